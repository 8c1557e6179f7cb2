"""Seeds: the run's, and one per stage derived from it."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (torch's on every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_stage(seed: int, stage: str) -> None:
    """Seed the global generators from the run's seed and the stage's name, so that a stage
    draws the same numbers whatever the stages before it drew: a run whose baseline came from
    the cache prunes and fine-tunes exactly like the run that trained it."""
    digest = hashlib.sha256(f"{seed}/{stage}".encode()).digest()
    seed_everything(int.from_bytes(digest[:4], "little"))
