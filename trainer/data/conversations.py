"""Conversations of a prepared chat dataset as training windows: packed whole, never split, never seen by each other.

Each window holds whole conversations (best-fit-decreasing into `seq_len` slots, then its least-full windows
repacked into fewer; or one per window without packing), the rest padded. A conversation of n tokens fills n slots: its tokens as inputs, the next token as each
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


def fullest_subset(lengths: list[int], gap: int) -> list[int]:
    """Indices of a subset of `lengths` with the largest sum <= gap (subset sums as bitsets; the last item
    that reaches the sum is taken first, so the choice is deterministic)."""
    reach = [1]  # reach[i]: bit s set when some subset of lengths[:i] sums to s
    within = (1 << (gap + 1)) - 1
    for n in lengths:
        reach.append((reach[-1] | (reach[-1] << n)) & within)
    total = reach[-1].bit_length() - 1
    chosen = []
    for i in range(len(lengths) - 1, -1, -1):
        if not (reach[i] >> total) & 1:  # total is out of reach without item i: take it
            chosen.append(i)
            total -= lengths[i]
    return chosen


def minimum_slack(items: list[int], lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of `items`, each opened with the longest item left and filled with the subset of the rest that
    leaves the least free space (Gupta and Ho's minimum bin slack). Exact per bin: for small pools only."""
    left = sorted(items, key=lambda i: (-int(lengths[i]), i))
    bins = []
    while left:
        first, rest = left[0], left[1:]
        picked = set(fullest_subset([int(lengths[i]) for i in rest], capacity - int(lengths[first])))
        bins.append([first, *(rest[j] for j in sorted(picked))])
        left = [item for j, item in enumerate(rest) if j not in picked]
    return bins


def repack_least_full(
    bins: list[list[int]], lengths: np.ndarray, capacity: int, *, max_pool: int = 128
) -> list[list[int]]:
    """Fewer bins: the k least-full bins' items repacked by minimum slack, kept when they need fewer than k
    bins; k doubles (up to max_pool) while they do not. Best-fit decreasing leaves its slack spread over many
    bins when lengths are alike (three 150-token conversations per 512-token window, none of the rest fitting
    the 62 left); this gathers it. The work is capped by the number of items: deterministic on every rank."""
    bins = [list(b) for b in bins]
    fills = np.array([int(lengths[b].sum()) for b in bins], dtype=np.int64)
    lower_bound = -(-int(np.sum(lengths)) // capacity)
    budget = 50 * len(lengths) + 100_000  # subset-sum steps (about items^2 / 2k a try), over all tries
    k = 4
    while len(bins) > lower_bound and k <= min(max_pool, len(bins)) and budget > 0:
        pool = np.sort(np.argpartition(fills, k - 1)[:k]) if k < len(bins) else np.arange(len(bins))
        if fills[pool].sum() > (k - 1) * capacity:  # these k cannot fit in k - 1 bins
            k *= 2
            continue
        items = [i for b in pool.tolist() for i in bins[b]]
        budget -= len(items) ** 2 // (2 * k)
        repacked = minimum_slack(items, lengths, capacity)
        if len(repacked) >= k:
            k *= 2
            continue
        kept = np.setdiff1d(np.arange(len(bins)), pool)
        bins = [bins[b] for b in kept.tolist()] + repacked
        fills = np.concatenate([fills[kept], [int(lengths[b].sum()) for b in repacked]])
        k = 4
    return bins


def pack_whole(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices holding every item whole within `capacity`: best-fit decreasing, then repacked."""
    return repack_least_full(best_fit_decreasing(lengths, capacity), np.asarray(lengths), capacity)


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
            bins = [keep[b] for b in pack_whole(kept_lengths, seq_len)]
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
