"""The one place that talks to MLflow about runs: params, tags, metrics, artifacts, the lookup of
an earlier finished run, and closing runs whose process is gone.

A run is tracked from before validation to the end, so bad input and crashes leave a FAILED run
(with the error as a tag) and Ctrl-C a KILLED one; a run never stays RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import one_line
from pipeline.measure.resources import Sample
from pipeline.tracking.environment import alive, environment_tags, process_tags
from pipeline.tracking.outbox import (
    OUTBOX_FILE,
    Outbox,
    kept_elsewhere,
    listening,
    send,
    sync_folder,
    unreachable,
    wait_before_retry,
)
from pipeline.tracking.store import is_local, tracking_uri
from pipeline.tracking.tracker import NullTracker, Tracker

if TYPE_CHECKING:
    from pipeline.tracking.logged_model import ModelToLog

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "PIPELINE_MLFLOW_PARENT_RUN_ID"

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def experiment_id(client, name: str, output_root: str | Path) -> str:
    """Get or create the experiment; local stores keep artifacts beside the database."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if is_local(client.tracking_uri):
        location = (Path(output_root).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created by a concurrent job in the meantime
        return client.get_experiment_by_name(name).experiment_id


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"pruner.mode": "dependency_aware", ...}; lists become JSON."""
    if isinstance(tree, dict):
        flat: dict[str, str] = {}
        for key, value in tree.items():
            flat |= flatten(value, f"{prefix}{key}.")
        return flat
    value = json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)
    return {prefix.rstrip("."): value[:MAX_PARAM_LENGTH]}


def _resolved_or_raw(cfg: DictConfig) -> dict:
    """The resolved config; a config that cannot be resolved (the run is about to fail on it)
    is logged as written, so the FAILED run still shows what was asked for."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)


def close_dead_runs(client, experiment: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (killed with SIGKILL, out
    of memory, machine reset), as a scheduler would; returns their ids. Runs of other hosts are
    left alone: their processes cannot be seen from here."""
    host = socket.gethostname()
    stale = client.search_runs(
        [experiment],
        filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'",
        max_results=1000,
    )
    closed = []
    for run in stale:
        if alive(run.data.tags):
            continue
        client.set_tag(run.info.run_id, "error", "process gone: ended by a later run's start-up")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("marked %d run(s) of dead processes KILLED: %s", len(closed), ", ".join(closed))
    return closed


IDENTITY_TAG = "config_identity"


def quiet_mlflow() -> None:
    """MLflow sets its loggers to INFO when first imported: its INFO lines (database tables
    created, system metrics started and stopped) would surround the lines that matter on the
    console. Its warnings still show."""
    import mlflow  # noqa: F401  (first: the import is what sets the level)

    logging.getLogger("mlflow").setLevel(logging.WARNING)


UI_PORT = 5000  # where `mlflow ui` serves unless told otherwise


def ui_line(
    uri: str, experiment: str, run_id: str | None = None, model_id: str | None = None
) -> str:
    """Where a person opens the experiment in MLflow's runs view (MLflow 3 otherwise opens on
    its GenAI overview) and, with `run_id`, the run's own page (and its model's, with
    `model_id`). For a local store, the command that serves it first."""
    view = f"#/experiments/{experiment}?workflowType=machine_learning"
    page = f"#/experiments/{experiment}/runs/{run_id}" if run_id else None
    if is_local(uri):
        base = f"http://127.0.0.1:{UI_PORT}"
        start = f"mlflow ui --backend-store-uri {uri}, then "
    else:
        base, start = uri.rstrip("/"), ""
    line = f"MLflow: {start}{base}/{view}"
    if page is None:
        return line
    model = ""
    if model_id:
        model = f"; model models:/{model_id}: {model_address(uri, experiment, model_id)}"
    return f"{line} (this run: {base}/{page}{model})"


def model_address(uri: str, experiment: str, model_id: str) -> str:
    """A LoggedModel's page in the UI (the Models tab's row), served as ui_line says."""
    base = f"http://127.0.0.1:{UI_PORT}" if is_local(uri) else uri.rstrip("/")
    return f"{base}/#/experiments/{experiment}/models/{model_id}?workflowType=machine_learning"


def run_address(uri: str, experiment: str, run_id: str, model_id: str | None = None) -> str:
    """The run's page, and its model's (after the command that serves a local store)."""
    return ui_line(uri, experiment, run_id, model_id).removeprefix("MLflow: ")


def finished_run_record(tracking: Any, output_root: str | Path, identity: str):
    """(measurements record, run id, run address) of the latest FINISHED run whose settings had
    this identity (pipeline.config.identity.config_identity), or None: how a re-run sweep skips
    the jobs already done."""
    import tempfile

    from mlflow import MlflowClient

    quiet_mlflow()

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one file: no bar

    uri = tracking_uri(tracking.uri, output_root)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{IDENTITY_TAG} = '{identity}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        return None
    run_id = found[0].info.run_id
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "measurements.json", folder)
            record = json.loads(Path(path).read_text())
        except Exception:  # artifacts deleted or unreachable: run the job again
            return None
    from pipeline.tracking.logged_model import run_model_id

    model_id = None
    with contextlib.suppress(Exception):  # a store without LoggedModels (MLflow 2's)
        model_id = run_model_id(client, run_id)
    return record, run_id, run_address(uri, experiment.experiment_id, run_id, model_id)


class MlflowTracker:
    """One MLflow run: started before the config is checked, so that bad input and crashes
    leave a FAILED run; ended FINISHED, FAILED or KILLED by tracked_run. With a tracking
    server, what cannot reach it goes to the run folder's outbox (pipeline.tracking.outbox) and
    the run goes on."""

    def __init__(self, settings: Mapping[str, Any], output_root: str | Path) -> None:
        self.settings = dict(settings)
        self.output_root = Path(output_root)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri: str | None = None
        self.closing_line: str | None = None  # where to open the run, once it has ended
        self._client = None
        self._params: dict[str, str] = {}
        self._dataset: dict[str, str] = {}  # name and digest, for the model's linked metrics
        self.model_ids: dict[str, str] = {}  # LoggedModel name -> id, once sent
        self.finished_run_id: str | None = None
        self._sample_step = 0
        self._log_file: Path | None = None
        self._outbox: Outbox | None = None
        self._failed_at: float | None = None
        self._lock = threading.RLock()  # the resource sampler logs from its own thread

    def start(self, params: dict[str, str], run_name: str | None, log_file: Path | None) -> None:
        import mlflow
        from mlflow import MlflowClient

        quiet_mlflow()

        self._log_file = log_file
        uri = tracking_uri(self.settings.get("uri"), self.output_root)
        self.uri = uri
        remote = not is_local(uri)
        if remote:
            # MLflow retries a request 7 times with a doubling back-off (minutes of waiting per
            # call while a server is down); the outbox keeps the data instead, and retries.
            limit_http_retries()
        mlflow.set_tracking_uri(uri)
        self._client = MlflowClient(uri)
        exp_id = experiment_id(self._client, self.settings["experiment"], self.output_root)
        self.experiment_id = exp_id
        if remote:  # first: a run whose status waits in an outbox is not a dead one
            send_kept_elsewhere(self.output_root, uri)
        close_dead_runs(self._client, exp_id)
        tags = environment_tags() | process_tags()
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
            tags["mlflow.parentRunId"] = parent
        system_metrics = bool(self.settings.get("system_metrics", True))
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(self.settings["sample_interval_s"])
            mlflow.set_system_metrics_samples_before_logging(1)
        run = mlflow.start_run(
            experiment_id=exp_id, run_name=run_name, tags=tags, log_system_metrics=system_metrics
        )
        self.run_id = run.info.run_id
        if remote and log_file is not None:
            self._outbox = Outbox(
                Path(log_file).parent / OUTBOX_FILE,
                {"uri": uri, "run_id": self.run_id, "process": process_tags()},
            )
        self.log_params(params)

    def finish(self, status: str = "FINISHED", error: BaseException | None = None) -> None:
        if self.run_id is None:
            return
        import mlflow
        from mlflow.tracking import fluent

        if error is not None:
            self._do({"op": "batch", "tags": [["error", one_line(error)]]})
        if self._log_file is not None:
            with contextlib.suppress(Exception):  # a missing log must not hide the run's status
                self.log_artifact(self._log_file)
        self._do({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
        # MLflow's own end of the run: its system-metrics thread stops, its active run is
        # cleared. Its request for the status repeats ours, and may fail while the server is
        # down: the outbox holds the status then.
        monitors = getattr(fluent, "run_id_to_system_metrics_monitor", {})
        monitor = monitors.pop(self.run_id, None)
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)
        self._last_try()
        self.closing_line = ui_line(
            self.uri, self.experiment_id, self.run_id, self.model_ids.get("pruned")
        )
        self.finished_run_id, self.run_id = self.run_id, None

    def _last_try(self) -> None:
        """One more try to send what was kept; else one line saying where it waits."""
        if self._outbox is None or not self._outbox.path.exists():
            return
        self._failed_at = None
        with contextlib.suppress(Exception):
            self._flush_kept()
        left = len(self._outbox.pending())
        if left:
            folder = self._outbox.path.parent
            print(
                f"tracking: {self.uri} did not answer; {left} operations of run {self.run_id} "
                f"are kept in {self._outbox.path}: python -m pipeline.sync {folder} sends them "
                f"(so does the next run's start on this host)",
                file=sys.stderr,
                flush=True,
            )

    def _still_down(self) -> bool:
        """Before a retry: whether nothing listens at the server's port, which counts as a
        failure (restarting the RETRY_S wait) without the client's retries and back-off."""
        if self._failed_at is None or listening(self.uri):
            return False
        self._failed_at = time.monotonic()
        return True

    def _flush_kept(self) -> None:
        sent = self._outbox.flush(self._client, self.run_id)
        log.warning(
            "tracking: %s answers again; sent the %d operations kept meanwhile", self.uri, sent
        )

    def _do(self, op: dict[str, Any]) -> Any:
        """Send one operation now (returning what send returns); while the server does not
        answer, keep it (after whatever was kept before it, so the server gets everything in
        order) and return None."""
        with self._lock:
            outbox = self._outbox
            if outbox is not None and outbox.path.exists():
                if wait_before_retry(self._failed_at) or self._still_down():
                    outbox.add(op)
                    return None
                try:
                    self._flush_kept()
                except Exception as error:
                    if not unreachable(error):
                        raise
                    self._failed_at = time.monotonic()
                    outbox.add(op)
                    return None
            try:
                return send(self._client, self.run_id, op)
            except Exception as error:
                if outbox is None or not unreachable(error):
                    raise
                self._failed_at = time.monotonic()
                outbox.add(op)
                log.warning(
                    "tracking: %s is not answering; the run goes on and keeps what it logs in %s "
                    "until it does",
                    self.uri,
                    outbox.path,
                )
                return None

    def log_params(self, params: dict[str, str]) -> None:
        self._params |= params
        items = [[k, v] for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self._do({"op": "batch", "params": items[start : start + 100]})

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._do({"op": "batch", "tags": [[k, str(v)] for k, v in tags.items()]})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [
            [key, float(value), now, step or 0]
            for key, value in metrics.items()
            if value is not None
        ]
        for start in range(0, len(batch), 1000):
            self._do({"op": "batch", "metrics": batch[start : start + 1000]})

    def log_dataset(self, dataset: dict[str, Any]) -> None:
        self._dataset = {"name": dataset["name"], "digest": dataset["digest"]}
        self._do({"op": "dataset", "dataset": dataset})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not Path(path).exists():
            return
        self._do(
            {"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path}
        )

    def log_model(self, model: ModelToLog, run_dir: Path) -> dict[str, dict[str, str]]:
        """Write the MLflow model(s) of `model` in the run folder, then send each as a
        LoggedModel with its metrics linked; the pyfunc one is registered under
        tracking.register_as (in a sweep with tracking.register=best, the sweep's end registers
        its best job instead). Returns, per model sent, its id, URI and UI address (a model
        kept in the outbox has none yet)."""
        from pipeline.tracking.logged_model import LOADER_MODULE, save_models

        sent = {}
        register_as = self.settings.get("register_as")
        in_sweep = bool(os.environ.get(PARENT_RUN_ENV))
        if self.settings.get("register") == "best":
            if in_sweep:
                register_as = None
            elif register_as:
                log.warning(
                    "tracking.register=best: a single run is registered as with register=each; "
                    "a sweep moves the %r alias to its best job",
                    "champion",
                )
        for name, folder in save_models(model, run_dir):
            onnx = name.endswith("_onnx")
            op = {
                "op": "model",
                "path": str(Path(folder).resolve()),
                "name": name,
                "model_type": "onnx" if onnx else "pyfunc",
                "loader": "mlflow.onnx" if onnx else LOADER_MODULE,
                "metrics": model.metrics,
                "params": self._params,
                "dataset": self._dataset,
                "register_as": register_as if name == "pruned" else None,
                "time": time.time(),
            }
            model_id = self._do(op)
            if model_id is not None:
                self.model_ids[name] = model_id
                sent[name] = {
                    "model_id": model_id,
                    "uri": f"models:/{model_id}",
                    "address": model_address(self.uri, self.experiment_id, model_id),
                }
        return sent

    def log_sample(self, sample: Sample) -> None:
        stamp = int(sample.time * 1000)
        step = self._sample_step
        self._sample_step += 1
        # NVML readings feed the stage summaries only: MLflow's system metrics chart them already.
        metrics = [
            [f"resource.{key}", value, stamp, step]
            for key, value in sample.values.items()
            if not key.startswith("gpu")
        ]
        with contextlib.suppress(Exception):  # a lost sample must never stop a run
            if self._outbox is not None:  # a server: kept while it does not answer
                self._do({"op": "batch", "metrics": metrics})
                return
            from mlflow.entities import Metric

            batch = [Metric(*values) for values in metrics]
            self._client.log_batch(self.run_id, metrics=batch, synchronous=False)


# Per request: 2 retries, 1 s then 2 s apart, 20 s to answer (the user's own settings win).
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def limit_http_retries() -> None:
    """HTTP_RETRIES for MLflow's REST client, where the user's environment does not set them."""
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)


def send_kept_elsewhere(output_root: Path, uri: str) -> None:
    """Send the outboxes that ended runs of this host left for this server: one line each."""
    for folder in kept_elsewhere(output_root, uri):
        try:
            line = sync_folder(folder, uri)
        except Exception as error:  # a broken outbox must not stop the new run
            line = f"sync: {folder}: {one_line(error)}"
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def tracked_run(
    cfg: DictConfig, run_name: str | None = None, log_file: Path | None = None
) -> Iterator[Tracker]:
    """A tracker for `cfg` (MLflow unless tracking.enabled is false) whose run ends FINISHED,
    FAILED (with the error as a tag) or KILLED; the params are the resolved config."""
    tracking = cfg.get("tracking") or {}
    if not tracking.get("enabled", False):
        yield NullTracker()
        return
    tracker = MlflowTracker(tracking, cfg.paths.output_root)
    params = flatten(_resolved_or_raw(cfg))
    # The engine follows from the pruner's class (pipeline.pruning.engine): one column to
    # compare engines by in the runs table.
    params["pruner.engine"] = params.get("pruner._target_", "?").split(".", 1)[0]
    tracker.start(params, run_name, log_file)
    try:
        yield tracker
    except KeyboardInterrupt as error:
        tracker.finish("KILLED", error)
        raise
    except BaseException as error:
        tracker.finish("FAILED", error)
        raise
    else:
        tracker.finish("FINISHED")
