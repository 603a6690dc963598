"""LoRA and DoRA adapters (peft=lora|dora): the peft library's layers against their formulas, the merged hf/
export against the adapted forward, the adapter/ format through the peft library's own reader, adapter-only
checkpoints that resume exactly, the strategies against the single process, and the refusals.

Multi-rank tolerances are tests/test_strategies.py's: losses within 1e-4 relative, weights within 1e-5.
"""

from __future__ import annotations

import json

import peft  # noqa: F401  (in the dev extra: a missing package fails these tests, never skips them)
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import (
    TINY,
    TINY_LOOP,
    TINY_MARKOV,
    compose_config,
    make_trainer,
    run_command,
    train_losses,
)
from trainer.config import validate_config
from trainer.errors import CheckpointError, ConfigError
from trainer.peft.extension import ADAPTER, lora_config, merge_adapters, select_targets

LORA = ["peft=lora", "peft.rank=4", "peft.alpha=8"]
# Wide enough for NF4's blocks (64 weights) and block scales (256 at a time): 128 x 128 weights.
NF4_MODEL = ["model.arch.hidden_size=128", "model.arch.intermediate_size=256"]


class Block(nn.Module):
    """A one-linear model named like a transformer's projection."""

    def __init__(self, in_features: int = 6, out_features: int = 5) -> None:
        super().__init__()
        self.q_proj = nn.Linear(in_features, out_features, bias=True)


def adapted(name: str, *, rank: int = 2, alpha: float = 3.0) -> tuple[Block, Block]:
    """A tiny layer and its copy with the peft library's adapter (B non-zero, so the delta is)."""
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    plain = Block()
    model = Block()
    model.load_state_dict(plain.state_dict())
    config = lora_config(name, rank=rank, alpha=alpha, targets=["q_proj"])
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    with torch.no_grad():
        model.q_proj.lora_B[ADAPTER].weight.normal_()
        if name == "dora":
            model.q_proj.lora_magnitude_vector[ADAPTER].weight.uniform_(0.5, 2.0)
    return plain, model


def test_lora_forward_is_w_x_plus_alpha_over_r_b_a_x():
    plain, model = adapted("lora", rank=2, alpha=3.0)
    x = torch.randn(4, 6)
    a, b = model.q_proj.lora_A[ADAPTER].weight, model.q_proj.lora_B[ADAPTER].weight
    want = plain.q_proj(x) + (3.0 / 2) * x @ a.T @ b.T
    torch.testing.assert_close(model.q_proj(x), want)


def test_dora_forward_is_the_magnitude_times_the_row_normalised_adapted_weight():
    plain, model = adapted("dora", rank=2, alpha=3.0)
    x = torch.randn(4, 6)
    q = model.q_proj
    w, bias = plain.q_proj.weight, plain.q_proj.bias
    v = w + (3.0 / 2) * q.lora_B[ADAPTER].weight @ q.lora_A[ADAPTER].weight
    m = q.lora_magnitude_vector[ADAPTER].weight
    want = x @ ((m / torch.linalg.norm(v, dim=1)).unsqueeze(1) * v).T + bias
    torch.testing.assert_close(q(x), want)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merged_weights_give_the_adapted_forward(name):
    plain, model = adapted(name)
    merged = merge_adapters(model.state_dict(), ["q_proj"], scaling=3.0 / 2)
    assert set(merged) == {"q_proj.weight", "q_proj.bias"}
    plain.load_state_dict(merged)
    x = torch.randn(4, 6)
    torch.testing.assert_close(plain.q_proj(x), model.q_proj(x))


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merge_under_keep_zeros_keeps_exactly_the_base_zeros(name):
    plain, model = adapted(name)
    with torch.no_grad():
        model.q_proj.base_layer.weight[:, ::2] = 0.0  # a pruned base: half its columns
    merged = merge_adapters(model.state_dict(), ["q_proj"], scaling=1.5, keep_zeros=True)
    zeros = model.q_proj.base_layer.weight == 0
    assert (merged["q_proj.weight"][zeros] == 0).all()
    assert (merged["q_proj.weight"][~zeros] != 0).all()


def test_target_globs_match_the_last_name_part_or_the_whole_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=40,
        )
    )
    assert select_targets(model, ["q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert select_targets(model, ["model.layers.1.mlp.*"]) == [
        f"model.layers.1.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")
    ]
    with pytest.raises(ConfigError, match="'qproj' matches no linear module.*q_proj"):
        select_targets(model, ["q_proj", "qproj"])


def _run(tmp_path, *overrides: str):
    trainer = make_trainer(tmp_path, *TINY, *overrides)
    trainer.train()
    return trainer


def test_only_adapters_train_and_the_checkpoint_and_optimizer_hold_only_them(tmp_path):
    trainer = _run(tmp_path, *LORA, "peft.train_also=[model.norm.weight]")
    trained = {n for n, p in trainer.hf_model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained - {"model.norm.weight"})
    assert "model.norm.weight" in trained
    optimizer_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in optimizer_params) == sum(
        p.numel() for p in trainer.hf_model.parameters() if p.requires_grad
    )
    state_numel = sum(v.numel() for s in trainer.optimizer.state.values() for v in s.values() if v.dim())
    assert state_numel == 2 * sum(p.numel() for p in optimizer_params)  # AdamW's two moments, adapter-sized
    shard_file = tmp_path / "checkpoints" / "step_00000006" / "shards" / "rank_00000.safetensors"
    shards = load_file(str(shard_file))
    models = {k.removeprefix("model/").partition("@")[0] for k in shards if k.startswith("model/")}
    assert models == {n for n in trained}
    assert all(".base_layer." not in k and "embed_tokens" not in k for k in shards)
    trained_numel = sum(p.numel() for p in optimizer_params)
    total_numel = sum(p.numel() for p in trainer.hf_model.parameters())
    assert trained_numel < total_numel / 4
    # fp32 weights and two moments of what trains, plus the header: far from the whole model's
    assert shard_file.stat().st_size < 3 * 4 * trained_numel + 64 * 1024
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in hf)  # a plain model


def test_resume_from_an_adapter_checkpoint_is_exact(tmp_path):
    whole = _run(
        tmp_path / "whole", *LORA, "train.log_every=1", "scheduler=constant", "scheduler.decay_steps=6"
    )
    half = [
        *LORA,
        "train.log_every=1",
        "scheduler=constant",
        "scheduler.decay_steps=6",
        "checkpoint.every_steps=3",
        f"hydra.run.dir={tmp_path / 'half'}",
    ]
    _run(tmp_path / "half", *half, "train.max_steps=3")
    _run(tmp_path / "half", *half, "resume=auto")
    assert train_losses(tmp_path / "half") == train_losses(tmp_path / "whole")
    a, b = (
        load_file(str(tmp_path / "whole" / "hf" / "model.safetensors")),
        load_file(str(tmp_path / "half" / "hf" / "model.safetensors")),
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert whole.step == 6


def test_resume_against_another_base_or_without_adapters_is_refused_before_training(tmp_path):
    _run(tmp_path / "lora", *LORA, "train.max_steps=2")
    with pytest.raises(CheckpointError, match="another base model"):
        make_trainer(tmp_path / "lora", *TINY, *LORA, "train.seed=7", "resume=auto")
    with pytest.raises(CheckpointError, match="has no tensor for"):  # the base is not in it
        make_trainer(tmp_path / "lora", *TINY, "resume=auto")
    _run(tmp_path / "full", "train.max_steps=2")
    with pytest.raises(CheckpointError, match="holds no adapters"):
        make_trainer(tmp_path / "full", *TINY, *LORA, "resume=auto")


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_adapter_dir_loads_with_peft_and_gives_the_same_logits_as_the_merged_hf_export(name, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = _run(tmp_path, f"peft={name}", "peft.rank=4", "peft.train_also=['*norm*']")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is (name == "dora") and config["r"] == 4
    # The base: the adapted model's frozen weights under their plain names.
    base_state = {
        k.replace(".base_layer.", "."): v
        for k, v in trainer.hf_model.state_dict().items()
        if ".lora_" not in k
    }
    base = AutoModelForCausalLM.from_config(trainer.hf_model.config)
    base.load_state_dict(base_state, strict=False)
    base.tie_weights()
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, trainer.hf_model.config.vocab_size, (2, 16))
    trainer.hf_model.eval()
    with torch.no_grad():
        want = trainer.hf_model(ids).logits
        torch.testing.assert_close(with_adapter(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_bf16_base_trains_fp32_adapters_under_bf16_autocast(tmp_path):
    trainer = _run(tmp_path, *LORA, "peft.base_dtype=bf16", "precision=bf16", "train.max_steps=2")
    dtypes = {p.dtype for p in trainer.hf_model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in trainer.hf_model.parameters() if p.requires_grad} == {torch.float32}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["peft.rank=0"], "peft.rank=0: must be a positive"),
        (["peft.alpha=0"], "peft.alpha=0.0: must be > 0"),
        (["peft.dropout=1.0"], r"peft.dropout=1.0: must be in \[0, 1\)"),
        (["prune=magnitude", "prune.sparsity=0.5"], "prune=magnitude with peft=lora: the base is frozen"),
        (["peft.base_dtype=bf16"], "peft.base_dtype=bf16 with precision=fp32"),
        (["quant=int8_weight"], "quant=int8_weight with peft=lora"),
    ],
)
def test_bad_peft_values_are_refused_before_any_work(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(compose_config(*TINY, *LORA, *overrides))


def test_unknown_or_tied_targets_and_unknown_train_also_fail_before_wrapping(tmp_path):
    with pytest.raises(ConfigError, match="'attn_proj' matches no linear"):
        make_trainer(tmp_path, *TINY, *LORA, "peft.targets=[attn_proj]")
    with pytest.raises(ConfigError, match="peft.train_also pattern 'nosuch' matches no parameter"):
        make_trainer(tmp_path, *TINY, *LORA, "peft.train_also=[nosuch]")
    with pytest.raises(ConfigError, match="lm_head.weight is tied to model.embed_tokens.weight"):
        make_trainer(tmp_path, *TINY, *LORA, "peft.targets=[q_proj,lm_head]")


@pytest.mark.parametrize(
    "adapter", [["peft=dora"], ["peft=lora", "peft.base_dtype=nf4"]], ids=["dora", "lora-nf4"]
)
def test_export_turns_an_adapter_checkpoint_into_the_runs_hf_and_adapter(adapter, tmp_path):
    from trainer.export import export_checkpoint

    model = NF4_MODEL if "peft.base_dtype=nf4" in adapter else []
    _run(tmp_path / "base", *model, "train.max_steps=0")  # hf/: a pretrained base to adapt
    base = [*TINY_LOOP, *TINY_MARKOV, "model=hf", f"model.name_or_path={tmp_path / 'base' / 'hf'}"]
    trainer = make_trainer(tmp_path / "run", *base, *adapter, "peft.rank=4", "peft.train_also=['*norm*']")
    trainer.train()
    out = tmp_path / "exported"
    export_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000006", out)
    for got, want in ((out, tmp_path / "run" / "hf"), (out / "adapter", tmp_path / "run" / "adapter")):
        name = "adapter_model.safetensors" if got.name == "adapter" else "model.safetensors"
        a, b = load_file(str(want / name)), load_file(str(got / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base" / "hf")
    assert config["use_dora"] is ("peft=dora" in adapter)


def test_a_pruned_base_fine_tuned_with_adapters_keeps_its_zeros_in_the_merged_export(tmp_path):
    _run(tmp_path / "pruned", "train.max_steps=0", "prune=magnitude", "prune.sparsity=0.5")
    base = [*TINY_LOOP, *TINY_MARKOV, "model=hf", f"model.name_or_path={tmp_path / 'pruned' / 'hf'}"]
    trainer = make_trainer(tmp_path / "run", *base, *LORA, "prune=keep_zeros")
    assert [ext.name for ext in trainer.extensions] == ["peft"]  # the frozen base keeps its zeros itself
    trainer.train()
    pruned = load_file(str(tmp_path / "pruned" / "hf" / "model.safetensors"))
    merged = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    zeros = pruned[q] == 0
    assert zeros.float().mean() == pytest.approx(0.5, abs=0.02)
    assert (merged[q][zeros] == 0).all() and not torch.equal(merged[q], pruned[q])


def test_nf4_base_trains_lora_and_the_merged_export_is_the_dequantized_base_plus_the_delta(tmp_path):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor
    from transformers import AutoModelForCausalLM

    trainer = _run(tmp_path, *NF4_MODEL, *LORA, "peft.base_dtype=nf4")
    layer = trainer.hf_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer.weight, NF4Tensor)
    assert not isinstance(trainer.hf_model.model.embed_tokens.weight, NF4Tensor)  # only the adapted linears
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, trainer.hf_model.config.vocab_size, (2, 16))
    trainer.hf_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trainer.hf_model(ids).logits, atol=1e-5, rtol=1e-5)


def _lora_losses(run_dir, *variant: str) -> dict[int, float]:
    """Per-step losses of 3 LoRA steps of 8 sequences (2 micro-batches of 4 unless `variant` says otherwise)."""
    common = [*LORA, "scheduler=constant", "train.log_every=1", "train.max_steps=3", "train.export_hf=false"]
    _run(run_dir, *common, *variant)
    return train_losses(run_dir)


@pytest.fixture(scope="module")
def plain_lora_losses(tmp_path_factory) -> dict[int, float]:
    """The reference of the variants below: eager, recomputing nothing, 2 micro-batches a step."""
    return _lora_losses(tmp_path_factory.mktemp("plain_lora"))


@pytest.mark.parametrize(
    "variant",
    [
        ["train.activation_checkpointing=true"],
        ["train.activation_checkpointing=selective"],
        ["train.micro_batch_size=8"],
    ],
    ids=["activation_checkpointing", "selective_checkpointing", "no_accumulation"],
)
def test_lora_trains_to_the_same_losses_recomputed_or_unaccumulated(plain_lora_losses, tmp_path, variant):
    want, got = plain_lora_losses, _lora_losses(tmp_path, *variant)
    assert len(want) == 3 and got == pytest.approx(want, rel=1e-4)


def test_lora_compiled_trains_to_the_same_losses(plain_lora_losses, tmp_path):
    want, got = plain_lora_losses, _lora_losses(tmp_path, "train.compile=true")
    assert len(want) == 3 and got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("base_dtype", ["float", "bf16", "nf4"])
def test_a_base_stored_in_another_dtype_leaves_no_page_of_the_float_checkpoint_mapped(tmp_path, base_dtype):
    """transformers maps the checkpoint file; the float weights an nf4 or bf16 base replaced would stay
    resident while any tensor still views into the file. A float base is the file's weights themselves."""
    import gc

    _run(tmp_path / "base", *NF4_MODEL, "train.max_steps=0")
    file = tmp_path / "base" / "hf" / "model.safetensors"
    base = [*TINY_LOOP, *TINY_MARKOV, "model=hf", f"model.name_or_path={file.parent}"]
    precision = ["precision=bf16"] if base_dtype == "bf16" else []  # a bf16 base computes under autocast
    trainer = make_trainer(tmp_path / "run", *base, *LORA, *precision, f"peft.base_dtype={base_dtype}")
    gc.collect()
    with open("/proc/self/maps") as maps:
        mapped = str(file) in maps.read()
    assert mapped is (base_dtype == "float")
    trainer.train()  # and the copies train
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_nf4_base_weights_are_within_nf4s_error_of_the_float_base(tmp_path):
    """Each weight within 0.16 of its 64-weight block's absmax: half the widest gap between NF4's 16 levels
    (-1 and -0.696: 0.152), plus the rounding of the block's scale to 8 bits (measured: 0.153)."""
    float_base = make_trainer(tmp_path / "float", *TINY, *NF4_MODEL, *LORA).hf_model
    nf4_base = make_trainer(tmp_path / "nf4", *TINY, *NF4_MODEL, *LORA, "peft.base_dtype=nf4").hf_model
    floats = dict(float_base.named_modules())
    checked = 0
    for name, module in nf4_base.named_modules():
        if hasattr(module, "base_layer"):
            want = floats[name].base_layer.weight.detach().reshape(-1, 64)
            got = module.base_layer.weight.get_original_weight().reshape(-1, 64)
            error = ((got - want).abs() / want.abs().amax(dim=1, keepdim=True)).max().item()
            assert 0 < error <= 0.16, name
            checked += 1
    assert checked == 2 * 7  # every projection of both blocks


def test_nf4_refuses_dora_and_layers_its_blocks_do_not_divide(tmp_path):
    with pytest.raises(ConfigError, match="nf4 with peft=dora"):
        validate_config(compose_config(*TINY, "peft=dora", "peft.base_dtype=nf4"))
    with pytest.raises(
        ConfigError, match="model.layers.0.mlp.down_proj has 2048 weights, not a multiple of 4096"
    ):
        make_trainer(tmp_path, *TINY, *LORA, "peft.base_dtype=nf4")


def test_nf4_quantizes_scales_fewer_at_a_time_where_256_does_not_divide(tmp_path):
    """64 x 64 attention weights hold 64 blocks: their scales are quantized 64 at a time, the 64 x 256 MLP's
    256 at a time (QLoRA's), and the merged export is still the dequantized base plus the delta."""
    from transformers import AutoModelForCausalLM

    narrow = ["model.arch.hidden_size=64", "model.arch.intermediate_size=256"]
    trainer = _run(tmp_path, *narrow, *LORA, "peft.base_dtype=nf4")
    block = trainer.hf_model.model.layers[0]
    assert block.self_attn.q_proj.base_layer.weight.scaler_block_size == 64
    assert block.mlp.up_proj.base_layer.weight.scaler_block_size == 256
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, trainer.hf_model.config.vocab_size, (2, 16))
    trainer.hf_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trainer.hf_model(ids).logits, atol=1e-5, rtol=1e-5)


# ---- several ranks ------------------------------------------------------------------------------------------

STEPS = 6
COMMON = [
    *TINY,
    "peft.rank=4",
    "peft.alpha=8",
    "peft.train_also=['*norm*']",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "scheduler=constant",
]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """peft name -> its single-process run directory, run on first use."""
    runs = {}

    def get(name: str, *extra: str):
        if (name, extra) not in runs:
            runs[name, extra] = tmp_path_factory.mktemp(f"{name}_single")
            run_command([*COMMON, f"peft={name}", *extra, f"hydra.run.dir={runs[name, extra]}"])
        return runs[name, extra]

    return get


def _assert_follows(reference, run_dir, steps):
    want, got = train_losses(reference), train_losses(run_dir)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, want, got)
    for part in ("hf/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(reference / part)), load_file(str(run_dir / part))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=f"{part}: {k}")


# FSDP2 splits an NF4 weight's blocks and scales over the ranks: a model wide enough for 2 shards.
NF4_WIDE = (
    "peft.base_dtype=nf4",
    "model.arch.hidden_size=256",
    "model.arch.intermediate_size=512",
    "model.arch.num_attention_heads=4",
    "model.arch.num_key_value_heads=4",
)


@pytest.mark.parametrize(
    "name,strategy,extra",
    [("lora", s, ()) for s in ("ddp", "fsdp", "zero2", "zero3")]
    + [("dora", "fsdp", ()), ("dora", "zero3", ()), ("lora", "ddp", NF4_WIDE), ("lora", "fsdp", NF4_WIDE)],
    ids=lambda v: ("nf4" if v else "float") if isinstance(v, tuple) else v,
)
def test_adapters_on_two_ranks_follow_the_single_process(name, strategy, extra, single_runs, tmp_path):
    run_command(
        [*COMMON, f"peft={name}", *extra, f"strategy={strategy}", f"hydra.run.dir={tmp_path}"], nproc=2
    )
    _assert_follows(single_runs(name, *extra), tmp_path, range(1, STEPS + 1))


@pytest.mark.parametrize("first,second", [(("fsdp", 2), ("single", 1)), (("zero3", 2), ("fsdp", 2))])
def test_adapter_checkpoint_resumes_under_another_strategy_and_world_size(
    first, second, single_runs, tmp_path
):
    half = [*COMMON, "peft=lora", "checkpoint.every_steps=3", f"hydra.run.dir={tmp_path}"]
    run_command([*half, f"strategy={first[0]}", "train.max_steps=3"], nproc=first[1])
    run_command([*half, f"strategy={second[0]}", "resume=auto"], nproc=second[1])
    _assert_follows(single_runs("lora"), tmp_path, range(4, STEPS + 1))


# ---- GPT-2: Conv1D layers, adapted by the peft library with fan_in_fan_out -----------------------------

GPT2 = ["model.arch.model_type=gpt2", "peft.targets=[c_attn]"]


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_a_gpt2_conv1d_merges_to_the_forward_the_peft_library_computes(name):
    from peft import inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    plain, model = nn.Module(), nn.Module()
    plain.c_attn = Conv1D(9, 6)  # 6 inputs, 9 outputs: weight stored 6 x 9
    model.c_attn = Conv1D(9, 6)
    model.load_state_dict(plain.state_dict())
    config = lora_config(name, rank=2, alpha=3.0, targets=["c_attn"], fan_in_fan_out=True)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    with torch.no_grad():
        model.c_attn.lora_B[ADAPTER].weight.normal_()
        if name == "dora":
            model.c_attn.lora_magnitude_vector[ADAPTER].weight.uniform_(0.5, 2.0)
    merged = merge_adapters(model.state_dict(), ["c_attn"], scaling=1.5, conv1d=["c_attn"])
    assert merged["c_attn.weight"].shape == (6, 9)
    plain.load_state_dict(merged)
    x = torch.randn(4, 6)
    torch.testing.assert_close(plain.c_attn(x), model.c_attn(x))


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_gpt2_adapters_on_c_attn_load_with_peft_and_give_the_merged_exports_logits(name, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = _run(tmp_path, *GPT2, f"peft={name}", "peft.rank=4", "train.max_steps=2")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and sorted(config["target_modules"]) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]
    base = AutoModelForCausalLM.from_config(trainer.hf_model.config)  # a fresh GPT-2 given the frozen base
    base.load_state_dict(
        {
            k.replace(".base_layer.", "."): v
            for k, v in trainer.hf_model.state_dict().items()
            if ".lora_" not in k
        },
        strict=False,
    )
    base.tie_weights()
    ids = torch.randint(0, trainer.hf_model.config.vocab_size, (2, 16))
    with torch.no_grad():
        base_logits = base.eval()(ids).logits
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()  # adapts `base` in place
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    trainer.hf_model.eval()
    with torch.no_grad():
        want = merged(ids).logits
        assert not torch.allclose(want, base_logits, atol=1e-4)  # the adapters changed the model
        torch.testing.assert_close(with_adapter(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trainer.hf_model(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_with_an_nf4_base_is_refused_before_wrapping(tmp_path):
    with pytest.raises(ConfigError, match=r"peft.base_dtype=nf4 with GPT-2 Conv1D targets .*bf16 or float"):
        make_trainer(tmp_path, *TINY, *GPT2, *LORA, "peft.base_dtype=nf4")
