"""Distributed training, distillation, pruning and quantization of Hugging Face causal LMs."""

__version__ = "0.1.0"
