"""Pruning: one-shot (magnitude, Wanda, SparseGPT, N:M), gradual (GMP) and structured, with masks that hold
under every strategy through fine-tuning. `pruner.Pruner` is the loop extension. Importing the package loads
none of it."""
