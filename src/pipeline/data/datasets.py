"""Dataset builders: each returns train/val/test splits plus what the model needs to know.

Builders are named by `_target_` in conf/dataset/*.yaml. Splits are deterministic in the seed so
that a cached baseline and every job of a sweep see the same images.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline.data.augment import FlipAndShift
from pipeline.data.image_files import BadFiles, rgb_image, screen
from pipeline.data.layout import FASHION_MNIST_FILES, check_imagefolder, missing_fashion_mnist_files
from pipeline.errors import ConfigError, DataUnavailableError
from pipeline.training.distributed import SINGLE, World

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (channels, height, width) of one image
    bad_files: BadFiles | None = None  # image files left out (dataset.bad_files=skip)


@dataclass
class Loaders:
    train: Iterable
    val: Iterable
    test: Iterable


@dataclass
class StageInputs:
    """What a stage reads besides its model and settings."""

    loaders: Loaders
    criterion: Callable
    device: torch.device
    input_shape: tuple[int, int, int]


class FirstBatches:
    """The first `count` batches of a loader, for every pass over it; `len`, `batch_size` and
    `generator` (which the budget search replays) answer as a DataLoader's would. Tests cap
    every loop this way in one place."""

    def __init__(self, loader: DataLoader, count: int) -> None:
        self.loader, self.count = loader, count
        self.batch_size = loader.batch_size
        self.generator = loader.generator

    def __iter__(self) -> Iterator:
        return islice(iter(self.loader), self.count)

    def __len__(self) -> int:
        return min(len(self.loader), self.count)


def make_loaders(
    splits: DataSplits,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    max_batches: int | None = None,
    world: World = SINGLE,
) -> Loaders:
    """Shuffled training loader with a seeded order; evaluation loaders in dataset order; with
    `max_batches`, each yields at most that many batches per pass. Over several ranks
    (`world`), `batch_size` is the global batch: each rank trains on its share of it, from a
    DistributedSampler, and validates on every world.size-th image (no image twice, so the
    summed accuracy is exact); the test loader stays whole, for rank 0's measurements."""
    if world.distributed:
        return _sharded_loaders(splits, batch_size, seed, num_workers, max_batches, world)
    generator = torch.Generator().manual_seed(seed)
    common = {"batch_size": batch_size, "num_workers": num_workers}
    # A last training batch of one image stops BatchNorm ("Expected more than 1 value per
    # channel when training"): that one image sits the epoch out (a different one each epoch).
    lone = len(splits.train) % batch_size == 1 and len(splits.train) > 1
    loaders = [
        DataLoader(splits.train, shuffle=True, generator=generator, drop_last=lone, **common),
        DataLoader(splits.val, shuffle=False, **common),
        DataLoader(splits.test, shuffle=False, **common),
    ]
    if max_batches is not None:
        loaders = [FirstBatches(loader, max_batches) for loader in loaders]
    return Loaders(*loaders)


def _sharded_loaders(
    splits: DataSplits,
    batch_size: int,
    seed: int,
    num_workers: int,
    max_batches: int | None,
    world: World,
) -> Loaders:
    from torch.utils.data.distributed import DistributedSampler

    share = max(batch_size // world.size, 1)
    # drop_last: the split's tail that does not divide by the world size sits the epoch out,
    # rather than images repeated to pad it (a different tail each epoch: the shuffle moves).
    sampler = DistributedSampler(
        splits.train, world.size, world.rank, shuffle=True, seed=seed, drop_last=True
    )
    per_rank = len(sampler)
    lone = per_rank % share == 1 and per_rank > 1
    common = {"batch_size": share, "num_workers": num_workers}
    val = Subset(splits.val, range(world.rank, len(splits.val), world.size))
    loaders = [
        DataLoader(splits.train, sampler=sampler, drop_last=lone, **common),
        DataLoader(val, shuffle=False, **common),
        DataLoader(splits.test, shuffle=False, batch_size=batch_size, num_workers=num_workers),
    ]
    if max_batches is not None:
        loaders = [FirstBatches(loader, max_batches) for loader in loaders]
    return Loaders(*loaders)


def stratified_indices(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Split indices into train/val/test, stratified by label where every class allows it."""
    indices = np.arange(len(labels))
    labels = np.asarray(labels)
    rest, test = _split(indices, labels, test_fraction, seed)
    # val_fraction is a share of the whole set, so rescale it to the remainder.
    train, val = _split(rest, labels[rest], val_fraction / (1.0 - test_fraction), seed)
    return train.tolist(), val.tolist(), test.tolist()


def _split(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split  # imported here: 1 s off start-up

    if fraction <= 0:
        return indices, indices[:0]
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        return train_test_split(indices, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError:
        # Too few images for one per class in the smaller part (tiny test data): plain shuffle.
        return train_test_split(indices, test_size=fraction, random_state=seed)


class GrayImages(Dataset):
    """Grayscale images held as one uint8 tensor (N, H, W), served as normalised 3 x H x W floats.

    uint8 keeps 60,000 Fashion-MNIST images in 60 MB; the three channels are the same plane, so
    ImageNet-shaped models take them unchanged.
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        mean: float,
        std: float,
        augment: Callable | None = None,
    ):
        self.pixels, self.labels, self.augment = pixels, labels, augment
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = (self.pixels[index].float().div(255.0) - self.mean) / self.std
        image = image.unsqueeze(0)
        if self.augment is not None:
            image = self.augment(image)
        return image.expand(3, -1, -1), int(self.labels[index])


def _resize_to_uint8(images: torch.Tensor, size: int, scale: float) -> torch.Tensor:
    """(N, H, W) values in [0, scale] -> (N, size, size) uint8; chunked to bound memory."""
    out = torch.empty(len(images), size, size, dtype=torch.uint8)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].float().unsqueeze(1) / scale
        if chunk.shape[-1] != size:
            chunk = torch.nn.functional.interpolate(
                chunk, size=(size, size), mode="bilinear", align_corners=False
            )
        out[start : start + 4096] = chunk.squeeze(1).mul(255.0).round().clamp(0, 255).byte()
    return out


class ImageList(Dataset):
    """Image files with integer labels, read through PIL as RGB."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable):
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(rgb_image(self.paths[index])), self.labels[index]


def digits(
    num_classes: int,
    image_size: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> DataSplits:
    """scikit-learn's bundled 8x8 digits, upscaled to 3 x image_size x image_size."""
    from sklearn.datasets import load_digits
    from torchvision import transforms as T

    bunch = load_digits()
    if num_classes != 10:
        raise ConfigError(f"dataset.num_classes={num_classes} is not allowed; allowed values: 10")
    pixels = _resize_to_uint8(torch.tensor(bunch.images), image_size, scale=16.0)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train, val, test = stratified_indices(bunch.target, val_fraction, test_fraction, seed)
    # Small shifts and rotations: the upscaled digits are few (1,257 for training).
    augment = T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    return DataSplits(
        train=GrayImages(pixels[train], labels[train], 0.5, 0.5, augment),
        val=GrayImages(pixels[val], labels[val], 0.5, 0.5),
        test=GrayImages(pixels[test], labels[test], 0.5, 0.5),
        num_classes=10,
        input_shape=(3, image_size, image_size),
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), gzipped or not, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise DataUnavailableError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(
    root: str,
    num_classes: int,
    image_size: int,
    val_fraction: float,
    train_limit: int | None,
    seed: int,
) -> DataSplits:
    """Fashion-MNIST from IDX files (Debian's dataset-fashion-mnist package puts them in root).

    The official 60k/10k split; validation is carved, stratified, from the training part.
    `train_limit` keeps a stratified subset of the training images, for quick experiments.
    """
    if num_classes != 10:
        raise ConfigError(f"dataset.num_classes={num_classes} is not allowed; allowed values: 10")
    folder = Path(root)
    missing = missing_fashion_mnist_files(folder)
    if missing:
        raise DataUnavailableError(
            f"dataset.root={root}: Fashion-MNIST files missing ({', '.join(missing)}); install "
            f"them with `apt-get install dataset-fashion-mnist` or point dataset.root at them"
        )
    train_images, train_labels = (read_idx(folder / name) for name in FASHION_MNIST_FILES["train"])
    test_images, test_labels = (read_idx(folder / name) for name in FASHION_MNIST_FILES["test"])
    train, val, _ = stratified_indices(train_labels, val_fraction, 0.0, seed)
    if train_limit is not None and train_limit < len(train):
        train, _ = _split(
            np.asarray(train), train_labels[train], 1 - train_limit / len(train), seed
        )
        train = train.tolist()
    mean, std = 0.2860, 0.3530  # Fashion-MNIST's pixel statistics
    train_pixels = _resize_to_uint8(torch.from_numpy(train_images.copy()), image_size, 255.0)
    test_pixels = _resize_to_uint8(torch.from_numpy(test_images.copy()), image_size, 255.0)
    labels = torch.from_numpy(train_labels.astype(np.int64))
    # T.Compose([T.RandomHorizontalFlip(), T.RandomAffine(degrees=0, translate=(0.08, 0.08))]),
    # image for image, in a sixth of the time.
    augment = FlipAndShift(translate=0.08)
    return DataSplits(
        train=GrayImages(train_pixels[train], labels[train], mean, std, augment),
        val=GrayImages(train_pixels[val], labels[val], mean, std),
        test=GrayImages(test_pixels, torch.from_numpy(test_labels.astype(np.int64)), mean, std),
        num_classes=10,
        input_shape=(3, image_size, image_size),
    )


def _image_transforms(image_size: int) -> tuple[Callable, Callable]:
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.2, 0.2, 0.2),
            T.ToTensor(),
            normalize,
        ]
    )
    # Whole image resized, no crop: what the reference evaluation does.
    evaluation = T.Compose(
        [T.Resize((image_size, image_size), antialias=True), T.ToTensor(), normalize]
    )
    return train, evaluation


def pets(
    root: str,
    download: bool,
    split: str,
    num_classes: int,
    image_size: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    seed: int,
) -> DataSplits:
    """Oxford-IIIT Pet through torchvision; `split` picks the official or the reference split."""
    from torchvision.datasets import OxfordIIITPet

    if split not in ("official", "reference"):
        raise ConfigError(
            f"dataset.split={split!r} is not allowed; allowed values: official, reference"
        )
    train_tf, eval_tf = _image_transforms(image_size)
    base = Path(root) / "oxford-iiit-pet"
    try:
        trainval = OxfordIIITPet(root, split="trainval", download=download, transform=eval_tf)
    except RuntimeError as error:
        raise DataUnavailableError(
            f"dataset.root={root}: Oxford-IIIT Pet not found ({error}); put the extracted "
            f"images/ and annotations/ folders under {base} or set dataset.download=true"
        ) from None
    except OSError as error:  # download attempted without network
        raise DataUnavailableError(
            f"dataset.download=true: Oxford-IIIT Pet could not be downloaded ({error}); put the "
            f"extracted images/ and annotations/ folders under {base}"
        ) from None

    if split == "official":
        test = OxfordIIITPet(root, split="test", transform=eval_tf)
        trainval_train = OxfordIIITPet(root, split="trainval", transform=train_tf)
        labels = trainval._labels
        train_idx, val_idx, _ = stratified_indices(labels, val_fraction, 0.0, seed)
        train_set, val_set, test_set = (
            Subset(trainval_train, train_idx),
            Subset(trainval, val_idx),
            test,
        )
    else:
        paths, labels = _read_pet_list(base)
        # Same call as the reference evaluation, so the 1,470 test images match it.
        from sklearn.model_selection import train_test_split

        rest, test_idx = train_test_split(
            np.arange(len(labels)),
            test_size=test_fraction,
            random_state=split_seed,
            shuffle=True,
            stratify=labels,
        )
        rest_labels = np.asarray(labels)[rest]
        train_pos, val_pos = _split(
            np.arange(len(rest)), rest_labels, val_fraction / (1.0 - test_fraction), seed
        )
        pick = lambda idx: ([paths[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
        train_set = ImageList(*pick(rest[train_pos]), transform=train_tf)
        val_set = ImageList(*pick(rest[val_pos]), transform=eval_tf)
        test_set = ImageList(*pick(test_idx), transform=eval_tf)

    found = len(set(trainval._labels))
    if found != num_classes:
        raise ConfigError(
            f"dataset.num_classes={num_classes} does not match the {found} breeds "
            f"found under {base}"
        )
    return DataSplits(train_set, val_set, test_set, num_classes, (3, image_size, image_size))


def _read_pet_list(base: Path) -> tuple[list[Path], list[int]]:
    listing = base / "annotations" / "list.txt"
    if not listing.is_file():
        raise DataUnavailableError(
            f"dataset.split=reference needs {listing} (part of annotations.tar.gz)"
        )
    paths, labels = [], []
    for line in listing.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        image_id, class_id = line.split()[:2]
        paths.append(base / "images" / f"{image_id}.jpg")
        labels.append(int(class_id) - 1)
    return paths, labels


def imagefolder(
    root: str,
    num_classes: int,
    image_size: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    bad_files: str = "fail",
    verify: str = "header",
) -> DataSplits:
    """Any torchvision ImageFolder tree (root/<class>/<image>), split stratified from the seed.
    Every file is checked before training (pipeline.data.image_files): an unreadable one stops
    the run (bad_files=fail) or is left out of every split (skip)."""
    from torchvision.datasets import ImageFolder

    check_imagefolder({"root": root, "num_classes": num_classes})
    train_tf, eval_tf = _image_transforms(image_size)
    train_view = ImageFolder(root, transform=train_tf, loader=rgb_image)
    eval_view = ImageFolder(root, transform=eval_tf, loader=rgb_image)
    keep, skipped = screen([path for path, _ in train_view.samples], bad_files, verify)
    if len(keep) < len(train_view.samples):
        for view in (train_view, eval_view):
            view.samples = [view.samples[i] for i in keep]
            view.imgs = view.samples
            view.targets = [view.targets[i] for i in keep]
    train, val, test = stratified_indices(train_view.targets, val_fraction, test_fraction, seed)
    return DataSplits(
        Subset(train_view, train),
        Subset(eval_view, val),
        Subset(eval_view, test),
        num_classes,
        (3, image_size, image_size),
        skipped,
    )
