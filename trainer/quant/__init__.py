"""Quantization: post-training schemes (ptq, smooth), quantization-aware training (qat), and saving and
loading quantized models (serialization)."""

from trainer.quant.ptq import SCHEMES, check_scheme, quantize_model
from trainer.quant.serialization import load_any, load_quantized, save_quantized

__all__ = ["SCHEMES", "check_scheme", "load_any", "load_quantized", "quantize_model", "save_quantized"]
