"""int8 dynamic quantization that is fast on CPUs without VNNI: SmoothQuant smoothing + fbgemm's kernels.

fbgemm's dynamic int8 linear (`torch.ops.quantized.linear_dynamic`) quantizes each input to uint8 with
one scale per tensor, then runs a u8 x s8 matmul that is about twice as fast as fp32 on AVX2. Two kinds
of outliers break one scale per tensor (perplexity 23.65 -> 65.9 on SmolLM2):
- tokens: a few rows (the first token's, some in down_proj's input) are 10-1000x larger than the rest.
  Each row is divided by its own max before the kernel and the output row multiplied back, which is
  exactly per-token quantization for one elementwise pass each way: (X / r) W^T * r = X W^T.
- input channels: SmoothQuant (Xiao et al., 2023) moves their range into the weights. Channel j is
  divided by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and the weight's column j multiplied by it,
  which leaves the product unchanged. The division is folded into what produces the input, so it costs
  nothing at run time: the RMSNorm weight before q/k/v and gate/up, the rows of up_proj before down_proj
  and the rows of v_proj before o_proj. Smoothing makes the weights harder to quantize, so each group's
  strength (none included) is chosen by the int8 output error on calibration rows.
The LM head is smoothed the same way through the final RMSNorm (untied from the embedding first);
layers named in keep_float stay in float.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from trainer.calibration import CalibrationBatch, model_inputs
from trainer.errors import ConfigError

# Weights use 7 bits (-63..63): without VNNI, fbgemm sums pairs of uint8 x int8 products in int16
# (vpmaddubsw), which saturates for 255 * 127 * 2 but not for 255 * 63 * 2 = 32130. Measured on AVX2:
# 8-bit weights with 8-bit activations lose up to 8% to saturation, 8-bit weights with 7-bit
# activations 2%, 7-bit weights with 8-bit activations 1.5% (the least).
WEIGHT_QMAX = 63


def _quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output row on -WEIGHT_QMAX..WEIGHT_QMAX: (int8 values, float32 scales)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / WEIGHT_QMAX).clamp(min=1e-8)
    q = torch.round(w / scale[:, None]).clamp(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
    return q, scale


class Int8DynamicLinear(nn.Module):
    """A linear layer with int8 per-channel weights and activations quantized per token, per call (fbgemm, CPU).

    The state is plain tensors (`qweight` int8, `weight_scale`, `bias`), so it saves to safetensors and
    loads without unpickling; fbgemm's packed form is rebuilt from them on first use.
    """

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, device: torch.device | None = None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._packed = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, quantized: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> Int8DynamicLinear:
        """`linear` with its weight rounded to nearest, or given as `quantized` (int8 values, row scales)."""
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        out.qweight, out.weight_scale = quantized or _quantize_per_channel(linear.weight)
        if linear.bias is not None:
            out.bias = linear.bias.detach().float().clone()
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.weight_scale[:, None]

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None  # new weights: repack

    def _packed_weight(self):
        if self._packed is None:
            if self.qweight.device.type != "cpu":
                raise RuntimeError(
                    "Int8DynamicLinear runs on fbgemm's CPU kernels; load the model on the CPU "
                    "(device=cpu), or quantize with scheme=int8_dynamic for GPUs"
                )
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # quantized tensors are deprecated but still fbgemm's only entry
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    self.qweight, self.weight_scale.double(), zero, 0
                )
            # No bias in the packed form: the kernel's output is rescaled per row before the bias is added.
            self._packed = torch.ops.quantized.linear_prepack(qw, None)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        # Per-token scales on a per-tensor kernel: every row enters with max |x| = 1 and leaves scaled back.
        row_max = flat.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
        # reduce_range=False: full 8-bit activations (the weights took the 7-bit range instead).
        y = torch.ops.quantized.linear_dynamic(flat / row_max, self._packed_weight(), False).mul_(row_max)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 fbgemm"


def _scales_into_weight(norm: nn.Module | None) -> bool:
    """Whether dividing `norm.weight` divides its output: an RMSNorm computing w * x / rms(x) (Gemma's
    computes (1 + w) * x / rms(x))."""
    kind = type(norm).__name__
    return norm is not None and kind.endswith("RMSNorm") and "Gemma" not in kind


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The Llama-style decoder blocks whose structure smoothing relies on, or a clear error."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    needed = (
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )

    def has(block: nn.Module, path: str) -> bool:
        try:
            block.get_submodule(path)
            return True
        except AttributeError:
            return False

    if layers is None or not len(layers) or not all(has(b, p) for b in layers for p in needed):
        raise ConfigError(
            f"scheme=int8_smooth folds its scales into Llama-style decoder blocks ({', '.join(needed)}); "
            f"{type(model).__name__} does not have them. Use scheme=int8_dynamic or scheme=int8_weight"
        )
    for block in layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = block.get_submodule(name)
            if not _scales_into_weight(norm):
                raise ConfigError(
                    f"scheme=int8_smooth folds scales into RMSNorm weights (y = w * x / rms(x)); {name} is a "
                    f"{type(norm).__name__}. Use scheme=int8_dynamic or scheme=int8_weight"
                )
    return list(layers)


def final_norm_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The RMSNorm before the LM head, and the head (smoothing folds the head's scales into the norm)."""
    norm = getattr(getattr(model, "base_model", model), "norm", None)
    head = model.get_output_embeddings()
    if not _scales_into_weight(norm):
        raise ConfigError(
            f"scheme=int8_smooth with the LM head in int8 folds its scales into the final RMSNorm; "
            f"{type(model).__name__} has none. Keep the head in float: keep_float=[lm_head]"
        )
    if type(head) is not nn.Linear:
        raise ConfigError(f"the LM head is a {type(head).__name__}, not a linear layer; keep it in float")
    return norm, head


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own weight when it shares the input embedding's: its columns are about to be
    scaled and quantized, and the embedding must stay as it is."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[CalibrationBatch], *, sample_rows: int = 256
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per linear layer of the blocks (keys `{block}.{name}`) and the LM head (key `head`): max |x_j| over
    every calibration token per input channel j, and a sample of up to `sample_rows` input rows (evenly
    spaced) to score candidate scales on. Packed documents are run as they train (`model_inputs`)."""
    maxima: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}

    def record(_m, args, key):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        m = x.abs().amax(0)
        maxima[key] = m if key not in maxima else torch.maximum(maxima[key], m)
        samples.setdefault(key, []).append(x[:: max(1, x.shape[0] // 64)][:64].clone())

    linears = {
        f"{i}.{name}": module
        for i, block in enumerate(decoder_blocks(model))
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }
    if isinstance(model.get_output_embeddings(), nn.Linear):
        linears["head"] = model.get_output_embeddings()
    hooks = [
        module.register_forward_pre_hook(lambda m, args, key=key: record(m, args, key))
        for key, module in linears.items()
    ]
    device = next(model.parameters()).device
    try:
        model.eval()
        for batch in batches:
            model(**model_inputs(batch, device))
    finally:
        for h in hooks:
            h.remove()
    if not maxima:
        raise ValueError("calibration ran no batch; give at least one calibration batch")
    rows = {}
    for key, parts in samples.items():
        x = torch.cat(parts)
        rows[key] = x[:: max(1, x.shape[0] // sample_rows)][:sample_rows]
    return maxima, rows


def _scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def fake_quantized_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T with Int8DynamicLinear's rounding simulated in float (fast enough to score many scales):
    rows divided by their max |x|, then uint8 with one scale and zero point for the tensor, and 7-bit
    weights per output row."""
    row_max = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    x = x / row_max
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    xq = (torch.round(x / scale) + zero).clamp(0, 255).sub(zero).mul(scale) * row_max
    q, w_scale = _quantize_per_channel(w)
    return xq @ (q.float() * w_scale[:, None]).t()


def quantized_error(x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Relative error of int8 x @ W.T against float, summed over the weights."""
    total = 0.0
    for w in weights:
        w = w.detach().float()
        ref = x @ w.t()
        total += float((fake_quantized_matmul(x, w) - ref).norm() / ref.norm().clamp(min=1e-12))
    return total


def _best_scales(
    act_max: torch.Tensor,
    weights: list[torch.Tensor],
    x: torch.Tensor | None,
    *,
    alpha: float | None,
    groups: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Scales for one group of linears that share an input: SmoothQuant's rule with the given alpha, or
    the candidate with the lowest int8 output error on the calibration rows `x`: no smoothing (all ones)
    or the rule with one of ALPHAS.

    `groups=(num_kv, heads_per_kv, head_dim)` ties the channels of the query heads that read one
    key/value head (o_proj after v_proj): the scales returned are per key/value channel.
    """
    weight_max = torch.cat([w.detach().abs() for w in weights]).amax(0).float()
    if groups is not None:
        num_kv, per_kv, hd = groups
        act_max = act_max.view(num_kv, per_kv, hd).amax(1).reshape(-1)
        weight_max = weight_max.view(num_kv, per_kv, hd).amax(1).reshape(-1)
    if alpha is not None:
        return _scales(act_max, weight_max, alpha)
    best, best_err = None, float("inf")
    for s in [torch.ones_like(act_max)] + [_scales(act_max, weight_max, a) for a in ALPHAS]:
        full = _expand(s, groups)
        err = quantized_error(x / full, [w.detach().float() * full for w in weights])
        if err < best_err:
            best, best_err = s, err
    return best


def _expand(s: torch.Tensor, groups: tuple[int, int, int] | None) -> torch.Tensor:
    """Per key/value channel scales repeated for each query head of the group (HF's repeat_kv order)."""
    if groups is None:
        return s
    num_kv, per_kv, hd = groups
    return s.view(num_kv, 1, hd).expand(num_kv, per_kv, hd).reshape(-1)


ALPHAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def smooth_model(
    model: nn.Module,
    maxima: dict[str, torch.Tensor],
    rows: dict[str, torch.Tensor] | None = None,
    *,
    alpha: float | None = None,
    head: bool = False,
) -> None:
    """Fold SmoothQuant scales into the model in place; its float outputs stay the same (up to rounding).

    `alpha=None` searches ALPHAS per group of linears sharing an input, scoring each by the int8 kernel's
    output error on the calibration rows; a number applies that alpha everywhere (SmoothQuant's rule).
    `head=True` also smooths the LM head (to be quantized) through the final norm, untying it first.
    """
    if alpha is None and rows is None:
        raise ValueError("searching alpha needs the calibration rows; pass rows or a fixed alpha")
    norm_and_head = final_norm_and_head(model) if head else None  # fails before anything is changed
    config = model.config
    num_heads = config.num_attention_heads
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    rows = rows or {}
    for i, block in enumerate(decoder_blocks(model)):
        attn, mlp = block.self_attn, block.mlp
        # Inputs that follow an RMSNorm: divide the norm's weight, multiply the consumers' columns.
        for norm, linears, key in (
            (block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], f"{i}.self_attn.q_proj"),
            (block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], f"{i}.mlp.gate_proj"),
        ):
            s = _best_scales(maxima[key], [lin.weight for lin in linears], rows.get(key), alpha=alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            for lin in linears:
                lin.weight.mul_(s.to(lin.weight.dtype))
        # down_proj's input is act(gate) * up: scale up_proj's output rows.
        key = f"{i}.mlp.down_proj"
        s = _best_scales(maxima[key], [mlp.down_proj.weight], rows.get(key), alpha=alpha)
        _scale_rows(mlp.up_proj, 1.0 / s)
        mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype))
        # o_proj's input is the attention-weighted v: scale v_proj's rows. A key/value head serves
        # num_heads / num_kv query heads, so those heads share one scale per channel.
        key = f"{i}.self_attn.o_proj"
        groups = (num_kv, num_heads // num_kv, attn.o_proj.in_features // num_heads)
        s = _best_scales(maxima[key], [attn.o_proj.weight], rows.get(key), alpha=alpha, groups=groups)
        _scale_rows(attn.v_proj, 1.0 / s)
        attn.o_proj.weight.mul_(_expand(s, groups).to(attn.o_proj.weight.dtype))
    if norm_and_head is not None:
        norm, lm_head = norm_and_head
        untie_head(model)
        s = _best_scales(maxima["head"], [lm_head.weight], rows.get("head"), alpha=alpha)
        norm.weight.div_(s.to(norm.weight.dtype))
        lm_head.weight.mul_(s.to(lm_head.weight.dtype))


def _scale_rows(linear: nn.Linear, factor: torch.Tensor) -> None:
    linear.weight.mul_(factor.to(linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias.mul_(factor.to(linear.bias.dtype))


def int8_targets(module: nn.Module, *, keep_float: list[str], prefix: str = "") -> dict[str, nn.Linear]:
    """The plain nn.Linear layers under `module` (names with `prefix`) that contain none of `keep_float`."""
    found = {}
    for name, child in module.named_modules(prefix=prefix):
        if type(child) is nn.Linear and not any(k in name for k in keep_float):
            found[name] = child
    return found


def swap_linears(model: nn.Module, *, keep_float: list[str]) -> list[str]:
    """Replace every nn.Linear whose name contains none of `keep_float` by an Int8DynamicLinear."""
    targets = int8_targets(model, keep_float=keep_float)
    for name, linear in targets.items():
        model.set_submodule(name, Int8DynamicLinear.from_linear(linear))
    return list(targets)


def empty_int8_linears(model: nn.Module, names: list[str]) -> None:
    """Put empty Int8DynamicLinear modules at `names` (to load a saved state into)."""
    for name in names:
        child = model.get_submodule(name)
        model.set_submodule(
            name, Int8DynamicLinear(child.in_features, child.out_features, bias=child.bias is not None)
        )
