"""The tracking outbox without a server: what a run logs while its server does not answer is
kept in order, sent in order once it answers, never twice, and survives a cut-off last line.
tests/test_tracking_outage.py does the same against a real `mlflow server` that is killed."""

from __future__ import annotations

import json

import pytest
from mlflow.exceptions import MlflowException

from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.outbox import OUTBOX_FILE, Outbox, pending, unreachable
from test_tracking import free_port

DOWN = "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception "
DOWN += "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded"


class FakeClient:
    """MlflowClient's calls the tracker makes, recorded; raising as a dead server would."""

    def __init__(self) -> None:
        self.down = False
        self.calls: list[tuple] = []
        self.tries = 0

    def _call(self, *record) -> None:
        self.tries += 1
        if self.down:
            raise MlflowException(DOWN)
        self.calls.append(record)

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._call(
            "batch",
            [(m.key, m.value, m.step) for m in metrics],
            [(p.key, p.value) for p in params],
            [(t.key, t.value) for t in tags],
        )

    def log_artifact(self, run_id, path, artifact_path=None):
        self._call("artifact", path)

    def set_terminated(self, run_id, status, end_time=None):
        self._call("terminate", status)


@pytest.fixture
def tracker(tmp_path):
    tracker = MlflowTracker({"experiment": "pruning"}, tmp_path)
    tracker._client, tracker.run_id, tracker.uri = FakeClient(), "run1", "http://127.0.0.1:5000"
    tracker._outbox = Outbox(tmp_path / OUTBOX_FILE, {"uri": tracker.uri, "run_id": "run1"})
    return tracker


def test_what_the_server_missed_is_kept_then_sent_in_order_once(tracker, tmp_path):
    client, outbox = tracker._client, tmp_path / OUTBOX_FILE
    tracker.log_metrics({"a": 1.0}, step=1)
    assert client.calls == [("batch", [("a", 1.0, 1)], [], [])] and not outbox.exists()

    client.down = True
    tracker.log_metrics({"a": 2.0}, step=2)
    tries = client.tries
    tracker.set_tags({"stage.finetune": "running"})
    (tmp_path / "curve.png").write_bytes(b"png")
    tracker.log_artifact(tmp_path / "curve.png")
    assert client.tries == tries, "within RETRY_S of a failure nothing is tried again"
    kept = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert kept[0] == {"header": {"uri": "http://127.0.0.1:5000", "run_id": "run1"}}
    assert [op["op"] for op in kept[1:]] == ["batch", "batch", "artifact"]

    client.down = False
    tracker._failed_at = None  # RETRY_S later
    tracker.log_metrics({"a": 3.0}, step=3)
    assert client.calls[1:] == [
        ("batch", [("a", 2.0, 2)], [], []),
        ("batch", [], [], [("stage.finetune", "running")]),
        ("artifact", str((tmp_path / "curve.png").resolve())),
        ("batch", [("a", 3.0, 3)], [], []),
    ]
    assert not outbox.exists(), "an outbox all sent is removed"


def test_a_retry_while_nothing_listens_costs_a_connect_not_the_clients_retries(tracker, tmp_path):
    """MLflow's client retries with back-off (seconds each time, training waiting on the lock);
    past RETRY_S the tracker first tries the port once and keeps the op if nothing is there."""
    import socket
    import time

    client = tracker._client
    port = free_port()  # nothing listens on it
    tracker.uri = f"http://127.0.0.1:{port}"
    client.down = True
    tracker.log_metrics({"a": 1.0}, step=1)
    tries = client.tries
    tracker._failed_at = time.monotonic() - 60  # RETRY_S later
    started = time.monotonic()
    tracker.log_metrics({"a": 2.0}, step=2)
    assert client.tries == tries, "a closed port is not worth the client's retries"
    assert time.monotonic() - started < 1.0
    assert [op["metrics"][0][1] for _, op in tracker._outbox.pending()] == [1.0, 2.0]

    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        client.down = False
        tracker._failed_at = time.monotonic() - 60
        tracker.log_metrics({"a": 3.0}, step=3)
    assert [call[1][0][1] for call in client.calls] == [1.0, 2.0, 3.0]
    assert not (tmp_path / OUTBOX_FILE).exists()


def test_a_failure_midway_through_sending_resumes_after_the_last_sent(tracker, tmp_path):
    client, outbox = tracker._client, tracker._outbox
    client.down = True
    for step in range(1, 4):
        tracker.log_metrics({"a": float(step)}, step=step)
    client.down = False
    real = client.log_batch
    sent = []

    def one_then_down(run_id, **kinds):
        if sent:
            raise MlflowException(DOWN)
        sent.append(1)
        real(run_id, **kinds)

    client.log_batch = one_then_down
    with pytest.raises(MlflowException):
        outbox.flush(client, "run1")
    assert [op["metrics"][0][1] for _, op in outbox.pending()] == [2.0, 3.0]
    client.log_batch = real
    assert outbox.flush(client, "run1") == 2
    assert [call[1][0][1] for call in client.calls] == [1.0, 2.0, 3.0]


def test_a_line_cut_short_by_a_kill_is_not_read(tmp_path):
    outbox = Outbox(tmp_path / OUTBOX_FILE, {"run_id": "run1"})
    outbox.add({"op": "batch", "tags": [["a", "1"]]})
    with open(outbox.path, "a") as handle:
        handle.write('{"op": "batch", "metr')
    assert [op["tags"] for _, op in pending(outbox.path)] == [[["a", "1"]]]


def test_a_server_that_answers_no_is_an_error_not_an_outage(tracker, tmp_path):
    def refuse(run_id, **kinds):
        raise MlflowException("INVALID_PARAMETER_VALUE: Param value too long")

    tracker._client.log_batch = refuse
    with pytest.raises(MlflowException, match="INVALID_PARAMETER_VALUE"):
        tracker.log_params({"a": "b"})
    assert not (tmp_path / OUTBOX_FILE).exists()


@pytest.mark.parametrize(
    ("message", "outage"),
    [
        (DOWN, True),
        ("API request to http://h/api failed with timeout exception Read timed out.", True),
        ("API request to endpoint /api/2.0/x failed with error code 503 != 200", True),
        ("API request to endpoint /api/2.0/x failed with error code 404 != 200", False),
        ("RESOURCE_DOES_NOT_EXIST: Run 'x' not found", False),
    ],
)
def test_which_errors_are_an_outage(message, outage):
    assert unreachable(MlflowException(message)) is outage


def test_a_new_run_finds_the_outboxes_that_ended_runs_of_this_host_left(tmp_path):
    import socket
    import subprocess
    import sys

    from pipeline.tracking.environment import process_tags
    from pipeline.tracking.outbox import kept_elsewhere

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {"process.host": socket.gethostname(), "process.pid": str(gone.pid)}
    dead["process.started"] = "0.00"
    uri = "http://127.0.0.1:5000"
    folders = {
        "ended": {"uri": uri, "process": dead},
        "running": {"uri": uri, "process": process_tags()},  # this very process
        "other_server": {"uri": "http://elsewhere:5000", "process": dead},
        "other_host": {"uri": uri, "process": {**dead, "process.host": "another-machine"}},
    }
    for name, head in folders.items():
        folder = tmp_path / "runs" / "2026-12-06" / name
        folder.mkdir(parents=True)
        Outbox(folder / OUTBOX_FILE, head | {"run_id": name}).add({"op": "batch", "tags": []})
    assert kept_elsewhere(tmp_path, uri) == [tmp_path / "runs" / "2026-12-06" / "ended"]


def test_a_dataset_row_created_by_a_parallel_job_meanwhile_is_found_on_the_next_try():
    from pipeline.tracking.outbox import send

    class Racing:
        calls = 0

        def log_inputs(self, run_id, datasets):
            Racing.calls += 1
            if Racing.calls == 1:
                raise RuntimeError(
                    "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                    "datasets.name, datasets.digest"
                )

    record = {
        "name": "digits", "digest": "abc", "source_type": "code",
        "source": {"tags": {}}, "profile": {"train": 1},
    }  # fmt: skip
    send(Racing(), "run", {"op": "dataset", "dataset": record})
    assert Racing.calls == 2


def test_sync_to_a_server_that_is_still_down_says_so_at_once(tmp_path, monkeypatch):
    """`python -m pipeline.sync` while nothing listens: the line at once, not after MLflow's
    retries and back-off (minutes by its defaults); everything stays kept."""
    import time

    import mlflow

    from pipeline.tracking.outbox import sync_folder

    def no_client(*args, **kwargs):
        raise AssertionError("a closed port needs no MLflow client")

    monkeypatch.setattr(mlflow, "MlflowClient", no_client)

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens on it
    outbox = Outbox(tmp_path / OUTBOX_FILE, {"uri": uri, "run_id": "run1"})
    outbox.add({"op": "batch", "tags": [["a", "1"]]})
    started = time.monotonic()
    line = sync_folder(tmp_path)
    assert time.monotonic() - started < 2.0
    assert line == (
        f"sync: {uri} is still not answering; 1 of 1 kept operations of run run1 wait in "
        f"{tmp_path / OUTBOX_FILE}"
    )
    assert len(pending(tmp_path / OUTBOX_FILE)) == 1
