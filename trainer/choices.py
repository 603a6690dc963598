"""Closed choices of the configs: string Enums that Hydra checks when it composes a config.

A schema field typed with a `Choice` refuses any other value at composition, before any work, with an error
that names the key and lists the allowed values. The members are `str`s whose name is their value, so they
compare equal to, hash like, print, format and json-dump as the plain string (`name == "fp8"`,
`f"zero{...}"`, dict keys), and OmegaConf writes them to YAML (`--cfg job`, `.hydra/config.yaml`) by name,
which is the same string.

Like trainer.errors, this module imports only the standard library: every config module may use it.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """Base of the closed choices; one is made as `Choice("Name", "value1 value2 ...")`."""

    # OmegaConf turns a YAML string into a member by name, so every name is its value ("1-sqrt" included).
    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list[str]) -> str:
        return name

    # Plain values in messages and paths on every Python version (3.10's and 3.12's Enum format differently).
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


# The dtypes a config can name: parameters, gradient reductions, quantized models' float parts.
Dtype = Choice("Dtype", "float32 bfloat16 float16")
DTYPES: tuple[str, ...] = tuple(Dtype.__members__)  # plain strings, for checks of values not from a config

# `fp16` scales the loss dynamically; `fp8` is torchao float8 linears, bf16 elsewhere (compute capability 8.9+).
# Here, not with the training schema, because QAT's checks (trainer/quant/config.py) ask about it too.
PrecisionName = Choice("PrecisionName", "fp32 bf16 fp16 fp8")
# torchao's float8 training recipes (Float8LinearRecipeName): one scale per tensor (cuBLAS, fastest), per row
# (CUTLASS, more accurate), per row with the weight gradient's matmul kept in bf16 (most accurate).
Fp8Recipe = Choice("Fp8Recipe", "tensorwise rowwise rowwise_with_gw_hp")

# trainer.export's formats (trainer/export_config.py): an HF directory, one llama.cpp GGUF file, or a
# compressed-tensors directory (vLLM's quantized format).
ExportFormat = Choice("ExportFormat", "hf gguf compressed_tensors")
# The tensor types of a GGUF export (llama.cpp's names): float, or 8-/4-bit blocks of 32 weights with one scale.
GgufType = Choice("GgufType", "f32 f16 bf16 q8_0 q4_0")
# Schemes of the compressed-tensors export (trainer/quant/compressed_tensors.py): int8 weights per channel with
# float activations, int8 weights and activations (per token), int4 weights in groups.
CompressedTensorsScheme = Choice("CompressedTensorsScheme", "w8a16 w8a8 w4a16")
