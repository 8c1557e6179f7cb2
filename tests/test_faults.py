"""Faults during a run, each at the level of the part that meets it: a diverging loss in the
training loop, unreadable images at load and at read time, a full disk in an all-or-nothing
write, out of memory in a stage. tests/test_runtime_faults.py runs the same faults through the
command line."""

from __future__ import annotations

import errno
import io
import math
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from pipeline.data.datasets import ImageList, imagefolder
from pipeline.data.image_files import rgb_image, screen, unreadable
from pipeline.errors import BadImageError, DiskFullError, DivergedError, OutOfMemoryError
from pipeline.files import atomic_path, write_json
from pipeline.out_of_memory import guarded_stages, is_out_of_memory
from pipeline.training.loop import CHECK_EVERY, train_steps


class NanFrom:
    """Cross-entropy that turns NaN from its `step`-th call (1-based) on."""

    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0

    def __call__(self, logits, labels):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, labels)
        return loss * math.nan if self.calls >= self.step else loss


def batches(count: int) -> list:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, generator=generator), torch.tensor([0, 1, 0, 1])) for _ in range(count)
    ]


@pytest.mark.parametrize("bad_step", [3, CHECK_EVERY + 7])
def test_a_nan_loss_stops_the_pass_naming_epoch_step_and_learning_rate(bad_step):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
    with pytest.raises(DivergedError) as caught:
        train_steps(
            model, batches(CHECK_EVERY * 2), NanFrom(bad_step), optimizer, torch.device("cpu"),
            desc="finetune 2", epoch=2, stage="finetune", hint="lower finetune.lr",
        )  # fmt: skip
    assert str(caught.value) == (
        f"finetune: the training loss became nan at epoch 2, step {bad_step} (learning rate "
        f"0.25), so the stage stopped and kept nothing; lower finetune.lr"
    )


def test_a_finite_loss_gives_the_mean_over_every_image():
    model = nn.Linear(3, 2)
    data = batches(CHECK_EVERY + 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: losses add up
    expected = sum(nn.functional.cross_entropy(model(x), y).item() for x, y in data) / len(data)
    loss = train_steps(model, data, NanFrom(10**9), optimizer, torch.device("cpu"))
    assert loss == pytest.approx(expected, rel=1e-6)


def jpeg_bytes() -> bytes:
    """A noisy 64x64 JPEG: its scan data is long, so cutting its end leaves the header whole."""
    noise = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    Image.fromarray(noise.to(torch.uint8).numpy()).save(buffer, "JPEG")
    return buffer.getvalue()


def png_with_broken_data(path: Path) -> None:
    """A PNG whose header and end marker are intact but whose pixel data is not zlib."""
    Image.new("RGB", (24, 24), (10, 200, 30)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start : start + 12] = b"\x00" * 12
    path.write_bytes(bytes(data))
    with pytest.raises((OSError, zlib.error)), Image.open(path) as image:
        image.load()


@pytest.fixture
def odd_images(tmp_path) -> dict[str, Path]:
    paths = {
        "jpeg": tmp_path / "fine.jpg",
        "truncated": tmp_path / "truncated.jpg",
        "gray": tmp_path / "gray.png",
        "rgba": tmp_path / "rgba.png",
        "palette": tmp_path / "palette.png",
        "text": tmp_path / "notes.png",
    }
    paths["jpeg"].write_bytes(jpeg_bytes())
    paths["truncated"].write_bytes(jpeg_bytes()[:-200])
    Image.new("L", (24, 24), 90).save(paths["gray"])
    Image.new("RGBA", (24, 24), (200, 10, 10, 0)).save(paths["rgba"])
    Image.new("P", (24, 24), 3).save(paths["palette"])
    paths["text"].write_text("not an image")
    return paths


def test_the_header_check_finds_truncated_and_foreign_files_only(odd_images):
    reasons = {name: unreadable(path) for name, path in odd_images.items()}
    assert reasons == {
        "jpeg": None,
        "truncated": "truncated: the JPEG end marker is missing",
        "gray": None,
        "rgba": None,
        "palette": None,
        "text": "not an image PIL can identify",
    }
    for name in ("gray", "rgba", "palette"):
        image = rgb_image(odd_images[name])
        assert image.mode == "RGB" and image.size == (24, 24), name
    assert rgb_image(odd_images["jpeg"]).size == (64, 64)


def test_fail_names_the_first_bad_file_and_skip_counts_them(odd_images):
    paths = list(odd_images.values())
    with pytest.raises(BadImageError) as caught:
        screen(paths, "fail", "header")
    assert str(caught.value) == (
        f"{odd_images['truncated']} cannot be read as an image (truncated: the JPEG end marker "
        f"is missing); dataset.bad_files=skip leaves such files out"
    )
    keep, bad = screen(paths, "skip", "header")
    assert [paths[i] for i in keep] == [odd_images[n] for n in ("jpeg", "gray", "rgba", "palette")]
    assert bad.as_dict() == {
        "count": 2,
        "of": 6,
        "first": [
            f"{odd_images['truncated']}: truncated: the JPEG end marker is missing",
            f"{odd_images['text']}: not an image PIL can identify",
        ],
    }


def test_damage_inside_a_file_is_found_by_decode_or_named_at_read_time(tmp_path):
    broken = tmp_path / "broken.png"
    png_with_broken_data(broken)
    assert unreadable(broken) is None  # header and end marker are intact
    assert unreadable(broken, decode=True) is not None
    keep, bad = screen([broken], "skip", "decode")
    assert keep == [] and bad.count == 1
    # Read in a DataLoader worker, it comes back as the one line, not the worker's traceback.
    loader = DataLoader(ImageList([broken], [0], transform=lambda image: 0), num_workers=1)
    with pytest.raises(BadImageError) as caught:
        next(iter(loader))
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"{broken} cannot be read as an image (")
    assert line.endswith("dataset.bad_files=skip then leaves them out")


def test_imagefolder_skips_bad_files_in_every_split(tmp_path):
    root = tmp_path / "tree"
    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for n in range(6):
            Image.new("RGB", (16, 16), (40 * n, 100 * label, 10)).save(root / name / f"{n}.png")
    (root / "a" / "9.jpg").write_bytes(jpeg_bytes()[:-300])
    with pytest.raises(BadImageError):
        imagefolder(str(root), 2, 16, 0.25, 0.25, seed=0)
    splits = imagefolder(str(root), 2, 16, 0.25, 0.25, seed=0, bad_files="skip")
    assert splits.bad_files.count == 1 and splits.bad_files.total == 13
    seen = [splits.train.dataset.samples[i][0] for part in (splits.train, splits.val, splits.test)
            for i in part.indices]  # fmt: skip
    assert len(seen) == 12 and not any(path.endswith("9.jpg") for path in seen)


def test_a_full_disk_leaves_the_previous_file_and_no_staging(tmp_path):
    target = tmp_path / "cache" / "entry.json"
    write_json({"complete": True}, target)

    def fill(staging: Path, message_only: bool) -> None:
        staging.write_bytes(b"x" * 4096)
        if message_only:  # safetensors wraps the OSError in its own error type
            raise RuntimeError("Error while serializing: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    for message_only in (False, True):
        with pytest.raises(DiskFullError) as caught, atomic_path(target, size_hint=3 << 20) as s:
            fill(s, message_only)
        line = str(caught.value)
        assert line.startswith(f"no space left on the device of {target}: ")
        assert "about 3.0 MiB needed; nothing was left half-written" in line
        assert sorted(p.name for p in target.parent.iterdir()) == ["entry.json"]
        assert target.read_text() == '{\n  "complete": true\n}'
    with pytest.raises(DiskFullError) as caught, atomic_path(tmp_path / "model", True) as folder:
        (folder / "weights").write_bytes(b"x" * (1 << 20))
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "more than the 1.0 MiB written before it filled" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


@pytest.mark.parametrize(
    ("error", "where"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU"),
        (
            RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 9 bytes"),
            "host",
        ),
        (MemoryError(), "host"),
    ],
)
def test_out_of_memory_in_a_stage_is_one_line_with_the_batch_size(error, where, tiny):
    import contextlib

    settings = tiny("finetune.batch_size=48")
    entered = []
    stage = guarded_stages(lambda name: contextlib.nullcontext(entered.append(name)), settings)
    assert is_out_of_memory(error)
    with pytest.raises(OutOfMemoryError) as caught, stage("finetune"):
        raise error
    line = str(caught.value)
    assert entered == ["finetune"]
    assert line.startswith(f"finetune ran out of {where} memory at finetune.batch_size=48 (")
    assert line.endswith("); lower finetune.batch_size")
    expected = r"measure.throughput_batch_size=4, finetune"
    with pytest.raises(OutOfMemoryError, match=expected), stage("measure"):
        raise error
    with pytest.raises(ValueError), stage("finetune"):  # anything else passes through
        raise ValueError("not memory")
