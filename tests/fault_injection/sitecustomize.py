"""Faults injected into a real `python -m pipeline` process, for tests/test_runtime_faults.py.

On PYTHONPATH, Python imports this module at start-up. $PIPELINE_FAULT picks the fault:
  nan_loss:<stage epoch>          the loss is NaN from the first training step whose progress
                                  label is <stage epoch> ("finetune 2") on
  oom_above:<stage>:<batch>       a training step of <stage> on a batch larger than <batch>
                                  raises CUDA's out-of-memory error, as a GPU that is too small
  enospc:<folder>                 writing a .safetensors file into a staging folder of
                                  <folder> ("pruned_model") writes half of it, then finds the
                                  disk full
The training step is found by walking up the stack to pipeline.training.loop.train_steps and
reading its `desc`, so nothing in the pipeline knows about this."""

from __future__ import annotations

import errno
import os
import sys

FAULT = os.environ.get("PIPELINE_FAULT", "")


def _training_label() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "train_steps" and "desc" in frame.f_locals:
            return frame.f_locals["desc"]
        frame = frame.f_back
    return None


def _patch_loss(kind: str, argument: str) -> None:
    import torch
    from torch import nn

    forward = nn.CrossEntropyLoss.forward

    def faulty(self, logits, labels):
        label = _training_label()
        if label is not None and kind == "nan_loss" and label == argument:
            faulty.nan = True
        if label is not None and kind == "oom_above":
            stage, limit = argument.split(":")
            if label.startswith(stage) and logits.shape[0] > int(limit):
                raise torch.cuda.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)"
                )
        loss = forward(self, logits, labels)
        return loss * float("nan") if getattr(faulty, "nan", False) else loss

    nn.CrossEntropyLoss.forward = faulty


def _patch_safetensors(folder: str) -> None:
    import safetensors.torch

    save_file = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if os.path.basename(os.path.dirname(str(filename))).startswith(f".{folder}."):
            save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as handle:  # what was written before the disk filled
                handle.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return save_file(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = full_disk


if FAULT:
    kind, _, argument = FAULT.partition(":")
    if kind in ("nan_loss", "oom_above"):
        _patch_loss(kind, argument)
    elif kind == "enospc":
        _patch_safetensors(argument)
