"""What NNI 2.10.1's ModelSpeedup lacks for torchvision's classifiers, added as NNI allows:
replacement rules for module types it has none for, and, while it infers masks, norms that let
a removed channel stay removed; and a faster rule for the convs it has one for.

NNI is imported inside the functions (see pipeline.pruning.nni.adapter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pipeline.errors import UnsupportedModelError, first_line


def replacement_rules(model: nn.Module) -> dict[str, Callable]:
    """ModelSpeedup's `customized_replace_func` for the module types of `model`.

    NNI refuses to go past a module type it has no rule for, even one that holds no tensors
    (torchvision's Hardswish in MobileNetV3, StochasticDepth in EfficientNet and ConvNeXt,
    Permute, Identity). A module with no parameters and no buffers has nothing whose size
    depends on the channels that survive, so it stays as it is; the forward pass at the real
    size after speedup checks the result. ConvNeXt's layer scale (pipeline.models.zoo.ChannelScale)
    and its channels-first LayerNorm2d are narrowed along dim 1.
    """
    from nni.compression.pytorch.speedup.compress_modules import replace_module

    rules: dict[str, Callable] = {
        "Conv2d": _narrower_conv,
        "ChannelScale": _narrower_scale,
        # NNI names the rule by the type in its traced graph: the norms' own (see
        # channel_following_norms).
        "LayerNorm2d": _narrower_norm(dim=1),
        "LayerNorm": _narrower_norm(dim=-1),
    }
    for module in model.modules():
        kind = type(module).__name__
        if kind in replace_module or kind in rules:
            continue
        if next(module.parameters(recurse=False), None) is None and not list(
            module.buffers(recurse=False)
        ):
            rules[kind] = _unchanged
    return rules


def _unchanged(module: nn.Module, masks) -> nn.Module:
    return module


def _kept(masks, dim: int) -> torch.Tensor:
    """Indexes of the channels (along `dim`) that the module's input keeps."""
    from nni.compression.pytorch.speedup.compress_modules import convert_to_coarse_mask

    in_masks, _, _ = masks
    _, kept = convert_to_coarse_mask(in_masks[0], dim)
    return kept


def _narrower_conv(conv: nn.Conv2d, masks) -> nn.Module:
    """NNI's replace_conv2d for the two common kinds, in one indexing each: an ungrouped conv
    keeps the kept outputs of the kept inputs; a depthwise conv (one channel per group) keeps
    its kept channels. NNI walks the groups one by one in Python and initialises the new weights
    before overwriting them (at 224x224 most of the time its speedup spent replacing layers).
    Anything else, or a layer left empty, goes to NNI's own rule."""
    from nni.compression.pytorch.speedup.compress_modules import (
        convert_to_coarse_mask,
        replace_conv2d,
    )

    in_masks, output_mask, _ = masks
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    if len(in_masks) != 1 or not (conv.groups == 1 or depthwise):
        return replace_conv2d(conv, masks)
    kept_in = _kept(masks, 1)
    _, kept_out = convert_to_coarse_mask(output_mask, 1)
    if not len(kept_in) or not len(kept_out) or (depthwise and not torch.equal(kept_in, kept_out)):
        return replace_conv2d(conv, masks)
    kept_in, kept_out = kept_in.to(conv.weight.device), kept_out.to(conv.weight.device)
    narrower = nn.utils.skip_init(
        nn.Conv2d,
        len(kept_in),
        len(kept_out),
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=len(kept_out) if depthwise else 1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    weight = conv.weight.index_select(0, kept_out)
    with torch.no_grad():
        narrower.weight.copy_(weight if depthwise else weight.index_select(1, kept_in))
        if conv.bias is not None:
            narrower.bias.copy_(conv.bias.index_select(0, kept_out))
    return narrower


def _narrower_scale(module: nn.Module, masks) -> nn.Module:
    """pipeline.models.zoo.ChannelScale keeps the factors of the channels that survive."""
    kept = _kept(masks, 1).to(module.weight.device)
    narrower = type(module)(len(kept)).to(module.weight.device)
    with torch.no_grad():
        narrower.weight.copy_(module.weight.index_select(0, kept))
    return narrower


def _narrower_norm(dim: int) -> Callable:
    def replace(module: nn.LayerNorm, masks) -> nn.Module:
        """The norm's own class again (see channel_following_norms), over the kept channels."""
        if not isinstance(module, (ChannelFollowingNorm2d, ChannelFollowingNorm)):
            from nni.compression.pytorch.speedup.compress_modules import replace_layernorm

            return replace_layernorm(module, masks)  # a LayerNorm left as it was: NNI's rule
        kept = _kept(masks, dim).to(module.weight.device if module.weight is not None else "cpu")
        original = module.original_class
        narrower = original(len(kept), eps=module.eps, elementwise_affine=module.elementwise_affine)
        narrower.to(kept.device)
        if module.elementwise_affine:
            with torch.no_grad():
                narrower.weight.copy_(module.weight.index_select(0, kept))
                if module.bias is not None:
                    narrower.bias.copy_(module.bias.index_select(0, kept))
        return narrower

    return replace


class ChannelFollowingNorm2d(nn.LayerNorm):
    """A channels-first LayerNorm (torchvision's LayerNorm2d) whose output is zero on every
    channel where its whole input is zero: for NNI's mask inference only."""

    original_class: type[nn.LayerNorm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alive = (x != 0).any(dim=0).flatten(1).any(dim=1)
        return self.original_class.forward(self, x) * alive.view(1, -1, *([1] * (x.dim() - 2)))


class ChannelFollowingNorm(nn.LayerNorm):
    """ChannelFollowingNorm2d for a LayerNorm over the last dimension (channels last)."""

    original_class: type[nn.LayerNorm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alive = (x != 0).flatten(0, -2).any(dim=0)
        return self.original_class.forward(self, x) * alive


@contextlib.contextmanager
def channel_following_norms(model: nn.Module) -> Iterator[None]:
    """While NNI infers masks, LayerNorms over one channel dimension zero the channels whose
    input is all zero.

    NNI marks a channel removed when its values are zero (or constant) on every sample, and a
    LayerNorm turns a removed (zero) channel into -mean/std, which varies: NNI then keeps the
    channel after the norm while its own LayerNorm rule narrows the norm, and the next layer
    (ConvNeXt's depthwise convolution, its Linear layers) no longer fits. Zeroing them keeps
    the removed channels removed through the norm. Every norm gets its class back afterwards;
    the replacement rules build narrower ones of the original class.
    """
    for module in model.modules():
        if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
            continue
        original = type(module)
        channels_first = original.__name__ == "LayerNorm2d"
        if original is not nn.LayerNorm and not channels_first:
            continue  # a LayerNorm subclass whose layout is unknown: NNI's own rule
        module.__class__ = ChannelFollowingNorm2d if channels_first else ChannelFollowingNorm
        module.original_class = original
    try:
        yield
    finally:
        for module in model.modules():
            if isinstance(module, (ChannelFollowingNorm2d, ChannelFollowingNorm)):
                module.__class__ = module.__dict__.pop("original_class")


def failed_operation(error: BaseException) -> str | None:
    """The graph node or module type NNI was working on when it failed, from the traceback's
    frames (NNI names its nodes `<scope>.<aten op>.<index>` and its modules by type); else the
    innermost frame in NNI or torchvision."""
    if isinstance(error, UnsupportedModelError) and error.__cause__ is not None:
        error = error.__cause__  # what NNI raised, with its frames
    found, innermost = None, None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        local = frame.f_locals
        for key in ("curnode", "node"):
            node = local.get(key)
            if node is not None and hasattr(node, "op_type"):
                found = f"{node.op_type} at {node.name}"
        if "m_type" in local:
            found = f"module type {local['m_type']}"
        path = frame.f_code.co_filename
        if "/torchvision/" in path or "/nni/" in path:
            package = "torchvision" if "/torchvision/" in path else "nni"
            where = path.rpartition(f"/{package}/")[2]
            innermost = f"{frame.f_code.co_name} in {package}/{where}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found or innermost


def unsupported(step: str, error: BaseException) -> UnsupportedModelError:
    """One line for a model NNI cannot take through `step`: where and what NNI said."""
    reason = f"{type(error).__name__}: {first_line(error)}"
    operation = failed_operation(error)
    where = f" at {operation}" if operation else ""
    return UnsupportedModelError(
        f"NNI 2.10.1's {step} cannot take this model{where} ({reason}); allowed: the other "
        f"engine, Torch-Pruning, which traces models its own way: pruner=tp_magnitude (for "
        f"Swin and ShuffleNetV2 with pruner.submodules=['*.mlp'] or ['*.branch2'], the widths "
        f"free inside their blocks: docs/models.md)"
    )
