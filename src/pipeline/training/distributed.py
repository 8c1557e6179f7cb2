"""Data-parallel training on PyTorch's own torch.distributed: DDP for the gradients, a
DistributedSampler for the data, collectives for what the ranks must agree on. torchrun (or
Slurm through Submitit) starts the processes; this module only reads where each one stands.

Why torch.distributed and not Lightning Fabric: the pipeline already owns its training loop
(one fit() for baseline and fine-tuning, EMA, distillation, the NaN check), and what DDP adds to
it is a wrapper, a sampler and a few collectives. Fabric would add a dependency and a second way
to launch processes for what torchrun already does.

Pruning, speedup, the budget search and measuring run on rank 0 only; the other ranks then get
the pruned architecture (as save_pruned describes it) and its weights from rank 0, and a hash of
the parameters checks that every rank holds the same model before fine-tuning goes on.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import ConfigError, PipelineError


class RankError(PipelineError):
    """The ranks of a data-parallel job disagree (their models differ)."""


@dataclass(frozen=True)
class World:
    """Where this process stands in the job: rank `rank` of `size`, `local_rank` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched_world() -> World:
    """The world torchrun (RANK, WORLD_SIZE, LOCAL_RANK), Slurm (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID) or Submitit's local executor started this process in; SINGLE when none
    did."""
    for rank, size, local in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
        ("SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS", "SUBMITIT_LOCAL_LOCALID"),
    ):
        if size in os.environ and rank in os.environ:
            return World(
                int(os.environ[rank]), int(os.environ[size]), int(os.environ.get(local, 0))
            )
    return SINGLE


def check_launch(settings, args: list[str] | None = None) -> None:
    """trainer settings that this launch cannot honour are refused, in one ConfigError line:
    trainer=ddp without torchrun (with the command to use), a world size that is not
    trainer.devices x trainer.num_nodes, more devices than the machine has, a global batch
    that does not split evenly over the processes."""
    import sys

    trainer, device = settings.trainer, settings.device.value
    world = launched_world()
    strategy = getattr(trainer.strategy, "value", trainer.strategy)
    expected = trainer.devices * trainer.num_nodes
    if strategy == "single":
        if world.distributed:
            raise ConfigError(
                f"trainer.strategy=single, and this process is rank {world.rank} of "
                f"{world.size} started by torchrun or Slurm; allowed values: trainer=ddp with "
                f"trainer.devices={world.size}, or one process without torchrun"
            )
        return
    if not world.distributed and expected > 1 and not _submitit_launcher(args):
        shown = " ".join(args if args is not None else sys.argv[1:]) or "trainer=ddp"
        # --standalone: a rendezvous on a free port of this machine (two jobs do not meet)
        nodes = f"--nnodes={trainer.num_nodes} " if trainer.num_nodes > 1 else "--standalone "
        raise ConfigError(
            f"trainer=ddp runs one process per device, started by torchrun: torchrun "
            f"{nodes}--nproc-per-node={trainer.devices} -m pipeline {shown}"
        )
    if world.distributed and world.size != expected:
        raise ConfigError(
            f"trainer.devices={trainer.devices} x trainer.num_nodes={trainer.num_nodes} is "
            f"{expected} processes, and torchrun started {world.size}; allowed values: "
            f"trainer.devices x trainer.num_nodes = {world.size}"
        )
    for key in ("baseline", "finetune"):
        size = getattr(settings, key).batch_size
        if size % expected:
            raise ConfigError(
                f"{key}.batch_size={size} is the global batch, and does not split over "
                f"{expected} processes; allowed values: multiples of {expected}"
            )
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        if count and trainer.devices > count:
            raise ConfigError(
                f"trainer.devices={trainer.devices} is more than the {count} GPU(s) this "
                f"machine has; allowed values: 1 to {count}"
            )


def _submitit_launcher(args: list[str] | None) -> bool:
    """A command line whose launcher starts the job's tasks itself (Submitit, tasks_per_node):
    the check runs again in each task, where the world is known."""
    import sys

    given = args if args is not None else sys.argv[1:]
    return any(arg.startswith("hydra/launcher=submitit") for arg in given)


def start(trainer, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group of a data-parallel job (nothing for one process); returns the
    world and this rank's device (its own GPU on CUDA)."""
    world = launched_world()
    strategy = getattr(trainer.strategy, "value", trainer.strategy)
    if strategy != "ddp" or not world.distributed:
        return SINGLE, device
    import torch.distributed as dist

    submitit = "SLURM_PROCID" in os.environ or "SUBMITIT_LOCAL_GLOBALID" in os.environ
    if submitit and "MASTER_ADDR" not in os.environ:
        # A Submitit job's tasks (hydra/launcher=submitit_slurm or submitit_local with
        # tasks_per_node): Submitit's own helper exports the address and port of the first
        # node, from the job's node list and id.
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    backend = trainer.backend if trainer.backend != "auto" else None
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=world.rank,
            world_size=world.size,
            timeout=datetime.timedelta(seconds=trainer.timeout_s),
        )
    return world, device


def stop(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_json(value, world: World):
    """Rank 0's JSON-able `value` on every rank (a string on the wire: no pickle of objects)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [json.dumps(value) if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return json.loads(box[0])


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Each value summed over the ranks (float64)."""
    if not world.distributed:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_state(module: nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers, in place, on every rank (same architecture assumed)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def sync_buffers(module: nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank: each rank's last forward pass
    updated its own, from its own shard."""
    if not world.distributed:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def parameter_hash(module: nn.Module) -> str:
    """A SHA-256 over every parameter and buffer, by name, as bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def check_same_model(module: nn.Module, world: World, when: str) -> str:
    """The parameter hash, after checking that every rank has the same one (RankError naming the
    ranks that differ otherwise)."""
    mine = parameter_hash(module)
    if not world.distributed:
        return mine
    import torch.distributed as dist

    hashes: list[str | None] = [None] * world.size
    dist.all_gather_object(hashes, mine)
    differ = [rank for rank, value in enumerate(hashes) if value != hashes[0]]
    if differ:
        raise RankError(
            f"{when}: rank(s) {', '.join(map(str, differ))} hold other weights than rank 0 "
            f"(parameter hash {hashes[differ[0]][:12]} against {hashes[0][:12]})"
        )
    return mine


def share_model(
    model: nn.Module | None, model_config: dict, trusted: list[str], world: World, device
) -> nn.Module:
    """Rank 0's `model` (a pruned architecture) on every rank, on `device` (each rank's own):
    the architecture as save_pruned describes it (JSON), rebuilt on the others, then the
    weights broadcast."""
    if not world.distributed:
        return model
    from pipeline.models.pruned import build_described, describe

    config = dict(model_config)
    if "weights" in config:
        config["weights"] = "none"  # the broadcast brings the weights
    record = describe(model, config, trusted) if world.main else None
    record = broadcast_json(record, world)
    if not world.main:
        model = build_described(record, trusted)
    model = model.to(device)
    broadcast_state(model, world)
    return model


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The forward passes of training in `precision` (bf16-mixed, 16-mixed; 32: as they are)."""
    if precision == "32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        yield


def resolve_precision(choice: str, device: torch.device) -> str:
    """auto: bf16-mixed on a CUDA device that supports bf16, else 32."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32"
