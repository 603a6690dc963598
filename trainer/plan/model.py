"""The model a training config builds, without its weights: parameter counts from a meta-device model (a
pretrained name contributes its config.json only), split the way memory planning needs them.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from trainer.errors import ConfigError
from trainer.models import build_model_config, count_params, flops_per_token, is_linear, transformer_blocks

# peft.base_dtype=nf4: 4-bit codes plus one bf16 scale per 64 weights and a second-level quantization of
# the scales (torchao's NF4Tensor, QLoRA's layout): about 0.53 bytes a weight.
NF4_BYTES = 0.53


@dataclass
class ModelCounts:
    """Parameter counts of one model, and what planning reads off its config."""

    config: PretrainedConfig
    num_params: int  # every parameter, a tied embedding once
    num_layers: int
    block_params: int  # one transformer block's parameters
    root_params: int  # outside the blocks: embeddings, the untied head, the final norm
    linear_block_weights: int  # weights of the blocks' linear layers (what pruning masks)
    flops_per_token: float  # training FLOPs per token at the config's sequence length (trainer.models)
    hidden_size: int
    trainable: int = 0  # parameters that train (every one, or an adapter's)
    frozen_bytes: float = 0.0  # bytes of the frozen parameters (an adapter's base) as stored


def meta_model(config: PretrainedConfig, *, trust_remote_code: bool = False) -> nn.Module:
    """The model of `config` on the meta device: shapes without storage, built in milliseconds at any size."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def guess_vocab_size(cfg: Any, plan: Any) -> int | None:
    """The tokenizer's size without loading any data: plan.vocab_size, or what the data group builds (a BPE
    of data.tokenizer_vocab_size, a word-level one of the Markov source's words and 3 special tokens); None when
    the tokenizer is a pretrained one (the model's config.json says its vocabulary then)."""
    if plan.vocab_size:
        return int(plan.vocab_size)
    d = cfg.data
    tokenizer = d.get("tokenizer")
    if tokenizer == "bpe":
        return int(d.tokenizer_vocab_size)
    if tokenizer == "wordlevel" and d.get("markov") is not None:
        return int(d.markov.num_words) + 3
    return None


def model_config(cfg: Any, plan: Any) -> PretrainedConfig:
    """The transformers config trainer.train would build or load: model.arch over the source's config.json."""
    m = cfg.model
    # A pretrained model keeps its own vocabulary; one built from a config gets the tokenizer's.
    vocab = None if m.source == "pretrained" else guess_vocab_size(cfg, plan)
    config = build_model_config(m, vocab_size=vocab)
    config.use_cache = False
    return config


def count_model(config: PretrainedConfig, *, seq_len: int, trust_remote_code: bool = False) -> ModelCounts:
    model = meta_model(config, trust_remote_code=trust_remote_code)
    blocks = transformer_blocks(model)
    block = count_params(blocks[0])
    linear = sum(m.weight.numel() for b in blocks for m in b.modules() if is_linear(m) and m.weight.ndim == 2)
    total = count_params(model)
    return ModelCounts(
        config=config,
        num_params=total,
        num_layers=len(blocks),
        block_params=block,
        root_params=total - sum(count_params(b) for b in blocks),
        linear_block_weights=linear,
        flops_per_token=flops_per_token(model, seq_len),
        hidden_size=int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)),
        trainable=total,
    )


def _matches(name: str, patterns: list[str]) -> bool:
    """peft's target globs as trainer/peft reads them: a glob without a dot matches the last name part."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatch(last if "." not in p else name, p) for p in patterns)


def apply_peft(counts: ModelCounts, cfg: Any, *, param_bytes: int) -> None:
    """LoRA/DoRA: only the adapters (and `train_also`) train; the base is frozen in peft.base_dtype."""
    p = cfg.peft
    if p.name in ("none",):  # no adapter: every parameter trains
        return
    model = meta_model(counts.config)
    adapters, adapted, also = 0, 0, 0
    for name, module in model.named_modules():
        if is_linear(module) and _matches(name, list(p.targets)):
            out_f, in_f = module.weight.shape
            adapters += p.rank * (in_f + out_f) + (out_f if p.name in ("dora",) else 0)
            adapted += module.weight.numel()
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatch(name, g) for g in p.train_also):
            also += param.numel()
    base_bytes = {"float": param_bytes, "bf16": 2, "nf4": NF4_BYTES}[str(p.base_dtype)]
    frozen = counts.num_params - also
    # nf4 stores the adapted linears' weights in 4 bits; the rest of the base keeps train.dtype.
    counts.frozen_bytes = (
        adapted * base_bytes + (frozen - adapted) * param_bytes
        if str(p.base_dtype) == "nf4"
        else frozen * base_bytes
    )
    counts.trainable = adapters + also


def teacher_params(cfg: Any) -> int:
    """distill=kd: the teacher's parameter count from its config.json (or our checkpoint's), never its weights."""
    d = cfg.distill
    if d.name in ("none",):
        return 0
    try:
        config = AutoConfig.from_pretrained(d.teacher, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"distill.teacher={d.teacher}: cannot read its config.json ({e}); give a hub name or a directory "
            "holding one (an hf/ export, a checkpoint)"
        ) from e
    return count_params(meta_model(config))
