"""Structured pruning pipeline: baseline -> prune -> speedup -> finetune -> measure."""

from pipeline.models.pruned import load_pruned, save_pruned

__all__ = ["load_pruned", "save_pruned"]
