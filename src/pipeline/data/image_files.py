"""Image files that cannot be read, found before any training: a header check of every file
(PIL identifies it; a JPEG or PNG must also end with its end marker, which a truncated copy
lacks) or, with dataset.verify=decode, a full decode. dataset.bad_files=fail stops at the first
one; skip leaves them out and says which. Grayscale, palette and RGBA images are converted to
RGB, as torchvision's loader does: they are not bad."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.errors import BadImageError, ConfigError, first_line

log = logging.getLogger(__name__)

BAD_FILES_CHOICES = ("fail", "skip")
VERIFY_CHOICES = ("header", "decode")
NAMED = 5  # bad files named in the log and the run record

# The last bytes a complete file of the format holds; searched for near the end, as some
# writers pad after them.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_TAIL = 1024


@dataclass
class BadFiles:
    """The files a dataset left out (dataset.bad_files=skip)."""

    count: int = 0
    total: int = 0  # files looked at
    first: list[str] = field(default_factory=list)  # "path: reason" of the first NAMED

    def as_dict(self) -> dict:
        return {"count": self.count, "of": self.total, "first": self.first}


def check_choices(bad_files: str, verify: str) -> None:
    if bad_files not in BAD_FILES_CHOICES:
        raise ConfigError(
            f"dataset.bad_files={bad_files!r} is not allowed; allowed values: "
            f"{', '.join(BAD_FILES_CHOICES)}"
        )
    if verify not in VERIFY_CHOICES:
        raise ConfigError(
            f"dataset.verify={verify!r} is not allowed; allowed values: {', '.join(VERIFY_CHOICES)}"
        )


def unreadable(path: str | Path, decode: bool = False) -> str | None:
    """Why `path` cannot be read as an image, or None when it can."""
    try:
        with Image.open(path) as image:
            kind = image.format
            if decode:
                image.load()
                return None
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for broken files
        return first_line(error, 120) or type(error).__name__
    marker = _END_MARKERS.get(kind)
    if marker is not None:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - _TAIL))
            if marker not in handle.read():
                return f"truncated: the {kind} end marker is missing"
    return None


def screen(paths: Sequence[str | Path], bad_files: str, verify: str) -> tuple[list[int], BadFiles]:
    """The indices of `paths` that can be read, and what was left out. With bad_files=fail the
    first unreadable file raises BadImageError instead."""
    check_choices(bad_files, verify)
    keep, bad = [], BadFiles(total=len(paths))
    for index, path in enumerate(paths):
        reason = unreadable(path, decode=verify == "decode")
        if reason is None:
            keep.append(index)
            continue
        if bad_files == "fail":
            raise BadImageError(
                f"{path} cannot be read as an image ({reason}); dataset.bad_files=skip leaves "
                f"such files out"
            )
        bad.count += 1
        if len(bad.first) < NAMED:
            bad.first.append(f"{path}: {reason}")
    if bad.count:
        log.warning(
            "dataset.bad_files=skip: left out %d of %d images that cannot be read, first: %s",
            bad.count,
            bad.total,
            "; ".join(bad.first),
        )
    return keep, bad


def rgb_image(path: str | Path) -> Image.Image:
    """An image file as RGB (torchvision's loader, with one line naming a file that breaks at
    read time despite the check: a decode error deep inside the file)."""
    try:
        with open(path, "rb") as handle, Image.open(handle) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError(
            f"{path} cannot be read as an image ({first_line(error, 120)}); "
            f"dataset.verify=decode finds such files before training, and dataset.bad_files=skip "
            f"then leaves them out"
        ) from None
