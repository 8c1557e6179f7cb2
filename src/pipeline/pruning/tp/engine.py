"""Torch-Pruning 1.6 behind the pruning engine interface (pipeline.pruning.engine).

`pruner._target_` names a Torch-Pruning importance class (the criterion); its BasePruner finds
the coupled layers with a DependencyGraph, ranks each group and removes the channels itself,
so channel_masks narrows the model and narrow has nothing left to do. The masks it returns are
the record of what each step removed, in the pipeline's format (pipeline.stages.prune).

The config list comes from the pipeline (pipeline.pruning.config_list), as for NNI: with local
pruning its per-layer, rounded widths are kept exactly, so that two criteria compared at one
sparsity differ only in which channels they keep. With pruner.global_pruning Torch-Pruning
allocates the sparsity across layers itself, rounding with pruner.round_to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import statistics
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib.metadata import version

import torch
from hydra.utils import get_class
from torch import nn

from pipeline.config.schema import PrunerSettings
from pipeline.data.datasets import StageInputs
from pipeline.errors import ConfigError, EmptyLayerError, UnsupportedModelError, first_line
from pipeline.pruning.config_list import prunable_layers
from pipeline.pruning.engine import Masks, refuse_unread
from pipeline.training.loop import cycled_batches

log = logging.getLogger(__name__)

# Importance classes whose scores need gradients of the loss (backward passes over
# training_steps batches) or activations (forward passes); the others read the weights alone.
GRADIENT_IMPORTANCES = ("GroupTaylorImportance", "TaylorImportance")
ACTIVATION_IMPORTANCES = ("ActivationImportance",)
EVERY_IMPORTANCE = (
    "importance",
    "global_pruning",
    "isomorphic",
    "ignored_layers",
    "submodules",
    "prune_heads",
)


def importance_kind(target: str) -> str:
    """gradient, activation or weights: what the importance class `target` ranks on."""
    name = str(target).rsplit(".", 1)[-1]
    if name in GRADIENT_IMPORTANCES:
        return "gradient"
    return "activation" if name in ACTIVATION_IMPORTANCES else "weights"


@dataclass
class RatioPlan:
    """Torch-Pruning's pruning ratios for one step, from the pipeline's config list."""

    total: float  # pruning_ratio: every layer's (local) or all layers' together (global)
    per_layer: dict[nn.Module, float]  # pruning_ratio_dict (local pruning only)
    ignored: list[nn.Module]
    round_to: int | None


class TorchPruningEngine:
    name = "torch_pruning"
    narrows_while_ranking = True
    OPTIONS = {
        **{
            option: "pruner=tp_magnitude, tp_taylor, tp_lamp, tp_activation"
            for option in EVERY_IMPORTANCE
        },
        "training_steps": "pruner=tp_taylor, tp_activation",
    }

    def check(self, settings: PrunerSettings) -> None:
        kind = importance_kind(settings._target_)
        reads = (*EVERY_IMPORTANCE, *(("training_steps",) if kind != "weights" else ()))
        label = f"Torch-Pruning's {str(settings._target_).rsplit('.', 1)[-1]}"
        refuse_unread(settings, reads, label)
        if kind != "weights" and settings.training_steps is None:
            raise ConfigError(
                f"pruner.training_steps is missing; {label} ranks on training batches: "
                f"allowed values: an integer >= 1"
            )
        if settings.isomorphic and not settings.global_pruning:
            raise ConfigError(
                "pruner.isomorphic=true is not allowed with pruner.global_pruning=false "
                "(isomorphic pruning ranks globally among groups of one structure); allowed: "
                "pruner.global_pruning=true, or pruner.isomorphic=false"
            )
        if settings.global_pruning and settings.sparsity_scale:
            raise ConfigError(
                "pruner.sparsity_scale is not allowed with pruner.global_pruning=true (global "
                "ranking allocates the sparsity across layers itself); allowed: "
                "pruner.sparsity_scale=[] or pruner.global_pruning=false"
            )
        if settings.global_pruning and settings.submodules:
            raise ConfigError(
                "pruner.submodules is not allowed with pruner.global_pruning=true (each "
                "submodule is a graph of its own, ranked apart from the others); allowed: "
                "pruner.submodules=[] or pruner.global_pruning=false"
            )
        arguments = settings.importance or {}
        accepted = inspect.signature(get_class(settings._target_)).parameters
        unknown = sorted(set(arguments) - set(accepted))
        if unknown:
            raise ConfigError(
                f"pruner.importance.{unknown[0]} is not an argument of {settings._target_}; "
                f"allowed keys: {', '.join(sorted(accepted)) or 'none'}"
            )

    def channel_masks(
        self,
        model: nn.Module,
        config_list: list[dict],
        settings: PrunerSettings,
        inputs: StageInputs,
        tied: None = None,
    ) -> tuple[Masks, None]:
        """Rank, then remove, the channels one step's config list asks for; `model` is
        narrowed in place. Returns the masks of what was removed (on the shapes the step
        began with). The dependency graph is traced anew at every step: Torch-Pruning finds
        it in a fraction of a second, so nothing is handed on (`tied` stays None)."""
        import torch_pruning as tp

        quiet_torch_pruning()
        model.to(inputs.device)
        importance = get_class(settings._target_)(**(settings.importance or {}))
        plan = ratio_plan(model, config_list, settings)
        names = {module: name for name, module in model.named_modules()}
        shapes = {name: _out_width(module) for name, module in model.named_modules()}
        # Torch-Pruning narrows an nn.MultiheadAttention's heads only without its head count,
        # with the residual width it shares (a torchvision ViT's hidden_dim).
        heads = attention_heads(model, multihead=bool(settings.prune_heads))
        if not settings.prune_heads:
            plan = heads_divide_widths(model, plan)
        head_ratio = plan.total or (
            statistics.median(plan.per_layer.values()) if plan.per_layer else 0.0
        )
        example = torch.rand(1, *inputs.input_shape, device=inputs.device)
        was_training = model.training
        model.eval()  # tracing and ranking see the network as it infers
        masks: Masks = {}
        try:
            graphs = pruning_graphs(model, plan, settings.submodules or [], example)
            pruners = [
                tp.pruner.BasePruner(
                    graph.module,
                    graph.example,
                    importance,
                    global_pruning=bool(settings.global_pruning),
                    isomorphic=bool(settings.isomorphic),
                    pruning_ratio=graph.plan.total,
                    pruning_ratio_dict=graph.plan.per_layer or None,
                    ignored_layers=graph.plan.ignored,
                    round_to=graph.plan.round_to,
                    num_heads=heads,
                    prune_num_heads=bool(settings.prune_heads),
                    prune_head_dims=not settings.prune_heads,
                    head_pruning_ratio=head_ratio if settings.prune_heads else 0.0,
                )
                for graph in graphs
            ]
            with ranking_statistics(importance, model, settings, inputs):
                for graph, pruner in zip(graphs, pruners, strict=True):
                    for group in pruner.step(interactive=True):
                        _record(group, names, shapes, masks)
                        group.prune()
                    graph.check_output()
            follow_heads(model, heads, pruners, bool(settings.prune_heads), head_ratio)
        except (ConfigError, EmptyLayerError, UnsupportedModelError):
            raise
        except Exception as error:
            raise unsupported(error) from error
        finally:
            model.train(was_training)
            model.zero_grad(set_to_none=True)
            for module in model.modules():
                if hasattr(module, "_importance"):
                    del module._importance
        _fix_hidden_dim(model)
        still_runs(model, example)
        return masks, None

    def narrow(
        self,
        model: nn.Module,
        masks: Masks,
        input_shape: tuple[int, int, int],
        settings: PrunerSettings,
    ) -> nn.Module:
        """Nothing to remove: Torch-Pruning removed the channels while it ranked them."""
        if masks:
            log.info("speedup: Torch-Pruning already removed the masked channels while pruning")
        return model


def attention_heads(model: nn.Module, multihead: bool) -> dict[nn.Module, int]:
    """Torch-Pruning's num_heads: each attention's heads, keyed by the layer that makes its
    queries, keys and values: the `qkv` linear layer of an attention block that holds
    `num_heads` (timm's, and most hand-written ViTs), and with `multihead` torch's
    nn.MultiheadAttention itself."""
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and multihead:
            heads[module] = module.num_heads
        elif isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(
            getattr(module, "num_heads", None), int
        ):
            heads[module.qkv] = module.num_heads
    return heads


def heads_divide_widths(model: nn.Module, plan: RatioPlan) -> RatioPlan:
    """Narrowing every head of an nn.MultiheadAttention narrows the width it shares with the
    residual stream, which its heads must still divide: widths are rounded to a multiple of
    every attention's head count (Torch-Pruning's own ViT setting) and of pruner.round_to."""
    counts = [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not counts:
        return plan
    return dataclasses.replace(plan, round_to=math.lcm(plan.round_to or 1, *counts))


def follow_heads(
    model: nn.Module,
    heads: dict[nn.Module, int],
    pruners: list,
    prune_heads: bool,
    ratio: float,
) -> None:
    """Attention blocks that hold their head count and width (timm's) compute with them:
    after their qkv layer is narrowed they must follow it. With pruner.prune_heads, a run
    that removed no head is refused rather than let the option pass unnoticed."""
    left = {m: n for p in pruners for m, n in p.num_heads.items() if m in heads}
    if prune_heads and all(left.get(m, n) == n for m, n in heads.items()):
        counts = sorted(set(heads.values()))
        raise UnsupportedModelError(
            f"pruner.prune_heads=true: Torch-Pruning removed no attention head of this model "
            f"({len(heads)} attention layers of {counts} heads, head ratio {ratio:.3g}; "
            f"torch's nn.MultiheadAttention keeps its heads); allowed values: "
            f"pruner.prune_heads=false, which narrows every head instead"
        )
    for module in model.modules():
        qkv = getattr(module, "qkv", None)
        if qkv in heads and not isinstance(module, nn.MultiheadAttention):
            module.num_heads = left.get(qkv, heads[qkv])
            if isinstance(getattr(module, "head_dim", None), int):
                module.head_dim = qkv.out_features // (3 * module.num_heads)


def still_runs(model: nn.Module, example: torch.Tensor) -> None:
    """Torch-Pruning narrows what its graph shows; a forward that computes with a width of
    its own (timm's attention reshapes to its input's width) breaks only when it runs.
    Said in one line here, before any later stage runs the model."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    except Exception as error:
        raise UnsupportedModelError(
            f"Torch-Pruning {version('torch-pruning')} narrowed this model into one that no "
            f"longer runs ({type(error).__name__}: {first_line(error)}); allowed values: "
            f"pruner.submodules=[...] naming the blocks whose inner widths are free, e.g. "
            f"['*.mlp'] for a transformer's MLPs"
        ) from error
    finally:
        model.train(was_training)


def quiet_torch_pruning() -> None:
    # Said of every group whose layers carry no weight to rank (a pooling, a flatten).
    warnings.filterwarnings("ignore", message="Layer .* does not have _importance")
    # Said of a ViT's class token and position embedding, whose last dimension it rightly prunes.
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected")


def _out_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def ratio_plan(model: nn.Module, config_list: list[dict], settings: PrunerSettings) -> RatioPlan:
    """The config list (pipeline.pruning.config_list.resolve_config_list) in Torch-Pruning's
    terms. Per-layer entries keep exactly the channel counts NNI would keep
    (C - int(sparsity * C)); under global pruning they are summed into one ratio."""
    modules = dict(model.named_modules())
    ignored_names = [
        name for entry in config_list if entry.get("exclude") for name in entry.get("op_names", [])
    ]
    for pattern in settings.ignored_layers or []:
        matched = [name for name in modules if name and fnmatchcase(name, pattern)]
        if not matched:
            raise ConfigError(
                f"pruner.ignored_layers: {pattern!r} matches no layer; allowed values: patterns "
                f"over the layer names, e.g. {next(iter(prunable_layers(model, set())))!r}"
            )
        ignored_names += matched
    ignored = [modules[name] for name in dict.fromkeys(ignored_names)]
    entries = [entry for entry in config_list if not entry.get("exclude")]
    keep: dict[str, int] = {}
    total = None
    for entry in entries:
        if "op_names" in entry and "sparsity_per_layer" in entry:
            for name in entry["op_names"]:
                width = _out_width(modules[name])
                keep[name] = width - int(entry["sparsity_per_layer"] * width)
        elif "total_sparsity" in entry or "sparsity" in entry:
            total = float(entry.get("total_sparsity", entry.get("sparsity")))
        else:
            raise ConfigError(f"pruner.config_list entry {entry} cannot be read by Torch-Pruning")
    if total is not None:
        return RatioPlan(total, {}, ignored, settings.round_to)
    if settings.global_pruning:
        widths = prunable_layers(model, set(ignored_names))
        kept = sum(keep.get(name, width) for name, width in widths.items())
        return RatioPlan(1.0 - kept / sum(widths.values()), {}, ignored, settings.round_to)
    # Torch-Pruning keeps int(C * (1 - ratio)) channels: half a channel more keeps float error
    # from costing one. The counts are rounded already, so it rounds nothing itself.
    per_layer = {
        modules[name]: (_out_width(modules[name]) - count - 0.5) / _out_width(modules[name])
        for name, count in keep.items()
    }
    return RatioPlan(0.0, per_layer, ignored, None)


@dataclass
class Graph:
    """One graph Torch-Pruning prunes: the whole model, or one of pruner.submodules with the
    input it is called with (for tracing) and the shape of its output (which must stay)."""

    module: nn.Module
    example: torch.Tensor | tuple
    plan: RatioPlan
    name: str = ""
    output_shape: tuple[int, ...] | None = None

    def check_output(self) -> None:
        if self.output_shape is None:
            return
        with torch.no_grad():
            shape = _shape(self.module(*_as_args(self.example)))
        if shape != self.output_shape:
            raise UnsupportedModelError(
                f"pruner.submodules: pruning {self.name!r} changed its output from "
                f"{self.output_shape} to {shape}; allowed values: submodules whose outputs "
                f"come from their last layer alone (an MLP, a branch), not through a residual"
            )


def pruning_graphs(
    model: nn.Module, plan: RatioPlan, patterns: list[str], example: torch.Tensor
) -> list[Graph]:
    """The whole model as one graph, or, with `patterns`, every outermost submodule whose name
    matches one, with its last layer (whose outputs leave it) among the ignored ones: only the
    widths inside it are pruned, so the rest of the model need not be traced."""
    if not patterns:
        return [Graph(model, example, plan)]
    modules = dict(model.named_modules())
    matched = [n for n in modules if n and any(fnmatchcase(n, p) for p in patterns)]
    matched = [n for n in matched if not any(n.startswith(f"{o}.") for o in matched)]
    if not matched:
        raise ConfigError(
            f"pruner.submodules: {patterns} match no submodule; allowed values: patterns over "
            f"the submodule names, e.g. {next(n for n in modules if n)!r}"
        )
    calls: dict[str, tuple] = {}

    def keep_call(name: str):
        def hook(module, args, output) -> None:
            calls.setdefault(name, (args, _shape(output)))

        return hook

    handles = [modules[n].register_forward_hook(keep_call(n)) for n in matched]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    graphs = []
    for name in matched:
        submodule = modules[name]
        inside = set(submodule.modules())
        layers = [m for m in submodule.modules() if _out_width(m) is not None]
        if name not in calls or len(layers) < 2:  # unused, or no width of its own to prune
            continue
        args, output_shape = calls[name]
        part = RatioPlan(
            plan.total,
            {m: ratio for m, ratio in plan.per_layer.items() if m in inside},
            [m for m in plan.ignored if m in inside] + [layers[-1]],
            plan.round_to,
        )
        example_args = args[0] if len(args) == 1 else args
        graphs.append(Graph(submodule, example_args, part, name, output_shape))
    if not graphs:
        raise ConfigError(
            f"pruner.submodules: none of {matched[:3]} is called with two or more layers of "
            f"its own; allowed values: patterns of submodules with a free width inside"
        )
    return graphs


def _as_args(example: torch.Tensor | tuple) -> tuple:
    return example if isinstance(example, tuple) else (example,)


def _shape(output) -> tuple[int, ...] | None:
    return tuple(output.shape) if isinstance(output, torch.Tensor) else None


@contextlib.contextmanager
def ranking_statistics(
    importance, model: nn.Module, settings: PrunerSettings, inputs: StageInputs
) -> Iterator[None]:
    """What the importance class reads besides the weights, from settings.training_steps
    training batches: gradients of the loss summed over them (Taylor), or each layer's mean
    |input| summed over them (Torch-Pruning's activation hook keeps only the last batch's)."""
    kind = importance_kind(settings._target_)
    batches = cycled_batches(inputs.loaders.train, settings.training_steps or 0)
    if kind == "gradient":
        model.zero_grad(set_to_none=True)
        for images, labels in batches:
            images, labels = images.to(inputs.device), labels.to(inputs.device)
            inputs.criterion(model(images), labels).backward()
    elif kind == "activation":
        sums: dict[nn.Module, torch.Tensor] = {}
        with importance.compute_importance(model), torch.no_grad():
            for images, _ in batches:
                model(images.to(inputs.device))
                for module in model.modules():
                    if hasattr(module, "_importance"):
                        sums[module] = sums.get(module, 0) + module._importance
        for module, total in sums.items():
            module._importance = total
    yield


def _record(group, names: dict, shapes: dict, masks: Masks) -> None:
    """The output channels `group` removes from convolutions and linear layers, as masks on
    the widths the step began with."""
    from torch_pruning.pruner import function

    removes_outputs = (
        function.prune_conv_out_channels,
        function.prune_depthwise_conv_out_channels,
        function.prune_linear_out_channels,
    )
    for dependency, indices in group:
        layer = dependency.target.module
        name = names.get(layer)
        if dependency.handler not in removes_outputs or shapes.get(name) is None:
            continue
        kept = torch.ones(shapes[name], dtype=torch.bool)
        kept[list(indices)] = False
        weight = kept.view(-1, *([1] * (layer.weight.dim() - 1))).expand(
            shapes[name], *layer.weight.shape[1:]
        )
        masks[name] = {"weight": weight.float().contiguous()}
        if getattr(layer, "bias", None) is not None:
            masks[name]["bias"] = kept.float()


def _fix_hidden_dim(model: nn.Module) -> None:
    """torchvision's VisionTransformer reshapes its patches by self.hidden_dim: after the
    embedding width is pruned, it must follow conv_proj (as Torch-Pruning's own ViT example
    sets it)."""
    if hasattr(model, "hidden_dim") and isinstance(getattr(model, "conv_proj", None), nn.Conv2d):
        model.hidden_dim = model.conv_proj.out_channels


def unsupported(error: BaseException) -> UnsupportedModelError:
    """One line for a model Torch-Pruning cannot take: what it said."""
    return UnsupportedModelError(
        f"Torch-Pruning {version('torch-pruning')} cannot prune this model "
        f"({type(error).__name__}: {first_line(error)})"
    )
