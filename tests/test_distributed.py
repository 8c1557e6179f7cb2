"""trainer=ddp: data-parallel training over gloo processes on the CPU (2 processes, 2 cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, run_cli

# --standalone: a free port of its own, so that two jobs on one machine do not meet
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_fit(rank: int, port: int, folder: str) -> None:
    """One rank of a 2-process gloo job: fit() a digits MobileNetV2 for 3 epochs, writing the
    parameter hash it holds after every epoch, and the exact validation accuracy."""
    import torch.distributed as dist

    from pipeline.checks.settings import settings_from
    from pipeline.config.compose import compose
    from pipeline.data.datasets import digits, make_loaders
    from pipeline.models.zoo import mobilenet_v2
    from pipeline.training.distributed import World, parameter_hash
    from pipeline.training.loop import evaluate, evaluate_across, fit

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = World(rank, 2, rank)
    settings = settings_from(compose(["finetune.epochs=3", "max_batches=3"])).finetune
    splits = digits(10, 32, 0.1, 0.2, seed=0)
    loaders = make_loaders(splits, 16, 0, max_batches=3, world=world)
    torch.manual_seed(rank)  # different starting weights: DDP must make them rank 0's
    model = mobilenet_v2(num_classes=10)
    hashes = []
    result = fit(
        model,
        loaders,
        torch.nn.CrossEntropyLoss(),
        settings,
        torch.device("cpu"),
        desc="finetune",
        on_epoch=lambda row: hashes.append(parameter_hash(model)),
        world=world,
    )
    criterion = torch.nn.CrossEntropyLoss()
    whole = make_loaders(splits, 16, 0).val
    shard = make_loaders(splits, 16, 0, world=world).val  # every second image, no cap
    shared = evaluate_across(model, shard, criterion, torch.device("cpu"), world)
    alone = evaluate(model, whole, criterion, torch.device("cpu"))
    record = {
        "hashes": hashes,
        "final": parameter_hash(result.model),
        "val": [shared.accuracy, shared.samples, alone.accuracy, alone.samples],
        "history_hashes": [row["parameter_hash"] for row in result.history],
    }
    Path(folder, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def test_two_gloo_ranks_hold_the_same_weights_after_every_epoch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_fit, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["hashes"]) == 3
    assert ranks[0]["hashes"] == ranks[1]["hashes"]  # every epoch, hashed on each rank alone
    assert ranks[0]["history_hashes"] == ranks[0]["hashes"]
    assert ranks[0]["final"] == ranks[1]["final"]
    assert len(set(ranks[0]["hashes"])) == 3  # the weights did change between epochs
    # Validation summed over the two shards is the accuracy over the whole split.
    for record in ranks:
        shared_accuracy, shared_samples, alone_accuracy, alone_samples = record["val"]
        assert shared_samples == alone_samples == 180  # the whole validation split
        assert shared_accuracy == pytest.approx(alone_accuracy, abs=1e-9)


def test_trainer_ddp_without_torchrun_is_refused_with_the_command(tmp_path):
    result = run_cli("trainer=ddp", "sparsity=0.3", f"paths.output_root={tmp_path}", cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: trainer=ddp runs one process per device, started by torchrun: torchrun "
        "--standalone --nproc-per-node=2 -m pipeline trainer=ddp sparsity=0.3 "
        f"paths.output_root={tmp_path}"
    )


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny):
    from pipeline.errors import ConfigError
    from pipeline.training.distributed import check_launch

    settings = tiny("trainer=ddp", "finetune.batch_size=15")
    os.environ |= {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    try:
        with pytest.raises(ConfigError, match=r"^finetune.batch_size=15 is the global batch"):
            check_launch(settings)
        with pytest.raises(ConfigError, match="torchrun started 2"):
            check_launch(tiny("trainer=ddp", "trainer.devices=3", "finetune.batch_size=15"))
    finally:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key)


def torchrun(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [*TORCHRUN, "-m", "pipeline", "trainer=ddp", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_torchrun_job_writes_one_run_from_rank_0(tmp_path):
    from mlflow import MlflowClient

    job = torchrun(*TINY, f"paths.output_root={tmp_path}", cwd=tmp_path)
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-3000:]
    assert "accuracy (top-1)" in out and out.count("accuracy (top-1)") == 1
    (record_file,) = tmp_path.glob("runs/*/*/measurements.json")  # one run folder
    record = json.loads(record_file.read_text())
    assert len([row["parameter_hash"] for row in record["finetune_history"]]) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["trainer.world_size"] == "2"
    assert not list(Path("/tmp").glob(f"pipeline-rank1-*/{tmp_path.name}"))


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=`rank`."""
    found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    for pid in found.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_killing_rank_1_mid_epoch_fails_the_job_naming_it_and_a_rerun_completes(tmp_path):
    from mlflow import MlflowClient

    args = [*TINY, "finetune.epochs=60", f"paths.output_root={tmp_path}"]
    job = torchrun(*args, cwd=tmp_path)
    lines = []
    deadline = time.monotonic() + 300
    for line in job.stdout:
        lines.append(line)
        if "finetune epoch 3/60" in line or time.monotonic() > deadline:
            break
    pid = _rank_pid(job.pid, 1)
    assert pid is not None, "".join(lines)[-2000:]
    os.kill(pid, signal.SIGKILL)
    out = "".join(lines) + job.communicate(timeout=300)[0]
    assert job.returncode != 0
    said = [line for line in out.splitlines() if line.startswith("error: ")]
    assert said == [
        f"error: rank 1 of 2 (pid {pid}) ended without a word: killed (SIGKILL, out of memory "
        "or a reset machine); the job stopped, and a re-run starts it again"
    ], out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pruning").experiment_id
    (failed,) = client.search_runs([experiment])
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"].startswith("RankError: rank 1 of 2 (pid ")
    assert not list(tmp_path.glob("runs/*/*/measurements.json"))  # nothing partial

    again = torchrun(*args, cwd=tmp_path)  # the same command
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    statuses = sorted(r.info.status for r in client.search_runs([experiment]))
    assert statuses == ["FAILED", "FINISHED"]


def test_the_gpu_series_follow_cuda_visible_devices_to_the_physical_gpu():
    from pipeline.measure.resources import nvml_device

    assert nvml_device(1, None) == 1
    assert nvml_device(0, "3,1") == 3 and nvml_device(1, "3, 1") == 1
    assert nvml_device(0, "GPU-5c1a2b3d-0000") == "GPU-5c1a2b3d-0000"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_gpu_trains_in_bf16_under_torchrun(tmp_path):
    count = torch.cuda.device_count()
    job = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={count}",
            "-m", "pipeline", "trainer=ddp", f"trainer.devices={count}", "device=cuda",
            "trainer.precision=bf16-mixed", *TINY, f"baseline.batch_size={16 * count}",
            f"finetune.batch_size={16 * count}", f"paths.output_root={tmp_path}",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    (record_file,) = tmp_path.glob("runs/*/*/measurements.json")
    record = json.loads(record_file.read_text())
    assert record["device"] == "cuda" and record["config"]["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.slow
def test_submitit_tasks_train_one_job_data_parallel(tmp_path):
    """The Slurm path as far as it runs here: Submitit's local executor starts the job's two
    tasks, and Submitit's helper gives them their rendezvous."""
    from mlflow import MlflowClient

    result = run_cli(
        "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "trainer=ddp",
        *TINY, "sparsity=0.15", f"paths.output_root={tmp_path}", cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (record_file,) = tmp_path.glob("sweeps/*/*/0/measurements.json")
    record = json.loads(record_file.read_text())
    assert all(row["parameter_hash"] for row in record["finetune_history"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    (job,) = [run for run in runs if run.data.tags.get("sweep") != "true"]
    assert job.info.status == "FINISHED" and job.data.tags["trainer.world_size"] == "2"


def test_the_throughput_table_gives_medians_ranges_and_per_round_ratios(monkeypatch):
    import importlib.util

    benchmarks = ROOT / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location("ddp_bench", benchmarks / "ddp_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = module.table({"one": [100.0, 50.0, 110.0], "two": [200.0, 60.0, 100.0]}).splitlines()
    assert lines[1].split()[:2] == ["one", "100.0"] and "1.00 (1.00-1.00)" in lines[1]
    # median 100 against 100; per round 2.00, 1.20 and 0.91: a round's load reaches both.
    assert lines[2].split()[1] == "100.0" and lines[2].endswith("1.00 (0.91-2.00)")
