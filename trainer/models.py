"""Models: any AutoModelForCausalLM (from a config, a hub name, a local path or a GGUF file), and its FLOPs."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.pytorch_utils import Conv1D

from trainer.errors import ConfigError, TrainerError, TrainerWarning
from trainer.loss import causal_lm_loss
from trainer.utils import gguf_parsed_once, loading_from, require


def _arch_dict(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.arch) if OmegaConf.is_config(cfg.arch) else dict(cfg.arch)


def _arch_keys_in(message: str, arch: dict[str, Any]) -> list[str]:
    """The model.arch fields a transformers message is about: `hidden_size` in "The hidden size (32) ..." or
    "Field 'hidden_size' ...", `num_attention_heads` in "... the number of attention heads (3)"."""
    text = message.lower()
    return [
        f"model.arch.{key}={value}"
        for key, value in arch.items()
        if key in text or all(word in text for word in key.split("_") if word != "num")
    ]


@contextlib.contextmanager
def _names_the_key(key: str, fix: str, *, arch: dict[str, Any] | None = None) -> Iterator[None]:
    """transformers' refusal of a model, architecture or path as a ConfigError that names our key and the fix.
    A ConfigError of ours and an ImportError (a missing package, which names its own install) pass through.
    A config class's own validation (huggingface_hub's strict dataclasses: heads that do not divide the hidden
    size, a field of the wrong type) is named by the model.arch fields its message is about."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        yield
    except (TrainerError, ImportError):  # ours (a path refused by loading_from too), a missing package
        raise
    except StrictDataclassError as e:
        reason = " ".join(str(e.__cause__ or e).split())
        named = ", ".join(_arch_keys_in(reason, arch or {})) or key
        raise ConfigError(f"{named}: transformers refuses this architecture ({reason}); {fix}") from e
    except (ValueError, KeyError, TypeError, AttributeError, OSError, AssertionError) as e:
        raise ConfigError(f"{key}: {type(e).__name__}: {e}; {fix}") from e


def _check_heads(config: PretrainedConfig, *, from_arch: bool) -> None:
    """Query heads in groups of key/value heads: transformers builds a model whose attention then fails at
    the first forward when they do not divide ("The size of tensor a (2) must match ... b (3)")."""
    heads, kv_heads = (
        getattr(config, "num_attention_heads", None),
        getattr(config, "num_key_value_heads", None),
    )
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        where = "model.arch" if from_arch else "the model's config.json"
        raise ConfigError(
            f"{where}.num_key_value_heads={kv_heads}: must divide {where}.num_attention_heads={heads} (each "
            f"key/value head serves a group of query heads); pick a divisor of {heads}, e.g. "
            f"model.arch.num_key_value_heads={heads}"
        )


def build_model_config(cfg: Any, *, vocab_size: int | None = None) -> PretrainedConfig:
    """The transformers config of a model built from scratch; vocab_size comes from the tokenizer."""
    arch = _arch_dict(cfg)
    if cfg.name_or_path:
        with (
            _names_the_key(
                f"model.name_or_path={cfg.name_or_path}" + (" with model.arch" if arch else ""),
                "give a hub name or a local directory with a config.json, and model.arch fields its config knows",
                arch=arch,
            ),
            loading_from(cfg.name_or_path, key="model.name_or_path"),
        ):
            config = AutoConfig.from_pretrained(
                cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, **arch
            )
    else:
        model_type = arch.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.arch needs model_type (e.g. llama) when model.name_or_path is null")
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(
                f"model.arch.model_type={model_type}: not a model type this transformers knows; use one of its "
                "config classes' model_type (llama, mistral, qwen2, gpt2, ...), or model.name_or_path"
            )
        with _names_the_key(
            f"model.arch (model_type={model_type})",
            f"check the fields against transformers' {model_type} config",
            arch=arch,
        ):
            config = AutoConfig.for_model(model_type, **arch)
    heads_given = "num_key_value_heads" in arch or "num_attention_heads" in arch
    _check_heads(config, from_arch=heads_given or not cfg.name_or_path)
    if vocab_size is not None:
        rounded = -(-vocab_size // 64) * 64  # multiple of 64: faster matmuls, spare ids unused
        if "vocab_size" not in arch:
            config.vocab_size = rounded
        elif arch["vocab_size"] < vocab_size:
            raise ConfigError(
                f"model.arch.vocab_size={arch['vocab_size']} is smaller than the tokenizer's {vocab_size} tokens; "
                "leave it out (the tokenizer's size, rounded up to a multiple of 64) or give at least that"
            )
    if not cfg.name_or_path:
        _check_pad_id(config, given="pad_token_id" in arch)
    return config


def _check_pad_id(config: PretrainedConfig, *, given: bool) -> None:
    """A config class's default pad id outside a small vocabulary (Phi-3's 32000): transformers' embedding
    refuses it with an assertion that names no key."""
    pad, vocab = getattr(config, "pad_token_id", None), config.vocab_size
    if isinstance(pad, int) and not 0 <= pad < vocab:
        key = "model.arch.pad_token_id" if given else "+model.arch.pad_token_id"
        raise ConfigError(
            f"model.arch (model_type={config.model_type}): pad_token_id={pad}"
            + ("" if given else f" (the default of transformers' {type(config).__name__})")
            + f" is outside the model's vocabulary of {vocab} ids; set {key}=0, or any id below {vocab} (the "
            "padding embedding row; the loss never reads it)"
        )


def build_model(
    cfg: Any, *, vocab_size: int | None = None, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A causal LM as the model config says; random init uses the current torch seed."""
    if cfg.source == "pretrained":
        kwargs: dict[str, Any] = {
            "trust_remote_code": cfg.trust_remote_code,
            "dtype": dtype,
            **_arch_dict(cfg),
        }
        if cfg.gguf_file:
            require("gguf", extra="gguf")
            kwargs["gguf_file"] = cfg.gguf_file
        with (
            _names_the_key(
                f"model.name_or_path={cfg.name_or_path}"
                + (f" (model.gguf_file={cfg.gguf_file})" if cfg.gguf_file else "")
                + (" with model.arch" if kwargs.keys() - {"trust_remote_code", "dtype", "gguf_file"} else ""),
                "give a hub name or a local directory of a causal LM, and model.arch fields its config knows",
                arch=_arch_dict(cfg),
            ),
            loading_from(cfg.name_or_path, key="model.name_or_path"),
            gguf_parsed_once(cfg.gguf_file),  # its config and weights from one parse
        ):
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
        if cfg.gguf_file:
            model = _without_gguf_quantizer(model, dtype)
    else:
        config = build_model_config(cfg, vocab_size=vocab_size)
        with _names_the_key(
            f"model.arch (model_type={config.model_type})",
            f"check each model.arch field's name and value against transformers' {type(config).__name__}",
        ):
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=cfg.trust_remote_code, dtype=dtype
            )
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer (data.tokenizer=null)"
        )
    return model


def _without_gguf_quantizer(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The same weights (dequantized on load) in a plain model: transformers keeps a GGUF quantizer on the one it
    loaded, which `save_pretrained` refuses, so its float export (hf/) would fail."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF model: modules whose class is listed in its `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"cannot find the transformer blocks of {type(model).__name__} (no `_no_split_modules`); "
            "sharding, pruning and distillation work per block"
        )
    return blocks


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D` (transformers.pytorch_utils): a linear layer y = x W + b whose weight is stored
    [in, out], transposed relative to nn.Linear's [out, in]."""
    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear (or subclass) or a GPT-2 Conv1D: what pruning, adapters and quantization treat as a linear."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight in nn.Linear orientation [out, in]: a transposed view of a Conv1D's (writing
    to it writes the layer's weight)."""
    return module.weight.T if is_conv1d(module) else module.weight


def as_weight_layout(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor computed in nn.Linear orientation [out, in] (a mask, an updated weight) in the layout of
    `module.weight`: transposed back for a Conv1D."""
    return tensor.T.contiguous() if is_conv1d(module) else tensor


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """An nn.Linear computing what a GPT-2 Conv1D computes (the weight transposed, the same bias)."""
    w = conv.weight.detach()
    linear = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias.detach())
    return linear


def fused_experts(model: nn.Module) -> list[str]:
    """The names, within a transformer block, of an MoE's routed experts stored as fused 3-D parameters
    (transformers' Qwen2MoeExperts, MixtralExperts: [experts, out, in]); [] for a dense model. Pruning, adapters
    and quantization work on linear layers, which these are not."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    block = next((m for m in model.modules() if type(m).__name__ in names), None)
    return [] if block is None else [n for n, p in block.named_parameters() if p.ndim >= 3]


def warn_unhandled_experts(model: nn.Module, *, feature: str, consequence: str) -> None:
    """A warning, where `model` is an MoE with fused experts, that `feature` (which works on linear layers)
    leaves them as they are: `consequence` says how."""
    fused = fused_experts(model)
    if fused:
        warnings.warn(
            f"{feature}: the routed experts of this MoE ({', '.join(fused)} in each block) are fused 3-D "
            f"parameters, not linear layers: {consequence}",
            TrainerWarning,
            stacklevel=3,
        )


def layer_types(model: nn.Module) -> list[str]:
    """The class names of the leaf modules of `model`, sorted (for messages that say what a model is made of)."""
    return sorted({type(m).__name__ for m in model.modules() if not next(m.children(), None)})


def max_seq_len(model: PreTrainedModel) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def supports_fused_loss(model: PreTrainedModel) -> bool:
    """The fused loss needs logits = lm_head(final hidden state): no soft-capping, scaling or extra heads."""
    c = model.config
    if getattr(c, "final_logit_softcapping", None) or getattr(c, "logit_scale", None) not in (None, 1, 1.0):
        return False
    head = model.get_output_embeddings()
    return isinstance(head, nn.Linear) and hasattr(model, "base_model") and model.base_model is not model


class CausalLMWithLoss(nn.Module):
    """The module strategies wrap: decoder forward plus a cross-entropy that never holds the full logits.

    Computing the loss inside one module's forward keeps every parameter use (LM head included) within the
    hooks that DDP and FSDP install, whichever loss path is taken.
    """

    def __init__(self, model: PreTrainedModel, *, loss_chunk_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.fused = loss_chunk_size != 0 and supports_fused_loss(model)
        self.loss_chunk_size = loss_chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        num_targets: int | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum of token cross-entropies divided by `num_targets` (the global batch's count), or the mean.
        `position_ids` that restart within a row keep its documents apart: no attention mask and no KV cache
        are passed, which is when transformers builds the block-diagonal mask from them."""
        if self.fused:
            hidden = self.model.base_model(
                input_ids=input_ids, position_ids=position_ids, use_cache=False
            ).last_hidden_state
            head = self.model.get_output_embeddings()
            return causal_lm_loss(
                hidden,
                head.weight,
                head.bias,
                labels,
                chunk_size=self.loss_chunk_size,
                num_targets=num_targets,
            )
        logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return causal_lm_loss(logits, None, None, labels, chunk_size=0, num_targets=num_targets)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token, forward plus backward (the PaLM appendix-B count).

    6 * N for every weight used in a matrix multiply (all parameters except the input embedding table,
    whose lookup is free; the LM head counts even when tied to it), plus 12 * layers * attention width *
    seq_len for the attention scores and the weighted sum (2 matmuls, x2 for multiply-add, x3 for the
    backward), with no discount for the causal mask. Norms, activations and softmax are not counted.
    """
    c = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    n = count_params(model) - embed.numel()
    if head is not None and head.weight is embed:
        n += embed.numel()
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return 6.0 * n + 12.0 * c.num_hidden_layers * heads * head_dim * seq_len
