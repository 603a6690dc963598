"""Structured pruning: attention heads, MLP channels and whole layers removed, leaving a smaller dense model.

Works on Llama-style decoders (Llama, Mistral, Qwen2, SmolLM: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`).
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


def _check_llama_like(block: nn.Module, model_type: str) -> None:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    need = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))]
    if any(
        m is None or not all(isinstance(getattr(m, n, None), nn.Linear) for n in names) for m, names in need
    ):
        raise ConfigError(
            f"prune=structured (heads, MLP channels, layers) knows Llama-style blocks (self_attn.q/k/v/o_proj as "
            f"nn.Linear, mlp.gate/up/down_proj); model_type={model_type}'s {type(block).__name__} is not one"
            + (
                " (its attention holds q, k and v in one fused GPT-2 Conv1D, which it does not slice)"
                if any(is_conv1d(m) for m in block.modules())
                else ""
            )
            + ": use an unstructured method (prune=magnitude, wanda, sparsegpt, nm)"
        )


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
        attn = block.self_attn
        d = attn.head_dim
        q = attn.q_proj.weight.detach().float().reshape(kv, per_group * d, -1)
        k = attn.k_proj.weight.detach().float().reshape(kv, d, -1)
        v = attn.v_proj.weight.detach().float().reshape(kv, d, -1)
        o = attn.o_proj.weight.detach().float().reshape(-1, kv, per_group * d)
        score = q.pow(2).sum((1, 2)) + k.pow(2).sum((1, 2)) + v.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))
        groups = torch.sort(torch.topk(score, kv - removed).indices).values
        kv_rows = (groups[:, None] * d + torch.arange(d)).reshape(-1)
        q_rows = (groups[:, None] * per_group * d + torch.arange(per_group * d)).reshape(-1)
        attn.q_proj = _sliced(attn.q_proj, q_rows, dim=0)
        attn.k_proj = _sliced(attn.k_proj, kv_rows, dim=0)
        attn.v_proj = _sliced(attn.v_proj, kv_rows, dim=0)
        attn.o_proj = _sliced(attn.o_proj, q_rows, dim=1)
        head_dim = d
    config.head_dim = head_dim
    config.num_key_value_heads = kv - removed
    config.num_attention_heads = (kv - removed) * per_group
    return removed * per_group


def prune_mlp_channels(model: nn.Module, fraction: float) -> int:
    """Remove floor(fraction x intermediate_size) hidden channels per MLP, by the norms of their weights."""
    size = model.config.intermediate_size
    removed = math.floor(fraction * size + 1e-6)
    if removed == 0:
        return 0
    for block in transformer_blocks(model):
        mlp = block.mlp
        score = (
            mlp.gate_proj.weight.detach().float().pow(2).sum(1)
            + mlp.up_proj.weight.detach().float().pow(2).sum(1)
            + mlp.down_proj.weight.detach().float().pow(2).sum(0)
        )
        keep = torch.sort(torch.topk(score, size - removed).indices).values
        mlp.gate_proj = _sliced(mlp.gate_proj, keep, dim=0)
        mlp.up_proj = _sliced(mlp.up_proj, keep, dim=0)
        mlp.down_proj = _sliced(mlp.down_proj, keep, dim=1)
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
        _check_llama_like(block, getattr(model.config, "model_type", type(model).__name__))
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
