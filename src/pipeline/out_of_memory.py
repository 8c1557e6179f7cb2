"""Out of memory in a stage, as one line: which stage, which device, the batch size in force and
the key that sets it. The job then fails alone, as any failing job of a sweep does."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager

import torch

from pipeline.config.schema import RunSettings
from pipeline.errors import OutOfMemoryError, first_line

# The batch size each stage runs at, as the key a user sets. The measure stage reads the test
# set at finetune.batch_size and times throughput at its own.
STAGE_BATCH_KEYS = {
    "baseline": ("baseline.batch_size",),
    "prune": ("pruner.batch_size",),
    "speedup": ("pruner.batch_size",),
    "finetune": ("finetune.batch_size",),
    "measure": ("measure.throughput_batch_size", "finetune.batch_size"),
}

# CPU allocations that fail raise a RuntimeError from c10's allocator, not MemoryError.
_HOST_MESSAGES = ("can't allocate memory", "not enough memory", "cannot allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA or host allocation that failed, whichever way PyTorch or Python raised it."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in text for m in _HOST_MESSAGES)


def _setting(settings: RunSettings, key: str):
    section, name = key.split(".")
    return getattr(getattr(settings, section), name)


def out_of_memory_line(stage: str, settings: RunSettings, error: BaseException) -> str:
    keys = STAGE_BATCH_KEYS.get(stage, ())
    where = "GPU" if isinstance(error, torch.cuda.OutOfMemoryError) else "host"
    in_force = ", ".join(f"{key}={_setting(settings, key)}" for key in keys) or "its batch size"
    lower = " or ".join(keys) or "the batch size"
    return (
        f"{stage} ran out of {where} memory at {in_force} ({first_line(error, 120)}); lower {lower}"
    )


def release_memory() -> None:
    """What the failed stage held goes back before the next job of an in-process sweep."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded_stages(
    stage: Callable[[str], ContextManager[None]], settings: RunSettings
) -> Callable[[str], ContextManager[None]]:
    """`stage` (StageMonitor.stage) whose out-of-memory errors become OutOfMemoryError."""

    @contextlib.contextmanager
    def guarded(name: str) -> Iterator[None]:
        with stage(name):
            try:
                yield
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                line = out_of_memory_line(name, settings, error)
                del error
                release_memory()
                raise OutOfMemoryError(line) from None

    return guarded
