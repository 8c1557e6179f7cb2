"""The one place that calls NNI 2.10.1: the pruner (its class from pruner._target_), the
evaluator's training functions, ModelSpeedup with its retry (and, in pipeline.pruning.nni.rules, the
replacement rules it lacks), and NNI's log levels.

NNI is imported inside the functions, so that loading a pruned model, the command line's config
checks and everything else run without it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from unittest import mock

import torch
from hydra.utils import get_class
from torch import nn

from pipeline.config.schema import NNI_ACTIVATIONS, PrunerSettings
from pipeline.errors import EmptyLayerError, SpeedupError, first_line
from pipeline.measure.runtime_forms import fold_batchnorm
from pipeline.pruning.engine import Masks
from pipeline.pruning.nni.rules import channel_following_norms, replacement_rules, unsupported
from pipeline.training.loop import cycled_batches, train_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerDependencies:
    """What NNI's dependency-aware pruner traces the model for: the layers whose output
    channels are tied (by residual additions: they must be pruned alike) and the group count
    each conv's channels must respect. Both follow from the graph and the convs' groups alone,
    so they stay valid while pruning only narrows the layers: `signature` says for which
    layers they were found."""

    channel: list[set[str]]
    group: dict[str, int]
    signature: tuple

    def fit(self, model: nn.Module) -> bool:
        return self.signature == layer_signature(model)


def layer_signature(model: nn.Module) -> tuple:
    """The model's convs by name with what NNI's GroupDependency reads: depthwise (one group
    per output channel: no constraint, however many) or else their group count. Pruning
    channels changes neither, except for a depthwise conv with a channel multiplier, whose
    groups follow its input."""
    return tuple(
        (name, "depthwise" if module.groups == module.out_channels else module.groups)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))
    )


# NNI 2.10.1's structured pruners by what they rank channels on; any other class (an activation
# pruner of NNI's, or one with the same constructor) ranks on activations.
NORM_PRUNERS = ("L1NormPruner", "L2NormPruner", "FPGMPruner")  # the weights alone
GRADIENT_PRUNERS = ("TaylorFOWeightPruner",)  # weight x gradient over training steps


def pruner_kind(target: str) -> str:
    """norm, gradient or activation: which settings the pruner class `target` reads."""
    name = str(target).rsplit(".", 1)[-1]
    if name in NORM_PRUNERS:
        return "norm"
    return "gradient" if name in GRADIENT_PRUNERS else "activation"


# pruner.activation values NNI 2.10.1 does not offer (schema.NNI_ACTIVATIONS): the pruner is
# built with relu and given these instead; its hooks read the function at every batch.
MAGNITUDES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"abs": torch.abs}

NNI_PLAIN_LOGGERS = ("FixMaskConflict", "Shape_Dependency", "torch apply compression")


def quiet_nni() -> None:
    """NNI logs every wrapped and replaced module at INFO; keep warnings and errors only."""
    # NNI gives its module loggers explicit levels, so the parent's level is not enough.
    names = [name for name in logging.root.manager.loggerDict if name.startswith("nni")]
    # A few of its utilities log under names of their own.
    for name in ["nni", *names, *NNI_PLAIN_LOGGERS]:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Warns on every pruning call that it had no model to unbind: nothing to act on.
    logging.getLogger("nni.algorithms.compression.v2.pytorch.utils.evaluator").setLevel(
        logging.ERROR
    )
    # ModelSpeedup's mask inference reads .grad of non-leaf tensors, which torch warns about
    # once per layer; it works as intended.
    warnings.filterwarnings(
        "ignore", message="The .grad attribute of a Tensor", category=UserWarning
    )
    # NNI traces the model with torch.jit, which torch now marks as deprecated on every call.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=FutureWarning)


@contextlib.contextmanager
def lean_tracing() -> Iterator[None]:
    """NNI's torch.jit.trace calls without check_trace.

    NNI reads the traced graph only to find layers and their dependencies, never runs the
    trace; the check torch does by default traces the model a second time and compares the two
    (at 224x224 it was 12.7 s of the 22 s the default 4-step schedule spent tracing).
    """
    original = torch.jit.trace
    with mock.patch.object(torch.jit, "trace", functools.partial(original, check_trace=False)):
        yield


def nni_training_func(loader: Iterable, device: torch.device) -> Callable:
    """The training function NNI's TorchEvaluator calls; max_steps counts optimizer steps."""

    def training_func(
        model, optimizers, criterion, lr_schedulers=None, max_steps=None, max_epochs=None
    ):
        optimizer = optimizers[0] if isinstance(optimizers, (list, tuple)) else optimizers
        if max_steps is None:
            for _ in range(max_epochs or 1):
                train_steps(
                    model,
                    loader,
                    criterion,
                    optimizer,
                    device,
                    desc="prune stats",
                    hint="lower pruner.lr",
                )
            return
        # A short loader is cycled until max_steps batches have run.
        batches = cycled_batches(loader, max_steps)
        train_steps(
            model, batches, criterion, optimizer, device, desc="prune stats", hint="lower pruner.lr"
        )

    return training_func


def observe_func(loader: Iterable, device: torch.device, batches: int) -> Callable:
    """A stand-in for NNI's training function that only looks: `batches` forward passes in eval
    mode, no gradient, no optimizer step, whatever max_steps NNI asks for."""

    @torch.no_grad()
    def training_func(
        model, optimizers, criterion, lr_schedulers=None, max_steps=None, max_epochs=None
    ):
        model.eval()
        for images, _ in cycled_batches(loader, batches):
            model(images.to(device))

    return training_func


def channel_masks(
    model: nn.Module,
    config_list: list[dict],
    settings: PrunerSettings,
    loader: Iterable,
    criterion: Callable,
    device: torch.device,
    input_shape: tuple[int, int, int],
    dependencies: LayerDependencies | None = None,
) -> tuple[Masks, LayerDependencies | None]:
    """Rank output channels with the pruner class named by settings._target_ and return NNI's
    masks for the lowest-ranked ones. `model` keeps its layer shapes, and its weights too,
    except where NNI trains it while it ranks (Taylor pruners, statistics=nni: training_steps
    batches at pruner.lr, as NNI's evaluator does). Norm pruners read the weights of a copy,
    activation pruners observe a BatchNorm-folded copy; masks are keyed by layer name.

    In dependency_aware mode NNI traces the model to find which layers must be pruned alike;
    `dependencies` found on an earlier, wider version of the same model (see
    LayerDependencies.fit) spare that trace. The dependencies used are returned with the
    masks (None in normal mode)."""
    quiet_nni()
    # pipeline.checks.settings.settings_from has checked that _target_ imports (TARGETS).
    pruner_class = get_class(settings._target_)
    model.to(device)
    dummy_input = torch.rand(
        settings.confidence,
        *trace_shape(model, input_shape, settings.trace_input_size),
        device=device,
    )
    mode = _value(settings.mode)
    found: list[LayerDependencies] = []
    try:
        with lean_tracing(), known_dependencies(model, dependencies, found):
            if pruner_kind(settings._target_) == "norm":
                target = copy.deepcopy(model)
                pruner = pruner_class(target, config_list, mode=mode, dummy_input=dummy_input)
            else:
                pruner = _data_pruner(
                    pruner_class,
                    model,
                    config_list,
                    settings,
                    loader,
                    criterion,
                    device,
                    dummy_input,
                )
            _, masks = pruner.compress()
    except Exception as error:
        raise unsupported("pruner", error) from error
    pruner._unwrap_model()
    return masks, (found[0] if found else None)


def _data_pruner(
    pruner_class: type,
    model: nn.Module,
    config_list: list[dict],
    settings: PrunerSettings,
    loader: Iterable,
    criterion: Callable,
    device: torch.device,
    dummy_input: torch.Tensor,
):
    """An NNI pruner that ranks on training batches: a Taylor pruner or an activation pruner,
    with the evaluator that feeds it."""
    import nni
    from nni.algorithms.compression.v2.pytorch import TorchEvaluator

    gradient = pruner_kind(settings._target_) == "gradient"
    if not gradient and settings.statistics == "activation":
        # NNI hooks each layer's own output (a conv's is taken before its BatchNorm), applies
        # `activation` itself, and stops adding once the *samples* seen reach training_steps,
        # while its evaluator trains the model for training_steps *batches*. To rank channels
        # by the activation the network really produces: rank on a copy with BatchNorm folded
        # into the convolutions (so a conv's output is the BN output), feed it exactly
        # training_steps batches forward-only in eval mode, and give NNI a sample budget that
        # covers them all.
        target = fold_batchnorm(copy.deepcopy(model).eval())
        batch_size = getattr(loader, "batch_size", None) or 1
        nni_steps = settings.training_steps * batch_size
        training_func = observe_func(loader, device, settings.training_steps)
    else:
        # Taylor scores (weight x gradient) and statistics=nni come from NNI's own training
        # steps, which train `model` itself, as NNI does.
        target, nni_steps = model, settings.training_steps
        training_func = nni_training_func(loader, device)
    # NNI re-creates the optimizer for the wrapped model, so it must be traced.
    optimizer = nni.trace(torch.optim.Adam)(target.parameters(), lr=settings.lr)
    evaluator = TorchEvaluator(training_func, optimizer, criterion, dummy_input=dummy_input)
    mode = _value(settings.mode)
    if gradient:
        return pruner_class(
            target,
            config_list,
            evaluator,
            training_steps=nni_steps,
            mode=mode,
            dummy_input=dummy_input,
        )
    activation = _value(settings.activation)
    pruner = pruner_class(
        target,
        config_list,
        evaluator,
        training_steps=nni_steps,
        activation=activation if activation in NNI_ACTIVATIONS else "relu",
        mode=mode,
        dummy_input=dummy_input,
    )
    if activation in MAGNITUDES:
        pruner._activation = MAGNITUDES[activation]
    return pruner


@contextlib.contextmanager
def known_dependencies(
    model: nn.Module, known: LayerDependencies | None, found: list[LayerDependencies]
) -> Iterator[None]:
    """NNI's DependencyAwareAllocator given `known` when it fits `model` instead of tracing;
    what it used lands in `found`."""
    from nni.algorithms.compression.v2.pytorch.pruning.tools.sparsity_allocator import (
        DependencyAwareAllocator,
    )

    traced = DependencyAwareAllocator._get_dependency

    def get_dependency(allocator, dummy_input):
        if known is not None and known.fit(model):
            found.append(known)
        else:
            channel, group = traced(allocator, dummy_input)
            found.append(LayerDependencies(channel, group, layer_signature(model)))
        return found[-1].channel, found[-1].group

    with mock.patch.object(DependencyAwareAllocator, "_get_dependency", get_dependency):
        yield


def _value(choice) -> str:
    return getattr(choice, "value", choice)


def trace_shape(
    model: nn.Module, input_shape: tuple[int, int, int], trace_size: int | None
) -> tuple[int, ...]:
    """The shape of NNI's dummy inputs: channel masks and the dependencies between layers do not
    depend on the spatial size, so a small one makes tracing and mask inference far cheaper.
    A model that cannot run at the small size (a Flatten before a Linear) keeps the real one."""
    channels, height, width = input_shape
    if trace_size is None or trace_size >= max(height, width):
        return input_shape
    small = (channels, trace_size, trace_size)
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *small, device=device))
    except RuntimeError:
        return input_shape
    finally:
        model.train(was_training)
    return small


def speedup(
    model: nn.Module,
    masks: Masks,
    input_shape: tuple[int, int, int],
    confidence: int,
    trace_size: int | None = None,
) -> nn.Module:
    """Replace masked layers by narrower ones; `confidence` is the batch size of NNI's inference.

    With `trace_size`, NNI infers the masks on trace_size x trace_size inputs (much cheaper at
    224). NNI infers which channels survive from `confidence` random samples and now and then
    drops one that is merely zero on all of them, leaving mismatched widths; the result is
    checked at the real input size and, on a mismatch, redone with 4x the samples and then at
    the real size before giving up.
    """
    if not masks:
        return model
    shape = trace_shape(model, input_shape, trace_size)
    attempts = [(shape, confidence), (shape, confidence * 4), (input_shape, confidence * 4)]
    attempts = list(dict.fromkeys(attempts))  # drop repeats, keep the order
    for number, (attempt_shape, samples) in enumerate(attempts, start=1):
        candidate = copy.deepcopy(model) if number < len(attempts) else model
        # ModelSpeedup writes what it infers into the masks it is given: every attempt starts
        # from the pruner's own.
        given = copy.deepcopy(masks)
        try:
            return model_speedup(candidate, given, attempt_shape, samples, check_shape=input_shape)
        except SpeedupError as error:
            if number == len(attempts):
                raise
            log.warning("speedup attempt %d failed (%s); retrying", number, error)
    raise AssertionError("unreachable")


def model_speedup(
    model: nn.Module,
    masks: Masks,
    shape: tuple[int, ...],
    confidence: int,
    check_shape: tuple[int, ...],
) -> nn.Module:
    """One ModelSpeedup call on `shape` inputs, checked by a forward pass at `check_shape`."""
    from nni.compression.pytorch.speedup import ModelSpeedup, compressor

    quiet_nni()
    device = next(model.parameters()).device
    dummy_input = torch.rand(confidence, *shape, device=device)
    model.eval()
    try:
        with lean_tracing():
            speedup = ModelSpeedup(
                model,
                dummy_input,
                masks,
                confidence=confidence,
                customized_replace_func=replacement_rules(model),
            )
        # ModelSpeedup traces the model once to build its graph and, in speedup_model, once
        # more to fix mask conflicts, on the same model and input: give the second its trace.
        shared_trace = functools.partial(
            compressor.fix_mask_conflict, traced=speedup.torch_graph.trace
        )
        # After tracing (the graph keeps the norms' own types), before mask inference.
        with (
            mock.patch.object(compressor, "fix_mask_conflict", shared_trace),
            channel_following_norms(model),
        ):
            speedup.speedup_model()
    except Exception as error:
        if type(error).__name__ == "EmptyLayerError":
            # The sparsity leaves a layer empty: the budget search counts it as too much.
            raise EmptyLayerError(f"NNI's ModelSpeedup: {first_line(error)}") from error
        raise unsupported("ModelSpeedup", error) from error
    try:
        with torch.no_grad():
            model(torch.rand(2, *check_shape, device=device))
    except RuntimeError as error:
        # NNI infers which channels survive from `confidence` random samples; too few samples
        # can mislead it into mismatched layer widths.
        raise SpeedupError(
            f"pruner.confidence={confidence}: ModelSpeedup produced inconsistent layer widths "
            f"({str(error).splitlines()[0]}); raise pruner.confidence (8 or more)"
        ) from None
    return model
