"""Command line: `python -m pipeline [overrides]`; see conf/config.yaml."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.errors import ConfigError, PipelineError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
failed_jobs: list[str] = []


def check_group_choices(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject `group=unknown` with one line, before Hydra prints its multi-line composition error.

    Files starting with "_" are shared fragments, not choices.
    """
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = conf_dir / key
        if not sep or "/" in key or not group.is_dir() or value == "null":
            continue
        if any(ch in value for ch in "()[]*"):  # sweep syntax: leave to Hydra
            continue
        allowed = sorted(p.stem for p in group.glob("*.yaml") if not p.stem.startswith("_"))
        for choice in value.split(","):
            if choice not in allowed:
                raise ConfigError(
                    f"{key}={choice!r} is not allowed; allowed values: {', '.join(allowed)}"
                )


def record_rejected_run(args: list[str], error: ConfigError) -> None:
    """Leave a FAILED MLflow run for an invocation rejected before Hydra composed its config."""
    import mlflow  # noqa: F401  (imported first: it sets up its loggers on import)
    from hydra import compose, initialize_config_dir

    from pipeline.tracking import tracked_run

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # keep the error the only line shown

    usable = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg or arg.startswith("hydra") or "," in arg:
            continue
        with contextlib.suppress(ConfigError):
            check_group_choices([arg])
            usable.append(arg)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=usable)
        with contextlib.suppress(ConfigError), tracked_run(cfg, run_name="rejected"):
            raise error
    except Exception:  # best effort: the one-line error below is what the user must see
        pass


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from pipeline.run import run
    from pipeline.tracking import tracked_run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log_file = run_dir / f"{hydra_cfg.job.name}.log"
    run_name = f"{cfg.pruner.get('type')} sparsity={cfg.get('sparsity')}"
    try:
        with tracked_run(cfg, run_name, log_file) as tracker:
            record = run(cfg, run_dir, tracker)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # let the other jobs of the sweep run
            failed_jobs.append(str(error))
            return math.nan
        sys.exit(2)
    return record["pruned"]["accuracy"]


def _terminate(signum, frame):
    # SIGTERM (a scheduler stopping us) ends the MLflow run as KILLED, like Ctrl-C.
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as error:
        record_rejected_run(sys.argv[1:], error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
    if failed_jobs:
        sys.exit(2)
