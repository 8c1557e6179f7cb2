"""Fine-tuning throughput (images per second) with 1 and 2 processes (trainer=ddp's gloo path on
the CPU), and in bf16-mixed against fp32 on one process: the pipeline's own training step
(pipeline.training.loop.train_steps) on digits' MobileNetV2, the global batch the same in every
row. On a 2-core CPU this shows that data-parallel training runs and what it costs, not a
speed-up: two processes share the two cores one process would use.

    .venv/bin/python benchmarks/ddp_throughput.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

GLOBAL_BATCH = 64
EPOCHS = 3  # the first is warm-up, not timed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_main(rank: int, size: int, port: int, threads: int, precision: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.data.datasets import digits, make_loaders
    from pipeline.models.zoo import mobilenet_v2
    from pipeline.training.distributed import World
    from pipeline.training.loop import set_epoch, train_steps

    torch.set_num_threads(threads)
    world = World(rank, size, rank)
    if size > 1:
        os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        dist.init_process_group("gloo", rank=rank, world_size=size)
    splits = digits(10, 32, 0.1, 0.2, seed=0)
    loaders = make_loaders(splits, GLOBAL_BATCH, 0, world=world)
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10)
    trained = DistributedDataParallel(model) if size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seconds, images = 0.0, 0
    for epoch in range(1, EPOCHS + 1):
        set_epoch(loaders.train, epoch)
        if size > 1:
            dist.barrier()
        start = time.perf_counter()
        train_steps(
            trained,
            loaders.train,
            torch.nn.CrossEntropyLoss(),
            optimizer,
            torch.device("cpu"),
            precision=precision,
            world=world,
        )
        if epoch > 1:
            seconds += time.perf_counter() - start
            images += sum(len(labels) for _, labels in loaders.train) * size
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "images": images}))
    if size > 1:
        dist.destroy_process_group()


def measure(size: int, threads: int, precision: str) -> float:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.json")
        args = (size, free_port(), threads, precision, out)
        if size == 1:
            rank_main(0, *args)
        else:
            mp.spawn(rank_main, args=args, nprocs=size, join=True)
        result = json.loads(Path(out).read_text())
    return result["images"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    cores = os.cpu_count() or 1
    rows = [
        ("1 process, fp32", 1, cores, "32"),
        (
            f"2 processes (gloo), fp32, {max(cores // 2, 1)} thread(s) each",
            2,
            max(cores // 2, 1),
            "32",
        ),
        ("1 process, bf16-mixed", 1, cores, "bf16-mixed"),
    ]
    measured = [
        (label, measure(size, threads, precision)) for label, size, threads, precision in rows
    ]
    base = measured[0][1]
    print(
        f"fine-tuning throughput, MobileNetV2 on digits 32x32, global batch {GLOBAL_BATCH}, "
        f"{EPOCHS - 1} timed epochs, {cores} CPU cores"
    )
    print(f"{'setup':<48} {'images/s':>10} {'vs 1 process fp32':>18}")
    for label, rate in measured:
        print(f"{label:<48} {rate:>10.1f} {rate / base:>18.2f}")


if __name__ == "__main__":
    main()
