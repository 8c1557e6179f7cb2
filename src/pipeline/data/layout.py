"""What each dataset kind needs on disk, checked without reading an image (and without
importing torch), so that a wrong root fails before any work with one line naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGEFOLDER_LAYOUT = "a folder with one subfolder of images per class (root/<class>/<image>)"


def class_folders(root: str | Path) -> list[str]:
    """The class folder names of an ImageFolder tree, as torchvision orders them; ConfigError
    when the root is missing or holds no class folders."""
    folder = Path(str(root))
    if not folder.is_dir():
        raise ConfigError(
            f"dataset.root={str(root)!r} is not allowed: no such folder; allowed values: "
            f"{IMAGEFOLDER_LAYOUT}"
        )
    # torchvision's ImageFolder takes every sub-folder as a class and refuses an empty one.
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not classes:
        raise ConfigError(
            f"dataset.root={str(root)!r} is not allowed: it has no class folders; allowed "
            f"values: {IMAGEFOLDER_LAYOUT}"
        )
    empty = [name for name in classes if not any((folder / name).iterdir())]
    if empty:
        raise ConfigError(
            f"dataset.root={str(root)!r} is not allowed: class folder {empty[0]!r} is empty; "
            f"allowed values: {IMAGEFOLDER_LAYOUT}"
        )
    return classes


def class_count(root: str) -> int:
    """The `class_count` config resolver: imagefolder's num_classes when not given."""
    return len(class_folders(root))


def check_imagefolder(dataset: dict[str, Any]) -> None:
    from pipeline.data.image_files import check_choices

    check_choices(dataset.get("bad_files", "fail"), dataset.get("verify", "header"))
    classes = class_folders(dataset["root"])
    if dataset.get("num_classes") != len(classes):
        raise ConfigError(
            f"dataset.num_classes={dataset.get('num_classes')!r} is not allowed: "
            f"{dataset['root']} has {len(classes)} class folders; allowed values: {len(classes)} "
            f"(or leave num_classes unset to take it from the folders)"
        )


def missing_fashion_mnist_files(root: str | Path) -> list[str]:
    """The Fashion-MNIST IDX files that are not in `root`."""
    folder = Path(str(root))
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    return [name for name in names if not (folder / name).is_file()]


def check_fashion_mnist(dataset: dict[str, Any]) -> None:
    missing = missing_fashion_mnist_files(dataset["root"])
    if missing:
        raise ConfigError(
            f"dataset.root={str(dataset['root'])!r} is not allowed: Fashion-MNIST files missing "
            f"({', '.join(missing)}); allowed values: the folder of the IDX files "
            f"(`apt-get install dataset-fashion-mnist` puts them in "
            f"/usr/share/datasets/fashion-mnist)"
        )


def check_pets(dataset: dict[str, Any]) -> None:
    if dataset.get("download"):
        return  # torchvision fetches it; a failed download is reported by the loader
    base = Path(str(dataset["root"])) / "oxford-iiit-pet"
    needed = [base / "images", base / "annotations"]
    if dataset.get("split") == "reference":
        needed.append(base / "annotations" / "list.txt")
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise ConfigError(
            f"dataset.root={str(dataset['root'])!r} is not allowed: {missing[0]} is missing; "
            f"allowed values: a folder holding oxford-iiit-pet/images and "
            f"oxford-iiit-pet/annotations, or dataset.download=true"
        )


LAYOUT_CHECKS = {
    "pipeline.data.imagefolder": check_imagefolder,
    "pipeline.data.fashion_mnist": check_fashion_mnist,
    "pipeline.data.pets": check_pets,
}


def check_layout(dataset: dict[str, Any]) -> None:
    """The dataset's files are where its kind needs them (kinds without files pass)."""
    check = LAYOUT_CHECKS.get(dataset.get("_target_"))
    if check is not None:
        check(dataset)
