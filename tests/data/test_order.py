import torch

from trainer.data import SampleOrder, rank_micro_batches


def test_each_epoch_is_a_permutation_and_epochs_differ():
    order = SampleOrder(10, seed=3)
    first, second = order.take(10), order.take(10)
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)


def test_order_is_deterministic_and_resumes_from_the_consumed_count():
    straight = SampleOrder(7, seed=1)
    expected = torch.cat([straight.take(4) for _ in range(5)])
    a = SampleOrder(7, seed=1)
    head = torch.cat([a.take(4) for _ in range(2)])
    b = SampleOrder(7, seed=0)
    b.load_state_dict(a.state_dict())
    tail = torch.cat([b.take(4) for _ in range(3)])
    assert torch.equal(torch.cat([head, tail]), expected)


def test_a_batch_crosses_the_epoch_boundary_without_skipping():
    order = SampleOrder(5, seed=0)
    order.take(3)
    batch = order.take(4)  # two from epoch 0, two from epoch 1
    assert order.epoch == 1 and len(batch) == 4


def test_micro_batches_of_all_ranks_partition_the_global_batch():
    global_batch = torch.arange(100, 112)
    world = 3
    parts = [
        rank_micro_batches(global_batch, micro_batch_size=2, rank=r, world_size=world) for r in range(world)
    ]
    assert all(len(p) == 2 for p in parts)  # 12 / (2 x 3) = 2 accumulation steps
    flat = sorted(torch.cat([t for p in parts for t in p]).tolist())
    assert flat == global_batch.tolist()


def test_resume_rejects_data_of_another_size():
    import pytest

    state = SampleOrder(10, seed=0).state_dict()
    with pytest.raises(ValueError, match="taken on 10 training sequences but the data now gives 11"):
        SampleOrder(11, seed=0).load_state_dict(state)
