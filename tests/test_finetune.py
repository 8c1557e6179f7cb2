import copy
import math

import pytest
import torch
from torch import nn

from pipeline.models.zoo import mobilenet_v2
from pipeline.stages.finetune import scale_dropout
from pipeline.training.loop import Distillation, lr_schedule


def test_distillation_with_alpha_zero_is_the_task_loss():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    images, labels = torch.randn(8, 4), torch.randint(0, 3, (8,))
    logits = torch.randn(8, 3)
    criterion = torch.nn.CrossEntropyLoss()
    plain = Distillation(teacher, alpha=0.0, temperature=4.0)
    torch.testing.assert_close(
        plain.loss(criterion, logits, labels, images), criterion(logits, labels)
    )


def test_distillation_term_vanishes_when_student_matches_teacher():
    teacher = torch.nn.Linear(4, 3)
    images, labels = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with torch.no_grad():
        logits = teacher(images)
    only_soft = Distillation(teacher, alpha=1.0, temperature=2.0)
    assert only_soft.loss(torch.nn.CrossEntropyLoss(), logits, labels, images).item() < 1e-6


def test_warmup_then_cosine_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_schedule(optimizer, epochs=5, schedule="cosine", warmup_epochs=1)
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.5  # warm-up
    assert rates[1] == 1.0  # peak, then decaying
    assert rates[1] > rates[2] > rates[3] > rates[4] > 0
    assert lr_schedule(optimizer, 5, "constant", 0) is None


def test_recipes_compose(tiny):

    settings = tiny("finetune=reference")
    assert settings.finetune.distill is None
    assert settings.finetune.schedule == "constant"
    default = tiny()
    assert default.finetune.distill is None and default.finetune.schedule == "cosine"
    distill = tiny("finetune=distill")
    assert distill.finetune.distill.alpha == 0.5 and distill.finetune.schedule == "cosine"


def test_distillation_teaches_the_student_what_the_baseline_predicts(tiny):
    """With finetune=distill the student learns what the teacher knows: trained on labels that
    are mostly wrong, the distilled student still answers as the teacher does (the truth, on
    the validation images), and the same student fine-tuned on the labels alone does not."""
    import dataclasses

    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.config.schema import DistillSettings, DropoutRule
    from pipeline.data.datasets import Loaders, StageInputs
    from pipeline.stages.finetune import finetune

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))

    torch.manual_seed(0)
    images = torch.randn(192, 3, 2, 2)
    teacher = net().eval()
    with torch.no_grad():
        taught = teacher(images).argmax(1)
    noisy = torch.where(torch.rand(192) < 0.25, taught, (taught + 1) % 3)

    def loader(labels: torch.Tensor) -> DataLoader:
        return DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=False)

    loaders = Loaders(loader(noisy), loader(taught), loader(taught))
    inputs = StageInputs(loaders, torch.nn.CrossEntropyLoss(), torch.device("cpu"), (3, 2, 2))
    base = dataclasses.replace(
        tiny().finetune, epochs=15, lr=0.05, dropout=DropoutRule.keep, ema_decay=0.0
    )
    agreement = {}
    for name, distill in (("labels", None), ("distilled", DistillSettings(1.0, 1.0))):
        torch.manual_seed(1)
        student = net()
        tuned = finetune(student, inputs, dataclasses.replace(base, distill=distill), teacher)
        with torch.no_grad():
            agreement[name] = (tuned.model(images).argmax(1) == taught).float().mean().item()
    assert agreement["distilled"] > 0.9, agreement
    assert agreement["labels"] < 0.5, agreement


def test_channels_last_training_learns_what_nchw_learns_and_returns_the_default_layout(tiny):
    """NHWC is a speed setting: the same losses and weights as NCHW (to float rounding), and a
    model handed on contiguous (safetensors refuses anything else; NNI traces it next)."""
    import dataclasses

    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.datasets import Loaders
    from pipeline.training.loop import fit

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 8, 8), torch.randint(0, 3, (48,)))
    settings = tiny().finetune
    trained = {}
    for channels_last in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3),
            torch.nn.BatchNorm2d(6),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(6, 3),
        )
        loader = DataLoader(data, batch_size=16, shuffle=False)
        choice = dataclasses.replace(settings, epochs=2, channels_last=channels_last)
        trained[channels_last] = fit(
            model, Loaders(loader, loader, loader), torch.nn.CrossEntropyLoss(), choice, "cpu"
        )
    nhwc, nchw = trained[True], trained[False]
    assert nhwc.model[0].weight.is_contiguous()
    assert not nhwc.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    for ours, theirs in zip(nhwc.history, nchw.history, strict=True):
        assert abs(ours["train_loss"] - theirs["train_loss"]) < 1e-4
    for name, value in nchw.model.state_dict().items():
        torch.testing.assert_close(nhwc.model.state_dict()[name], value, atol=1e-4, rtol=1e-4)


def test_the_teacher_runs_in_the_students_layout_and_is_handed_back_contiguous(tiny):
    """With channels_last a distillation teacher sees NHWC batches in NHWC weights, and the
    baseline it is goes on to the measure stage in the default layout."""
    import dataclasses

    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.datasets import Loaders
    from pipeline.training.loop import Distillation, fit

    def small() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(6, 3),
        )

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,)))
    loader = DataLoader(data, batch_size=16)
    teacher = small()
    layouts = []
    teacher[0].register_forward_hook(
        lambda module, args, out: layouts.append(
            module.weight.is_contiguous(memory_format=torch.channels_last)
        )
    )
    settings = dataclasses.replace(tiny().finetune, epochs=1, channels_last=True)
    fit(
        small(),
        Loaders(loader, loader, loader),
        torch.nn.CrossEntropyLoss(),
        settings,
        "cpu",
        distillation=Distillation(teacher, alpha=0.5, temperature=2.0),
    )
    assert layouts and all(layouts)
    assert teacher[0].weight.is_contiguous()
    assert not teacher[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_scaled_dropout_follows_the_weights_kept_in_the_layer_each_dropout_feeds():
    """Han et al. 2015: rate * sqrt(kept / original weights) of the next layer that runs."""
    base = mobilenet_v2(num_classes=10, weights="none", head=[1024, 512, 128], dropout=0.5)
    pruned = copy.deepcopy(base)
    head = pruned.classifier
    head[0], head[3], head[6], head[9] = (
        nn.Linear(1280, 400),
        nn.Linear(400, 208),
        nn.Linear(208, 48),
        nn.Linear(48, 10),
    )
    changed = scale_dropout(pruned, base, (3, 32, 32))
    expected = {
        "classifier.2": 0.5 * math.sqrt(400 * 208 / (1024 * 512)),
        "classifier.5": 0.5 * math.sqrt(208 * 48 / (512 * 128)),
        "classifier.8": 0.5 * math.sqrt(48 * 10 / (128 * 10)),
    }
    assert {name: new for name, (_, new) in changed.items()} == expected
    assert [head[i].p for i in (2, 5, 8)] == list(expected.values())
    assert base.classifier[2].p == 0.5  # the baseline keeps its own
    # From the original's rates, not the current ones: a second call changes nothing.
    assert scale_dropout(pruned, base, (3, 32, 32)) == {}
    assert scale_dropout(copy.deepcopy(base), base, (3, 32, 32)) == {}


class _DeclaredOutOfOrder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 3)  # declared first, runs last
        self.body = nn.Linear(4, hidden)
        self.drop = nn.Dropout(0.4)

    def forward(self, x):
        return self.fc(self.drop(self.body(x.flatten(1))))


def test_scaled_dropout_follows_the_forward_order_not_the_declaration_order():
    original, pruned = _DeclaredOutOfOrder(8), _DeclaredOutOfOrder(2)
    assert scale_dropout(pruned, original, (4,)) == {"drop": (0.4, 0.4 * math.sqrt(2 / 8))}
    assert pruned.training  # the probing forward pass leaves the mode as it was


@pytest.mark.slow
def test_fine_tuning_with_scaled_dropout_lowers_the_pruned_heads_rates(tiny, tmp_path, monkeypatch):
    import pipeline.stages.finetune as stage
    from pipeline.run import run

    seen = []
    original = stage.fit

    def spied(model, *args, **kwargs):
        seen.append(sorted(m.p for m in model.modules() if isinstance(m, nn.Dropout)))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(stage, "fit", spied)
    run(tiny("sparsity=0.5", "finetune.dropout=scaled"), tmp_path / "scaled")
    run(tiny("sparsity=0.5", "finetune.dropout=keep"), tmp_path / "keep")
    scaled, kept = seen
    assert scaled and all(rate < 0.5 for rate in scaled)
    assert set(kept) == {0.5}


def test_the_moving_average_warms_up_its_decay_and_copies_integer_buffers():
    """After n updates towards a constant c from a, the average is c + (a - c) times the
    product of the decays used, min(decay, (1 + k) / (10 + k)) for k = 0..n-1."""
    from pipeline.training.loop import ema_average

    update = ema_average(0.9)
    mean, count = torch.full((3,), 4.0), torch.tensor(7)
    target, target_count = torch.full((3,), 1.0), torch.tensor(12)
    product = 1.0
    for k in range(30):
        update([mean, count], [target, target_count], torch.tensor(k))
        product *= min(0.9, (1 + k) / (10 + k))
        torch.testing.assert_close(mean, torch.full((3,), 1.0 + 3.0 * product))
    assert count.item() == 12  # BatchNorm's batch count is the model's, not a mean
    # The warm-up: the first update moves nine tenths of the way, not a tenth.
    first = torch.zeros(1)
    ema_average(0.999)([first], [torch.ones(1)], torch.tensor(0))
    torch.testing.assert_close(first, torch.tensor([0.9]))


def _fit_small(ema_decay: float, channels_last: bool = False):
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.config.schema import FinetuneSettings
    from pipeline.data.datasets import Loaders
    from pipeline.training.loop import fit

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    data = TensorDataset(torch.randn(96, 3, 8, 8), torch.randint(0, 3, (96,)))
    loader = DataLoader(data, batch_size=16, shuffle=False)
    settings = FinetuneSettings(
        epochs=3,
        batch_size=16,
        lr=0.1,
        schedule="constant",
        warmup_epochs=0,
        channels_last=channels_last,
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True},
    )
    loaders = Loaders(loader, loader, loader)
    return fit(model, loaders, nn.CrossEntropyLoss(), settings, "cpu", ema_decay=ema_decay), loaders


def test_fine_tuning_with_a_moving_average_validates_and_keeps_the_average():
    """The averaged weights are what each epoch validates and what fit returns; the training
    itself is the same steps (the same losses) as without it, and a decay that averages
    nothing returns what plain training does."""
    from pipeline.training.loop import evaluate

    plain, _ = _fit_small(0.0)
    averaged, loaders = _fit_small(0.9)
    nearly_none, _ = _fit_small(1e-12)
    assert [e["train_loss"] for e in averaged.history] == [e["train_loss"] for e in plain.history]
    weight = averaged.model.state_dict()["5.weight"]
    assert not torch.allclose(weight, plain.model.state_dict()["5.weight"])
    # What the best epoch validated is the model returned, BatchNorm statistics included.
    best = averaged.history[averaged.best_epoch - 1]["val_accuracy"]
    again = evaluate(averaged.model, loaders.val, nn.CrossEntropyLoss(), "cpu")
    assert again.accuracy == best
    running = averaged.model.state_dict()["1.running_mean"]
    assert not torch.allclose(running, plain.model.state_dict()["1.running_mean"])
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(nearly_none.model.state_dict()[name], value)


def test_the_moving_average_keeps_the_layout_contract_under_channels_last():
    averaged, _ = _fit_small(0.9, channels_last=True)
    weight = averaged.model[0].weight
    assert weight.is_contiguous()
    assert not weight.is_contiguous(memory_format=torch.channels_last)


def test_max_grad_norm_bounds_every_step_and_is_range_checked(tiny):
    """finetune.max_grad_norm=c clips the gradients' global norm: one plain SGD step at rate lr
    moves the weights by at most lr * c, where the unclipped step moves them much further."""
    import dataclasses

    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.datasets import Loaders
    from pipeline.errors import ConfigError
    from pipeline.training.loop import fit

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 4, 4) * 10, torch.randint(0, 3, (16,)))
    loader = DataLoader(data, batch_size=16)
    plain_sgd = {"_target_": "torch.optim.SGD", "_partial_": True}
    moved = {}
    for clip in (None, 0.01):
        settings = dataclasses.replace(
            tiny(f"finetune.max_grad_norm={'null' if clip is None else clip}").finetune,
            epochs=1,
            lr=1.0,
            warmup_epochs=0,
            optimizer=plain_sgd,
            channels_last=False,
        )
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        result = fit(
            model,
            Loaders(loader, loader, loader),
            torch.nn.CrossEntropyLoss(),
            settings,
            torch.device("cpu"),
        )
        after = torch.cat([p.detach().flatten() for p in result.model.parameters()])
        moved[clip] = (after - before).norm().item()
    assert moved[0.01] <= 0.01 + 1e-6
    assert moved[None] > 10 * moved[0.01]
    with pytest.raises(ConfigError, match=r"^finetune.max_grad_norm=0.0 is not allowed; allowed"):
        tiny("finetune.max_grad_norm=0")
