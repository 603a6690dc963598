"""Deterministic, resumable sample order.

The order is a pure function of (seed, epoch): a fresh permutation of the training windows per epoch.
The only state is the number of samples consumed globally, so a resumed run, even with another number
of ranks, continues with exactly the samples that come next, none seen twice and none skipped.
"""

from __future__ import annotations

import torch

from trainer.errors import ConfigError


class SampleOrder:
    def __init__(self, num_samples: int, *, seed: int, consumed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.consumed = consumed
        self._epoch_cache: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch_cache = (epoch, torch.randperm(self.num_samples, generator=g))
        return self._epoch_cache[1]

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_samples

    def take(self, count: int) -> torch.Tensor:
        """The next `count` sample indices over all ranks, crossing into the next epoch when needed."""
        parts = []
        while count > 0:
            epoch, offset = divmod(self.consumed, self.num_samples)
            n = min(count, self.num_samples - offset)
            parts.append(self._permutation(epoch)[offset : offset + n])
            self.consumed += n
            count -= n
        return torch.cat(parts)

    def peek(self, count: int) -> torch.Tensor:
        """The next `count` sample indices, without consuming them."""
        consumed = self.consumed
        try:
            return self.take(count)
        finally:
            self.consumed = consumed

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_samples"] != self.num_samples:
            raise ConfigError(
                f"the checkpoint was taken on {state['num_samples']} training sequences but the data now gives "
                f"{self.num_samples}, so its data position means nothing in them; resume with the data and the "
                "data.seq_len it was taken with, or start a new run (resume=none)"
            )
        self.seed = state["seed"]
        self.consumed = state["consumed"]


def rank_micro_batches(
    global_indices: torch.Tensor, *, micro_batch_size: int, rank: int, world_size: int
) -> list[torch.Tensor]:
    """Split one global batch into this rank's micro-batches: micro-step m, rank r gets slot m*world+r."""
    slots = global_indices.view(-1, micro_batch_size)
    return [slots[i] for i in range(rank, slots.shape[0], world_size)]
