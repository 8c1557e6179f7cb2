from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import TensorDataset

from pipeline.data.datasets import DataSplits, digits, imagefolder, make_loaders, stratified_indices
from pipeline.errors import ConfigError


def test_digits_splits_are_deterministic_stratified_and_disjoint():
    a = digits(10, 32, 0.1, 0.2, seed=7)
    b = digits(10, 32, 0.1, 0.2, seed=7)
    assert (len(a.train), len(a.val), len(a.test)) == (1257, 180, 360)
    assert a.test.labels.tolist() == b.test.labels.tolist()
    assert a.input_shape == (3, 32, 32)
    counts = Counter(a.test.labels.tolist())
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 2
    image, label = a.val[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


def test_stratified_indices_cover_everything_once():
    labels = [i % 4 for i in range(200)]
    train, val, test = stratified_indices(labels, 0.1, 0.2, seed=1)
    assert sorted(train + val + test) == list(range(200))
    assert len(test) == 40 and len(val) == 20


def numbered_splits(train: int, val: int, test: int) -> DataSplits:
    """Splits whose label is each item's position, so a loader's labels show the order it reads."""

    def numbered(count: int) -> TensorDataset:
        return TensorDataset(torch.zeros(count, 1), torch.arange(count))

    return DataSplits(numbered(train), numbered(val), numbered(test), 1, (1, 1, 1))


def order(loader) -> list[int]:
    return [int(label) for _, labels in loader for label in labels]


def test_training_order_is_shuffled_by_the_seed_and_evaluation_order_is_kept():
    splits = numbered_splits(train=64, val=20, test=12)
    loaders = make_loaders(splits, batch_size=8, seed=1)
    first_epoch, second_epoch = order(loaders.train), order(loaders.train)

    assert sorted(first_epoch) == list(range(64)), "an epoch must see every image once"
    assert first_epoch != list(range(64)), "the training loader reads in dataset order"
    assert second_epoch != first_epoch, "every epoch reads in the same order"
    again = make_loaders(splits, batch_size=8, seed=1)
    assert [order(again.train), order(again.train)] == [first_epoch, second_epoch]
    assert order(make_loaders(splits, batch_size=8, seed=2).train) != first_epoch
    assert order(loaders.val) == order(loaders.val) == list(range(20))
    assert order(loaders.test) == list(range(12))


def test_a_last_training_batch_of_one_image_is_left_out_and_no_other():
    # BatchNorm cannot train on a batch of one; evaluation has no such limit.
    lone = make_loaders(numbered_splits(train=17, val=17, test=1), batch_size=8, seed=1)
    assert [len(labels) for _, labels in lone.train] == [8, 8]
    assert [len(labels) for _, labels in lone.val] == [8, 8, 1]
    two = make_loaders(numbered_splits(train=18, val=2, test=2), batch_size=8, seed=1)
    assert [len(labels) for _, labels in two.train] == [8, 8, 2]


def test_max_batches_caps_every_pass_of_every_loader():
    splits = numbered_splits(train=64, val=20, test=6)
    loaders = make_loaders(splits, batch_size=4, seed=1, max_batches=3)

    for name, expected in (("train", 3), ("val", 3), ("test", 2)):  # test: 6 images, 2 batches
        loader = getattr(loaders, name)
        assert len(loader) == expected, name
        for _ in range(2):
            assert len(list(loader)) == expected, f"{name}: a pass yields another count"
    assert order(loaders.val) == list(range(12))  # the first batches, in order
    # Training still reshuffles each pass, so capped epochs see other images.
    assert order(loaders.train) != order(loaders.train)
    assert loaders.train.batch_size == 4  # NNI sizes its statistics budget from it
    # The budget search replays the order's generator: a capped pass draws from the same one.
    state = loaders.train.generator.get_state()
    first = order(loaders.train)
    loaders.train.generator.set_state(state)
    assert order(loaders.train) == first
    uncapped = make_loaders(splits, batch_size=4, seed=1)
    assert len(uncapped.train) == 16 and len(list(uncapped.val)) == 5


CLASSES = ("a_red", "b_green", "c_blue")  # folder names sort as ImageFolder numbers them


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """root/<class>/<n>.png: 3 classes x 10 images, class k bright in channel k."""
    root = tmp_path / "images"
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for n in range(10):
            colour = [10 + n] * 3
            colour[label] = 150 + 10 * n
            Image.new("RGB", (20, 20), tuple(colour)).save(root / name / f"{n}.png")
    return root


def test_imagefolder_splits_are_disjoint_stratified_and_labelled(image_tree, tiny):
    settings = tiny(
        "dataset=imagefolder",
        f"dataset.root={image_tree}",
        "dataset.num_classes=3",
        "dataset.image_size=16",
        "dataset.val_fraction=0.2",
        "dataset.test_fraction=0.2",
    )
    splits = instantiate(settings.dataset)

    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    indices = {name: set(part.indices) for name, part in parts.items()}
    assert sorted(i for part in indices.values() for i in part) == list(range(30))
    targets = splits.train.dataset.targets
    per_class = {name: Counter(targets[i] for i in part) for name, part in indices.items()}
    assert per_class == {
        "train": {0: 6, 1: 6, 2: 6},
        "val": {0: 2, 1: 2, 2: 2},
        "test": {0: 2, 1: 2, 2: 2},
    }
    assert splits.num_classes == 3 and splits.input_shape == (3, 16, 16)
    for name, part in parts.items():
        for image, label in part:
            assert image.shape == (3, 16, 16), name
            if name != "train":  # no colour jitter: the bright channel tells the class
                assert int(image.mean(dim=(1, 2)).argmax()) == label, name
    again = imagefolder(str(image_tree), 3, 16, 0.2, 0.2, seed=settings.seed)
    assert set(again.test.indices) == indices["test"]


def test_imagefolder_checks_the_class_count_and_the_folder(image_tree, tmp_path):
    with pytest.raises(ConfigError, match="dataset.num_classes=4 .* 3 class folders"):
        imagefolder(str(image_tree), 4, 16, 0.2, 0.2, seed=0)
    with pytest.raises(ConfigError, match="dataset.root=.* no such folder"):
        imagefolder(str(tmp_path / "nowhere"), 3, 16, 0.2, 0.2, seed=0)
    flat = tmp_path / "flat"  # images with no class folders
    flat.mkdir()
    (flat / "a.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="dataset.root=.* has no class folders"):
        imagefolder(str(flat), 3, 16, 0.2, 0.2, seed=0)


def test_imagefolder_takes_the_class_count_from_its_folders(image_tree, tiny):
    settings = tiny("dataset=imagefolder", f"dataset.root={image_tree}")
    assert settings.dataset["num_classes"] == 3 and settings.model["num_classes"] == 3
