"""A Llama model and its byte-level BPE tokenizer as one GGUF file, the format llama.cpp runs.

Written with the `gguf` package's `GGUFWriter` (the writer llama.cpp's own converters use), following the
conventions of llama.cpp's `convert_hf_to_gguf.py`:

- metadata under `llama.*`: context, embedding and feed-forward lengths, block count, head counts (query
  and key/value), head size (`rope.dimension_count`), rope frequency base and linear rope scaling, the RMS
  norm epsilon, the vocabulary size, the file type;
- the tokenizer as `tokenizer.ggml.*`: model `gpt2` (byte-level BPE), the pre-tokenizer llama.cpp must split
  with (`gpt-2`, or `smollm` for SmolLM2's digit split), every token in its byte-level spelling with its
  type (control for special added tokens, unused for the padding ids a model's vocabulary has beyond its
  tokenizer's, named `[PADn]` as llama.cpp names them), the merges, bos/eos/unk/pad ids and whether bos/eos
  are added;
- tensors under llama.cpp's names (`gguf.TensorNameMap`: token_embd, blk.N.attn_q/k/v/output,
  ffn_gate/up/down, attn_norm, ffn_norm, output_norm, output); the rows of Q and K permuted from HF's
  rotate-half layout to the interleaved pairs llama.cpp's rope works on (transformers' GGUF loader
  permutes them back); no `output` for tied embeddings, which llama.cpp reads as tied;
- types: norms and 1-D tensors f32; the matrices in the asked type (quantized by `gguf.quants`), a matrix
  whose rows do not divide into the type's blocks f16 as llama.cpp's converter keeps it. Under q8_0 and
  q4_0 the matrices named in `keep_float` stay f16: by default the LM head (the embedding when tied), as
  `trainer.quantize` keeps it float; with it quantized (`keep_float=[]`), q4_0 stores it q8_0, since
  llama-quantize keeps the output matrix at more bits (6) too.

What GGUF cannot describe is refused before anything is written, saying why: another architecture than
LlamaForCausalLM, biases, an activation other than silu, a rope scaling other than linear or Llama 3's (written
as llama.cpp's `rope_freqs` factors), and a tokenizer
other than byte-level BPE (the word-level vocabulary of `data=embedded` has no GGUF tokenizer model: llama.cpp
knows SentencePiece, byte-level BPE, WordPiece and Unigram vocabularies, none of which splits on whitespace
and maps an unseen word to one unknown token).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import ConfigError
from trainer.utils import require

# The HF pre-tokenizers we can name to llama.cpp (its `tokenizer.ggml.pre`), as (type, details) sequences.
_BYTE_LEVEL = ("ByteLevel", False, True)  # type, add_prefix_space, use_regex
_PRE_TOKENIZERS = {
    (_BYTE_LEVEL,): "gpt-2",  # GPT-2's split (our data=pydoc/hf tokenizers)
    (("Digits", True), _BYTE_LEVEL): "smollm",  # digits one by one, then GPT-2's split (SmolLM2)
}
_UNSUPPORTED_ROPE = (
    "rope_type={rope_type}: only the default rope, linear scaling and Llama 3's scaling are written to GGUF"
)
FIX = "export it with format=hf and convert that with llama.cpp's convert_hf_to_gguf.py"


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
    check_gguf_model(model)
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
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling)
    freq_factors = llama3_rope_factors(config, head_dim)
    if freq_factors is not None:  # llama.cpp divides each rotary frequency by its factor
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freq_factors)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPES[gguf_type](gguf))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocabulary(writer, vocab)

    tied = _tied(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the metadata
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"format=gguf: {hf_name} has no llama.cpp tensor name; {FIX}")
        if gguf_name == "output.weight" and tied:
            continue
        data = tensor.detach().to(torch.float32).cpu()
        if gguf_name.endswith("attn_q.weight"):
            data = permute_rotary_rows(data, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            data = permute_rotary_rows(data, config.num_key_value_heads)
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


def check_gguf_model(model: Any) -> None:
    """A Llama model GGUF's `llama` architecture describes, or a ConfigError saying what is not."""
    config = model.config
    kind = type(model).__name__
    if kind != "LlamaForCausalLM" or getattr(config, "model_type", None) != "llama":
        raise ConfigError(
            f"format=gguf writes Llama models (LlamaForCausalLM) only; this model is {kind} "
            f"(model_type={getattr(config, 'model_type', None)}); {FIX}"
        )
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    if biases:
        raise ConfigError(
            f"format=gguf: this Llama has biases ({biases[0]}, ...), which are not written; {FIX}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"format=gguf: hidden_act={config.hidden_act}; llama.cpp's llama runs silu; {FIX}")
    _rope(config)


def _rope_parameters(config: Any) -> tuple[dict[str, Any], str]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    return params, params.get("rope_type", params.get("type", "default"))


def _rope(config: Any) -> tuple[float, float | None]:
    """(rope theta, linear scaling factor or None); scalings GGUF has no form for refused."""
    params, rope_type = _rope_parameters(config)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope_type in ("default", "llama3"):  # llama3: per-frequency factors, llama3_rope_factors
        return float(theta), None
    if rope_type == "linear":
        return float(theta), float(params["factor"])
    raise ConfigError(f"format=gguf: {_UNSUPPORTED_ROPE.format(rope_type=rope_type)}; {FIX}")


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
    if spec.get("normalizer") is not None:
        raise ConfigError(
            f"format=gguf: the tokenizer normalizes text ({spec['normalizer'].get('type')}), which llama.cpp's "
            f"byte-level BPE does not; {FIX}"
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))

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
        else:
            key.append((step["type"],))
    name = _PRE_TOKENIZERS.get(tuple(key))
    if name is None:
        raise ConfigError(
            f"format=gguf: the tokenizer's pre-tokenizer {[k[0] for k in key] or None} is none llama.cpp "
            "names (GPT-2's byte-level split, SmolLM2's digits then byte-level); its text would split "
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
