"""Weighted mixtures of prepared datasets, and their resumable sample order.

Which source global sample i comes from is a pure function of the weights (a blended index, as Megatron's):
source s's k-th sample has the deadline (k + 1/2) / w_s (weights normalized to sum to 1), and the global order
is every deadline in increasing order, ties to the lower source index. This is the largest-error-first
assignment: each sample goes to the source furthest behind its share, so after any n samples source s has
within one sample of w_s * n, and any window of consecutive samples is within two samples of its share. The
counts before position i are closed-form, so any stretch of the order is computed without the ones before
it: a resume at sample 10^12 costs what one at sample 0 does.

Within a source, its k-th sample is sample k mod n_s of epoch k // n_s, through a permutation of the source's
samples seeded by (seed, source, epoch): a source that runs out starts its next epoch alone, and the others
are not disturbed. The permutation is a Feistel network (with cycle walking), computed per index, so no
permutation of the corpus is ever held in memory.

The only state is the count of samples consumed, the same under any world size; the checkpoint keeps it with
the mixture's identity (the sources' fingerprints, weights, seq_len, packing, tokenizer), and a resume with
another identity is refused unless `data.allow_changed=true`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch

from trainer.data.prepared import Batch, real_tokens
from trainer.errors import DataError

_ROUNDS = 4


def check_weights(weights: list[float], *, key: str = "data.sources") -> list[float]:
    """Weights normalized to sum to 1; a negative, non-finite or all-zero list is refused."""
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise DataError(f"{key}[{i}].weight={w}: a weight must be a finite number >= 0")
    total = sum(weights)
    if total <= 0:
        raise DataError(f"{key}: every weight is 0 ({weights}); give at least one source a positive weight")
    return [w / total for w in weights]


def _count_below(t: float, w: float) -> int:
    """How many k >= 0 have the deadline (k + 0.5) / w < t, computed with the very float operations that
    `blend` uses for the deadlines, so that the two agree exactly."""
    if t <= 0:
        return 0
    k = max(0, math.ceil(t * w - 0.5))
    while k > 0 and (k - 1 + 0.5) / w >= t:
        k -= 1
    while (k + 0.5) / w < t:
        k += 1
    return k


def blend(start: int, count: int, weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Global samples [start, start + count): (source of each, its sample number within that source).

    The samples before `start` with a deadline below t0 = start - 2S all come before it (and are at most
    `start`); every sample up to start + count has a deadline below t1 = start + count + 2S. So sorting the
    deadlines in [t0, t1) gives the stretch exactly.
    """
    live = [s for s, w in enumerate(weights) if w > 0]
    margin = 2 * len(weights)
    t0, t1 = float(start - margin), float(start + count + margin)
    base = {s: _count_below(t0, weights[s]) for s in live}
    top = {s: _count_below(t1, weights[s]) for s in live}
    ks = np.concatenate([np.arange(base[s], top[s], dtype=np.int64) for s in live])
    ss = np.concatenate([np.full(top[s] - base[s], s, dtype=np.int64) for s in live])
    w = np.array(weights, dtype=np.float64)
    deadlines = (ks + 0.5) / w[ss]
    order = np.lexsort((ss, deadlines))  # by deadline, then source
    first = start - sum(base.values())
    chosen = order[first : first + count]
    return ss[chosen], ks[chosen]


def _round_keys(seed: int, source: int, epoch: int) -> list[np.uint64]:
    digest = hashlib.sha256(f"{seed}/{source}/{epoch}".encode()).digest()
    return [np.uint64(int.from_bytes(digest[8 * r : 8 * r + 8], "little")) for r in range(_ROUNDS)]


def _mix(x: np.ndarray, key: np.uint64, mask: np.uint64) -> np.ndarray:
    z = (x + key) * np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(31)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(29)
    return z & mask


def permute(positions: np.ndarray, n: int, *, seed: int, source: int, epoch: int) -> np.ndarray:
    """Element `positions` of a pseudo-random permutation of range(n) (a Feistel network on the next even
    power of two, cycle-walked into range(n)): a bijection, computed per index."""
    if n <= 1:
        return np.zeros(len(positions), dtype=np.int64)
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = _round_keys(seed, source, epoch)

    def once(y: np.ndarray) -> np.ndarray:
        left, right = y >> half, y & mask
        for key in keys:
            left, right = right, left ^ _mix(right, key, mask)
        return (left << half) | right

    out = once(positions.astype(np.uint64))
    outside = out >= np.uint64(n)
    while outside.any():  # the domain is < 4n: a few rounds at most
        out[outside] = once(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


class MixtureOrder:
    """The training order over a mixture: `take(count)` gives the next global sample ids (offset of the
    source + sample within it), a pure function of the seed, the weights and the count consumed."""

    def __init__(
        self,
        sizes: list[int],
        weights: list[float],
        *,
        seed: int,
        identity: dict[str, Any],
        allow_changed: bool = False,
        consumed: int = 0,
    ) -> None:
        self.sizes, self.weights, self.seed = list(sizes), list(weights), seed
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.num_samples = int(self.offsets[-1])
        self.identity, self.allow_changed = identity, allow_changed
        self.consumed = consumed

    def take(self, count: int) -> torch.Tensor:
        sources, ks = blend(self.consumed, count, self.weights)
        ids = np.empty(count, dtype=np.int64)
        for s in np.unique(sources).tolist():
            mine = sources == s
            epochs, positions = np.divmod(ks[mine], self.sizes[s])
            local = np.empty(len(positions), dtype=np.int64)
            for e in np.unique(epochs).tolist():
                at = epochs == e
                local[at] = permute(positions[at], self.sizes[s], seed=self.seed, source=s, epoch=e)
            ids[mine] = self.offsets[s] + local
        self.consumed += count
        return torch.from_numpy(ids)

    def peek(self, count: int) -> torch.Tensor:
        """The next `count` sample ids, without consuming them."""
        consumed = self.consumed
        try:
            return self.take(count)
        finally:
            self.consumed = consumed

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "mixture": self.identity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changed = identity_changes(state.get("mixture"), self.identity)
        if changed and not self.allow_changed:
            raise DataError(
                f"the checkpoint was trained on other data: {'; '.join(changed)}. Resume with the data it was "
                "trained on, or set data.allow_changed=true to continue on this data on purpose"
            )
        self.seed = state["seed"]
        self.consumed = state["consumed"]
        if changed and _is_main():
            print(
                f"data.allow_changed=true: the data changed ({'; '.join(changed)}); training continues on the "
                f"new data from its global sample {self.consumed}",
                flush=True,
            )


def identity_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What differs between the mixture a checkpoint was trained on and this one, one phrase each."""
    if saved is None:
        return [
            "the checkpoint was trained on another data preset, not on prepared datasets (data=tokenized)"
        ]
    out = []
    before, after = saved["sources"], now["sources"]
    if len(before) != len(after):
        out.append(f"{len(before)} source(s) then, {len(after)} now")
    for i, (b, a) in enumerate(zip(before, after, strict=False)):
        if b["fingerprint"] != a["fingerprint"]:
            out.append(f"source {i} ({a['path']}) holds other tokens than {b['path']} did")
        if b["weight"] != a["weight"]:
            out.append(f"source {i}'s weight was {b['weight']}, now {a['weight']}")
    for key in ("seq_len", "packing", "tokenizer"):
        if saved.get(key) != now.get(key):
            out.append(f"{key} was {saved.get(key)}, now {now.get(key)}")
    if "truncation" in saved and saved["truncation"] != now.get("truncation"):  # it decides the windows
        out.append(f"truncation was {saved['truncation']}, now {now.get('truncation')}")
    return out


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def round_robin(sizes: list[int]) -> np.ndarray:
    """The ids of sources of these sizes (laid out one after another) taken in turns: the first window of
    each source, then the second of each, ...; a source that runs out drops out of the turns."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    turn = np.concatenate([np.arange(n, dtype=np.int64) * len(sizes) + s for s, n in enumerate(sizes)])
    ids = np.concatenate([offsets[s] + np.arange(n, dtype=np.int64) for s, n in enumerate(sizes)])
    return ids[np.argsort(turn, kind="stable")]


class Mixture:
    """Several sources' windows as one indexable set: id = offset of the source + the window within it.
    `order(seed=)` gives the weighted training order over it; evaluation reads the ids 0..len-1 in turn.
    `in_turns`: id k is the k-th window of round_robin (the eval split: a limited evaluation, the first
    train.eval_batches batches, then sees every source and not only the first)."""

    def __init__(
        self,
        windows: list[Any],
        weights: list[float],
        *,
        identity: dict[str, Any],
        allow_changed: bool = False,
        in_turns: bool = False,
    ) -> None:
        self.windows, self.weights = windows, weights
        self.identity, self.allow_changed = identity, allow_changed
        self.sizes = [len(w) for w in windows]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.turns = round_robin(self.sizes) if in_turns and len(windows) > 1 else None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def order(self, *, seed: int) -> MixtureOrder:
        return MixtureOrder(
            self.sizes, self.weights, seed=seed, identity=self.identity, allow_changed=self.allow_changed
        )

    @property
    def stats(self) -> dict[str, float]:
        """The packing of conversation sources (trainer.data.conversations), summed over them: what the loop
        prints and logs; {} when no source packs conversations."""
        parts = [w.stats for w in self.windows if getattr(w, "stats", None)]
        if not parts:
            return {}
        tokens, slots = sum(p["tokens"] for p in parts), sum(p["slots"] for p in parts)
        return {
            "packing_efficiency": tokens / max(slots, 1),
            **{
                k: sum(p[k] for p in parts)
                for k in ("tokens", "slots", "truncated", "dropped", "lost_trainable")
            },
        }

    def batch(self, indices: torch.Tensor) -> Batch:
        ids = indices.numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        if self.turns is not None:
            ids = self.turns[ids]
        sources = np.searchsorted(self.offsets, ids, side="right") - 1
        parts: list[tuple[np.ndarray, Batch]] = []
        for s in np.unique(sources).tolist():
            rows = np.flatnonzero(sources == s)
            parts.append((rows, self.windows[s].batch(torch.from_numpy(ids[rows] - self.offsets[s]))))
        inputs = torch.empty((len(ids), parts[0][1].inputs.shape[1]), dtype=torch.long)
        labels = torch.empty_like(inputs)
        # A row of a source without document masking is one sequence: positions 0..L-1, as the model's own.
        with_positions = any(b.position_ids is not None for _, b in parts)
        positions = torch.arange(inputs.shape[1]).repeat(len(ids), 1) if with_positions else None
        for rows, b in parts:
            at = torch.from_numpy(rows)
            inputs[at], labels[at] = b.inputs, b.labels
            if positions is not None and b.position_ids is not None:
                positions[at] = b.position_ids
        return Batch(inputs, labels, positions, num_tokens=sum(real_tokens(b) for _, b in parts))
