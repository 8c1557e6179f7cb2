"""Command line: `python -m pipeline [overrides]`; see conf/config.yaml."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.errors import ConfigError, PipelineError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from pipeline.run import run

    try:
        record = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return record["pruned"]["accuracy"]


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
