"""Conversations of a prepared chat dataset as training windows: packed whole, never split, never seen by each other.

Each window holds whole conversations (best-fit-decreasing into `seq_len` slots, or one per window without
packing), the rest padded. A conversation of n tokens fills n slots: its tokens as inputs, the next token as each
one's label where the mask says that token is trained (IGNORE_INDEX elsewhere, and at its last token, whose next
token belongs to no one), and positions 0..n-1. The restarting positions, with no attention mask, are what
transformers needs to keep packed documents apart (document masking); the padding is a document of its own.

A conversation longer than `seq_len` is cut to its first `seq_len` tokens (`truncation=truncate`) or left out
(`drop`); either way the trained tokens it loses are counted, in `stats` with the packing's efficiency (the
fraction of slots holding a token rather than padding).
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import torch

from trainer.data.order import SampleOrder
from trainer.data.prepared import Batch, PreparedSplit
from trainer.loss import IGNORE_INDEX


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most `capacity`: items longest first (ties by
    index), each into the fullest bin it fits in, else a new bin. Deterministic; O(n log n + n * capacity) at
    worst, in practice near n log n (bins are kept by their free space, at most capacity + 1 distinct values)."""
    order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths)))
    bins: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct free spaces that some bin has
    by_free: dict[int, list[int]] = {}  # free space -> bins with it (a stack: the newest first)
    for item in order.tolist():
        n = int(lengths[item])
        at = bisect.bisect_left(free_values, n)
        if at < len(free_values):
            free = free_values[at]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_values.pop(at)
        else:
            b, free = len(bins), capacity
            bins.append([])
        bins[b].append(item)
        left = free - n
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_values, left)
            by_free[left].append(b)
    return bins


class ConversationWindows:
    """Windows of whole conversations from one split of a prepared chat dataset (see the module docstring)."""

    def __init__(
        self, split: PreparedSplit, seq_len: int, *, pad_id: int, packing: bool, truncation: str
    ) -> None:
        self.split, self.seq_len, self.pad_id = split, seq_len, pad_id
        lengths = split.document_lengths()
        too_long = np.flatnonzero(lengths > seq_len)
        # The trained tokens the long ones lose: all (dropped), or those past seq_len (truncated).
        first_lost = 1 if truncation == "drop" else seq_len
        lost = sum(int(split.document_mask(int(d))[first_lost:].sum()) for d in too_long)
        keep = np.flatnonzero(lengths <= seq_len) if truncation == "drop" else np.arange(len(lengths))
        kept_lengths = np.minimum(lengths[keep], seq_len)
        if packing:
            bins = [keep[b] for b in best_fit_decreasing(kept_lengths, seq_len)]
        else:
            bins = [keep[i : i + 1] for i in range(len(keep))]
        # The windows as one flat list of conversations and where each window's start.
        self.docs = np.concatenate(bins).astype(np.int64) if bins else np.zeros(0, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int64)
        tokens = int(kept_lengths.sum())
        self.stats: dict[str, Any] = {
            "packing_efficiency": tokens / max(len(bins) * seq_len, 1),
            "tokens": tokens,
            "slots": len(bins) * seq_len,
            "truncated": 0 if truncation == "drop" else len(too_long),
            "dropped": len(too_long) if truncation == "drop" else 0,
            "lost_trainable": lost,
        }

    def __len__(self) -> int:
        return len(self.starts) - 1

    def order(self, *, seed: int) -> SampleOrder:
        return SampleOrder(len(self), seed=seed)

    def window(self, i: int) -> list[int]:
        """The conversations window i holds, in the order they are laid out."""
        return self.docs[self.starts[i] : self.starts[i + 1]].tolist()

    def batch(self, indices: torch.Tensor) -> Batch:
        L = self.seq_len
        rows = len(indices)
        inputs = np.full((rows, L), self.pad_id, dtype=np.int64)
        labels = np.full((rows, L), IGNORE_INDEX, dtype=np.int64)
        positions = np.empty((rows, L), dtype=np.int64)
        num_tokens = 0
        for row, i in enumerate(indices.tolist()):
            at = 0
            for d in self.window(i):
                ids = self.split.document(d)[:L]
                trained = self.split.document_mask(d)[: len(ids)]
                n = len(ids)
                inputs[row, at : at + n] = ids
                labels[row, at : at + n - 1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
                positions[row, at : at + n] = np.arange(n)
                at += n
            positions[row, at:] = np.arange(L - at)  # the padding: a document of its own
            num_tokens += at
        return Batch(
            torch.from_numpy(inputs),
            torch.from_numpy(labels),
            torch.from_numpy(positions),
            num_tokens=num_tokens,
        )
