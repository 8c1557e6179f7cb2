"""The inference form of a model, used for every timing: the baseline and the pruned model get
the same treatment so that their latency ratio compares architectures, not runtimes."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.schema import Runtime

RUNTIMES = tuple(runtime.value for runtime in Runtime)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d into the Conv2d just before it in a Sequential (eval-mode maths).

    Inference then skips one pass over every activation map; outputs are unchanged up to
    float rounding. Modifies `model` in place and returns it.
    """
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
    return model


def inference_model(
    model: nn.Module,
    input_shape: tuple[int, ...],
    runtime: str = "eager",
    fold_bn: bool = True,
    channels_last: bool = False,
) -> nn.Module:
    """A copy of `model` prepared for timing; the original is left untouched."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: allowed {', '.join(RUNTIMES)}")
    prepared = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(prepared)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    if runtime == "jit_freeze":
        device = next(prepared.parameters()).device
        example = torch.zeros(1, *input_shape, device=device)
        if channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            prepared = torch.jit.freeze(torch.jit.trace(prepared, example).eval())
    return prepared
