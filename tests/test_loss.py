import pytest
import torch
import torch.nn.functional as F

from trainer.loss import IGNORE_INDEX, causal_lm_loss


def _inputs(dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 8, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(30, generator=g, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, 30, (23,), generator=g)
    labels[::4] = IGNORE_INDEX
    return h, w, b, labels


@pytest.mark.parametrize("chunk", [1, 5, 23, 0])
def test_fused_loss_and_gradients_equal_the_full_logits_reference(chunk):
    h, w, b, labels = _inputs()
    ref = F.cross_entropy(h @ w.t() + b, labels, ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    out = causal_lm_loss(h, w, b, labels, chunk_size=chunk)
    grads = torch.autograd.grad(out, (h, w, b))
    assert out.item() == pytest.approx(ref.item(), abs=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_loss_by_hand_on_two_tokens():
    # logits [0, ln 3] -> p = [1/4, 3/4]; token 0 costs ln 4, token 1 costs ln(4/3); the third is ignored.
    h = torch.tensor([[1.0], [1.0], [1.0]])
    w = torch.tensor([[0.0], [torch.log(torch.tensor(3.0))]])
    labels = torch.tensor([0, 1, IGNORE_INDEX])
    expected = (torch.log(torch.tensor(4.0)) + torch.log(torch.tensor(4.0 / 3.0))) / 2
    assert causal_lm_loss(h, w, None, labels, chunk_size=1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_num_targets_sets_the_denominator_for_accumulation():
    h, w, b, labels = _inputs()
    total = causal_lm_loss(h, w, b, labels, num_targets=1)
    mean = causal_lm_loss(h, w, b, labels)
    assert total.item() == pytest.approx(mean.item() * int((labels != IGNORE_INDEX).sum()), rel=1e-6)


def test_logits_path_matches_fused_path():
    h, w, b, labels = _inputs(bias=False)
    fused = causal_lm_loss(h, w, None, labels, chunk_size=4)
    plain = causal_lm_loss((h @ w.t())[None], None, None, labels[None])
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)


def test_no_gradient_work_under_no_grad():
    h, w, b, labels = _inputs()
    with torch.no_grad():
        out = causal_lm_loss(h, w, b, labels, chunk_size=4)
    assert out.grad_fn is None


def test_a_frozen_lm_head_costs_no_weight_gradient_and_leaves_the_hidden_gradient_exact():
    # LoRA and QLoRA freeze the LM head: the fused loss must not build its [vocab, hidden] gradient (a third of
    # the loss's matmuls, and a buffer the size of the head), while the hidden states' gradient is unchanged.
    from torch.utils.flop_counter import FlopCounterMode

    def run(frozen: bool):
        h, w, _, labels = _inputs(bias=False)
        w.requires_grad_(not frozen)
        ref = F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE_INDEX)
        (want,) = torch.autograd.grad(ref, (h,))
        with FlopCounterMode(display=False) as counter:
            out = causal_lm_loss(h, w, None, labels, chunk_size=5)
        (got,) = torch.autograd.grad(out, (h,))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        return counter.get_total_flops(), int((labels != IGNORE_INDEX).sum())

    (trained, n), (frozen, _) = run(False), run(True)
    assert n < 23  # of the 23 rows, only those with a target reach the LM head
    d, v = 8, 30
    assert trained == 3 * 2 * n * d * v  # logits, hidden's gradient, weight's gradient
    assert frozen == 2 * 2 * n * d * v
