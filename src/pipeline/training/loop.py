"""The one train / evaluate loop, shared by the baseline, NNI's training steps and fine-tuning."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from itertools import islice

import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from pipeline.config.schema import TrainingSettings
from pipeline.data.datasets import Loaders
from pipeline.errors import DivergedError
from pipeline.training.distributed import (
    SINGLE,
    World,
    all_sum,
    autocast,
    check_same_model,
    sync_buffers,
)

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    accuracy: float  # top-1, 0..1
    top5: float
    loss: float
    samples: int
    correct: list[bool] = field(default_factory=list)  # top-1 right or wrong, image by image
    # Image by image as well, for per-class figures (confusion matrix, recall per class).
    predicted: list[int] = field(default_factory=list)  # top-1 class
    labels: list[int] = field(default_factory=list)
    classes: int = 0  # width of the model's output


@dataclass
class FitResult:
    model: nn.Module  # holds the weights of best_epoch
    history: list[dict] = field(default_factory=list)  # {epoch, train_loss, val_accuracy, val_loss}
    best_epoch: int = 0  # 0: the starting weights were best (or no epoch ran)


@dataclass
class Distillation:
    """Knowledge distillation from a teacher (the unpruned baseline): the loss mixes the task
    loss with the KL divergence between softened teacher and student outputs (Hinton et al.)."""

    teacher: nn.Module
    alpha: float  # weight of the distillation term
    temperature: float

    def loss(self, criterion: Callable, logits, labels, images) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
        )
        return (1.0 - self.alpha) * criterion(logits, labels) + self.alpha * t * t * soft


def cycled_batches(loader: Iterable, count: int) -> Iterator:
    """Exactly `count` batches, going round a loader shorter than that again (fewer only when
    the loader is empty)."""
    done = 0
    while done < count:
        before = done
        for batch in islice(loader, count - done):
            done += 1
            yield batch
        if done == before:
            return


def _progress(loader: Iterable, desc: str):
    return tqdm(
        loader,
        total=len(loader) if hasattr(loader, "__len__") else None,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=None,
    )


def batch_layout(channels_last: bool) -> torch.memory_format:
    """The memory format of the training loop's weights and image batches."""
    return torch.channels_last if channels_last else torch.contiguous_format


def _on(images: torch.Tensor, device: torch.device, layout: torch.memory_format) -> torch.Tensor:
    # channels_last exists for 4-D batches only; anything else keeps its layout.
    layout = layout if images.dim() == 4 else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=layout)


def train_steps(
    model: nn.Module,
    loader: Iterable,
    criterion: Callable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    desc: str = "train",
    distillation: Distillation | None = None,
    layout: torch.memory_format = torch.contiguous_format,
    average: torch.optim.swa_utils.AveragedModel | None = None,
    max_grad_norm: float | None = None,
    epoch: int = 1,
    stage: str | None = None,
    hint: str = "lower finetune.lr",
    precision: str = "32",
    scaler: torch.amp.GradScaler | None = None,
    world: World = SINGLE,
) -> float:
    """One pass over the loader; returns the mean training loss. `average`, where given, is
    updated after every optimizer step; `max_grad_norm` clips the gradients before it.
    A NaN or infinite loss stops the pass with DivergedError, one line naming `stage` (`desc`
    unless given), `epoch`, the step and the learning rate, ending with `hint`.
    `precision` (bf16-mixed, 16-mixed with `scaler`, 32) is the forward passes'; over several
    ranks (`world`), `model` is the DDP-wrapped one and the mean is over every rank's images."""
    model.train()
    if distillation is not None:
        distillation.teacher.eval()
    # Kept on the device and read every CHECK_EVERY steps: a .item() per step would wait for
    # the GPU at each one. A non-finite loss makes the running sum non-finite, and first_bad
    # remembers its step.
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
    bar = _progress(loader, desc)
    for step, (images, labels) in enumerate(bar, 1):
        images, labels = _on(images, device, layout), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            logits = model(images)
            if distillation is None:
                loss = criterion(logits, labels)
            else:
                loss = distillation.loss(criterion, logits, labels, images)
        if scaler is not None:  # 16-mixed: scaled, so that small fp16 gradients do not vanish
            scaler.scale(loss).backward()
            if max_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
        if average is not None:
            average.update_parameters(getattr(model, "module", model))  # DDP's inner model
        loss = loss.detach().float()
        first_bad = torch.where(
            (first_bad < 0) & ~torch.isfinite(loss), torch.full_like(first_bad, step), first_bad
        )
        total_loss += loss.double() * len(labels)
        seen += len(labels)
        if step % CHECK_EVERY == 0:
            mean = _checked(total_loss, first_bad, optimizer, stage or desc, epoch, hint) / seen
            bar.set_postfix(loss=f"{mean:.4f}")
    total = _checked(total_loss, first_bad, optimizer, stage or desc, epoch, hint)
    total, seen = all_sum([total, seen], world, device)
    return total / max(seen, 1)


CHECK_EVERY = 20  # training steps between two looks at the loss (one GPU sync each)


def _checked(
    total: torch.Tensor,
    first_bad: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    stage: str,
    epoch: int,
    hint: str,
) -> float:
    """The running loss sum as a float, or DivergedError when a step's loss was not finite."""
    value = total.item()
    if math.isfinite(value):
        return value
    lr = optimizer.param_groups[0]["lr"]
    raise DivergedError(
        f"{stage}: the training loss became {value} at epoch {epoch}, step {int(first_bad)} "
        f"(learning rate {lr:g}), so the stage stopped and kept nothing; {hint}"
    )


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, loader: Iterable, num_batches: int, device: torch.device
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics from `num_batches` forward passes.

    Removing channels changes what each later layer receives, while the BatchNorms still
    normalise with the statistics of the unpruned network; the errors compound through the
    depth (on Fashion-MNIST, pruning 5 % of MobileNetV2's channels took validation accuracy from
    0.77 to 0.47, and re-estimating the statistics brought most of it back). Forward passes
    only: no weight changes. A short loader is cycled.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if num_batches <= 0 or not norms:
        return model
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all the batches, not a decaying one
    was_training = model.training
    model.train()
    for images, _ in cycled_batches(loader, num_batches):
        model(images.to(device, non_blocking=True))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(was_training)
    return model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    criterion: Callable,
    device: torch.device,
    desc: str = "eval",
    layout: torch.memory_format = torch.contiguous_format,
) -> EvalResult:
    model.eval()
    correct5 = seen = 0
    total_loss = 0.0
    correct: list[bool] = []
    predicted: list[int] = []
    truth: list[int] = []
    classes = 0
    for images, labels in _progress(loader, desc):
        images, labels = _on(images, device, layout), labels.to(device, non_blocking=True)
        logits = model(images)
        total_loss += criterion(logits, labels).item() * len(labels)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels.unsqueeze(1))
        correct += hits[:, 0].tolist()
        predicted += top[:, 0].tolist()
        truth += labels.tolist()
        classes = logits.shape[1]
        correct5 += hits.any(dim=1).sum().item()
        seen += len(labels)
    if seen == 0:
        return EvalResult(math.nan, math.nan, math.nan, 0)
    return EvalResult(
        sum(correct) / seen,
        correct5 / seen,
        total_loss / seen,
        seen,
        correct,
        predicted,
        truth,
        classes,
    )


def evaluate_across(
    model: nn.Module,
    loader: Iterable,
    criterion: Callable,
    device: torch.device,
    world: World,
    desc: str = "val",
    layout: torch.memory_format = torch.contiguous_format,
) -> EvalResult:
    """evaluate() over a split sharded between the ranks, summed: the exact accuracy and mean
    loss over the whole split (not a mean of the ranks' means); no image-by-image lists."""
    mine = evaluate(model, loader, criterion, device, desc, layout)
    if not world.distributed:
        return mine
    n = mine.samples
    sums = [mine.accuracy * n, mine.top5 * n, mine.loss * n, n] if n else [0.0, 0.0, 0.0, 0]
    correct, correct5, loss, seen = all_sum(sums, world, device)
    if seen == 0:
        return EvalResult(math.nan, math.nan, math.nan, 0)
    return EvalResult(correct / seen, correct5 / seen, loss / seen, int(seen))


def set_epoch(loader: Iterable, epoch: int) -> None:
    """A DistributedSampler's epoch (its shuffle), through FirstBatches where there is one."""
    inner = getattr(loader, "loader", loader)
    sampler = getattr(inner, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def lr_schedule(
    optimizer: torch.optim.Optimizer, epochs: int, schedule: str, warmup_epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """constant, or linear warm-up then cosine decay, stepped once per epoch."""
    if schedule == "constant":
        return None

    def factor(epoch: int) -> float:  # epoch: the number of epochs finished
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def ema_average(decay: float) -> Callable[[list, list, torch.Tensor], None]:
    """An exponential moving average of weights and buffers for AveragedModel's multi_avg_fn,
    with the usual warm-up of the decay, min(decay, (1 + n) / (10 + n)) after n updates
    (TensorFlow's ExponentialMovingAverage with num_updates; timm's ModelEma): the first
    updates follow the model closely, so the pruned starting weights fade within a few hundred
    steps instead of weighing on the average for thousands. Integer buffers (BatchNorm's batch
    count) take the model's value."""

    @torch.no_grad()
    def update(averaged: list, current: list, updates: torch.Tensor) -> None:
        n = int(updates)
        rate = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for mean, value in zip(averaged, current, strict=True):
            if mean.is_floating_point():
                mean.lerp_(value, rate)
            else:
                mean.copy_(value)

    return update


def fit(
    model: nn.Module,
    loaders: Loaders,
    criterion: Callable,
    settings: TrainingSettings,
    device: torch.device,
    desc: str = "train",
    on_epoch: Callable[[dict], None] | None = None,
    distillation: Distillation | None = None,
    ema_decay: float = 0.0,
    precision: str = "32",
    world: World = SINGLE,
) -> FitResult:
    """Train for settings.epochs with settings.optimizer at settings.lr under settings.schedule,
    keeping the weights of the epoch with the best validation accuracy. The one training loop
    of the baseline and fine-tuning stages. With settings.channels_last the loop runs in NHWC
    (weights and batches); the model it returns is back in the default layout.
    With ema_decay > 0 an exponential moving average of the weights and BatchNorm statistics
    (ema_average) follows every step, and it, not the last step's weights, is what each epoch
    validates, what the best epoch keeps and what is returned; 0 is no averaging.
    `precision`: the forward passes' (pipeline.training.distributed.autocast). Over several
    ranks (`world`, loaders sharded) the model trains inside DistributedDataParallel, each
    epoch ends with rank 0's BatchNorm statistics on every rank, and validation is summed over
    the ranks, so every rank keeps the same epoch and weights."""
    layout = batch_layout(settings.channels_last)
    model.to(device, memory_format=layout)
    average = None
    if ema_decay > 0:
        average = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=ema_average(ema_decay), use_buffers=True
        )
    validated = model if average is None else average.module
    if distillation is not None:
        # The teacher sees the same NHWC batches: in NCHW it would convert each one back.
        distillation.teacher.to(device, memory_format=layout)
    optimizer = instantiate(settings.optimizer)(model.parameters(), lr=settings.lr)
    trained = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=ids)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    scheduler = lr_schedule(
        optimizer, settings.epochs, _name(settings.schedule), settings.warmup_epochs
    )
    best_accuracy = -1.0
    best_state = None
    result = FitResult(model=model)
    # disable=None: bars on a terminal, none in redirected logs.
    epochs = settings.epochs
    epoch_bar = tqdm(range(1, epochs + 1), desc=desc, dynamic_ncols=True, disable=None)
    for epoch in epoch_bar:
        set_epoch(loaders.train, epoch)
        train_loss = train_steps(
            trained,
            loaders.train,
            criterion,
            optimizer,
            device,
            f"{desc} {epoch}",
            distillation,
            layout,
            average,
            settings.max_grad_norm,
            epoch=epoch,
            stage=desc,
            hint=f"lower {desc}.lr or set {desc}.max_grad_norm",
            precision=precision,
            scaler=scaler,
            world=world,
        )
        if scheduler is not None:
            scheduler.step()
        sync_buffers(model, world)
        if average is not None:
            sync_buffers(average.module, world)
        with autocast(precision, device):
            val = evaluate_across(validated, loaders.val, criterion, device, world, "val", layout)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_accuracy": val.accuracy,
            "val_loss": val.loss,
        }
        if world.distributed:  # every rank holds the same weights after every epoch, checked
            record["parameter_hash"] = check_same_model(validated, world, f"{desc} epoch {epoch}")
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        epoch_bar.set_postfix(loss=f"{train_loss:.4f}", val_acc=f"{val.accuracy:.4f}")
        log.info(
            "%s epoch %d/%d: train loss %.4f, val accuracy %.4f",
            desc,
            epoch,
            epochs,
            train_loss,
            val.accuracy,
        )
        # A NaN accuracy (empty validation split) never beats; the last epoch is kept then.
        if val.accuracy > best_accuracy or math.isnan(val.accuracy):
            best_accuracy = val.accuracy if not math.isnan(val.accuracy) else best_accuracy
            best_state = copy.deepcopy(validated.state_dict())
            result.best_epoch = epoch
    # Back to the layout every later stage expects (NNI's tracing, safetensors, export).
    model.to(memory_format=torch.contiguous_format)
    if distillation is not None:
        distillation.teacher.to(memory_format=torch.contiguous_format)
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


def _name(choice: Enum | str) -> str:
    return choice.value if isinstance(choice, Enum) else choice
