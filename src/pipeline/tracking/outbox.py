"""What a run could not send to its tracking server, kept in the run folder until it can.

When the server stops answering (restarted, a network blip), a run goes on: each params, tags or
metrics batch, artifact and the final status is appended to `tracking_outbox.jsonl` in the run
folder (one JSON line each, flushed and fsynced, so a kill loses nothing that was kept), and the
run retries every RETRY_S seconds, sending what was kept in order before anything new. What is
still kept at the end is sent by `python -m pipeline.sync <run dir>` or by the next run's start
on this host. Each line is marked sent once the server took it; a batch sent twice (a kill
between the two) is harmless, as MLflow's stores keep one row per identical metric.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.files import file_lock

log = logging.getLogger(__name__)

OUTBOX_FILE = "tracking_outbox.jsonl"
RETRY_S = 5.0  # seconds between two tries to reach a server that stopped answering
PROBE_TIMEOUT_S = 2.0  # a host that drops packets instead of refusing them
DATASET_TRIES = 5

# MLflow's REST client: a server that is down, restarting or overloaded, after its own retries.
_UNREACHABLE = re.compile(
    r"API request to .* failed with (exception|timeout exception|error code 5\d\d)", re.S
)


def unreachable(error: BaseException) -> bool:
    """The server did not answer (as opposed to answering no, which is a real error)."""
    import requests

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    return bool(_UNREACHABLE.search(str(error)))


def send(client, run_id: str, op: dict[str, Any]) -> str | None:
    """Carry out one kept operation with an MlflowClient; a model's returns its model id."""
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "batch":
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, t, s) for k, v, t, s in op.get("metrics", [])],
            params=[Param(k, v) for k, v in op.get("params", [])],
            tags=[RunTag(k, v) for k, v in op.get("tags", [])],
        )
    elif kind == "artifact":
        path = Path(op["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), op.get("artifact_path"))
        elif path.exists():
            client.log_artifact(run_id, str(path), op.get("artifact_path"))
    elif kind == "dataset":
        from pipeline.tracking.dataset_input import dataset_input

        # Parallel jobs on one SQLite store create the same dataset row at the same moment:
        # the loser of that race finds the row on its next try.
        for attempt in range(DATASET_TRIES):
            try:
                client.log_inputs(run_id, datasets=[dataset_input(op["dataset"])])
                break
            except Exception as error:
                if "UNIQUE constraint failed" not in str(error) or attempt == DATASET_TRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
    elif kind == "model":
        from pipeline.tracking.logged_model import send_model

        return send_model(client, run_id, op)
    elif kind == "terminate":
        client.set_terminated(run_id, op["status"], op["end_time"])
    else:
        raise ValueError(f"unknown outbox operation {kind!r}")
    return None


class Outbox:
    """The kept operations of one run, in the file `path` (created on first use)."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = header  # uri, run_id, process host and pid: what sync needs
        self._lock = threading.RLock()

    def add(self, op: dict[str, Any]) -> None:
        with self._lock:
            lines = [] if self.path.exists() else [{"header": self.header}]
            _append(self.path, [*lines, op])

    def pending(self) -> list[tuple[int, dict[str, Any]]]:
        """(line number, operation) of what was kept and not yet marked sent, in order."""
        return pending(self.path)

    def flush(self, client, run_id: str) -> int:
        """Send what was kept, in order, marking each sent; stops (raising) at the first
        failure. Returns how many were sent; the file is removed once all are."""
        with self._lock:
            return flush(self.path, client, run_id)


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, default=str) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def _records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill: its call never returned
            continue


def header(path: Path) -> dict[str, Any] | None:
    first = next(_records(path), None)
    return None if first is None else first.get("header")


def pending(path: Path) -> list[tuple[int, dict[str, Any]]]:
    ops, sent = [], set()
    for number, record in enumerate(_records(path)):
        if "sent" in record:
            sent.add(record["sent"])
        elif "op" in record:
            ops.append((number, record))
    return [(number, op) for number, op in ops if number not in sent]


def flush(path: Path, client, run_id: str) -> int:
    done = 0
    for number, op in pending(path):
        send(client, run_id, op)
        _append(path, [{"sent": number}])
        done += 1
    if path.exists() and not pending(path):
        path.unlink()
    return done


def sync_folder(run_dir: Path, uri: str | None = None) -> str:
    """Send the outbox of one run folder; returns the line to print. Another process that
    holds the same folder's lock (a concurrent sync) is waited for."""
    from mlflow import MlflowClient

    path = Path(run_dir) / OUTBOX_FILE
    if not path.exists():
        return f"sync: nothing kept in {run_dir}"
    head = header(path) or {}
    target = uri or head.get("uri")
    with file_lock(path):
        count = len(pending(path))
        if count == 0:
            path.unlink(missing_ok=True)
            return f"sync: nothing kept in {run_dir}"
        sent = None  # nothing listens: said at once, not after the client's retries
        if listening(target):
            try:
                sent = flush(path, MlflowClient(target), head["run_id"])
            except Exception as error:
                if not unreachable(error):
                    raise
        if sent is None:
            left = len(pending(path))
            return (
                f"sync: {target} is still not answering; {left} of {count} kept operations of "
                f"run {head['run_id']} wait in {path}"
            )
    return f"sync: sent the {sent} kept operations of run {head['run_id']} to {target}"


def kept_elsewhere(output_root: Path, uri: str) -> list[Path]:
    """Run folders under `output_root` whose outbox, for this tracking URI, belongs to a
    process that is gone: what a new run's start sends."""
    import socket

    from pipeline.tracking.environment import alive

    found = []
    host = socket.gethostname()
    for folder in ("runs", "sweeps"):
        for path in (Path(output_root) / folder).glob(f"**/{OUTBOX_FILE}"):
            head = header(path) or {}
            process = head.get("process", {})
            if head.get("uri") != uri or process.get("process.host") != host or alive(process):
                continue
            found.append(path.parent)
    return sorted(found)


def wait_before_retry(last_failure: float | None) -> bool:
    """True while the last failure is more recent than RETRY_S."""
    return last_failure is not None and time.monotonic() - last_failure < RETRY_S


def listening(uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether anything accepts a connection at the server's host and port: one try, no
    retries. A retry while the server is down costs the run this instead of MLflow's own
    retries and back-off (seconds, with the tracker's lock held, so training waits)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return True  # not a server this can probe: the client's own call decides
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
