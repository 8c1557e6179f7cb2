"""What a command line asks for, checked before Hydra runs anything: the jobs of a `-m` sweep
(one per swept value, the sweep presets' own params included), each composed and checked with
the data, checkpoints and tracking server it points at.
"""

from __future__ import annotations

from hydra.errors import HydraException
from omegaconf import OmegaConf

from pipeline.checks.preflight import check_inputs, check_tracking_server
from pipeline.checks.settings import settings_from
from pipeline.config.compose import compose
from pipeline.config.schema import budget_overrides
from pipeline.errors import ConfigError
from pipeline.tracking.store import tracking_store


def job_overrides(args: list[str]) -> list[list[str]]:
    """The override lists a command line stands for: one for a single run; for a `-m` sweep, the
    first job plus each other value of each swept key (enough to try every value once)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # Hydra's own parser tells the overrides from its flags (--cfg job, -m, ...); its settings
    # (launcher, sweeper, output dirs) are not part of a job's config.
    overrides = get_args_parser().parse_args(args).overrides
    wanted = [a for a in overrides if not a.lstrip("+~").startswith("hydra")]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(wanted)
        single = [a for a, o in zip(wanted, parsed, strict=True) if not o.is_sweep_override()]
        parsed += parser.parse_overrides(preset_sweep(single, wanted))
    except HydraException as error:
        raise ConfigError(str(error).strip().splitlines()[0]) from None
    # Sweeps that do not list their values (Optuna intervals) are left to the job's own check.
    parsed = [o for o in parsed if not o.is_sweep_override() or _listable(o)]
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            values = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            values = [f"{key}={override.get_value_element_as_str()}"]
        choices.append(values)
    first = [values[0] for values in choices]
    jobs = [first]
    for position, values in enumerate(choices):
        for value in values[1:]:
            jobs.append([*first[:position], value, *first[position + 1 :]])
    return jobs


def preset_sweep(single: list[str], given: list[str]) -> list[str]:
    """The `key=a,b` sweeps a preset (conf/sweep/) declares in hydra.sweeper.params, composed
    from the command line's `single` (not swept) overrides, for the keys it does not `given`."""
    params = OmegaConf.select(compose(single, with_hydra=True), "hydra.sweeper.params")
    given = {o.lstrip("+~").partition("=")[0] for o in given}
    return [f"{key}={value}" for key, value in (params or {}).items() if key not in given]


def _listable(override) -> bool:
    """Choice and range sweeps list their values; intervals (for Optuna) do not."""
    try:
        next(iter(override.sweep_string_iterator()), None)
    except Exception:
        return False
    return True


def check_command_line(args: list[str]) -> list[ConfigError]:
    """Compose and check every job the command line asks for, and what each points at (data,
    checkpoints, layers, tracking server).

    A single run, or a sweep none of whose jobs can run, raises the first ConfigError. A sweep
    whose other jobs can run gets back the errors of the failing ones: those fail alone, as
    FAILED runs, and the rest of the sweep goes on.
    """

    errors, servers = [], set()
    jobs = job_overrides(args)
    for overrides in jobs:
        check_budget_or_sparsity(overrides)
    for overrides in jobs:
        try:
            settings = settings_from(compose(overrides))
            check_inputs(settings)
        except ConfigError as error:
            errors.append(error)
            continue
        if settings.tracking.enabled:
            servers.add(tracking_store(settings))
    for key, uri in sorted(servers):
        check_tracking_server(uri, key)
    if len(errors) == len(jobs):
        raise errors[0]
    return errors


def check_budget_or_sparsity(overrides: list[str]) -> None:
    """A budget replaces the sparsity: a command line that names both is refused."""
    given = dict(override.lstrip("+").partition("=")[::2] for override in overrides)
    budgets = budget_overrides(given)
    if budgets and "sparsity" in given:
        raise ConfigError(
            f"{budgets[0]} replaces sparsity, and sparsity={given['sparsity']} is given too; "
            f"allowed: a budget or a sparsity, not both"
        )
