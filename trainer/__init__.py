"""Distributed training, distillation, pruning and quantization of Hugging Face causal LMs."""

from trainer import quiet

__version__ = "0.1.0"

quiet.install()
