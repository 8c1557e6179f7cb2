"""Torch-Pruning 1.6, the second pruning engine: the only code that imports torch_pruning."""
