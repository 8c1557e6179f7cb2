"""The pets dataset through torchvision's OxfordIIITPet, on generated data in its on-disk layout."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import pets
from pipeline.errors import DataUnavailableError
from pipeline.run import run

BREEDS = [f"breed{i:02d}" for i in range(37)]


def make_pet_tree(root: Path, trainval_per_breed: int = 3, test_per_breed: int = 2) -> Path:
    """root/oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test,list}.txt}."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    rng = np.random.default_rng(0)
    splits = {"trainval": [], "test": []}
    for class_id, breed in enumerate(BREEDS, start=1):
        species = 1 if class_id <= 12 else 2
        for number in range(1, trainval_per_breed + test_per_breed + 1):
            name = f"{breed}_{number}"
            # Each breed gets its own mean colour so that a model can learn something.
            pixels = rng.normal(class_id * 6, 20, size=(40, 48, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(base / "images" / f"{name}.jpg")
            split = "trainval" if number <= trainval_per_breed else "test"
            splits[split].append(f"{name} {class_id} {species} {class_id}")
    for split, lines in splits.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    every = sorted(splits["trainval"] + splits["test"])
    (base / "annotations" / "list.txt").write_text(header + "\n".join(every) + "\n")
    return root


def test_official_split_reads_torchvision_layout(tmp_path):
    root = make_pet_tree(tmp_path / "data")
    splits = pets(str(root), False, "official", 37, 32, 0.1, 0.2, 1234, seed=0)
    assert len(splits.test) == 37 * 2
    assert len(splits.train) + len(splits.val) == 37 * 3
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 37


def test_reference_split_is_stratified_80_20_over_all_images(tmp_path):
    root = make_pet_tree(tmp_path / "data")
    splits = pets(str(root), False, "reference", 37, 32, 0.1, 0.2, 1234, seed=0)
    assert len(splits.test) == 37  # 20% of 185, one per breed
    assert sorted(splits.test.labels) == list(range(37))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 37 * 5


def test_missing_data_says_where_to_put_it(tmp_path):
    with pytest.raises(DataUnavailableError, match=r"dataset.root=.*oxford-iiit-pet"):
        pets(str(tmp_path / "nowhere"), False, "official", 37, 32, 0.1, 0.2, 1234, seed=0)


@pytest.mark.slow
def test_pipeline_runs_on_the_pet_layout(tiny, tmp_path):
    root = make_pet_tree(tmp_path / "data")
    record = run(
        tiny("dataset=pets", f"dataset.root={root}", "dataset.image_size=32"),
        tmp_path / "run",
    )
    assert record["pruned"]["params"] < record["baseline"]["params"]
    assert record["config"]["dataset"]["num_classes"] == 37
