"""The next step's micro-batches, assembled on a background thread while the current step trains.

The order stays the one source of truth: the prefetcher peeks at the next step's indices (without consuming
them) and builds their batches on its thread; when the step comes, it takes its indices from the order as
before and uses the prefetched batches only if they are of exactly those indices (a resume or any other change
of the order in between makes them be built again, on the spot). What the training thread waited for its
batches is measured, for `data_wait_s` in metrics.jsonl.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from trainer.data.order import rank_micro_batches


class Prefetcher:
    def __init__(self, windows: Any, *, micro_batch_size: int, rank: int, world_size: int) -> None:
        self.windows = windows
        self.split = dict(micro_batch_size=micro_batch_size, rank=rank, world_size=world_size)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending: tuple[torch.Tensor, Future] | None = None

    def _build(self, indices: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.windows.batch(idx) for idx in rank_micro_batches(indices, **self.split)]

    def next_batches(self, order: Any, count: int, *, prefetch: bool = True) -> tuple[list, float]:
        """This rank's micro-batches of the next `count` samples of `order` (consumed), and the seconds the
        caller waited for them; then the following step's are started in the background (`prefetch`)."""
        indices = order.take(count)
        start = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None and torch.equal(pending[0], indices):
            batches = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()
            batches = self._build(indices)
        waited = time.perf_counter() - start
        if prefetch:
            upcoming = order.peek(count)
            self._pending = (upcoming, self._pool.submit(self._build, upcoming))
        return batches, waited

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)
