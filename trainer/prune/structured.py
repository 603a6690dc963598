"""Structured pruning: attention heads, MLP channels and whole layers removed, leaving a smaller dense model.

Works on Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma, SmolLM: `self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`), on Phi-3's fused `qkv_proj` and `gate_up_proj` (each part's rows sliced alike), and
on GPT-NeoX's MLP and layers (its head size is hidden_size / heads, which a model with fewer heads breaks).
Every layer loses the same number of heads and channels (the HF config holds one `num_attention_heads` and
one `intermediate_size`), each layer choosing its own by weight norm. The config is updated (with `head_dim`
written out, since hidden_size / num_heads no longer gives it), so `save_pretrained` / `from_pretrained`
round-trip the smaller model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.models import is_conv1d, transformer_blocks


def _sliced(linear: nn.Linear, index: torch.Tensor, *, dim: int) -> nn.Linear:
    """A new linear keeping rows (dim 0: outputs) or columns (dim 1: inputs) `index` of `linear`."""
    w = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            b = linear.bias.detach()
            new.bias.copy_(b.index_select(0, index.to(b.device)) if dim == 0 else b)
    return new


def _layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, list) of the ModuleList that holds the transformer blocks."""
    blocks = transformer_blocks(model)
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) and child[0] is blocks[0]:
                return parent, attr, child
    raise ConfigError(f"cannot find the list of transformer layers of {type(model).__name__}")


def _shape_of(block: nn.Module) -> str | None:
    """ "llama" (separate q/k/v/o and gate/up/down nn.Linear), "phi3" (q, k, v fused in qkv_proj; gate and up in
    gate_up_proj), "gpt_neox" (q, k, v interleaved per head in query_key_value; an un-gated MLP), or None."""

    def linears(module: nn.Module | None, *names: str) -> bool:
        return module is not None and all(isinstance(getattr(module, n, None), nn.Linear) for n in names)

    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if linears(attn, "q_proj", "k_proj", "v_proj", "o_proj") and linears(
        mlp, "gate_proj", "up_proj", "down_proj"
    ):
        return "llama"
    if linears(attn, "qkv_proj", "o_proj") and linears(mlp, "gate_up_proj", "down_proj"):
        return "phi3"
    if linears(getattr(block, "attention", None), "query_key_value", "dense") and linears(
        mlp, "dense_h_to_4h", "dense_4h_to_h"
    ):
        return "gpt_neox"
    return None


def _check_shape(block: nn.Module, model_type: str, *, heads: float, num_heads: int) -> str:
    shape = _shape_of(block)
    if shape is None:
        raise ConfigError(
            f"prune=structured (heads, MLP channels, layers) knows Llama-style blocks (self_attn.q/k/v/o_proj, "
            f"mlp.gate/up/down_proj), Phi-3's fused qkv_proj/gate_up_proj and GPT-NeoX's query_key_value; "
            f"model_type={model_type}'s {type(block).__name__} is not one"
            + (
                " (its attention holds q, k and v in one fused GPT-2 Conv1D, which it does not slice)"
                if any(is_conv1d(m) for m in block.modules())
                else ""
            )
            + ": use an unstructured method (prune=magnitude, wanda, sparsegpt, nm)"
        )
    if shape == "gpt_neox" and math.floor(heads * num_heads + 1e-6):
        raise ConfigError(
            f"prune.heads={heads} on model_type={model_type}: its config has no head size of its own (GPT-NeoX "
            "computes it as hidden_size / num_attention_heads), so a model with fewer heads cannot be saved and "
            "loaded back; prune MLP channels and layers (prune.heads=0), or heads with an unstructured method"
        )
    return shape


def drop_layers(model: nn.Module, indices: list[int]) -> None:
    parent, attr, layers = _layer_list(model)
    n = len(layers)
    bad = [i for i in indices if not -n <= i < n]
    if bad or len({i % n for i in indices}) >= n:
        raise ConfigError(
            f"prune.drop_layers={list(indices)}: the model has layers 0..{n - 1} and at least one must remain"
        )
    gone = {i % n for i in indices}
    kept = [layer for i, layer in enumerate(layers) if i not in gone]
    for new_idx, layer in enumerate(kept):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx  # the KV cache is indexed by it
    setattr(parent, attr, nn.ModuleList(kept))
    config = model.config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in gone]


def _qkv(attn: nn.Module, shape: str, heads: int, kv: int, d: int) -> list[torch.Tensor]:
    """The q, k and v weights (rows: output features), each head's rows together, whatever the fusing."""
    if shape == "phi3":
        return list(attn.qkv_proj.weight.detach().float().split([heads * d, kv * d, kv * d]))
    return [getattr(attn, n).weight.detach().float() for n in ("q_proj", "k_proj", "v_proj")]


def _keep_heads(
    attn: nn.Module, shape: str, heads: int, kv: int, d: int, q_rows: torch.Tensor, kv_rows: torch.Tensor
) -> None:
    if shape == "phi3":
        rows = torch.cat([q_rows, heads * d + kv_rows, (heads + kv) * d + kv_rows])
        attn.qkv_proj = _sliced(attn.qkv_proj, rows, dim=0)
        attn.num_key_value_heads = len(kv_rows) // d  # Phi-3 splits qkv by it; the config holds the rest
    else:
        attn.q_proj = _sliced(attn.q_proj, q_rows, dim=0)
        attn.k_proj = _sliced(attn.k_proj, kv_rows, dim=0)
        attn.v_proj = _sliced(attn.v_proj, kv_rows, dim=0)
    attn.o_proj = _sliced(attn.o_proj, q_rows, dim=1)


def prune_heads(model: nn.Module, fraction: float) -> int:
    """Remove floor(fraction x KV heads) key/value groups (each with its query heads) per layer, by weight norm."""
    config = model.config
    heads, kv = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    removed = math.floor(fraction * kv + 1e-6)
    if removed == 0:
        return 0
    if removed >= kv:
        raise ConfigError(f"prune.heads={fraction} would remove all {kv} key/value heads; lower it")
    per_group = heads // kv
    for block in transformer_blocks(model):
        attn, shape = block.self_attn, _shape_of(block)
        d = attn.head_dim
        q, k, v = _qkv(attn, shape, heads, kv, d)
        q, k, v = q.reshape(kv, per_group * d, -1), k.reshape(kv, d, -1), v.reshape(kv, d, -1)
        o = attn.o_proj.weight.detach().float().reshape(-1, kv, per_group * d)
        score = q.pow(2).sum((1, 2)) + k.pow(2).sum((1, 2)) + v.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))
        groups = torch.sort(torch.topk(score, kv - removed).indices).values
        kv_rows = (groups[:, None] * d + torch.arange(d)).reshape(-1)
        q_rows = (groups[:, None] * per_group * d + torch.arange(per_group * d)).reshape(-1)
        _keep_heads(attn, shape, heads, kv, d, q_rows, kv_rows)
        head_dim = d
    config.head_dim = head_dim
    config.num_key_value_heads = kv - removed
    config.num_attention_heads = (kv - removed) * per_group
    return removed * per_group


def _mlp(mlp: nn.Module, shape: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The MLP's input-side weights (gate and up, or GPT-NeoX's one; rows: channels) and its output weight."""
    if shape == "phi3":
        return list(mlp.gate_up_proj.weight.detach().float().chunk(2)), mlp.down_proj.weight.detach().float()
    if shape == "gpt_neox":
        return [mlp.dense_h_to_4h.weight.detach().float()], mlp.dense_4h_to_h.weight.detach().float()
    ins = [mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float()]
    return ins, mlp.down_proj.weight.detach().float()


def _keep_channels(mlp: nn.Module, shape: str, size: int, keep: torch.Tensor) -> None:
    if shape == "phi3":  # gate's channels, then up's: Phi-3 chunks the output in two
        mlp.gate_up_proj = _sliced(mlp.gate_up_proj, torch.cat([keep, size + keep]), dim=0)
    elif shape == "gpt_neox":
        mlp.dense_h_to_4h = _sliced(mlp.dense_h_to_4h, keep, dim=0)
        mlp.dense_4h_to_h = _sliced(mlp.dense_4h_to_h, keep, dim=1)
        return
    else:
        mlp.gate_proj = _sliced(mlp.gate_proj, keep, dim=0)
        mlp.up_proj = _sliced(mlp.up_proj, keep, dim=0)
    mlp.down_proj = _sliced(mlp.down_proj, keep, dim=1)


def prune_mlp_channels(model: nn.Module, fraction: float) -> int:
    """Remove floor(fraction x intermediate_size) hidden channels per MLP, by the norms of their weights."""
    size = model.config.intermediate_size
    removed = math.floor(fraction * size + 1e-6)
    if removed == 0:
        return 0
    for block in transformer_blocks(model):
        shape = _shape_of(block)
        ins, out = _mlp(block.mlp, shape)
        score = sum(w.pow(2).sum(1) for w in ins) + out.pow(2).sum(0)
        keep = torch.sort(torch.topk(score, size - removed).indices).values
        _keep_channels(block.mlp, shape, size, keep)
    model.config.intermediate_size = size - removed
    return removed


def pruned_config(config: Any, *, heads: float, mlp_channels: float, layers: list[int]) -> Any:
    """The HF config of a model after `prune_structured` with these settings (shapes only, no weights):
    what `python -m trainer.export` builds to load a structured-pruned checkpoint into."""
    import copy

    config = copy.deepcopy(config)
    n = config.num_hidden_layers
    gone = {i % n for i in layers}
    config.num_hidden_layers = n - len(gone)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in gone]
    q_heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or q_heads
    removed = math.floor(heads * kv + 1e-6)
    if removed:
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
        config.num_key_value_heads = kv - removed
        config.num_attention_heads = (kv - removed) * (q_heads // kv)
    config.intermediate_size -= math.floor(mlp_channels * config.intermediate_size + 1e-6)
    return config


def prune_structured(
    model: nn.Module, *, heads: float, mlp_channels: float, layers: list[int]
) -> dict[str, Any]:
    """Shrink `model` in place; returns what was removed (for the report)."""
    for block in transformer_blocks(model):
        model_type = getattr(model.config, "model_type", type(model).__name__)
        _check_shape(block, model_type, heads=heads, num_heads=model.config.num_attention_heads)
    before = sum(p.numel() for p in model.parameters())
    if layers:
        drop_layers(model, list(layers))
    heads_removed = prune_heads(model, heads)
    channels_removed = prune_mlp_channels(model, mlp_channels)
    after = sum(p.numel() for p in model.parameters())
    return {
        "params_before": before,
        "params_after": after,
        "layers_dropped": sorted(layers),
        "heads_removed_per_layer": heads_removed,
        "mlp_channels_removed_per_layer": channels_removed,
        "num_hidden_layers": model.config.num_hidden_layers,
        "num_attention_heads": model.config.num_attention_heads,
        "num_key_value_heads": getattr(model.config, "num_key_value_heads", None),
        "intermediate_size": model.config.intermediate_size,
    }
