"""The support matrix: which feature works on which model family, the one source of truth.

Every cell is Y (tests/test_model_matrix.py proves it on the family's tiny config: the feature did something,
checked against the float model or the files it wrote) or a Refusal (the test checks that the feature stops
with one paragraph matching `match`, which names the family or its layers and what to do). docs/models.md is
rendered from here, and a test checks that the committed file equals the rendering:

    python -m tests.model_matrix --write docs/models.md
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The tiny shapes every family shares (tests/conftest.py's TINY_MODEL); a family adds what its config needs.
TINY_SHAPES = (
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=2",
    "model.arch.num_key_value_heads=2",
)
# QLoRA's NF4 bases take weights in blocks of 4096 (64 x 64): a family's QLoRA cell is twice as wide.
NF4_SHAPES = ("model.arch.hidden_size=64", "model.arch.intermediate_size=128")


@dataclass(frozen=True)
class Family:
    name: str
    overrides: tuple[str, ...]  # besides TINY_SHAPES
    lora_targets: tuple[str, ...]  # peft.targets for LoRA, DoRA and QLoRA (the defaults name Llama's)
    note: str = ""  # what a user must know to build it (rendered under the table)
    nf4_overrides: tuple[str, ...] = ()  # besides NF4_SHAPES
    gguf_overrides: tuple[str, ...] = ()  # for the GGUF cell, checked by transformers' GGUF loader


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("model.arch.model_type=llama",), LLAMA_TARGETS),
        Family("qwen2", ("model.arch.model_type=qwen2",), LLAMA_TARGETS),
        Family(
            "qwen3",
            ("model.arch.model_type=qwen3", "+model.arch.head_dim=16"),
            LLAMA_TARGETS,
            "its config's head_dim defaults to 128 whatever the width: set `+model.arch.head_dim` "
            "(hidden_size / num_attention_heads) for a small model. Its GGUF cell keeps head_dim=128: "
            "transformers' GGUF loader reads no head_dim from a qwen3 file and takes 128 (the export warns)",
            nf4_overrides=("model.arch.head_dim=32",),
            gguf_overrides=("model.arch.head_dim=128",),
        ),
        Family("mistral", ("model.arch.model_type=mistral",), LLAMA_TARGETS),
        Family(
            "gemma2",
            ("model.arch.model_type=gemma2", "+model.arch.head_dim=16"),
            LLAMA_TARGETS,
            "head_dim defaults to 256: set `+model.arch.head_dim`; its logits are soft-capped "
            "(final_logit_softcapping), so the loss takes the plain path instead of the fused one. Its GGUF "
            "cell keeps head_dim=256, as query_pre_attn_scalar (256): llama.cpp scales queries by the head size "
            "(the export refuses another scalar) and transformers' GGUF loader reads no scalar and takes 256",
            nf4_overrides=("model.arch.head_dim=32",),
            gguf_overrides=("model.arch.head_dim=256",),
        ),
        Family(
            "phi3",
            ("model.arch.model_type=phi3", "+model.arch.pad_token_id=0"),
            ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
            "its config's pad_token_id is 32000, outside a small vocabulary (transformers refuses the "
            "config): set `+model.arch.pad_token_id=0` (any id below the vocabulary size; the loss never "
            "reads it). q, k, v and gate/up are fused projections (`qkv_proj`, `gate_up_proj`): name those in "
            "`peft.targets`",
        ),
        Family(
            "gpt_neox",
            ("model.arch.model_type=gpt_neox",),
            ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            "Pythia's layout: q, k and v in one fused `query_key_value`; `peft.targets` names its own layers",
        ),
        Family(
            "gpt2",
            (
                "model.arch.model_type=gpt2",
                "+model.arch.resid_pdrop=0.0",
                "+model.arch.embd_pdrop=0.0",
                "+model.arch.attn_pdrop=0.0",
            ),
            ("c_attn", "c_proj", "c_fc"),
            "its layers are `Conv1D` (a linear layer whose weight is stored [in, out]): pruning, LoRA/DoRA "
            "(peft's fan_in_fan_out) and trainer.quantize treat them as the linear they are. Dropout (0.1 by "
            "default) is off here so that runs on 1 and 2 ranks compare step by step",
        ),
        Family(
            "qwen2_moe",
            (
                "model.arch.model_type=qwen2_moe",
                "+model.arch.num_experts=4",
                "+model.arch.num_experts_per_tok=2",
                "+model.arch.moe_intermediate_size=32",
                "+model.arch.shared_expert_intermediate_size=32",
            ),
            LLAMA_TARGETS,
            "set the expert sizes (`num_experts`, `num_experts_per_tok`, `moe_intermediate_size`, "
            "`shared_expert_intermediate_size`; the defaults are Qwen1.5-MoE-A2.7B's). Its routed experts are "
            "fused 3-D parameters (`mlp.experts.gate_up_proj`, `down_proj`), not linear layers: they train, "
            "shard and distill like any parameter; LoRA, QAT and the int8/compressed-tensors schemes cover "
            "the attention and the shared expert (nn.Linear) and leave the routed experts as they are "
            "(frozen under LoRA, float once quantized), each saying so in a warning; pruning refuses them",
            nf4_overrides=(
                "model.arch.moe_intermediate_size=64",
                "model.arch.shared_expert_intermediate_size=64",
            ),
        ),
    )
}


@dataclass(frozen=True)
class Refusal:
    """A cell whose feature stops with one paragraph (a ConfigError) that `match` finds (re.search; `{family}`
    is replaced by the family's name) and that names the family (its model_type or model class), unless the
    refusal is the same for every family (a scheme this machine cannot run)."""

    short: str  # in the table
    match: str
    why: str  # listed under the table
    any_family: bool = False


@dataclass(frozen=True)
class Feature:
    name: str
    group: str
    what: str  # how the test proves a Y: rendered in the table's first column's legend
    refusals: dict[str, Refusal] = field(default_factory=dict)  # family -> its refusal; others are Y
    slow: bool = False  # proved by a slow-tier test


STRUCTURED = Refusal(
    "block not sliced",
    r"prune=structured .*model_type={family}'s \w+ is not one",
    "Structured pruning slices Llama-shaped blocks (separate q/k/v/o and gate/up/down nn.Linear "
    "projections), Phi-3's fused `qkv_proj`/`gate_up_proj` and GPT-NeoX's MLP; GPT-2's `c_attn` Conv1D and MoE "
    "blocks are refused before any weight changes, naming the block class; the unstructured methods prune them.",
)
NEOX_HEADS = Refusal(
    "head size not in config",
    r"prune.heads=0.5 on model_type={family}: its config has no head size",
    "GPT-NeoX computes its head size as hidden_size / num_attention_heads, so a model with fewer heads "
    "cannot be saved and loaded back; refused naming prune.heads=0 (MLP channels and layers are pruned).",
)
MOE_PRUNE = Refusal(
    "fused experts",
    r"prune.targets=null on model_type={family}: its routed experts .*3-D .*prune.targets",
    "The routed experts are fused 3-D parameters, not linear layers: pruning the blocks' linears alone "
    "would report the asked sparsity for a model whose experts (most of its weights) stay dense. The "
    "refusal names them; `prune.targets` naming the attention and shared-expert layers prunes those alone.",
)
SMOOTH = Refusal(
    "block not Llama-shaped",
    r"scheme=int8_smooth folds",
    "SmoothQuant folds its per-channel scales into the RMSNorm before each attention and MLP of a "
    "Llama-shaped block; a block without it (LayerNorm with a bias, Gemma's (1 + w) RMSNorm, fused "
    "projections, MoE) is refused naming int8_dynamic and int8_weight, which need no folding.",
)
CPU_INT4 = Refusal(
    "CUDA only",
    r"scheme=int4_weight needs an NVIDIA GPU",
    "int4_weight runs on CUDA's tinygemm kernels: on a CPU it is refused (whatever the family) naming "
    "int8_weight; not proven here on a GPU.",
    any_family=True,
)
CPU_SPARSE24 = Refusal(
    "CUDA only",
    r"scheme=sparse24 needs an NVIDIA GPU",
    "2:4 sparse kernels are CUDA-only (compute capability 8.0+): on a CPU sparse24 is refused whatever the "
    "family; not proven here on a GPU.",
    any_family=True,
)
CT_W8A8 = Refusal(
    "block not Llama-shaped",
    r"scheme=w8a8 folds SmoothQuant scales into Llama-style decoder blocks",
    "w8a8 smooths activations into the RMSNorm of Llama-shaped blocks, like int8_smooth; other blocks are "
    "refused naming w8a16 and w4a16.",
)
CT_CONV1D = Refusal(
    "Conv1D",
    r"GPT2LMHeadModel has no nn.Linear layer to quantize .*Conv1D",
    "compressed-tensors quantizes nn.Linear modules, and its readers (vLLM, transformers) expect a Linear's "
    "[out, in] weight; GPT-2's Conv1D stores [in, out]. Refused, naming trainer.quantize, which converts "
    "Conv1D to Linear first.",
)
GGUF_NOT_WRITTEN = Refusal(
    "family not written",
    r"format=gguf cannot write this model: it is \w+ \(model_type={family}\), and the families written are",
    "format=gguf writes the llama.cpp architectures of the families listed Y (trainer/gguf_export.py's "
    "FAMILIES); another family is refused naming them, format=hf and llama.cpp's convert_hf_to_gguf.py.",
)
QAT_CONV1D = Refusal(
    "Conv1D",
    r"quant=int8_weight \(QAT\) .*GPT-2's Conv1D layers are not nn.Linear",
    "QAT swaps nn.Linear for torchao's fake-quantized linear; GPT-2's Conv1D is not one. Refused naming "
    "trainer.quantize on the hf/ export, which converts Conv1D first.",
)
NF4_CONV1D = Refusal(
    "Conv1D",
    r"peft.base_dtype=nf4 with GPT-2 Conv1D targets",
    "peft's 4-bit LoRA layer wraps nn.Linear; GPT-2's Conv1D with an NF4 base is refused before wrapping, "
    "naming peft.base_dtype=bf16 or float.",
)

NOT_LLAMA_SHAPED = ("phi3", "gpt_neox", "gpt2", "qwen2_moe")
NOT_SLICED = ("gpt2", "qwen2_moe")  # by structured pruning
ALL = tuple(FAMILIES)


def _each(families: tuple[str, ...], refusal: Refusal) -> dict[str, Refusal]:
    return {f: refusal for f in families}


FEATURES: list[Feature] = [
    Feature("single", "train", "one process: the losses are finite and every weight moved"),
    Feature("ddp", "train", "2 gloo ranks: the losses of the single-process run"),
    Feature("fsdp", "train", "2 gloo ranks: the losses of the single-process run"),
    Feature("zero3", "train", "2 gloo ranks: the losses of the single-process run"),
    Feature(
        "activation checkpointing",
        "train",
        "block 0's MLP runs twice per micro-batch (forward, then recompute in the backward)",
    ),
    Feature(
        "selective checkpointing",
        "train",
        "train.activation_checkpointing=selective: the step's loss and gradients without checkpointing, no matmul "
        "run again in the backward, other ops recomputed",
    ),
    Feature(
        "compile",
        "train",
        "a one-block model compiled as train.compile=true does, through dynamo and AOT autograd (eager kernels: "
        "inductor's codegen is proven on llama by tests/test_train.py): graphs captured, the eager losses",
        slow=True,
    ),
    Feature("KD logits", "distill", "a teacher of the family: kd_loss > 0, the loss the mix of the terms"),
    Feature("KD hidden states", "distill", "hidden_loss > 0, the loss the mix of the terms"),
    Feature(
        "magnitude", "prune", "every linear of the blocks at 50% sparsity", _each(("qwen2_moe",), MOE_PRUNE)
    ),
    Feature("wanda", "prune", "every linear of the blocks at 50% sparsity", _each(("qwen2_moe",), MOE_PRUNE)),
    Feature(
        "sparsegpt", "prune", "every linear of the blocks at 50% sparsity", _each(("qwen2_moe",), MOE_PRUNE)
    ),
    Feature(
        "2:4 (nm)", "prune", "at most 2 non-zeros in every 4 inputs, 50%", _each(("qwen2_moe",), MOE_PRUNE)
    ),
    Feature(
        "structured heads",
        "prune",
        "half the heads gone from config and weights; the saved model reloads to the same logits",
        {**_each(NOT_SLICED, STRUCTURED), "gpt_neox": NEOX_HEADS},
    ),
    Feature(
        "structured channels",
        "prune",
        "half the MLP channels gone from config and weights; the saved model reloads to the same logits",
        _each(NOT_SLICED, STRUCTURED),
    ),
    Feature("LoRA", "peft", "adapter/ loads with peft and gives the merged hf/ export's logits"),
    Feature("DoRA", "peft", "adapter/ loads with peft and gives the merged hf/ export's logits"),
    Feature(
        "QLoRA (nf4)",
        "peft",
        "the adapted bases are NF4 tensors; adapter/ loads with peft and gives the merged hf/ export's logits",
        _each(("gpt2",), NF4_CONV1D),
    ),
    Feature(
        "QAT (int8_weight)",
        "quant",
        "fake-quantized linears train; quantized/ reloads close to hf/, smaller",
        _each(("gpt2",), QAT_CONV1D),
    ),
    Feature(
        "int8_weight", "quant", "reloaded logits within 5-12% of float, >= 1 byte saved per quantized weight"
    ),
    Feature(
        "int8_dynamic", "quant", "reloaded logits within 5-12% of float, >= 1 byte saved per quantized weight"
    ),
    Feature(
        "int8_smooth",
        "quant",
        "reloaded logits within 5-12% of float, >= 1 byte saved per quantized weight",
        _each(("gemma2", *NOT_LLAMA_SHAPED), SMOOTH),
    ),
    Feature("int4_weight", "quant", "(a CUDA scheme: refused on this CPU matrix)", _each(ALL, CPU_INT4)),
    Feature("sparse24", "quant", "(a CUDA scheme: refused on this CPU matrix)", _each(ALL, CPU_SPARSE24)),
    Feature("hf/", "export", "transformers reloads it to the trained model's logits"),
    Feature(
        "GGUF",
        "export",
        "transformers' GGUF loader reads it to the float logits",
        {  # one line a family: the families trainer/gguf_export.py does not write
            "gpt_neox": GGUF_NOT_WRITTEN,
            "qwen2_moe": GGUF_NOT_WRITTEN,
        },
    ),
    Feature(
        "compressed-tensors w8a16",
        "export",
        "transformers reloads it to our quantized logits, smaller than hf/",
        _each(("gpt2",), CT_CONV1D),
    ),
    Feature(
        "compressed-tensors w8a8",
        "export",
        "transformers reloads it to our quantized logits, smaller than hf/",
        _each(("gemma2", *NOT_LLAMA_SHAPED), CT_W8A8) | _each(("gpt2",), CT_CONV1D),
    ),
    Feature(
        "compressed-tensors w4a16",
        "export",
        "transformers reloads it to our quantized logits, smaller than hf/",
        _each(("gpt2",), CT_CONV1D),
    ),
    Feature("SFT (chat)", "sft", "conversations: only assistant tokens are trained, every weight moved"),
]
FEATURE = {f.name: f for f in FEATURES}


def cell(feature: str, family: str) -> Refusal | None:
    """None for a Y cell, else the refusal expected."""
    return FEATURE[feature].refusals.get(family)


def render() -> str:
    """docs/models.md."""
    families = list(FAMILIES)
    refusals: dict[Refusal, dict[str, list[str]]] = {}  # refusal -> feature -> families
    for f in FEATURES:
        for family, r in f.refusals.items():
            refusals.setdefault(r, {}).setdefault(f.name, []).append(family)
    number = {r: i + 1 for i, r in enumerate(refusals)}
    lines = [
        "# Model families: what works on which",
        "",
        "[← README](../README.md) · [Architecture](architecture.md) · [Pruning](pruning.md) · "
        "[LoRA, DoRA, QLoRA](peft.md) · [Quantization](quantization.md) · [Export](export.md)",
        "",
        "Generated by `python -m tests.model_matrix --write docs/models.md` from `tests/model_matrix.py`, the "
        "matrix `tests/test_model_matrix.py` checks cell by cell (a test fails when this file differs from "
        "the rendering). **Y**: proven on the family's tiny config (2 blocks, width 32), the feature checked "
        "to have done something (what, per feature, below). **no**: the feature stops before any work with "
        "one paragraph naming the family or its layers and what to do instead (numbered below); never a "
        "crash, never a silent no-op. Tested on CPUs: the CUDA-only schemes are refusals here.",
        "",
        "| feature | " + " | ".join(families) + " |",
        "| --- | " + " | ".join("---" for _ in families) + " |",
    ]
    for f in FEATURES:
        cells = []
        for family in families:
            r = cell(f.name, family)
            cells.append("Y" if r is None else f"no: {r.short} ({number[r]})")
        lines.append(f"| {f.group}: {f.name} | " + " | ".join(cells) + " |")
    lines += ["", "## Building each family", ""]
    lines += [
        "| family | overrides (beside the tiny shapes) | LoRA `peft.targets` | note |",
        "| --- | --- | --- | --- |",
    ]
    for fam in FAMILIES.values():
        overrides = " ".join(f"`{o}`" for o in fam.overrides)
        targets = "default" if fam.lora_targets == LLAMA_TARGETS else f"`[{','.join(fam.lora_targets)}]`"
        lines.append(f"| {fam.name} | {overrides} | {targets} | {fam.note} |")
    lines += [
        "",
        "The tiny shapes: `" + " ".join(TINY_SHAPES) + "`; QLoRA's cells use `" + " ".join(NF4_SHAPES) + "` "
        "(NF4 quantizes weights in blocks of 4096). A model loaded with `model=hf model.name_or_path=...` "
        "needs none of this: its config.json has it.",
        "",
        "## What a Y proves",
        "",
        "| feature | checked |",
        "| --- | --- |",
    ]
    lines += [f"| {f.name} | {f.what}{' (slow tier)' if f.slow else ''} |" for f in FEATURES]
    lines += ["", "## The refusals", ""]
    for r, where in refusals.items():
        cells = "; ".join(
            f"{feature}: {'every family' if len(fams) == len(families) else ', '.join(fams)}"
            for feature, fams in where.items()
        )
        lines.append(f"{number[r]}. **{r.short}** ({cells}). {r.why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the rendering here (default: print it)")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(render())
    else:
        sys.stdout.write(render())


if __name__ == "__main__":
    main()
