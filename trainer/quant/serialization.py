"""Saving and loading models: float ones (an `hf/` export, a checkpoint, a GGUF file) and quantized ones.

A quantized model directory holds:

    config.json          the transformers config (the architecture to rebuild)
    quantization.json    the manifest: scheme, weights file, tied-weight aliases, the layers that are
                         int8 fbgemm modules, the torch/torchao versions it was made with
    model.safetensors    plain tensors (int8_smooth: int8 weights, scales, float norms; sparse24: the
                         2:4-pruned weights, dense), or
    model.pt             a state dict of torchao tensor subclasses (torch.save; loaded with
                         weights_only=True, torchao registers its classes as safe)
    tokenizer files

`load_quantized(DIR)` rebuilds the architecture from config.json, puts empty quantized modules where the
manifest says, and assigns the saved tensors: no arbitrary unpickling, no re-quantization. sparse24 is
the exception that proves it: torch's semi-structured tensors do not serialize, so their dense 2:4 weights
are saved and compressed again at load, which is lossless (the same values at the same positions).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from trainer.data.tokenizer import load_tokenizer
from trainer.errors import CorruptFileError, InputNotFoundError
from trainer.quant import smooth
from trainer.quant.ptq import check_scheme, conv1d_as_linear, sparsify_24
from trainer.utils import gguf_parsed_once, loading_from, require, staged

MANIFEST = "quantization.json"
FORMAT = "trainer-quantized"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".gguf")


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _strip_quantization_config(config: Any) -> None:
    """A GGUF-loaded config says `quantization_config: gguf`; the weights we hold are dequantized floats."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def save_quantized(
    out_dir: Path, model: PreTrainedModel, info: dict[str, Any], tokenizer: Any = None
) -> Path:
    """Write a quantized model (see the module docstring); written under a temporary name, then renamed (nothing is
    left of it when writing fails)."""
    out_dir = Path(out_dir)
    with staged(out_dir) as tmp:
        _write_quantized(tmp, out_dir, model, info, tokenizer)
    return out_dir


def _write_quantized(
    tmp: Path, out_dir: Path, model: PreTrainedModel, info: dict[str, Any], tokenizer: Any
) -> None:
    _strip_quantization_config(model.config)
    model.config.save_pretrained(str(tmp))
    # Tied weights (embedding and LM head) are one tensor under two names: store it once.
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in first_name:
            aliases[name] = first_name[id(value)]
            continue
        first_name[id(value)] = name
        value = value.detach()
        if info["scheme"] == "sparse24" and not _plain(value):
            value = value.to_dense()  # the 2:4 weights themselves; load_quantized compresses them again
        unique[name] = value
    if all(_plain(t) for t in unique.values()):
        from safetensors.torch import save_file

        weights = "model.safetensors"
        save_file(
            {k: v.contiguous() for k, v in unique.items()}, str(tmp / weights), metadata={"format": "pt"}
        )
    else:
        weights = "model.pt"
        torch.save(unique, tmp / weights)
    manifest = {
        "format": FORMAT,
        "version": 1,
        **info,
        "weights": weights,
        "aliases": aliases,
        "torch": torch.__version__,
        "torchao": _torchao_version(),
        "load": f"from trainer.quant import load_quantized; model = load_quantized('{out_dir}')",
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def _torchao_version() -> str | None:
    try:
        import importlib.metadata

        return importlib.metadata.version("torchao")
    except Exception:
        return None


def is_quantized_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{file}: not JSON ({e}); quantize the model again (trainer.quantize)") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptFileError(
            f"{file} is not a {FORMAT} manifest; quantize the model again (trainer.quantize)"
        )
    return manifest


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Rebuild a model saved by `save_quantized`, ready to run on `device`."""
    path = Path(path)
    manifest = read_manifest(path)
    with loading_from(str(path)):
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    conv1d_as_linear(model, manifest.get("conv1d_as_linear", []))  # GPT-2's, quantized as nn.Linear
    smooth.empty_int8_linears(model, manifest.get("int8_linears", []))
    weights = path / manifest["weights"]
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        with loading_from(str(weights)):
            state = load_file(str(weights))
    else:
        require("torchao.quantization", extra="quant", package="torchao")  # registers its safe classes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(weights, map_location=device, weights_only=True)
    for alias, name in manifest.get("aliases", {}).items():
        state[alias] = state[name]
    model.load_state_dict(state, strict=True, assign=True)
    for alias, name in manifest.get("aliases", {}).items():  # tied again: one tensor, as when saved
        parent, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(parent), attr, model.get_parameter(name))
    model.to(device)
    if manifest["scheme"] == "sparse24":
        check_scheme("sparse24", torch.device(device))  # CUDA only: says so before any kernel runs
        sparsify_24(model, manifest["keep_float"])
    return model.eval()


@contextlib.contextmanager
def float_source(path: str | Path) -> Iterator[tuple[str, str | None]]:
    """(directory, gguf file or None) from which transformers loads a float model and its tokenizer.

    `path` is an HF directory (an `hf/` export), a GGUF file, or a trainer checkpoint directory (exported
    to a temporary directory for the duration).
    """
    path = Path(path)
    gguf_file = gguf_in(path)
    if gguf_file is not None:
        require("gguf", extra="gguf")
        yield str(gguf_file.parent), gguf_file.name
    elif (path / "trainer_state.json").is_file():
        from trainer.checkpoint_model import export_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            export_checkpoint(path, Path(tmp) / "hf")
            yield str(Path(tmp) / "hf"), None
    elif (path / "config.json").is_file():
        yield str(path), None
    else:
        raise InputNotFoundError(
            f"{path}: not a model. Give an HF directory (a run's hf/ export, with config.json), a "
            "checkpoints/step_XXXXXXXX directory, a .gguf file (or a directory holding one), a "
            "compressed-tensors directory or a directory written by trainer.quantize"
        )


def gguf_in(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one .gguf file of a directory without config.json (what
    `trainer.export format=gguf` writes); None for anything else. A directory of several is refused."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise InputNotFoundError(
            f"{path} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); give one of them, "
            f"e.g. {found[0]}"
        )
    return found[0] if found else None


def compressed_tensors_scheme(path: Path) -> str | None:
    """`w8a16`, `w8a8`, `w4a16`... for a directory whose config.json has a compressed-tensors
    quantization_config (weight bits, activation bits or 16), else None."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return None
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        return "compressed-tensors"
    weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    return f"w{weights.get('num_bits', '?')}a{acts.get('num_bits', 16)}"


def load_compressed_tensors(directory: Path) -> PreTrainedModel:
    """A compressed-tensors directory through transformers with the compressed-tensors package, which
    decompresses the weights to float where it has no kernel (the CPU)."""
    require("compressed_tensors", extra="compressed-tensors", package="compressed-tensors")
    with loading_from(str(directory)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the quantization_config from the model will be used": what we want
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch.float32, trust_remote_code=False
        )
    return model.eval()


def load_float(
    directory: str, gguf_file: str | None = None, *, with_tokenizer: bool = True
) -> tuple[PreTrainedModel, Any]:
    """A float32 model and its tokenizer (None: `with_tokenizer=False`) from `float_source`'s answer."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    # A GGUF file's config, weights and tokenizer from one parse. A model's own code never runs here:
    # evaluate and quantize do not trust it.
    with gguf_parsed_once(gguf_file):
        with loading_from(directory):
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.float32, trust_remote_code=False, **kwargs
            )
        _strip_quantization_config(model.config)
        return model.eval(), load_tokenizer_from(directory, gguf_file) if with_tokenizer else None


def load_tokenizer_from(directory: str, gguf_file: str | None = None) -> Any:
    if gguf_file:
        from transformers import AutoTokenizer

        with loading_from(directory):
            tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=False)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    with loading_from(directory):
        return load_tokenizer(directory)


def load_tokenizer_of(path: str | Path) -> Any:
    """The tokenizer of any model path `load_any` accepts, without loading the weights (a checkpoint's from
    its own files, or its run's config)."""
    path = Path(path)
    if is_quantized_dir(path) or compressed_tensors_scheme(path):
        with loading_from(str(path)):
            return load_tokenizer(str(path))
    if gguf_in(path) is None and (path / "trainer_state.json").is_file():
        from trainer.checkpoint_model import describe_checkpoint

        return describe_checkpoint(path).tokenizer
    with float_source(path) as (directory, gguf_file):
        return load_tokenizer_from(directory, gguf_file)


def load_any(
    path: str | Path, *, device: str | torch.device = "cpu", with_tokenizer: bool = True
) -> tuple[PreTrainedModel, Any, int]:
    """(model, tokenizer, bytes of weights on disk) for any model path `evaluate` accepts; the tokenizer is
    None with `with_tokenizer=False` (a caller that has loaded it: a GGUF file's takes seconds to parse)."""
    path = Path(path)
    if is_quantized_dir(path):
        tokenizer = load_tokenizer(str(path)) if with_tokenizer else None
        return load_quantized(path, device=device), tokenizer, weights_size(path)
    if compressed_tensors_scheme(path):
        tokenizer = None
        if with_tokenizer:
            with loading_from(str(path)):
                tokenizer = load_tokenizer(str(path))
        return load_compressed_tensors(path).to(device), tokenizer, weights_size(path)
    with float_source(path) as (directory, gguf_file):
        model, tokenizer = load_float(directory, gguf_file, with_tokenizer=with_tokenizer)
        size = weights_size(Path(directory) / gguf_file if gguf_file else Path(directory))
    return model.to(device), tokenizer, size


def weights_size(path: Path) -> int:
    """Bytes of the weight files of a model directory (or of one weight file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
