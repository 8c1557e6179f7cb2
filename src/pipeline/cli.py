"""The command line: check every job's config first (one line and exit 2 on bad input, with a
FAILED MLflow run), then let Hydra run the job or the sweep.

    python -m pipeline [overrides]           python -m pipeline -m sparsity=0.05,0.15
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.checks.preflight import check_inputs, check_tracking_server
from pipeline.checks.settings import settings_from
from pipeline.checks.sweep_plan import check_command_line
from pipeline.config.budget_pruner import budget_pruner_override
from pipeline.config.compose import SEARCH_PATH, compose
from pipeline.config.identity import config_identity
from pipeline.config.schema import BUDGET_KINDS
from pipeline.errors import ConfigError, PipelineError, one_line
from pipeline.files import write_json
from pipeline.sweeps.objectives import FAILED, objective
from pipeline.sweeps.outcomes import RECORD_FILE, write_job_outcome
from pipeline.sweeps.resume import finished_before
from pipeline.tracking.store import tracking_store
from pipeline.training.distributed import (
    SINGLE,
    RankError,
    barrier,
    broadcast_json,
    launched_world,
    start,
    stop,
)
from pipeline.training.ranks import peer_failure, record_rank_error, share_run_dir


@hydra.main(version_base="1.3", config_path=SEARCH_PATH, config_name="config")
def job(cfg: DictConfig) -> float | list[float] | None:
    """One run; returns what a Hydra sweeper optimises (pipeline.sweeps.objectives: the pruned
    accuracy unless search.objective says otherwise), None for a failed job of a sweep."""
    # Imported here: a rejected command line exits before paying for torch and MLflow.
    from pipeline.run import resolve_device, run
    from pipeline.tracking.mlflow_tracker import IDENTITY_TAG, tracked_run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log_file = run_dir / f"{hydra_cfg.job.name}.log"
    budget = cfg.get("budget") or {}
    budgets = [f"budget.{kind}={budget[kind]}" for kind in BUDGET_KINDS if budget.get(kind)]
    target = budgets[0] if budgets else f"sparsity={cfg.get('sparsity')}"
    run_name = f"{hydra_cfg.runtime.choices.get('pruner')} {target}"
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    # Built once: the resume lookup, the checks and the run all read these settings. Settings
    # that do not check fail inside the tracked run, so that they leave a FAILED run.
    try:
        settings, invalid = settings_from(cfg), None
    except ConfigError as error:
        settings, invalid = None, error
    identity = None if settings is None else config_identity(settings)
    world = SINGLE
    if settings is not None:  # trainer=ddp: join the other ranks (checked before: torchrun)
        world, _ = start(settings.trainer, resolve_device(settings.device.value))
    earlier = None
    if settings is not None and not settings.force and world.main:
        earlier = finished_before(settings, identity)
    if not world.main:  # rank 0 decides, so that every rank skips or none does
        if broadcast_json(None, world):
            return None
        return _other_rank(settings, run_dir, world)
    if world.distributed:
        broadcast_json(earlier is not None, world)
        share_run_dir(run_dir, world)
    if earlier is not None:
        what = " ".join(hydra_cfg.overrides.task) or "this run"
        print(earlier_summary(earlier))
        print(f"skipped: {what} finished before ({earlier.where}); force=true runs it again")
        write_json(earlier.record, run_dir / RECORD_FILE)  # for the sweep's summary and report
        write_job_outcome(run_dir, "skipped", earlier=earlier.where)
        return objective(earlier.record, settings)
    try:
        with tracked_run(cfg, run_name, log_file) as tracker:
            tracker.set_tags(
                {f"choice.{group}": str(choice) for group, choice in _choices(hydra_cfg).items()}
            )
            if invalid is not None:
                raise invalid
            check_inputs(settings)  # again: a sweeper's sampled values were not pre-checked
            tracker.set_tags({IDENTITY_TAG: identity})
            if world.distributed:
                tracker.set_tags({"trainer.world_size": str(world.size)})
            try:
                record = run(settings, run_dir, tracker, world)
            except BaseException as error:
                # Another rank's end (an error, a kill) reaches rank 0 as a broken collective
                # or as torchrun's SIGTERM: the job fails, naming that rank and its cause.
                if world.distributed:  # torchrun's SIGTERM must not cut the search short
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                failure = peer_failure(world, run_dir)
                if failure is None:
                    raise
                raise RankError(failure) from error
            barrier(world)  # the others wait for rank 0's files
            stop(world)
    except Exception as error:
        expected = isinstance(error, PipelineError)
        line = str(error) if expected else one_line(error)
        if not expected:
            _traceback_to_log_file(error)
        print(f"error: {line}", file=sys.stderr)
        if sweeping:  # the job fails alone (a FAILED run); the other jobs of the sweep run
            write_job_outcome(run_dir, "failed", error=line)
            return FAILED
        if expected:
            sys.exit(2)
        raise
    # The MLflow run's id: how a sweep's end finds the best job's model to register.
    write_job_outcome(run_dir, "finished", run_id=getattr(tracker, "finished_run_id", None))
    if getattr(tracker, "closing_line", None):
        print(tracker.closing_line)
    return objective(record, settings)


def _other_rank(settings, run_dir: Path, world) -> None:
    """A rank other than 0: trains with the others, writes nothing (rank 0 writes the run);
    its error, if any, is left in rank 0's run folder for rank 0 to name, and said in one
    line."""
    from pipeline.run import run

    logging.getLogger().setLevel(logging.ERROR)  # rank 0 says what happens, once
    shared = share_run_dir(run_dir, world)
    try:
        run(settings, shared, None, world)
        barrier(world)
    except Exception as error:
        line = str(error) if isinstance(error, PipelineError) else one_line(error)
        record_rank_error(shared, world, line)
        print(f"error: rank {world.rank}: {line}", file=sys.stderr, flush=True)
        sys.exit(2)
    stop(world)
    return None


def earlier_summary(earlier) -> str:
    """What the earlier run found: its summary table and where its MLflow run is."""
    from pipeline.report import summary_table

    try:
        text = summary_table(earlier.record)
    except (KeyError, TypeError, ValueError) as error:  # a record of an older layout
        text = f"(its summary cannot be shown: {one_line(error)})"
    if earlier.address:
        text += f"\nMLflow: {earlier.address}"
    return text


def _traceback_to_log_file(error: BaseException) -> None:
    """An unexpected error of a sweep job: its traceback goes to the job's log file only, the
    console gets one line."""
    text = "".join(traceback.format_exception(error))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.stream.write(text)
            handler.flush()


def _choices(hydra_cfg) -> dict[str, str]:
    """The config group choices of this job (pruner=apoz, dataset=digits, ...), Hydra's own
    groups left out."""
    return {
        group: choice
        for group, choice in hydra_cfg.runtime.choices.items()
        if not group.startswith("hydra") and choice is not None
    }


def record_rejected_run(args: list[str], error: ConfigError) -> None:
    """Leave a FAILED MLflow run for a command line rejected before any job ran, in the store
    its other overrides (tracking.uri, paths.output_root, ...) point at, when that store is
    enabled and reachable."""
    usable = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg or arg.startswith("hydra") or "," in arg:
            continue
        with contextlib.suppress(ConfigError):
            settings_from(compose([*usable, arg]))
            usable.append(arg)
    try:
        cfg = compose(usable)
        settings = settings_from(cfg)
        if not settings.tracking.enabled:
            return
        key, uri = tracking_store(settings)
        check_tracking_server(uri, key)
        from pipeline.tracking.mlflow_tracker import tracked_run

        with contextlib.suppress(ConfigError), tracked_run(cfg, run_name="rejected"):
            raise error
    except Exception:  # best effort: the one-line error, printed before, is what matters
        pass


def _terminate(signum, frame):
    # SIGTERM (a scheduler stopping us) ends the MLflow run as KILLED, like Ctrl-C.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    chosen = budget_pruner_override(sys.argv[1:])
    if chosen is not None:
        sys.argv.append(chosen)
    args = sys.argv[1:]
    if not any(arg in ("--help", "-h", "--hydra-help", "--info", "-i") for arg in args):
        try:
            doomed = check_command_line(args)
        except ConfigError as error:
            if launched_world().main:  # one line and one FAILED run for the job, not per rank
                print(f"error: {error}", file=sys.stderr, flush=True)
                record_rejected_run(args, error)
            sys.exit(2)
        for error in doomed:
            print(f"warning: a job of this sweep will fail: {error}", file=sys.stderr, flush=True)
    if chosen is not None and launched_world().main:
        # After the check, so that a rejected command line still prints its one line only.
        print(
            f"note: a budget run without a pruner prunes with {chosen} (the default for "
            "budgets; pruner=mean_rank for NNI's)",
            file=sys.stderr,
            flush=True,
        )
    world = launched_world()
    if world.distributed and world.rank > 0:
        # Rank 0 keeps the run folder; another rank's Hydra folder and log go to a temporary
        # one (its one-line error goes to rank 0's folder and the console), and its console
        # shows warnings only.
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix=f"pipeline-rank{world.rank}-")
        atexit.register(shutil.rmtree, folder, True)
        sys.argv += [f"hydra.run.dir={folder}", "hydra.output_subdir=null"]
        logging.getLogger().setLevel(logging.WARNING)
    job()  # a sweep with a failed job exits 2 from its end callback (pipeline.sweep_end)
