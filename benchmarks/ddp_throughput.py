"""Fine-tuning throughput (images per second) with 1 and 2 processes (trainer=ddp's gloo path on
the CPU), and in bf16-mixed against fp32 on one process: the pipeline's own training step
(pipeline.training.loop.train_steps) on digits' MobileNetV2, the global batch the same in every
row. On a 2-core CPU this shows that data-parallel training runs and what it costs, not a
speed-up: two processes share the two cores one process would use.

With --device cuda: the reference MobileNetV2 (37 classes) on random 224x224 images, the global
batch --batch: one GPU in fp32 and in bf16-mixed, then every GPU of the machine (nccl, one
process each) in bf16-mixed; each row's ratio is against one GPU in fp32.

    .venv/bin/python benchmarks/ddp_throughput.py            # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/ddp_throughput.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

GLOBAL_BATCH = 64
EPOCHS = 3  # the first is warm-up, not timed
CUDA_IMAGES = 2048  # random 224x224 images per epoch on CUDA (1.2 GB per process)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_main(
    rank: int,
    size: int,
    port: int,
    threads: int,
    precision: str,
    out: str,
    device_type: str = "cpu",
    batch: int = GLOBAL_BATCH,
) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.models.zoo import mobilenet_v2
    from pipeline.training.distributed import World
    from pipeline.training.loop import set_epoch, train_steps

    torch.set_num_threads(threads)
    world = World(rank, size, rank)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1:
        os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=size)
    loaders = _loaders(device.type, batch, world)
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=37 if device.type == "cuda" else 10).to(device)
    trained = model
    if size > 1:
        ids = [rank] if device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seconds, images = 0.0, 0
    for epoch in range(1, EPOCHS + 1):
        set_epoch(loaders.train, epoch)
        if size > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train_steps(
            trained,
            loaders.train,
            torch.nn.CrossEntropyLoss(),
            optimizer,
            device,
            precision=precision,
            world=world,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if epoch > 1:
            seconds += time.perf_counter() - start
            images += sum(len(labels) for _, labels in loaders.train) * size
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "images": images}))
    if size > 1:
        dist.destroy_process_group()


def _loaders(device_type: str, batch: int, world):
    """Digits on the CPU; on CUDA random 224x224 images (throughput does not read them), the
    same DistributedSampler sharding either way."""
    from pipeline.data.datasets import DataSplits, digits, make_loaders

    if device_type == "cpu":
        return make_loaders(digits(10, 32, 0.1, 0.2, seed=0), batch, 0, world=world)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(CUDA_IMAGES, 3, 224, 224, generator=generator)
    labels = torch.randint(0, 37, (CUDA_IMAGES,), generator=generator)
    train = torch.utils.data.TensorDataset(images, labels)
    return make_loaders(DataSplits(train, train, train, 37, (3, 224, 224)), batch, 0, world=world)


def measure(
    size: int, threads: int, precision: str, device: str = "cpu", batch: int = GLOBAL_BATCH
) -> float:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.json")
        args = (size, free_port(), threads, precision, out, device, batch)
        if size == 1:
            rank_main(0, *args)
        else:
            mp.spawn(rank_main, args=args, nprocs=size, join=True)
        result = json.loads(Path(out).read_text())
    return result["images"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="global batch (cuda: 256)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="each setup is measured once per round, the setups interleaved, so that load "
        "which comes and goes reaches them alike; the median and the range are printed",
    )
    args = parser.parse_args()
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise SystemExit("--device cuda: no CUDA device here")
        batch = args.batch or 256
        setups = [
            ("1 GPU, fp32", 1, 4, "32"),
            ("1 GPU, bf16-mixed", 1, 4, "bf16-mixed"),
            (f"{gpus} GPU(s) (nccl), bf16-mixed", gpus, 4, "bf16-mixed"),
        ]
        title = (
            f"fine-tuning throughput, MobileNetV2 (37 classes) on random 224x224 images, "
            f"global batch {batch}, {EPOCHS - 1} timed epochs of {CUDA_IMAGES} images, "
            f"{torch.cuda.get_device_name(0)}"
        )
    else:
        cores = os.cpu_count() or 1
        half = max(cores // 2, 1)
        batch = args.batch or GLOBAL_BATCH
        setups = [
            ("1 process, fp32", 1, cores, "32"),
            (f"2 processes (gloo), fp32, {half} thread(s) each", 2, half, "32"),
            ("1 process, bf16-mixed", 1, cores, "bf16-mixed"),
        ]
        title = (
            f"fine-tuning throughput, MobileNetV2 on digits 32x32, global batch {batch}, "
            f"{EPOCHS - 1} timed epochs, {cores} CPU cores"
        )
    rates: dict[str, list[float]] = {label: [] for label, *_ in setups}
    for _ in range(args.rounds):
        for label, size, threads, precision in setups:
            rates[label].append(measure(size, threads, precision, args.device, batch))
    print(f"{title}; median [min, max] of {args.rounds} interleaved rounds")
    print(table(rates))


def table(rates: dict[str, list[float]]) -> str:
    """Each setup's median rate with its range, and the ratio of medians to the first setup's
    with the range of the per-round ratios (the setups of a round ran back to back)."""
    first = next(iter(rates.values()))
    base = statistics.median(first)
    lines = [f"{'setup':<48} {'images/s':>10} {'(min-max)':>15} {'ratio':>6} {'(per round)':>13}"]
    for label, values in rates.items():
        ratios = [value / reference for value, reference in zip(values, first, strict=True)]
        lines.append(
            f"{label:<48} {statistics.median(values):>10.1f} "
            f"({min(values):>6.1f}-{max(values):<6.1f}) {statistics.median(values) / base:>6.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
