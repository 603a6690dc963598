"""Data: text sources, tokenizers, packing and the resumable sample order."""

from trainer.data.loading import (
    IGNORE_INDEX,
    Data,
    TokenWindows,
    build_data,
    pack,
    pad_each,
)
from trainer.data.order import SampleOrder, rank_micro_batches

__all__ = [
    "IGNORE_INDEX",
    "Data",
    "SampleOrder",
    "TokenWindows",
    "build_data",
    "pack",
    "pad_each",
    "rank_micro_batches",
]
