"""The blended order of a mixture: proportions, determinism, random access, and epochs per source."""

import numpy as np
import pytest
import torch

from trainer.data.mixture import Mixture, MixtureOrder, blend, check_weights, permute
from trainer.data.prepared import Batch
from trainer.errors import DataError

IDENTITY = {"sources": [], "seq_len": 8, "packing": True, "tokenizer": "x"}


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [0.05, 0.9, 0.04, 0.01], [1, 1, 1]])
def test_every_10000_consecutive_samples_are_within_1_percent_of_the_weights(weights):
    w = check_weights([float(x) for x in weights])
    sources, _ = blend(0, 200_000, w)
    counts = np.cumsum(np.eye(len(w), dtype=np.int64)[sources], axis=0)
    windows = counts[10_000:] - counts[:-10_000]  # every window of 10,000 consecutive samples
    assert np.abs(windows / 10_000 - np.array(w)).max() < 0.01
    assert np.abs(windows / 10_000 - np.array(w)).max() <= 2 / 10_000  # in fact within two samples


def test_the_blend_is_a_pure_function_of_the_position():
    w = check_weights([0.6, 0.25, 0.15])
    whole = blend(0, 50_000, w)
    pieces = [blend(start, 777, w) for start in range(0, 50_000, 777)]
    assert np.array_equal(np.concatenate([p[0] for p in pieces])[:50_000], whole[0])
    assert np.array_equal(np.concatenate([p[1] for p in pieces])[:50_000], whole[1])
    for s in range(3):  # each source's samples are taken in turn, none skipped
        assert np.array_equal(whole[1][whole[0] == s], np.arange((whole[0] == s).sum()))
    far = 10**12  # far into a run costs what the start does
    sources, ks = blend(far, 1000, w)
    assert abs(ks[sources == 0][0] - 0.6 * far) < 2


def test_each_epoch_of_a_source_is_a_permutation_and_epochs_differ():
    for n in (1, 2, 7, 1000, 4097):
        first = permute(np.arange(n), n, seed=3, source=1, epoch=0)
        assert sorted(first.tolist()) == list(range(n))
    second = permute(np.arange(1000), 1000, seed=3, source=1, epoch=1)
    assert not np.array_equal(permute(np.arange(1000), 1000, seed=3, source=1, epoch=0), second)


def test_a_source_that_runs_out_starts_its_next_epoch_without_disturbing_the_others():
    small, large = 10, 10_000
    order = MixtureOrder([small, large], [0.5, 0.5], seed=1, identity=IDENTITY)
    ids = torch.cat([order.take(8) for _ in range(10)]).numpy()  # 40 of each: four epochs of the small one
    from_small = ids[ids < small]
    assert [sorted(from_small[i : i + small].tolist()) for i in range(0, 40, small)] == [
        list(range(small))
    ] * 4
    assert len({tuple(from_small[i : i + small]) for i in range(0, 40, small)}) == 4  # a new order each epoch
    # The large source's samples are the same as in a mixture whose small source never runs out.
    other = MixtureOrder([1000, large], [0.5, 0.5], seed=1, identity=IDENTITY)
    other_ids = other.take(80).numpy()
    assert np.array_equal(ids[ids >= small] - small, other_ids[other_ids >= 1000] - 1000)


def test_the_order_resumes_from_the_consumed_count_under_any_batching():
    straight = MixtureOrder([50, 70, 30], [0.5, 0.3, 0.2], seed=4, identity=IDENTITY)
    want = torch.cat([straight.take(12) for _ in range(30)])
    a = MixtureOrder([50, 70, 30], [0.5, 0.3, 0.2], seed=4, identity=IDENTITY)
    head = torch.cat([a.take(12) for _ in range(13)])
    b = MixtureOrder([50, 70, 30], [0.5, 0.3, 0.2], seed=0, identity=IDENTITY)
    b.load_state_dict(a.state_dict())
    tail = torch.cat([b.take(4) for _ in range(3 * 17)])
    assert torch.equal(torch.cat([head, tail]), want)


def test_weights_that_are_negative_or_all_zero_are_refused():
    with pytest.raises(DataError, match=r"data.sources\[1\].weight=-1"):
        check_weights([1.0, -1.0])
    with pytest.raises(DataError, match="every weight is 0"):
        check_weights([0.0, 0.0])
    assert check_weights([0.0, 3.0, 1.0]) == [0.0, 0.75, 0.25]


class Windows:
    """`size` windows of 2 tokens, each [source, index]."""

    def __init__(self, source: int, size: int) -> None:
        self.source, self.size = source, size

    def __len__(self) -> int:
        return self.size

    def batch(self, ids: torch.Tensor) -> Batch:
        rows = torch.stack([torch.full_like(ids, self.source), ids], dim=1)
        return Batch(rows, rows)


def test_the_eval_windows_of_a_mixture_come_in_turns_so_a_limited_eval_sees_every_source():
    mixture = Mixture([Windows(0, 3), Windows(1, 1), Windows(2, 2)], [1.0] * 3, identity={}, in_turns=True)
    inputs = mixture.batch(torch.arange(len(mixture))).inputs
    assert inputs.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [2, 1], [0, 2]]
    # the training view of the same windows is one source after the other
    plain = Mixture([Windows(0, 3), Windows(1, 1), Windows(2, 2)], [1.0] * 3, identity={})
    assert plain.batch(torch.arange(3))[0][:, 0].tolist() == [0, 0, 0]
