"""Are the shipped ImageNet weights of EfficientNet-Lite0 mapped onto our definition correctly?

The same model is trained twice with the same short recipe on the same Fashion-MNIST subset
(the pipeline's baseline stage, same seed, same batches): once from the ImageNet weights of the
extra efficientnet_lite0 (model.weights=imagenet), once from random initialisation
(model.weights=none). Weights whose tensors landed in the wrong places would be no better than
random ones after training; correctly mapped features train to a clearly higher accuracy. The
difference is given with its paired 95 % bootstrap interval and McNemar's p-value over the
test images (pipeline.measure.uncertainty.accuracy_change).

    python benchmarks/pretrained.py                       # 4,000 images, 64 px, 2 epochs
    python benchmarks/pretrained.py --train-limit 8000 --epochs 3 --image-size 96

Needs `pip install -e ".[efficientnet_lite0]"` and Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import time

import _common as common
import torch
from hydra.utils import instantiate

from pipeline.data.datasets import StageInputs, make_loaders
from pipeline.measure.uncertainty import accuracy_change
from pipeline.models.zoo import build_from_config
from pipeline.stages.baseline import baseline
from pipeline.training.loop import evaluate


def train_and_test(weights: str, args: argparse.Namespace) -> tuple[object, float]:
    settings = common.project_settings(
        [
            "model=efficientnet_lite0",
            f"model.weights={weights}",
            "dataset=fashion_mnist",
            f"dataset.train_limit={args.train_limit}",
            f"dataset.image_size={args.image_size}",
            f"baseline.epochs={args.epochs}",
            f"baseline.lr={args.lr}",
            "baseline.warmup_epochs=0",
            "baseline.cache=false",
            f"seed={common.SEED}",
        ]
    )
    common.seed_everything(common.SEED)
    splits = instantiate(settings.dataset)
    loaders = make_loaders(splits, settings.baseline.batch_size, settings.seed, 0)
    device = torch.device("cpu")
    inputs = StageInputs(loaders, torch.nn.CrossEntropyLoss(), device, splits.input_shape)
    started = time.perf_counter()
    model = build_from_config(settings.model)
    result = baseline(model, inputs, settings.baseline, cache_path=None)
    tested = evaluate(result.model, loaders.test, inputs.criterion, device, desc="test")
    return tested, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.02, help="peak SGD rate, both runs")
    args = parser.parse_args()
    common.quiet_warnings()
    tested = {}
    for weights in ("imagenet", "none"):
        tested[weights], seconds = train_and_test(weights, args)
        print(
            f"weights={weights:<8} test accuracy {tested[weights].accuracy:.4f} "
            f"({tested[weights].samples} images, trained {seconds:.0f} s)",
            flush=True,
        )
    change = accuracy_change(tested["none"].correct, tested["imagenet"].correct)
    print(
        f"pretrained - random: {change['points']:+.2f} points "
        f"[{change['ci_low']:+.2f}, {change['ci_high']:+.2f}] (95 % paired bootstrap), "
        f"McNemar p = {change['p_value']:.2g}; {args.train_limit} training images at "
        f"{args.image_size}x{args.image_size}, {args.epochs} epochs, SGD peak rate {args.lr}"
    )


if __name__ == "__main__":
    main()
