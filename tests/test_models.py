"""Models from a config, from a local pretrained directory; activation checkpointing and compile switches."""

import json

import pytest
import torch

from tests.conftest import TINY, TINY_LOOP, compose_config, make_trainer
from trainer.data import build_data
from trainer.models import CausalLMWithLoss, build_model


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_pretrained_model_from_a_local_export_fine_tunes_with_its_own_tokenizer(tmp_path):
    make_trainer(tmp_path / "base", *TINY).train()
    export = tmp_path / "base" / "hf"
    # The data and tokenizer come from the exported model: data.tokenizer=null means the model's own.
    rows = (tmp_path / "base" / "data").rglob("train.jsonl").__next__()
    tuned = make_trainer(
        tmp_path / "tuned",
        *TINY_LOOP,
        "model=hf",
        f"model.name_or_path={export}",
        "data=hf",
        f"data.data_files={rows}",
        "train.max_steps=2",
    )
    base_weights = build_model(compose_config("model=hf", f"model.name_or_path={export}").model).state_dict()
    assert all(torch.equal(base_weights[k], v) for k, v in tuned.hf_model.state_dict().items())
    assert tuned.train()["final_step"] == 2


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    common = [*TINY, "scheduler=constant", "train.log_every=1", "train.export_hf=false"]
    make_trainer(tmp_path / "a", *common).train()
    checkpointed = make_trainer(tmp_path / "b", *common, "train.activation_checkpointing=true")
    model = checkpointed.hf_model
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    checkpointed.train()
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-5)


def test_selective_checkpointing_recomputes_no_matmul_and_holds_less_than_none_more_than_full(tmp_path):
    """One forward and backward of the trainer's module under each train.activation_checkpointing: the same
    loss and gradients; full checkpointing runs each block's matmuls again in the backward but the last (down:
    no backward needs its output, and torch's recompute stops once every saved tensor is back), selective none; the step's peak of activations (torch's MemTracker) is lowest with full,
    highest without."""
    from collections import Counter

    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulCount(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    import warnings

    runs = {}
    formatwarning = warnings.formatwarning  # torch's module tracker replaces it when checkpointing re-enters
    for mode in ("false", "selective", "true"):
        trainer = make_trainer(tmp_path / mode, *TINY, f"train.activation_checkpointing={mode}")
        batch = trainer.data.train.batch(torch.arange(4))
        torch.manual_seed(0)
        tracker, counter = MemTracker(), MatmulCount()
        tracker.track_external(trainer.module)
        with tracker, counter:
            loss = trainer.module(batch.inputs, batch.labels)
            forward = counter.calls.copy()
            loss.backward()
        warnings.formatwarning = formatwarning
        activations = next(iter(tracker.get_tracker_snapshot("peak").values()))
        runs[mode] = {
            "loss": loss.item(),
            "grads": {n: p.grad.clone() for n, p in trainer.module.named_parameters()},
            "backward_matmuls": sum((counter.calls - forward)[op] for op in ("mm", "addmm", "bmm")),
            "peak": sum(v for k, v in activations.items() if str(k).split(".")[-1] in ("ACT", "TEMP")),
        }
    layers = trainer.hf_model.config.num_hidden_layers
    none, selective, full = runs["false"], runs["selective"], runs["true"]
    for run in (selective, full):
        assert run["loss"] == none["loss"]
        for name, grad in none["grads"].items():
            torch.testing.assert_close(run["grads"][name], grad, rtol=1e-5, atol=1e-7)
    assert selective["backward_matmuls"] == none["backward_matmuls"]
    assert full["backward_matmuls"] == none["backward_matmuls"] + 6 * layers  # q, k, v, o, gate, up
    assert none["peak"] > selective["peak"] > full["peak"], {m: r["peak"] for m, r in runs.items()}


def test_compiled_model_trains_like_eager_and_compiles_eval_once(tmp_path):
    from torch._dynamo.utils import counters

    common = [*TINY, "scheduler=constant", "train.log_every=1", "train.export_hf=false", "train.max_steps=3"]
    eager = make_trainer(tmp_path / "eager", *common)
    assert len(eager.data.eval) % 4 != 0  # the eval split ends in a short batch (micro_batch_size=4)
    eager_eval = eager.train()["eval_loss"]
    counters.clear()
    compiled = make_trainer(tmp_path / "compiled", *common, "train.compile=true").train()
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4)
    assert compiled["eval_loss"] == pytest.approx(eager_eval, rel=1e-5)
    # the training graph and the no-grad one: the short last eval batch is filled up to the same shape
    assert counters["stats"]["unique_graphs"] == 2


def test_fused_loss_equals_the_model_logits_loss(tmp_path):
    cfg = compose_config(*TINY)
    data = build_data(cfg.data, run_dir=tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(data.tokenizer))
    batch = data.train.batch(torch.arange(4))
    inputs, labels = batch.inputs, batch.labels
    fused = CausalLMWithLoss(model, loss_chunk_size=16)
    plain = CausalLMWithLoss(model, loss_chunk_size=0)
    assert fused.fused and not plain.fused
    assert fused(inputs, labels).item() == pytest.approx(plain(inputs, labels).item(), rel=1e-5)


def test_pydoc_preset_builds_a_bpe_tokenizer_from_real_text(tmp_path):
    cfg = compose_config("data=pydoc", "data.tokenizer_vocab_size=1024", "data.seq_len=64")
    data = build_data(cfg.data, run_dir=tmp_path)
    assert len(data.tokenizer) == 1024
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    text = "The for statement is used to iterate over the elements of a sequence."
    ids = data.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert data.tokenizer.decode(ids) == text and len(ids) < len(text) / 2
    # ~465 KB of text: hundreds of thousands of tokens, 10% of the topics held out.
    assert len(data.train) * 64 > 100_000 and 0 < len(data.eval) < len(data.train) / 5


def test_an_explicit_vocab_size_larger_than_the_tokenizer_is_kept_and_a_smaller_one_is_refused():
    from trainer.errors import ConfigError
    from trainer.models import build_model_config

    wide = compose_config("+model.arch.vocab_size=32000").model
    assert build_model_config(wide, vocab_size=9196).vocab_size == 32000  # spare ids unused, as in Llama 2
    assert build_model_config(compose_config().model, vocab_size=9196).vocab_size == 9216  # rounded up to 64
    with pytest.raises(ConfigError, match=r"model.arch.vocab_size=100 is smaller than the tokenizer's 9196"):
        build_model_config(compose_config("+model.arch.vocab_size=100").model, vocab_size=9196)
