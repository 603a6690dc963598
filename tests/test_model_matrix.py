"""Every cell of the support matrix (tests/model_matrix.py) on the family's tiny config.

A Y cell runs the feature and checks that it did something, against the float model or the files it wrote; a
refusal cell runs the same code and checks the one-paragraph ConfigError. Several cells share a run (the
single-process run is also the activation-checkpointing and hf/ cells; one KD run is both KD cells; one 2-rank
spawn runs every strategy on every family), and each cell is asserted and named on its own.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TINY_MARKOV, compose_config, read_metrics
from tests.model_matrix import FAMILIES, FEATURE, FEATURES, NF4_SHAPES, TINY_SHAPES, cell, render
from trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
STEPS, MICRO, GLOBAL = 2, 4, 8
LOOP = [
    f"train.micro_batch_size={MICRO}",
    f"train.global_batch_size={GLOBAL}",
    f"train.max_steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=0",
    "train.progress_bar=false",
    "checkpoint.every_steps=0",
    "scheduler=constant",
]
MULTI_RANK = ("ddp", "fsdp", "zero3")
SLOW_CELLS = {f.name for f in FEATURES if f.slow}
SINGLE_PROCESS = [f.name for f in FEATURES if f.name not in MULTI_RANK and not f.slow]
PTQ_BOUND = {"int8_weight": 0.05, "int8_dynamic": 0.08, "int8_smooth": 0.12}  # relative L2 of the logits


def family_overrides(
    family: str,
    *,
    shapes: tuple[str, ...] = TINY_SHAPES,
    data: tuple[str, ...] = (*TINY_MARKOV, "data.seq_len=32"),
) -> list[str]:
    fam = FAMILIES[family]
    extra = fam.nf4_overrides if shapes == NF4_SHAPES else ()
    return [*TINY_SHAPES, *shapes, *fam.overrides, *extra, *data, *LOOP]


@functools.cache
def _composed(*overrides: str) -> Any:
    return compose_config(*overrides)


def family_config(
    family: str, *overrides: str, shapes: tuple[str, ...] = TINY_SHAPES, data: tuple[str, ...] | None = None
) -> Any:
    """The training config of `family` with `overrides`, as compose_config(*family_overrides(...), *overrides)
    gives it, composed once per feature run and once per family (a Hydra composition is ~0.3 s): the families
    differ in model.arch alone, so the family's model group (with the model.* overrides) replaces llama's."""
    kwargs = {} if data is None else {"data": data}
    model = tuple(o for o in overrides if o.lstrip("+").startswith("model."))
    rest = tuple(o for o in overrides if o not in model)
    cfg = copy.deepcopy(_composed(*family_overrides("llama", **kwargs), *rest))
    cfg.model = copy.deepcopy(_composed(*family_overrides(family, shapes=shapes), *model).model)
    return cfg


def train_family(run_dir: Path, family: str, *overrides: str, **kwargs: Any) -> Any:
    """A Trainer of `family_config(family, *overrides, **kwargs)` in run_dir."""
    from trainer.distributed import ParallelEnv
    from trainer.loop import Trainer

    return Trainer(family_config(family, *overrides, **kwargs), run_dir=run_dir, env=ParallelEnv())


def fixed_ids(vocab: int, *, rows: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def bytes_in(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and "token" not in p.name)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits


# ---- the runs a family's cells share, each run once and its outcome (or error) kept -----------------------


class FamilyRuns:
    """One family's runs and models, each built at most once; a run's error is raised again by every cell
    that reads it (the refusal a cell expects, or the crash it reports)."""

    def __init__(self, name: str, tmp: Path, chat: dict[str, Path]):
        self.name, self.tmp, self.chat = name, tmp, chat
        self._outcomes: dict[str, Any] = {}
        self.warned: dict[str, list[str]] = {}  # run -> the warnings it gave

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._outcomes:
            try:
                self._outcomes[key] = (True, make())
            except Exception as e:  # kept for each cell that reads it
                self._outcomes[key] = (False, e)
        ok, value = self._outcomes[key]
        if not ok:
            raise value
        return value

    def train(self, key: str, *overrides: str, shapes: tuple[str, ...] = TINY_SHAPES, data=None, before=None):
        """A Trainer, trained, in tmp/key; `before(trainer)` runs before training (hooks, snapshots)."""

        def run():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer = train_family(self.tmp / key, self.name, *overrides, shapes=shapes, data=data)
                state = before(trainer) if before else None
                trainer.train()
            self.warned[key] = [str(w.message) for w in caught]
            return trainer, self.tmp / key, state

        return self.once(key, run)

    def model(self, **kwargs: Any) -> torch.nn.Module:
        """A fresh model of the family: the single run's trained hf/ export, in float32 (a copy each call)."""
        from transformers import AutoModelForCausalLM

        _, run, _ = self.base()
        return AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32, **kwargs).eval()

    def base(self):
        """The single-process run, with activation checkpointing: block 0's forward calls counted, the
        weights before training kept."""

        def before(trainer):
            from trainer.models import transformer_blocks

            calls = []
            # block 0's MLP (every family names it `mlp`), inside the checkpointed forward (the block's own hooks
            # stay outside it), counted in training mode (not the final evaluation)
            mlp = transformer_blocks(trainer.hf_model)[0].mlp
            mlp.register_forward_pre_hook(lambda m, _: calls.append(1) if m.training else None)
            start = {n: p.detach().clone() for n, p in trainer.hf_model.named_parameters()}
            return calls, start

        return self.train("single", "train.activation_checkpointing=true", before=before)

    def says_experts_stay(self, messages: list[str]) -> None:
        """An MoE's fused experts, which a linear-layer feature leaves as they are, are said to be (a warning);
        a dense model's warnings say nothing of experts."""
        from trainer.models import fused_experts

        said = any("routed experts" in m for m in messages)
        assert said == bool(fused_experts(self.base()[0].hf_model)), messages

    def vocab(self) -> int:
        return self.base()[0].hf_model.config.vocab_size


# ---- the checks, one per feature: each raises AssertionError when a Y is not what it claims ----------------


def check_single(fam: FamilyRuns) -> None:
    trainer, run, (_, start) = fam.base()
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))), losses
    frozen = [n for n, p in trainer.hf_model.named_parameters() if torch.equal(p.detach(), start[n])]
    assert not frozen, f"weights that did not move: {frozen[:4]}"


def check_activation_checkpointing(fam: FamilyRuns) -> None:
    trainer, _, (calls, _) = fam.base()
    assert trainer.hf_model.is_activation_checkpointing
    # each micro-batch: the block's forward, then its recompute in the backward
    assert len(calls) == 2 * STEPS * (GLOBAL // MICRO), len(calls)


def check_selective_checkpointing(fam: FamilyRuns) -> None:
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from trainer.activation_checkpointing import enable_activation_checkpointing

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.forward, self.backward = Counter(), Counter()
            self.now = self.forward

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.now[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    ids = fixed_ids(fam.vocab())
    steps = {}
    for mode in (False, "selective"):
        model = fam.model().train()
        enable_activation_checkpointing(model, mode)
        torch.manual_seed(0)  # the same dropout masks (the recompute replays the RNG)
        with Calls() as calls:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            calls.now = calls.backward
            loss.backward()
        steps[mode] = loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls
    (loss, grads, plain), (sel_loss, sel_grads, sel) = steps[False], steps["selective"]
    torch.testing.assert_close(sel_loss, loss)
    assert sel_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(sel_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    matmuls = ("mm", "addmm", "bmm", "baddbmm")
    assert sum(sel.backward[m] for m in matmuls) == sum(plain.backward[m] for m in matmuls)
    assert sel.backward.total() > plain.backward.total(), "nothing was recomputed"


def check_hf(fam: FamilyRuns) -> None:
    trainer, _, _ = fam.base()
    ids = fixed_ids(fam.vocab())
    torch.testing.assert_close(logits(fam.model(), ids), logits(trainer.hf_model, ids), atol=1e-5, rtol=1e-5)


def kd_run(fam: FamilyRuns) -> list[dict]:
    _, run, _ = fam.base()
    _, kd, _ = fam.train("kd", "distill=kd", f"distill.teacher={run / 'hf'}", "distill.hidden_weight=1.0")
    rows = [r for r in read_metrics(kd) if "loss" in r]
    for r in rows:  # the loss the step took is the mix of the terms logged
        assert r["loss"] == pytest.approx(
            0.5 * r["ce_loss"] + 0.5 * r["kd_loss"] + r["hidden_loss"], rel=1e-5
        )
    return rows


def check_kd_logits(fam: FamilyRuns) -> None:
    assert all(r["kd_loss"] > 0 for r in kd_run(fam))


def check_kd_hidden(fam: FamilyRuns) -> None:
    assert all(r["hidden_loss"] > 0 for r in kd_run(fam))


class Windows:
    """Calibration windows as the pruner reads them (`len`, `batch(indices)`)."""

    def __init__(self, vocab: int):
        self.ids = fixed_ids(vocab, rows=8, length=16)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index):
        from trainer.data.prepared import Batch

        return Batch(self.ids[index], self.ids[index], None, None)


def pruned(fam: FamilyRuns, *overrides: str):
    from trainer.distributed import ParallelEnv
    from trainer.prune.pruner import Pruner

    model = fam.model()
    cfg = _composed(*overrides)
    pruner = Pruner(cfg.prune, env=ParallelEnv(), device=torch.device("cpu"), max_steps=STEPS, seed=0)
    pruner.prepare(model, train_data=Windows(fam.vocab()), micro_batch_size=2, resume=None)
    return model, pruner


def check_unstructured(fam: FamilyRuns, *overrides: str) -> None:
    from trainer.models import is_linear, linear_weight, transformer_blocks

    model, pruner = pruned(fam, *overrides)
    inside = {id(m) for b in transformer_blocks(model) for m in b.modules()}
    linears = {f"{n}.weight" for n, m in model.named_modules() if is_linear(m) and id(m) in inside}
    assert set(pruner.masks) == linears, (
        f"pruned {sorted(pruner.masks)} of the blocks' linears {sorted(linears)}"
    )
    for name in linears:
        w = linear_weight(model.get_submodule(name.removesuffix(".weight")))
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02), name
        if "prune=nm" in overrides:
            assert int((w.reshape(-1, 4) != 0).sum(1).max()) <= 2, name
    logits(model, fixed_ids(fam.vocab()))  # the pruned model still runs


def check_structured(fam: FamilyRuns, what: str) -> None:
    import tempfile

    from transformers import AutoModelForCausalLM

    from trainer.models import transformer_blocks

    dense = fam.model()
    config, params = dense.config, sum(p.numel() for p in dense.parameters())
    if what == "heads":
        model, _ = pruned(fam, "prune=structured", "prune.heads=0.5", "prune.mlp_channels=0")
        assert model.config.num_attention_heads == config.num_attention_heads // 2
        o = transformer_blocks(model)[0].self_attn.o_proj
        assert o.in_features == model.config.num_attention_heads * model.config.head_dim
    else:
        model, _ = pruned(fam, "prune=structured", "prune.mlp_channels=0.5")
        assert model.config.intermediate_size == config.intermediate_size // 2
    assert sum(p.numel() for p in model.parameters()) < params
    ids = fixed_ids(fam.vocab())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        again = AutoModelForCausalLM.from_pretrained(tmp).eval()
        torch.testing.assert_close(logits(again, ids), logits(model.eval(), ids))


def peft_run(fam: FamilyRuns, name: str, *, nf4: bool = False):
    targets = ",".join(FAMILIES[fam.name].lora_targets)
    extra = ["peft.base_dtype=nf4"] if nf4 else []
    shapes = NF4_SHAPES if nf4 else TINY_SHAPES
    return fam.train(
        f"{name}{'_nf4' if nf4 else ''}",
        f"peft={name}",
        f"peft.targets=[{targets}]",
        "peft.rank=4",
        *extra,
        shapes=shapes,
    )


def base_of(trainer) -> torch.nn.Module:
    """A fresh model of the trained one's config holding its frozen base (the adapters left out)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(trainer.hf_model.config)
    state = {}
    for k, v in trainer.hf_model.state_dict().items():
        if ".lora_" not in k:
            v = v.get_original_weight() if type(v).__name__ == "NF4Tensor" else v
            state[k.replace(".base_layer.", ".")] = v
    missing, unexpected = base.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    base.tie_weights()
    return base.eval()


def check_adapters(fam: FamilyRuns, name: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, run, _ = peft_run(fam, name)
    fam.says_experts_stay(fam.warned[name])
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    adapted = {n.rsplit(".", 1)[-1] for n in config["target_modules"]}
    assert adapted == set(FAMILIES[fam.name].lora_targets), adapted
    ids = fixed_ids(fam.vocab())
    base = base_of(trainer)
    before = logits(base, ids)
    with_adapter = logits(PeftModel.from_pretrained(base, str(run / "adapter")), ids)
    merged = logits(AutoModelForCausalLM.from_pretrained(str(run / "hf")), ids)
    assert not torch.allclose(merged, before, atol=1e-6), "the adapters changed nothing"
    torch.testing.assert_close(with_adapter, merged, atol=1e-5, rtol=1e-5)


def check_qlora(fam: FamilyRuns) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, run, _ = peft_run(fam, "lora", nf4=True)
    fam.says_experts_stay(fam.warned["lora_nf4"])
    bases = [m.base_layer.weight for n, m in trainer.hf_model.named_modules() if hasattr(m, "lora_A")]
    assert bases and all(type(w).__name__ == "NF4Tensor" for w in bases)
    ids = fixed_ids(fam.vocab())
    base = base_of(trainer)
    with_adapter = logits(PeftModel.from_pretrained(base, str(run / "adapter")), ids)
    merged = logits(AutoModelForCausalLM.from_pretrained(str(run / "hf")), ids)
    assert not torch.allclose(with_adapter, logits(base_of(trainer), ids), atol=1e-6)
    torch.testing.assert_close(with_adapter, merged, atol=1e-4, rtol=1e-4)


def check_qat(fam: FamilyRuns) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.quant import load_quantized

    trainer, run, _ = fam.train("qat", "quant=int8_weight")
    fam.says_experts_stay(fam.warned["qat"])
    assert any(type(m).__name__ == "FakeQuantizedLinear" for m in trainer.hf_model.modules())
    ids = fixed_ids(fam.vocab())
    with torch.no_grad():
        got = load_quantized(run / "quantized")(input_ids=ids).logits
    want = logits(AutoModelForCausalLM.from_pretrained(str(run / "hf")), ids)
    assert 0 < relative_error(got, want) < PTQ_BOUND["int8_weight"]
    assert bytes_in(run / "quantized") < bytes_in(run / "hf")


def check_ptq(fam: FamilyRuns, scheme: str) -> None:
    from trainer.models import is_linear
    from trainer.quant import load_quantized, quantize_model, save_quantized
    from trainer.quant.ptq import check_scheme, default_keep_float

    check_scheme(scheme, torch.device("cpu"))
    model, ids = fam.model(), fixed_ids(fam.vocab())
    want = logits(model, ids)
    keep = default_keep_float(scheme)
    head = model.get_output_embeddings()
    linear_weights = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if is_linear(m) and (m is not head or not keep) and not any(k in n for k in keep)
    )
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = quantize_model(model, scheme, keep_float=keep, calibration=[fixed_ids(fam.vocab(), seed=2)])
    fam.says_experts_stay([str(w.message) for w in caught])
    out = save_quantized(fam.tmp / f"ptq_{scheme}", model, info)
    err = relative_error(logits(load_quantized(out), ids), want)
    assert 0 < err < PTQ_BOUND[scheme], err
    # int8 instead of float32: 3 of the 4 bytes of every quantized weight saved, less the per-row scales and
    # the pickle's overhead (at least one byte a weight on these tiny layers)
    assert bytes_in(out) < bytes_in(fam.base()[1] / "hf") - linear_weights


def check_gguf(fam: FamilyRuns) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.gguf_export import export_gguf
    from trainer.models import build_model

    tokenizer = fam.chat["bpe"]
    torch.manual_seed(0)
    cfg = _composed(*family_overrides(fam.name), *FAMILIES[fam.name].gguf_overrides)
    model = build_model(cfg.model, vocab_size=len(tokenizer)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qwen3's head_dim note: 128 here, what transformers' loader takes
        path = export_gguf(model, tokenizer, fam.tmp / "gguf", gguf_type="f32")
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = fixed_ids(len(tokenizer))
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-5, rtol=0)


def check_compressed_tensors(fam: FamilyRuns, scheme: str) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.quant.compressed_tensors import export_compressed_tensors, quantize_activations_per_token

    ours, ids = fam.model(), fixed_ids(fam.vocab())
    float_logits = logits(ours, ids)
    calibration = [fixed_ids(fam.vocab(), rows=4, length=32, seed=s) for s in (2, 3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # w4a16's group lowered to the tiny widths: said, and fine here
        out = export_compressed_tensors(
            ours, None, fam.tmp / f"ct_{scheme}", scheme=scheme, calibration=calibration
        )
        reloaded = AutoModelForCausalLM.from_pretrained(out)
    fam.says_experts_stay([str(w.message) for w in caught])
    if scheme == "w8a8":
        quantize_activations_per_token(ours)
    want = logits(ours, ids)
    assert relative_error(logits(reloaded, ids), want) < 1e-5
    assert 0 < relative_error(want, float_logits) < 0.2  # it is quantized
    assert bytes_in(out) < bytes_in(fam.base()[1] / "hf")


def check_sft(fam: FamilyRuns) -> None:
    chat = fam.chat
    trainer, run, start = fam.train(
        "sft",
        data=(
            "data=hf",
            f"data.data_files={chat['jsonl']}",
            "data.format=messages",
            f"data.tokenizer={chat['tokenizer']}",
            "data.seq_len=64",
        ),
        before=lambda t: {n: p.detach().clone() for n, p in t.hf_model.named_parameters()},
    )
    rows = [r for r in read_metrics(run) if "loss" in r]
    # the loss covers the assistant turns only: fewer target tokens than real ones
    assert all(0 < r["target_tokens"] < 0.8 * r["real_tokens"] for r in rows), rows
    moved = [n for n, p in trainer.hf_model.named_parameters() if not torch.equal(p.detach(), start[n])]
    assert len(moved) == len(start)


CHECKS: dict[str, Callable[[FamilyRuns], None]] = {
    "single": check_single,
    "activation checkpointing": check_activation_checkpointing,
    "selective checkpointing": check_selective_checkpointing,
    "KD logits": check_kd_logits,
    "KD hidden states": check_kd_hidden,
    "magnitude": lambda f: check_unstructured(f, "prune=magnitude"),
    "wanda": lambda f: check_unstructured(f, "prune=wanda", "prune.calibration_batches=2"),
    "sparsegpt": lambda f: check_unstructured(
        f, "prune=sparsegpt", "prune.calibration_batches=2", "prune.block_size=16"
    ),
    "2:4 (nm)": lambda f: check_unstructured(f, "prune=nm", "prune.block_size=16"),
    "structured heads": lambda f: check_structured(f, "heads"),
    "structured channels": lambda f: check_structured(f, "channels"),
    "LoRA": lambda f: check_adapters(f, "lora"),
    "DoRA": lambda f: check_adapters(f, "dora"),
    "QLoRA (nf4)": check_qlora,
    "QAT (int8_weight)": check_qat,
    "int8_weight": lambda f: check_ptq(f, "int8_weight"),
    "int8_dynamic": lambda f: check_ptq(f, "int8_dynamic"),
    "int8_smooth": lambda f: check_ptq(f, "int8_smooth"),
    "int4_weight": lambda f: check_ptq(f, "int4_weight"),
    "sparse24": lambda f: check_ptq(f, "sparse24"),
    "hf/": check_hf,
    "GGUF": check_gguf,
    "compressed-tensors w8a16": lambda f: check_compressed_tensors(f, "w8a16"),
    "compressed-tensors w8a8": lambda f: check_compressed_tensors(f, "w8a8"),
    "compressed-tensors w4a16": lambda f: check_compressed_tensors(f, "w4a16"),
    "SFT (chat)": check_sft,
}


def squeezed(text: str) -> str:
    """Lower case without '_' and '-': gpt_neox in GPTNeoXForCausalLM, gpt2 in "GPT-2's Conv1D"."""
    return text.lower().replace("_", "").replace("-", "")


def verdict(feature: str, family: str, run: Callable[[], None]) -> str | None:
    """None when the cell holds (Y proven, or the expected one-paragraph refusal), else what went wrong."""
    expected = cell(feature, family)
    where = f"{family} x {feature}"
    try:
        run()
    except ConfigError as e:
        message = str(e)
        if expected is None:
            return f"{where}: expected Y, refused: {message}"
        if not re.search(expected.match.replace("{family}", family), message):
            return f"{where}: refused, but not as the matrix says ({expected.match!r}): {message}"
        if not expected.any_family and squeezed(family) not in squeezed(message):
            return f"{where}: the refusal does not name the family (model_type or class): {message}"
        if "\n" in message.strip():
            return f"{where}: the refusal is not one paragraph: {message!r}"
        return None
    except Exception as e:  # a crash, or a Y check that failed
        return f"{where}: {type(e).__name__}: {e}"
    if expected is not None:
        return f"{where}: ran, but the matrix says it refuses ({expected.short})"
    return None


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: a second thread only adds synchronisation on the shared cores (~10x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> dict[str, Any]:
    """A byte-level BPE tokenizer (GGUF describes it), the same with a ChatML template (its tokens added), and
    word-reversal conversations."""
    import random

    from tests.chat_fixtures import WORDS, with_template
    from trainer.data.tokenizer import build_bpe_tokenizer

    rng = random.Random(0)
    words = WORDS[:12]
    rows = []
    for _ in range(64):
        said = rng.sample(words, rng.randint(2, 6))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "Reverse: " + " ".join(said)},
                    {"role": "assistant", "content": " ".join(reversed(said))},
                ]
            }
        )
    root = tmp_path_factory.mktemp("chat")
    jsonl = root / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [m["content"] for r in rows for m in r["messages"]] + ["user assistant system"]
    bpe = build_bpe_tokenizer(texts, 300)
    with_template(bpe, CHAT_TEMPLATE, special=["<|im_start|>", "<|im_end|>"]).save_pretrained(root / "tok")
    return {"bpe": bpe, "jsonl": jsonl, "tokenizer": root / "tok"}


# ---- the tests ---------------------------------------------------------------------------------------------


def test_the_matrix_has_a_check_for_every_feature_and_a_cell_for_every_family():
    assert set(CHECKS) | set(MULTI_RANK) | SLOW_CELLS == set(FEATURE)
    assert len(FAMILIES) == 9 and {"llama", "gpt2", "qwen2_moe", "phi3"} <= set(FAMILIES)
    for f in FEATURES:
        assert set(f.refusals) <= set(FAMILIES), f.name


def test_docs_models_md_is_the_rendered_matrix():
    committed = (ROOT / "docs" / "models.md").read_text()
    assert committed == render(), (
        "docs/models.md is stale: python -m tests.model_matrix --write docs/models.md"
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_single_process_cell_of_the_family_is_y_or_its_refusal(family, chat, tmp_path):
    fam = FamilyRuns(family, tmp_path, chat)
    failures = [verdict(feature, family, lambda f=feature: CHECKS[f](fam)) for feature in SINGLE_PROCESS]
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


def _strategies_on_every_family(rank: int, port: int, out: str, configs: dict[str, Any]) -> None:
    """One of 2 ranks: every family under ddp, fsdp and zero3 in turn (one process start for all 27 runs, the
    configs composed once by the test); rank 0 writes each run's losses, or the ConfigError that refused it,
    to out/multi_rank.json."""
    import os

    from trainer.distributed import ParallelEnv, destroy
    from trainer.loop import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    results: dict[str, dict[str, Any]] = {}
    try:
        for family in FAMILIES:
            for strategy in MULTI_RANK:
                run_dir = Path(out) / f"{family}-{strategy}"
                cfg = copy.deepcopy(configs[strategy])
                cfg.model = configs[family].model  # the families differ in model.arch alone
                try:
                    Trainer(cfg, run_dir=run_dir, env=ParallelEnv(rank, 2, rank)).train()
                except ConfigError as e:  # raised alike on both ranks, before any collective
                    results.setdefault(family, {})[strategy] = {"refused": str(e)}
                    continue
                losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r] if rank == 0 else []
                results.setdefault(family, {})[strategy] = {"losses": losses}
    finally:
        if rank == 0:
            (Path(out) / "multi_rank.json").write_text(json.dumps(results))
        destroy()


def _same_losses(outcome: dict[str, Any] | None, want: list[float]) -> None:
    if outcome is None:
        raise AssertionError("no result: the ranks stopped before this run")
    if "refused" in outcome:
        raise ConfigError(outcome["refused"])
    assert outcome["losses"] == pytest.approx(want, rel=1e-4), (outcome["losses"], want)


def test_every_family_trains_under_ddp_fsdp_and_zero3_on_two_ranks_as_in_one_process(tmp_path):
    """The losses of 2 gloo ranks (global batch split over them) are the single process's, step by step."""
    from tests.conftest import free_port, spawn_ranks
    from trainer.distributed import ParallelEnv
    from trainer.loop import Trainer

    quick = ["train.export_hf=false", "checkpoint.at_end=false"]
    configs = {family: compose_config(*family_overrides(family), *quick) for family in FAMILIES}
    configs |= {s: compose_config(*family_overrides("llama"), *quick, f"strategy={s}") for s in MULTI_RANK}
    spawn_ranks(_strategies_on_every_family, free_port(), str(tmp_path), configs)
    results = json.loads((tmp_path / "multi_rank.json").read_text())
    failures = []
    for family in FAMILIES:
        single = tmp_path / f"{family}-single"
        Trainer(configs[family], run_dir=single, env=ParallelEnv()).train()
        want = [r["loss"] for r in read_metrics(single) if "loss" in r]

        for strategy in MULTI_RANK:
            outcome = results.get(family, {}).get(strategy)
            failures.append(verdict(strategy, family, lambda o=outcome, w=want: _same_losses(o, w)))
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


def _compiled_losses(family: str, run_dir: Path, want: list[float]) -> None:
    from torch._dynamo.utils import counters

    # Dynamo keeps its compiled code per Python function: after 8 models of other families through the same
    # functions (the loss, the decoder helpers) it would silently run them eagerly.
    torch._dynamo.reset()
    counters.clear()
    trainer = train_family(run_dir, family, *ONE_BLOCK)
    # What train.compile=true does (Trainer.__init__), with dynamo's capture and AOT autograd's forward and
    # backward graphs but eager kernels: inductor's C++ codegen (~30 s a model on 2 cores) is proven on llama
    # by tests/test_train.py's compile test.
    trainer.module.compile(backend="aot_eager")
    trainer.train()
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    got = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert got == pytest.approx(want, rel=1e-5), (got, want)


ONE_BLOCK = ["model.arch.num_hidden_layers=1", "train.export_hf=false", "checkpoint.at_end=false"]


def test_every_family_compiles_to_the_eager_losses(tmp_path):
    """The compile cells: each family's one-block model through dynamo and AOT autograd, 2 steps."""
    failures = []
    for family in FAMILIES:
        eager = tmp_path / f"{family}-eager"
        train_family(eager, family, *ONE_BLOCK).train()
        want = [r["loss"] for r in read_metrics(eager) if "loss" in r]
        run = tmp_path / f"{family}-compiled"
        failures.append(verdict("compile", family, lambda f=family, r=run, w=want: _compiled_losses(f, r, w)))
    torch._dynamo.reset()
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)
