"""Structured pruning: the engine interface, NNI config lists, budgets, pruning in steps."""
