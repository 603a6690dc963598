"""A causal LM and its byte-level BPE tokenizer as one GGUF file, the format llama.cpp runs.

Written with the `gguf` package's `GGUFWriter` (the writer llama.cpp's own converters use), following the
conventions of llama.cpp's `convert_hf_to_gguf.py` for the families in `FAMILIES`: llama, mistral (written as
llama.cpp's `llama`, as its converter does), qwen2, qwen3, gemma2, phi3 and gpt2. What differs between them is
data, one `GgufFamily` each (the llama.cpp architecture, the activation its graph computes, which rows are
permuted, which biases are read, Gemma's norm offset, the sliding window and soft-capping keys, gpt2's learned
positions, LayerNorm and transposed Conv1D weights):

- metadata under `ARCH.*`: context, embedding and feed-forward lengths, block count, head counts (query and
  key/value), key/value head size (where not hidden / heads), rope dimension count, rope frequency base and
  linear rope scaling (none for gpt2), the RMS (gpt2: layer) norm epsilon, the vocabulary size, the file type;
  gemma2's sliding window and logit soft-capping;
- the tokenizer as `tokenizer.ggml.*`: model `gpt2` (byte-level BPE), the pre-tokenizer llama.cpp must split
  with (`gpt-2`, `smollm` for SmolLM2's digit split, `qwen2` for Qwen2's), every token in its byte-level spelling with its
  type (control for special added tokens, unused for the padding ids a model's vocabulary has beyond its
  tokenizer's, named `[PADn]` as llama.cpp names them), the merges, bos/eos/unk/pad ids and whether bos/eos
  are added;
- tensors under llama.cpp's names (`gguf.TensorNameMap` of the architecture: token_embd, blk.N.attn_q/k/v/
  output or phi3's and gpt2's fused attn_qkv, ffn_gate/up/down or their fused ffn_up, the norms, output_norm,
  output);
  for llama's architecture the rows of Q and K permuted from HF's rotate-half layout to the interleaved pairs
  its rope works on (transformers' GGUF loader permutes them back; the other architectures rotate halves as HF
  does); Gemma's RMS norm weights stored as 1 + w (llama.cpp scales by the weight, Gemma by one plus it); no
  `output` for tied embeddings, which llama.cpp reads as tied; gpt2's Conv1D weights (in x out) transposed;
- types: norms and 1-D tensors f32; the matrices in the asked type (quantized by `gguf.quants`), a matrix
  whose rows do not divide into the type's blocks f16 as llama.cpp's converter keeps it. Under q8_0 and
  q4_0 the matrices named in `keep_float` stay f16: by default the LM head (the embedding when tied), as
  `trainer.quantize` keeps it float; with it quantized (`keep_float=[]`), q4_0 stores it q8_0, since
  llama-quantize keeps the output matrix at more bits (6) too.

What GGUF cannot describe is refused before anything is written, saying why: another family, biases the
architecture does not read, another activation than its graph's, a rope scaling other than linear or Llama 3's
(written as llama.cpp's `rope_freqs` factors, llama's architecture only), partial rotary embeddings, a sliding
window that binds within the context where the architecture has none (or other than gemma2's alternate
layers), attention options the graph does not compute (gemma2's query scale, gpt2's `assumes`), and a tokenizer other than byte-level BPE (the word-level vocabulary of `data=embedded` has no GGUF
tokenizer model: llama.cpp knows SentencePiece, byte-level BPE, WordPiece and Unigram vocabularies, none of
which splits on whitespace and maps an unseen word to one unknown token).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import ConfigError, TrainerWarning
from trainer.utils import require

# The HF pre-tokenizers we can name to llama.cpp (its `tokenizer.ggml.pre`), as (type, details) sequences.
_BYTE_LEVEL = ("ByteLevel", False, True)  # type, add_prefix_space, use_regex
# Qwen2's split (transformers' Qwen2Tokenizer, and what it makes of any byte-level BPE in a qwen2 model's directory)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE_TOKENIZERS = {
    (_BYTE_LEVEL,): "gpt-2",  # GPT-2's split (our data=pydoc/hf tokenizers)
    (("Digits", True), _BYTE_LEVEL): "smollm",  # digits one by one, then GPT-2's split (SmolLM2)
    (("Split", _QWEN2_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "qwen2",  # Qwen2 and 2.5
}
FIX = "export it with format=hf and convert that with llama.cpp's convert_hf_to_gguf.py"


@dataclass(frozen=True)
class GgufFamily:
    """How one transformers model family is written as one of llama.cpp's architectures."""

    model_class: str  # the transformers class written
    arch: str  # the gguf.MODEL_ARCH member the file declares
    activation: str  # the MLP activation llama.cpp's graph for `arch` computes (transformers' name)
    permute_qk: bool = False  # llama's rope rotates interleaved pairs; the others rotate halves, as HF does
    biases: tuple[str, ...] = ()  # HF bias names (suffixes) the architecture reads; any other is refused
    norm_offset: float = 0.0  # added to RMS norm weights: Gemma scales by (1 + w), llama.cpp by w
    rope_types: tuple[str, ...] = ("default", "linear")
    alternate_window: bool = False  # a sliding window on even layers (gemma2's), which binds in the graph
    window_key: bool = False  # attention.sliding_window written (0: none), as llama.cpp's converter writes it
    softcapping: bool = False  # attention and final logit soft-capping, which the graph always applies
    tied_only: bool = False  # the architecture has no `output` tensor
    key_length: bool = (
        False  # head size written even where it is hidden / heads (transformers' gemma2 reads it)
    )
    rotary: bool = True  # rope keys; gpt2 adds learned positions (position_embd) instead
    layer_norm: bool = False  # LayerNorm with bias (gpt2), not RMSNorm
    transposed: bool = False  # Conv1D weights (in x out, gpt2's), stored out x in as llama.cpp reads matrices
    # Config values the architecture's graph assumes; a model with others is refused.
    assumes: dict[str, Any] = field(default_factory=dict)
    # Config fields transformers' GGUF loader reads from no key of this architecture: it takes its config
    # class's defaults, so a model with other values reads back as another model there (llama.cpp reads them).
    loader_defaults: dict[str, Any] = field(default_factory=dict)


_LLAMA_ROPE = ("default", "linear", "llama3")
_ROPE_NAMES = {"default": "the default rope", "linear": "linear scaling", "llama3": "Llama 3's scaling"}
FAMILIES: dict[str, GgufFamily] = {  # by config.model_type
    "llama": GgufFamily("LlamaForCausalLM", "LLAMA", "silu", permute_qk=True, rope_types=_LLAMA_ROPE),
    "mistral": GgufFamily("MistralForCausalLM", "LLAMA", "silu", permute_qk=True, rope_types=_LLAMA_ROPE),
    "qwen2": GgufFamily(
        "Qwen2ForCausalLM", "QWEN2", "silu", biases=("q_proj.bias", "k_proj.bias", "v_proj.bias")
    ),
    "qwen3": GgufFamily("Qwen3ForCausalLM", "QWEN3", "silu", loader_defaults={"head_dim": 128}),
    "gemma2": GgufFamily(
        "Gemma2ForCausalLM",
        "GEMMA2",
        "gelu_pytorch_tanh",
        norm_offset=1.0,
        key_length=True,
        alternate_window=True,
        window_key=True,
        softcapping=True,
        tied_only=True,
        loader_defaults={
            "query_pre_attn_scalar": 256,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    "phi3": GgufFamily("Phi3ForCausalLM", "PHI3", "silu", window_key=True),
    "gpt2": GgufFamily(
        "GPT2LMHeadModel",
        "GPT2",
        "gelu_new",
        biases=(".bias",),
        rotary=False,
        layer_norm=True,
        transposed=True,
        assumes={
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "add_cross_attention": False,
        },
        loader_defaults={"n_positions": 1024, "n_inner": None},
    ),
}


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def export_gguf(
    model: Any,
    tokenizer: Any,
    output_dir: Path,
    *,
    gguf_type: str,
    name: str = "model",
    keep_float: list[str] | None = None,
) -> Path:
    """Write `output_dir/model-TYPE.gguf` (through a temporary file renamed at the end); returns its path.

    `keep_float`: matrices whose HF names contain one of these stay f16 under a quantized type (None: the LM
    head, `trainer.quantize`'s default; a tied embedding is the LM head's matrix, so it follows the head)."""
    require("gguf", extra="gguf")
    import gguf

    config = model.config
    family = check_gguf_model(model)
    vocab = gguf_vocabulary(tokenizer, vocab_size=config.vocab_size)  # refuses before anything is written
    keep = DEFAULT_KEEP_FLOAT if keep_float is None else list(keep_float)
    head_name = _output_weight_name(model)
    state = model.state_dict()
    matrices = [n for n, t in state.items() if t.dim() == 2] + [head_name]
    unmatched = [k for k in keep if not any(k in n for n in matrices)]
    if unmatched:
        raise ConfigError(
            f"gguf.keep_float={unmatched}: no matrix of the model has that in its name (they are named like "
            f"{head_name} or model.layers.0.mlp.down_proj.weight); correct the names or leave them out"
        )
    _warn_loader_defaults(config, family)

    arch = getattr(gguf.MODEL_ARCH, family.arch)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    _add_hyperparameters(writer, gguf, config, family)
    writer.add_file_type(_FILE_TYPES[gguf_type](gguf))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocabulary(writer, vocab)

    tied = _tied(model)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == head_name):
            continue  # recomputed from the metadata; a tied head is the embedding
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"format=gguf: {hf_name} has no llama.cpp tensor name; {FIX}")
        data = _gguf_tensor(tensor, gguf_name, config, family)
        is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        float_kept = any(k in n for k in keep for n in ([hf_name, head_name] if is_output else [hf_name]))
        qtype = tensor_type(
            gguf_name, tuple(data.shape), gguf_type, is_output=is_output, keep_float=float_kept
        )
        array = gguf.quants.quantize(data.numpy(), getattr(gguf.GGMLQuantizationType, qtype.upper()))
        raw = getattr(gguf.GGMLQuantizationType, qtype.upper()) if array.dtype == np.uint8 else None
        writer.add_tensor(gguf_name, array, raw_dtype=raw)

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / gguf_file_name(gguf_type)
    partial = path.with_name(f".{path.name}.partial")
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # its plan of files is ours to print
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return path


def _add_hyperparameters(writer: Any, gguf: Any, config: Any, family: GgufFamily) -> None:
    """The `ARCH.*` keys llama.cpp builds the graph from (the rope_freqs tensor, for Llama 3's rope)."""
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(_feed_forward_length(config))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_kv_heads(config))
    if family.key_length or head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)  # llama.cpp's default is hidden / heads
        writer.add_value_length(head_dim)
    if family.rotary:
        writer.add_rope_dimension_count(head_dim)
        theta, scaling = _rope(config, family)
        writer.add_rope_freq_base(theta)
        if scaling is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(scaling)
        freq_factors = llama3_rope_factors(config, head_dim)
        if freq_factors is not None:  # llama.cpp divides each rotary frequency by its factor
            writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freq_factors)
    if family.layer_norm:
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    # gemma2's window (its even layers); phi3's, which llama.cpp reads (one that binds was refused)
    if family.window_key:
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    if family.softcapping:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_vocab_size(config.vocab_size)


def _gguf_tensor(tensor: torch.Tensor, gguf_name: str, config: Any, family: GgufFamily) -> torch.Tensor:
    """One HF tensor as float32 in llama.cpp's layout for the family."""
    data = tensor.detach().to(torch.float32).cpu()
    if family.permute_qk and gguf_name.endswith("attn_q.weight"):
        data = permute_rotary_rows(data, config.num_attention_heads)
    elif family.permute_qk and gguf_name.endswith("attn_k.weight"):
        data = permute_rotary_rows(data, _kv_heads(config))
    elif gguf_name.endswith("_norm.weight"):
        data = data + family.norm_offset
    elif family.transposed and data.dim() == 2 and gguf_name.startswith("blk."):
        data = data.t().contiguous()  # gpt2's Conv1D blocks; its embeddings are already rows
    return data


# ---- what can be written ----------------------------------------------------------------------------------

_BLOCKS = {"q8_0": 32, "q4_0": 32}  # weights per block (ggml's QK8_0, QK4_0): the quantized types
DEFAULT_KEEP_FLOAT = ["lm_head"]  # trainer.quantize's default (trainer.quant.ptq.default_keep_float)


def tensor_type(
    gguf_name: str,
    shape: tuple[int, ...],
    gguf_type: str,
    *,
    is_output: bool = False,
    keep_float: bool = False,
) -> str:
    """The type one tensor is stored in, llama.cpp's way: 1-D tensors (norms) f32; a matrix in `gguf_type`,
    but f16 where it is kept float under a quantized type or its rows do not divide into the type's blocks,
    and the output matrix at q8_0 under q4_0."""
    if len(shape) < 2 or gguf_name.endswith("_norm.weight"):
        return "f32"
    if keep_float and gguf_type in _BLOCKS:
        return "f16"
    if gguf_type == "q4_0" and is_output:
        gguf_type = "q8_0"
    block = _BLOCKS.get(gguf_type, 1)
    return gguf_type if shape[-1] % block == 0 else "f16"


def permute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a Q or K projection from HF's rotate-half order (per head: the first halves of the pairs, then
    the second halves) to the interleaved pairs llama.cpp rotates (llama.cpp's converter does the same)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _written_families() -> str:
    return ", ".join(f"{t} ({f.model_class})" for t, f in FAMILIES.items())


def check_gguf_model(model: Any) -> GgufFamily:
    """The family a model is written as, or a ConfigError saying what of it GGUF cannot describe."""
    config = model.config
    kind, model_type = type(model).__name__, getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None or kind != family.model_class:
        raise ConfigError(
            f"format=gguf cannot write this model: it is {kind} (model_type={model_type}), and the families "
            f"written are {_written_families()}; {FIX}"
        )
    what = f"format=gguf: this {model_type} model"
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias") and not n.endswith(family.biases)]
    if biases:
        allowed = f"only {', '.join(family.biases)} are" if family.biases else "none are"
        raise ConfigError(
            f"{what} has biases ({biases[0]}, ...); llama.cpp's {family.arch.lower()} reads {allowed}; {FIX}"
        )
    activation = next(
        (
            v
            for k in ("hidden_activation", "hidden_act", "activation_function")
            if (v := getattr(config, k, None))
        ),
        None,
    )
    if activation != family.activation:
        raise ConfigError(
            f"{what} has activation {activation}; llama.cpp's {family.arch.lower()} computes "
            f"{family.activation}; {FIX}"
        )
    other = {k: getattr(config, k, None) for k, v in family.assumes.items() if getattr(config, k, None) != v}
    if other:
        raise ConfigError(
            f"{what} has {other}; llama.cpp's {family.arch.lower()} computes {family.assumes}; {FIX}"
        )
    _rope(config, family)
    _check_attention(config, family, what)
    if family.tied_only and not _tied(model):
        raise ConfigError(
            f"{what} has an LM head apart from its embedding; llama.cpp's {family.arch.lower()} has no output "
            f"matrix and uses the embedding; {FIX}"
        )
    return family


def _check_attention(config: Any, family: GgufFamily, what: str) -> None:
    """Refuse a sliding window, a query scale or soft-capping the architecture's graph does not compute."""
    window = getattr(config, "sliding_window", None)
    layers = config.num_hidden_layers
    types = (
        getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * layers
    )
    sliding = [t == "sliding_attention" for t in types]
    binds = window is not None and any(sliding) and window < config.max_position_embeddings
    alternate = [i % 2 == 0 for i in range(layers)]  # llama.cpp's gemma2: even layers slide
    if binds and not (family.alternate_window and sliding == alternate):
        where = "on the even layers only" if family.alternate_window else "nowhere"
        raise ConfigError(
            f"{what} attends through a sliding window of {window} tokens on layers "
            f"{[i for i, s in enumerate(sliding) if s]}, within its context of {config.max_position_embeddings}; "
            f"llama.cpp's {family.arch.lower()} slides {where}, so it would attend past the window; {FIX}"
        )
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != _head_dim(config):
        raise ConfigError(
            f"{what} scales queries by 1/sqrt(query_pre_attn_scalar={scalar}); llama.cpp scales them by "
            f"1/sqrt(head size {_head_dim(config)}); {FIX}"
        )
    caps = {k: getattr(config, k, None) for k in ("attn_logit_softcapping", "final_logit_softcapping")}
    unwritable = None in caps.values() if family.softcapping else any(v is not None for v in caps.values())
    if unwritable:
        does = "always soft-caps" if family.softcapping else "soft-caps no"
        raise ConfigError(f"{what} has {caps}; llama.cpp's {family.arch.lower()} {does} logits; {FIX}")


def _warn_loader_defaults(config: Any, family: GgufFamily) -> None:
    for key, default in family.loader_defaults.items():
        value = getattr(config, key, None)
        if value != default:
            warnings.warn(
                f"format=gguf: {key}={value} is written for llama.cpp, but transformers' GGUF loader reads no "
                f"{key} from a {family.arch.lower()} file and takes {default}: loaded by transformers (as "
                "trainer.evaluate loads it) the file is another model",
                TrainerWarning,
                stacklevel=3,
            )


def _kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _feed_forward_length(config: Any) -> int:
    """The MLP width: `intermediate_size`, or gpt2's `n_inner` (None: 4 x hidden)."""
    if hasattr(config, "n_inner"):
        return config.n_inner or 4 * config.hidden_size
    return config.intermediate_size


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config: Any) -> tuple[dict[str, Any], str]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    return params, params.get("rope_type", params.get("type", "default"))


def _rope(config: Any, family: GgufFamily) -> tuple[float, float | None]:
    """(rope theta, linear scaling factor or None); scalings GGUF has no form for refused."""
    params, rope_type = _rope_parameters(config)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    if rope_type not in family.rope_types:
        names = [_ROPE_NAMES[k] for k in family.rope_types]
        allowed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
        raise ConfigError(
            f"format=gguf: rope_type={rope_type}: only {allowed} are written to GGUF for "
            f"{config.model_type}; {FIX}"
        )
    if partial != 1.0:
        raise ConfigError(
            f"format=gguf: partial_rotary_factor={partial}: rotary embeddings on part of each head are not "
            f"written (transformers' GGUF loader rotates whole heads); {FIX}"
        )
    if rope_type == "linear":
        return float(theta), float(params["factor"])
    return float(theta), None  # llama3: per-frequency factors, llama3_rope_factors


def llama3_rope_factors(config: Any, head_dim: int) -> np.ndarray | None:
    """Llama 3's rope scaling as the factor each rotary frequency is divided by (llama.cpp's `rope_freqs`
    tensor), None for another rope. Llama 3 keeps the frequencies whose wavelength is under
    original_max_position_embeddings / high_freq_factor, divides those over .../ low_freq_factor by `factor`,
    and interpolates between the two in 1/wavelength."""
    params, rope_type = _rope_parameters(config)
    if rope_type != "llama3":
        return None
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    factor, low, high = (float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    context = float(params["original_max_position_embeddings"])
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * np.pi / inv_freq
    smooth = np.clip((context / wavelength - low) / (high - low), 0.0, 1.0)  # 0: long waves, 1: short
    return (1.0 / ((1.0 - smooth) / factor + smooth)).astype(np.float32)


def _tied(model: Any) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return (
        out is None or out.weight is emb.weight or bool(getattr(model.config, "tie_word_embeddings", False))
    )


def _output_weight_name(model: Any) -> str:
    """The LM head's weight under its HF name (`lm_head.weight` for Llama), which keep_float is matched against."""
    head = model.get_output_embeddings()
    name = (
        next((n for n, m in model.named_modules() if m is head), "lm_head") if head is not None else "lm_head"
    )
    return f"{name}.weight"


# ---- the tokenizer ----------------------------------------------------------------------------------------


def gguf_vocabulary(tokenizer: Any, *, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.ggml.*` values of a byte-level BPE tokenizer, for a model of `vocab_size` embeddings;
    a ConfigError naming what GGUF cannot describe otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"format=gguf needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} has none; {FIX}"
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] == "WordLevel":
        raise ConfigError(
            "format=gguf: the tokenizer is word-level (data=embedded's), which GGUF cannot describe: llama.cpp's "
            "tokenizers are SentencePiece, byte-level BPE, WordPiece and Unigram, and none splits on whitespace "
            "and maps an unseen word to one unknown token. Train on byte-level BPE (data=pydoc, data=hf) for a "
            "GGUF export, or export this model with format=hf"
        )
    if model["type"] != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise ConfigError(
            f"format=gguf writes byte-level BPE tokenizers only (tokenizer.ggml.model=gpt2); this one is "
            f"{model['type']}; {FIX}"
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    normalizer = (spec.get("normalizer") or {}).get("type")
    # Qwen2's NFC is not written: llama.cpp's converter drops it too, and text already in NFC (most) splits alike
    if normalizer is not None and (normalizer, pre) != ("NFC", "qwen2"):
        raise ConfigError(
            f"format=gguf: the tokenizer normalizes text ({normalizer}), which llama.cpp's byte-level BPE does "
            f"not; {FIX}"
        )

    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ConfigError(
            f"format=gguf: the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} embeddings"
        )
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # llama.cpp's name for an embedding no token uses
            types.append(_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(_CONTROL if added.get(i, {}).get("special") else _USER if i in added else _NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    with_special = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": bos,
        "eos": eos,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        "add_bos": len(with_special) > len(plain) and with_special[0] == bos,
        "add_eos": len(with_special) > len(plain) and with_special[-1] == eos,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


_NORMAL, _CONTROL, _USER, _UNUSED = 1, 3, 4, 5  # gguf.TokenType's values


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    key = []
    for step in steps:
        if step["type"] == "ByteLevel":
            key.append(("ByteLevel", step.get("add_prefix_space", False), step.get("use_regex", True)))
        elif step["type"] == "Digits":
            key.append(("Digits", step.get("individual_digits", False)))
        elif step["type"] == "Split":
            pattern = step.get("pattern", {})
            key.append(
                (
                    "Split",
                    pattern.get("Regex", pattern.get("String")),
                    step.get("behavior"),
                    step.get("invert"),
                )
            )
        else:
            key.append((step["type"],))
    name = _PRE_TOKENIZERS.get(tuple(key))
    if name is None:
        raise ConfigError(
            f"format=gguf: the tokenizer's pre-tokenizer {[k[0] for k in key] or None} is none llama.cpp "
            "names (GPT-2's byte-level split, SmolLM2's digits then byte-level, Qwen2's split); its text would split "
            f"differently there; {FIX}"
        )
    return name


def _add_vocabulary(writer: Any, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if vocab[key] is not None:
            add(vocab[key])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])


_FILE_TYPES = {  # general.file_type: what most matrices are (llama.cpp's LlamaFileType)
    "f32": lambda g: g.LlamaFileType.ALL_F32,
    "f16": lambda g: g.LlamaFileType.MOSTLY_F16,
    "bf16": lambda g: g.LlamaFileType.MOSTLY_BF16,
    "q8_0": lambda g: g.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": lambda g: g.LlamaFileType.MOSTLY_Q4_0,
}
