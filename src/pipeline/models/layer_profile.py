"""Where a forward pass spends its time, by kind of layer: pointwise, depthwise and other
convolutions, linear layers, BatchNorm and the rest. Pruning removes MACs mostly from the
pointwise convolutions; comparing each kind's time and MACs before and after says which kinds
keep the time the MACs no longer account for (benchmarks/latency.py --profile)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from pipeline.models.stats import macs_by_layer

KINDS = ("pointwise conv", "depthwise conv", "other conv", "linear", "batchnorm", "other")
# Profiler labels: a prefix no ATen op name starts with.
LABEL = "layer kind: "
TOTAL_LABEL = "forward pass"
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def layer_kind(module: nn.Module) -> str:
    """One of KINDS. Depthwise: groups == in_channels == out_channels (whatever the kernel);
    pointwise: a 1x1 ungrouped Conv2d."""
    if isinstance(module, nn.Conv2d):
        if module.groups == module.in_channels == module.out_channels:
            return "depthwise conv"
        if module.kernel_size == (1, 1) and module.groups == 1:
            return "pointwise conv"
        return "other conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, BATCHNORMS):
        return "batchnorm"
    return "other"


def macs_by_kind(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """pipeline.models.stats' MACs of one single-image forward pass, summed per layer kind (0 for
    the kinds it does not count: batchnorm, other)."""
    modules = dict(model.named_modules())
    totals = dict.fromkeys(KINDS, 0)
    for name, macs in macs_by_layer(model, input_shape).items():
        totals[layer_kind(modules[name])] += macs
    return totals


@torch.inference_mode()
def profile_by_kind(
    model: nn.Module,
    input_shape: tuple[int, ...],
    repeats: int = 20,
    batch_size: int = 1,
    warmup: int = 3,
) -> dict[str, float]:
    """Milliseconds per forward pass spent in each of KINDS, on the model's device in eager mode,
    averaged over `repeats` calls under torch.profiler.

    Each leaf layer of a named kind runs inside a record_function range labelled with its kind
    (opened and closed by forward hooks); `other` is the rest of the pass: other layers
    (activations, dropout, the Identity left by BatchNorm folding) and the ops a forward() runs
    itself (residual additions, pooling, flattening). The kinds therefore add up to the whole
    pass. On CUDA the times are the host's (kernel launches), so profile on the CPU.
    """
    model.eval()
    device = next(model.parameters()).device
    batch = torch.randn(batch_size, *input_shape, device=device)
    handles = _label_layers(model)
    try:
        for _ in range(warmup):
            model(batch)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(repeats):
                with record_function(TOTAL_LABEL):
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
    microseconds = {event.key: event.cpu_time_total for event in profiler.key_averages()}
    per_call = {kind: microseconds.get(LABEL + kind, 0.0) / 1000.0 / repeats for kind in KINDS[:-1]}
    total = microseconds[TOTAL_LABEL] / 1000.0 / repeats
    per_call["other"] = max(0.0, total - sum(per_call.values()))
    return per_call


def _label_layers(model: nn.Module) -> list:
    """Forward hooks that run each leaf layer of a named kind inside a record_function range."""
    handles = []
    for module in model.modules():
        kind = layer_kind(module)
        if kind == "other" or next(module.children(), None) is not None:
            continue
        enter, leave = _range_hooks(LABEL + kind)
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    return handles


def _range_hooks(label: str) -> tuple[Callable, Callable]:
    opened: list[record_function] = []  # a leaf layer's call never nests inside itself

    def enter(_module, _inputs) -> None:
        opened.append(record_function(label).__enter__())

    def leave(_module, _inputs, _output) -> None:
        opened.pop().__exit__(None, None, None)

    return enter, leave
