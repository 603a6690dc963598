"""Pruning: one-shot (magnitude, Wanda, SparseGPT, N:M), gradual (GMP) and structured, with masks that hold
under every strategy through fine-tuning. `Pruner` is what the training loop calls."""

from trainer.prune.pruner import Pruner, select_targets

__all__ = ["Pruner", "select_targets"]
