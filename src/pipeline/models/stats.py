"""Size and compute of a model: parameters, multiply-accumulates and bytes of weights."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict (parameters and buffers), as stored on disk."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of a single image through Conv2d and Linear layers.

    Convolutions and fully connected layers hold all but a fraction of a percent of the work in
    the CNNs this pipeline prunes; element-wise ops are left out, as most MAC counters do.
    """
    return sum(macs_by_layer(model, input_shape).values())


@torch.no_grad()
def macs_by_layer(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """count_macs layer by layer: module name -> multiply-accumulates of one single-image forward
    pass, for each Conv2d and Linear that ran (a layer called twice counts twice)."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kernel = module.kernel_size[0] * module.kernel_size[1]
                work = output.numel() * (module.in_channels // module.groups) * kernel
            else:
                work = output.numel() * module.in_features
            macs[name] = macs.get(name, 0) + int(work)

        return count

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return macs
