"""What the benchmarks share: the two reference models, random data, the project's settings and
the two ways of pruning (the project's stage functions and the plain NNI call sequence)."""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.checks.settings import settings_from
from pipeline.config.compose import compose
from pipeline.config.schema import MeasureSettings, PrunerSettings, RunSettings
from pipeline.data.datasets import Loaders, StageInputs
from pipeline.measure.latency import PairedLatency
from pipeline.measure.uncertainty import latency_ratio
from pipeline.models.zoo import mobilenet_v2
from pipeline.pruning.nni.adapter import Masks
from pipeline.pruning.nni.adapter import speedup as nni_speedup
from pipeline.pruning.steps import prune_in_steps
from pipeline.stages.measure import timed_pair
from pipeline.stages.prune import prune
from pipeline.training.seeding import seed_everything

SEED = 1234
# Input size -> number of classes: 224 is the reference (Oxford-IIIT Pet) model, 32 the
# small-input model the digits default runs.
NUM_CLASSES = {224: 37, 32: 10}
LOADER_BATCH = 8


def input_shape(size: int) -> tuple[int, int, int]:
    return (3, size, size)


def build_model(size: int, seed: int = SEED) -> nn.Module:
    """The unpruned MobileNetV2 for `size`, randomly initialised from `seed`."""
    if size not in NUM_CLASSES:
        raise ValueError(f"size {size}: allowed sizes are {sorted(NUM_CLASSES)}")
    seed_everything(seed)
    return mobilenet_v2(num_classes=NUM_CLASSES[size])


def random_loader(size: int, steps: int, seed: int = SEED) -> DataLoader:
    """Exactly `steps` batches of random images and labels, in a fixed order (no shuffling), so
    every consumer sees the same batches."""
    generator = torch.Generator().manual_seed(seed)
    count = steps * LOADER_BATCH
    images = torch.randn(count, *input_shape(size), generator=generator)
    labels = torch.randint(0, NUM_CLASSES[size], (count,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=LOADER_BATCH, shuffle=False)


def quiet_warnings() -> None:
    """TorchScript tracing inside NNI warns on every call; the table is what matters here."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def project_settings(overrides: list[str]) -> RunSettings:
    """The project's checked settings, composed from conf/ with `overrides` exactly as
    `python -m pipeline` composes them."""
    return settings_from(compose(overrides))


def pruner_settings(
    training_steps: int = 5, round_to: str = "default", statistics: str = "default"
) -> PrunerSettings:
    """The pruner section of the project's config, with every value the benchmarks depend on
    pinned by an override. `round_to` and `statistics`: "default" keeps the project's default,
    anything else overrides it."""
    overrides = [
        "pruner=mean_rank",
        "pruner.mode=dependency_aware",
        "pruner.activation=relu",
        f"pruner.training_steps={training_steps}",
        f"pruner.batch_size={LOADER_BATCH}",  # what random_loader's batches hold
        "pruner.lr=0.001",
        "pruner.config_list=null",
        "pruner.exclude_last_layer=true",
        "pruner.confidence=8",
        "pruner.pruning_on_cuda=false",
    ]
    if round_to != "default":
        overrides.append(f"pruner.round_to={round_to}")
    if statistics != "default":
        overrides.append(f"pruner.statistics={statistics}")
    return project_settings(overrides).pruner


def add_timing_options(
    parser: argparse.ArgumentParser,
    threads: int | None = None,
    warmup: int | None = None,
    repeats_help: str = "measure.repeats: timed calls per model (default: conf/)",
) -> None:
    """--threads, --warmup, --repeats and --rounds: overrides of the measure settings (None
    keeps the value in conf/), read by measure_settings."""
    parser.add_argument(
        "--threads",
        type=int,
        default=threads,
        help="measure.threads: CPU threads while timing (torch; onnxruntime: intra-op) "
        f"(default: {'conf/, where null is torch default' if threads is None else threads})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=warmup,
        help="measure.warmup: untimed calls first, at most 3 above batch 1 "
        f"(default: {'conf/' if warmup is None else warmup})",
    )
    parser.add_argument("--repeats", type=int, default=None, help=repeats_help)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="measure.rounds: alternating rounds the repeats are split into (default: conf/)",
    )


def measure_settings(**options: object) -> MeasureSettings:
    """The measure section of the project's config with each option that is not None as a
    `measure.<key>=<value>` override, as a command line would give it."""
    overrides = [f"measure.{key}={value}" for key, value in options.items() if value is not None]
    return project_settings(overrides).measure


def timed_ratio(
    baseline: nn.Module,
    pruned: nn.Module,
    size: int,
    device: torch.device,
    settings: MeasureSettings,
    batch_size: int = 1,
    repeats: int | None = None,
) -> tuple[PairedLatency, dict, dict | None]:
    """Both models timed as the measure stage times them (timed_pair: alternating rounds in
    this process; `repeats` None: settings.repeats), the pruned/baseline ratio with its 95 %
    interval from the per-round ratios (pipeline.measure.uncertainty.latency_ratio), and on
    CUDA each model's peak memory of a call (MiB; None elsewhere)."""
    shape = input_shape(size)
    pair, memory = timed_pair(baseline, pruned, shape, device, settings, batch_size, repeats)
    return pair, latency_ratio(pair.baseline_rounds, pair.pruned_rounds), memory


def stage_inputs(size: int, settings: PrunerSettings) -> StageInputs:
    """What the prune and speedup stages read: training_steps random batches, the loss, the CPU
    and the input shape. No stage run here evaluates, so there is no validation or test data."""
    return StageInputs(
        loaders=Loaders(train=random_loader(size, settings.training_steps), val=(), test=()),
        criterion=nn.CrossEntropyLoss(),
        device=torch.device("cpu"),
        input_shape=input_shape(size),
    )


def project_prune(
    model: nn.Module, size: int, sparsity: float, settings: PrunerSettings
) -> tuple[nn.Module, Masks]:
    """Stage 2 as the pipeline runs it, on the CPU; returns the masked model and the masks."""
    seed_everything(SEED)
    result = prune(model, inputs=stage_inputs(size, settings), settings=settings, sparsity=sparsity)
    return result.model, result.masks


def project_pruned_model(
    model: nn.Module, size: int, sparsity: float, settings: PrunerSettings
) -> nn.Module:
    """The pipeline's pruned model: prune, speedup and BatchNorm re-estimation in
    settings.iterations steps (pipeline.pruning.steps), on the CPU."""
    seed_everything(SEED)
    result = prune_in_steps(
        model, inputs=stage_inputs(size, settings), settings=settings, sparsity=sparsity
    )
    return result.model


def project_speedup(
    model: nn.Module, masks: Masks, size: int, settings: PrunerSettings
) -> nn.Module:
    """The project's ModelSpeedup call with its checks and retries, without the BatchNorm
    re-estimation of the speedup stage: the plain side has none either."""
    seed_everything(SEED)
    return nni_speedup(
        model,
        masks,
        input_shape=input_shape(size),
        confidence=settings.confidence,
        trace_size=settings.trace_input_size,
    )


def plain_prune(
    model: nn.Module, size: int, sparsity: float, training_steps: int, lr: float = 1e-3
) -> tuple[nn.Module, Masks]:
    """The NNI 2.10.1 call sequence a user would write without the pipeline."""
    import nni
    from nni.algorithms.compression.v2.pytorch import TorchEvaluator
    from nni.compression.pytorch.pruning import ActivationMeanRankPruner

    loader = random_loader(size, training_steps)

    def training_func(
        model, optimizers, criterion, lr_schedulers=None, max_steps=None, max_epochs=None
    ):
        optimizer = optimizers[0] if isinstance(optimizers, (list, tuple)) else optimizers
        model.train()
        done = 0
        while True:
            for images, labels in loader:
                optimizer.zero_grad()
                criterion(model(images), labels).backward()
                optimizer.step()
                done += 1
                if max_steps is not None and done >= max_steps:
                    return
            if max_steps is None:
                return

    seed_everything(SEED)
    # Same order of random draws as the project's prune(), so both end with the same weights.
    dummy_input = torch.rand(8, *input_shape(size))
    last_linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    config_list = [
        {"total_sparsity": sparsity, "op_types": ["Conv2d", "Linear"]},
        {"exclude": True, "op_names": [last_linear]},
    ]
    optimizer = nni.trace(torch.optim.Adam)(model.parameters(), lr=lr)
    evaluator = TorchEvaluator(
        training_func, optimizer, nn.CrossEntropyLoss(), dummy_input=dummy_input
    )
    pruner = ActivationMeanRankPruner(
        model,
        config_list,
        evaluator,
        training_steps=training_steps,
        mode="dependency_aware",
        dummy_input=dummy_input,
    )
    _, masks = pruner.compress()
    pruner._unwrap_model()
    return model, masks


def plain_speedup(model: nn.Module, masks: Masks, size: int) -> nn.Module:
    from nni.compression.pytorch.speedup import ModelSpeedup

    seed_everything(SEED)
    ModelSpeedup(model, torch.rand(8, *input_shape(size)), masks).speedup_model()
    return model


def architecture(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter: equal lists mean equal pruned architectures."""
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]
