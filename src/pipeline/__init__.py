"""Structured pruning pipeline: baseline -> prune -> speedup -> finetune -> measure."""

from pipeline.models.pruned import load_pruned, save_pruned
from pipeline.tracking.logged_model import load_logged_model

__all__ = ["load_logged_model", "load_pruned", "save_pruned"]
