"""Fashion-MNIST from IDX files, tested on small files written in the same format."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.datasets import FASHION_MNIST_FILES, fashion_mnist, read_idx
from pipeline.errors import DataUnavailableError
from pipeline.run import run


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_fashion_files(root: Path, train: int = 200, test: int = 50) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        labels = np.arange(count) % 10
        # Brightness follows the class so that a model can learn something.
        images = rng.integers(0, 40, size=(count, 28, 28)) + labels[:, None, None] * 20
        images_name, labels_name = FASHION_MNIST_FILES[split]
        write_idx(root / images_name, images)
        write_idx(root / labels_name, labels)
    return root


def test_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


def test_official_split_with_validation_carved_from_train(tmp_path):
    root = make_fashion_files(tmp_path / "fm")
    splits = fashion_mnist(str(root), 10, 32, 0.1, None, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 50)
    image, label = splits.test[3]
    assert image.shape == (3, 32, 32) and label == 3
    limited = fashion_mnist(str(root), 10, 28, 0.1, 50, seed=0)
    assert len(limited.train) == 50 and limited.input_shape == (3, 28, 28)


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(str(tmp_path), 10, 32, 0.1, None, seed=0)


@pytest.mark.slow
def test_pipeline_runs_on_fashion_mnist_files(tiny, tmp_path):
    root = make_fashion_files(tmp_path / "fm")
    record = run(tiny("dataset=fashion_mnist", f"dataset.root={root}"), tmp_path / "run")
    assert record["pruned"]["params"] < record["baseline"]["params"]
