"""Evaluate models side by side: `python -m trainer.evaluate 'models=[DIR,...]' output=FILE.json`.

For each model (dense, distilled, pruned or quantized; an hf/ export, a checkpoint, a trainer.quantize output,
what `trainer.export` wrote: a .gguf file or a directory holding one, a compressed-tensors directory; or an
adapter/ directory, merged into the base it names, its size the adapter's and the base's) one
JSON entry with:

- `perplexity`: exp of the mean next-token cross-entropy over the eval split of the configured data
  group (the same windows training evaluates on), tokenized with the first model's tokenizer;
- `params` (parameters of the stored model, a tied embedding counted once) and `nonzero_params`;
- `size_bytes`: the weight files on disk (an export's as written: the .gguf file, the compressed safetensors);
- `scheme`: `float`, the trainer.quantize scheme, `gguf TYPE` or `compressed-tensors SCHEME`; `runtime`, for
  an export, what computed its numbers (transformers' GGUF loader, which dequantizes to float32; transformers
  with the compressed-tensors package, which decompresses on the CPU), None for our own models;
- `prefill_ms`: median time of one forward over `latency.batch_size` x `latency.prefill_len` tokens;
- `decode_tokens_per_s`: tokens generated per second, one at a time with the KV cache, after a prefill
  (with `latency.interleave=true` both are timed after every perplexity, each round timing every model
  once, so that a slow spell of the machine does not land on one model);
- `dtype`: the dtype its float parts run in (float models: `float_dtype`; quantized ones: their manifest's);
- `settings`: what the numbers depend on besides the model (eval data, batch sizes, latency, device);
- with `tasks=[...]`, `tasks`: each lm-evaluation-harness task's metrics and their standard errors (acc,
  acc_stderr, acc_norm, ...), its example count, version and config hash; and `lm_eval`: its version, few-shot,
  limit and seed (trainer/downstream.py: the model object goes to lm-eval's HF wrapper).

`name` is the model directory's name or the one `names` gives. The output is rewritten after each
model; with `resume=true` an existing output's entries with the same path, name and settings are kept
instead of measured again. With `latency.interleave=true` each entry is written once its perplexity (and
tasks) are measured, marked `latency_pending: true` until the timing at the end: resumed, such an entry is
only timed.
"""

from __future__ import annotations

import inspect
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainer.calibration import model_inputs
from trainer.cli import run
from trainer.data import IGNORE_INDEX, TokenWindows, build_data
from trainer.downstream import accuracy_line, check_tasks, evaluate_tasks
from trainer.errors import ConfigError, InputNotFoundError
from trainer.evaluate_config import register_evaluate_configs
from trainer.quant.serialization import (
    compressed_tensors_scheme,
    gguf_in,
    is_quantized_dir,
    load_any,
    load_tokenizer_of,
    read_manifest,
    weights_size,
)
from trainer.quant.smooth import Int8DynamicLinear
from trainer.utils import (
    check_output_file,
    dtype_name,
    register_package_resolver,
    require,
    resolve_device,
    resolve_dtype,
    write_json_atomic,
)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_evaluate_configs()  # its own schemas only: evaluating imports nothing of training's
register_package_resolver()


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: TokenWindows, *, batch_size: int, max_batches: int = 0
) -> tuple[float, float, int]:
    """(perplexity, mean token loss, target tokens) over the first max_batches batches (0: all)."""
    device = next(model.parameters()).device
    n = len(windows) if max_batches <= 0 else min(len(windows), max_batches * batch_size)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for start in range(0, n, batch_size):
        batch = windows.batch(torch.arange(start, min(start + batch_size, n)))
        labels = batch.labels
        # A chat dataset's packed conversations: positions restart at each one, and attention keeps to it.
        logits = model(**model_inputs(batch, device)).logits.float().cpu()
        total += F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).double()
        count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        raise ConfigError("the eval split has no target token; lower data.seq_len or add eval data")
    loss = float(total) / count
    return math.exp(min(loss, 50.0)), loss, count


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) as stored: quantized weights counted by their logical shape."""
    seen: set[int] = set()
    params = nonzero = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False))
        if isinstance(module, Int8DynamicLinear):
            tensors = [module.qweight] + ([module.bias] if module.bias is not None else [])
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            dense = t if type(t) in (torch.Tensor, nn.Parameter) else _stored_values(t)
            params += t.numel()
            nonzero += int(torch.count_nonzero(dense.detach()))
    return params, nonzero


def _stored_values(t: torch.Tensor) -> torch.Tensor:
    """A quantized or sparse tensor (torchao's, torch's 2:4) as the dense values it stands for. A linear weight
    whose format implements only the matmul (torchao's int4 tile-packed tensor has no dequantize) goes through
    the identity: linear(I, W) is W transposed, with the same non-zeros."""
    try:
        return t.dequantize() if hasattr(t, "dequantize") else t.to_dense()
    except NotImplementedError:
        if t.dim() != 2:
            raise
        return torch.nn.functional.linear(torch.eye(t.shape[1], dtype=t.dtype, device=t.device), t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(model: nn.Module, batch_size: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return torch.randint(3, vocab, (batch_size, length), generator=generator)


@torch.no_grad()
def prefill_ms(
    model: nn.Module, *, batch_size: int, length: int, warmup: int, repeats: int, statistic: str = "median"
) -> float:
    """Milliseconds of one forward over batch_size x length tokens: the median or the best of the repeats."""
    device = next(model.parameters()).device
    ids = _prompt(model, batch_size, length).to(device)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * (min(times) if statistic == "best" else statistics.median(times))


@torch.no_grad()
def decode_tokens_per_s(
    model: nn.Module,
    *,
    batch_size: int,
    prompt_len: int,
    new_tokens: int,
    warmup: int,
    repeats: int,
    statistic: str = "median",
) -> float:
    """Greedy decoding with the KV cache: generated tokens (batch x new) per second, prefill excluded; the
    median or the best of the repeats."""
    device = next(model.parameters()).device
    ids = _prompt(model, batch_size, prompt_len).to(device)
    # transformers >= 5.2x calls the KV cache `cache`; earlier versions `past_key_values`.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rates = []
    for i in range(warmup + repeats):
        out = model(input_ids=ids, use_cache=True)
        past, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{key: past})
            past, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= warmup:
            rates.append(batch_size * new_tokens / (time.perf_counter() - start))
    return max(rates) if statistic == "best" else statistics.median(rates)


def latency(model: nn.Module, lat: Any) -> dict[str, float]:
    """Prefill milliseconds and decode tokens/s of one model, its repeats run back to back."""
    run = dict(batch_size=lat.batch_size, warmup=lat.warmup, repeats=lat.repeats, statistic=lat.statistic)
    return {
        "prefill_ms": prefill_ms(model, length=lat.prefill_len, **run),
        "decode_tokens_per_s": decode_tokens_per_s(
            model, prompt_len=lat.prefill_len, new_tokens=lat.decode_tokens, **run
        ),
    }


def interleaved_latency(models: list[nn.Module], lat: Any) -> list[dict[str, float]]:
    """`latency` of each model, measured in rounds that time every model once (prefill, then decode), in
    alternating order; the warmup rounds are not timed. Drift in the machine's speed (other tenants, heat)
    then lands on all models rather than on whichever was being measured."""
    one = dict(batch_size=lat.batch_size, warmup=0, repeats=1)
    prefill: list[list[float]] = [[] for _ in models]
    decode: list[list[float]] = [[] for _ in models]
    for r in range(lat.warmup + lat.repeats):
        order = list(range(len(models)))
        for i in order if r % 2 == 0 else order[::-1]:
            p = prefill_ms(models[i], length=lat.prefill_len, **one)
            d = decode_tokens_per_s(
                models[i], prompt_len=lat.prefill_len, new_tokens=lat.decode_tokens, **one
            )
            if r >= lat.warmup:
                prefill[i].append(p)
                decode[i].append(d)
    best = lat.statistic == "best"
    return [
        {
            "prefill_ms": min(p) if best else statistics.median(p),
            "decode_tokens_per_s": max(d) if best else statistics.median(d),
        }
        for p, d in zip(prefill, decode, strict=True)
    ]


def model_name(path: str) -> str:
    """A short label: the directory name, with its parent's for the generic ones (hf, quantized)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name in ("hf", "quantized") and p.parent.name else p.name


def check_evaluate_config(cfg: Any) -> torch.device:
    check_output_file("output", cfg.output)  # before any model is measured: the results must have a place
    if not cfg.models:
        raise ConfigError("models=[] is empty: give one or more model paths, e.g. 'models=[outputs/run/hf]'")
    if cfg.names is not None:
        if len(cfg.names) != len(cfg.models):
            raise ConfigError(
                f"names has {len(cfg.names)} entries for {len(cfg.models)} models: give one name per model, "
                "in models order, or names=null for the directory names"
            )
        twice = sorted({n for n in cfg.names if list(cfg.names).count(n) > 1})
        if twice:
            raise ConfigError(f"names: {', '.join(twice)} given twice; each entry needs its own name")
    missing = [m for m in cfg.models if not Path(m).exists()]
    if missing:
        raise InputNotFoundError(
            f"models: {', '.join(missing)}: no such file or directory; give model paths (a run's hf/ export, "
            "a checkpoint, a trainer.quantize output, a .gguf file or a directory holding one, or a "
            "compressed-tensors export)"
        )
    from trainer.model_paths import ADAPTER_CONFIG, base_of  # the peft format's adapter/ directories

    for m in cfg.models:  # before any model is measured: a bad path is not found only after the others
        p = Path(m)
        model_files = ("config.json", "trainer_state.json", ADAPTER_CONFIG)
        if gguf_in(p) is None and not any((p / f).is_file() for f in model_files):
            raise InputNotFoundError(
                f"models: {m}: not a model (no config.json, no checkpoint, no .gguf file, no adapter); give a "
                "run's hf/ or adapter/ export, a checkpoint, a trainer.quantize output, a .gguf file or a "
                "directory holding one, or a compressed-tensors export"
            )
        if (p / ADAPTER_CONFIG).is_file():
            base_of(p, None)  # the base it names exists and is a float model
    lat = cfg.latency
    for key in ("batch_size", "prefill_len", "decode_tokens", "repeats"):
        if getattr(lat, key) < 1:
            raise ConfigError(f"latency.{key}={getattr(lat, key)}: must be >= 1")
    if lat.warmup < 0 or cfg.batch_size < 1 or cfg.eval_batches < 0:
        raise ConfigError("latency.warmup and eval_batches must be >= 0, batch_size >= 1")
    return resolve_device(cfg.device, key="device")


# Data keys that do not change the eval tokens: the tokenizer is always the first model's.
_NON_TOKEN_DATA_KEYS = ("tokenizer", "tokenizer_vocab_size", "cache_dir", "num_proc")


def eval_settings(cfg: Any, device: torch.device) -> dict[str, Any]:
    """What an entry's numbers depend on besides the model: two entries compare only if these agree."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    settings = {
        "data": {k: v for k, v in sorted(data.items()) if k not in _NON_TOKEN_DATA_KEYS},
        "tokenizer_from": str(cfg.models[0]),
        "batch_size": cfg.batch_size,
        "eval_batches": cfg.eval_batches,
        "latency": OmegaConf.to_container(cfg.latency, resolve=True),
        "device": device.type,
        "float_dtype": cfg.float_dtype,
        "threads": torch.get_num_threads(),
    }
    if cfg.tasks:
        settings["tasks"] = list(cfg.tasks)
        settings["lm_eval"] = OmegaConf.to_container(cfg.lm_eval, resolve=True)
    return json.loads(json.dumps(settings))  # as read back from the JSON, so that == compares like with like


def previous_entries(output: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads(output.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"resume=true: {output} is not JSON ({err}); delete it or run with resume=false"
        ) from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"resume=true: {output} is not the JSON list trainer.evaluate writes")
    return entries


def gguf_type(file: Path) -> str:
    """The type a GGUF file's matrices were written in (its general.file_type: f32, f16, q8_0, ...)."""
    gguf = require("gguf", extra="gguf")
    field = gguf.GGUFReader(file).fields.get("general.file_type")
    if field is None:
        return "?"
    return gguf.LlamaFileType(int(field.contents())).name.split("_", 1)[1].lower()


def load_adapted(adapter: Path, *, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any, int]:
    """(an adapter/ directory merged into the base its config names, the tokenizer, bytes on disk of the
    adapter and its base): what serving the adapter on its base loads."""
    from trainer.model_paths import base_of, load_adapter

    base = base_of(adapter, None)
    model = load_adapter(adapter, base=None, device=device, dtype=dtype)
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer_of(adapter if has_tokenizer else base)
    return model, tokenizer, weights_size(adapter) + weights_size(base)


def describe_model(path: str) -> tuple[str, str | None]:
    """(scheme, runtime) of a model path: `float`, a trainer.quantize scheme, `gguf TYPE` or
    `compressed-tensors SCHEME`; the runtime says what computes the numbers of an export (None: our own)."""
    from trainer.model_paths import ADAPTER_CONFIG

    p = Path(path)
    if (p / ADAPTER_CONFIG).is_file():
        adapter = json.loads((p / ADAPTER_CONFIG).read_text())
        kind = "dora" if adapter.get("use_dora") else str(adapter.get("peft_type", "lora")).lower()
        return f"{kind} adapter", f"merged by peft into its base {adapter.get('base_model_name_or_path')}"
    if is_quantized_dir(p):
        return read_manifest(p)["scheme"], None
    ct = compressed_tensors_scheme(p)
    if ct:
        return (
            f"compressed-tensors {ct}",
            "transformers + compressed-tensors (weights decompressed to float32)",
        )
    file = gguf_in(p)
    if file is not None:
        return f"gguf {gguf_type(file)}", "dequantized to float32 by transformers' GGUF loader"
    return "float", None


def evaluate_models(cfg: Any) -> list[dict[str, Any]]:
    """Measure each model and write `cfg.output` after each one; with `cfg.resume`, keep what matches."""
    device = check_evaluate_config(cfg)
    # the tasks are checked before any model loads: an unknown one is not found after an hour of perplexities
    tasks = check_tasks(list(cfg.tasks), cfg.lm_eval) if cfg.tasks else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    output = Path(cfg.output)
    settings = eval_settings(cfg, device)
    names = list(cfg.names) if cfg.names is not None else [model_name(p) for p in cfg.models]
    keys = [(str(path), name) for path, name in zip(cfg.models, names, strict=True)]
    kept: dict[tuple[str, str], dict[str, Any]] = {}
    untimed: dict[tuple[str, str], dict[str, Any]] = {}  # measured but for the interleaved latency
    if cfg.resume and output.exists():
        for e in previous_entries(output):
            key = (e.get("path"), e.get("name"))
            if key in keys and e.get("settings") == settings:
                (untimed if e.get("latency_pending") else kept)[key] = e
    done: dict[tuple[str, str], dict[str, Any]] = kept | untimed

    def write() -> None:  # models order; entries of models no longer listed are dropped
        write_json_atomic(output, [done[k] for k in keys if k in done])

    lat = cfg.latency
    held: list[tuple[tuple[str, str], dict[str, Any], nn.Module]] = []  # waiting for interleaved timing

    def finish(key: tuple[str, str], entry: dict[str, Any]) -> None:
        entry.pop("latency_pending", None)
        entry["settings"] = settings
        done[key] = entry
        write()  # an interruption loses at most the model in progress (held ones keep all but their timing)
        print(
            f"{entry['name']}: ppl {entry['perplexity']:.3f}, {entry['params'] / 1e6:.2f}M params "
            f"({entry['nonzero_params'] / max(entry['params'], 1):.1%} non-zero), {entry['size_bytes'] / 1e6:.2f} MB, "
            f"prefill {entry['prefill_ms']:.1f} ms, decode {entry['decode_tokens_per_s']:.1f} tok/s"
            + (f"; {accuracy_line(entry['tasks'])}" if "tasks" in entry else ""),
            flush=True,
        )

    data = None
    with tempfile.TemporaryDirectory() as tmp:
        for path, name in keys:
            if (path, name) in kept:
                print(f"{name}: kept from previous run ({output})", flush=True)
                continue
            scheme, runtime = describe_model(path)
            where = torch.device("cpu") if scheme == "int8_smooth" else device  # fbgemm kernels
            if scheme.endswith(" adapter"):
                model, tokenizer, size = load_adapted(
                    Path(path), device=where, dtype=resolve_dtype(cfg.float_dtype)
                )
            else:
                model, tokenizer, size = load_any(path, device=where)
            if scheme == "float" or scheme.startswith("gguf"):  # a GGUF file loads dequantized
                model.to(resolve_dtype(cfg.float_dtype))
            if data is None:  # the first model's tokenizer tokenizes the eval data for all
                first = tokenizer if path == str(cfg.models[0]) else load_tokenizer_of(cfg.models[0])
                first.save_pretrained(str(Path(tmp) / "tokenizer_src"))  # (the first model's entry was kept)
                data_cfg = cfg.data.copy()
                data_cfg.tokenizer = str(Path(tmp) / "tokenizer_src")
                data = build_data(data_cfg, run_dir=Path(tmp))
                vocab = len(data.tokenizer)
            if (path, name) in untimed:  # measured before an interruption: only its latency is missing
                print(f"{name}: ppl kept from previous run ({output}); timed with the others", flush=True)
                held.append(((path, name), untimed[(path, name)], model))
                continue
            if model.get_input_embeddings().num_embeddings < vocab:
                raise ConfigError(
                    f"{path} has {model.get_input_embeddings().num_embeddings} embeddings but the eval tokenizer "
                    f"(from {cfg.models[0]}) has {vocab} tokens: models compared on one perplexity must share a tokenizer"
                )
            ppl, loss, tokens = perplexity(
                model, data.eval, batch_size=cfg.batch_size, max_batches=cfg.eval_batches
            )
            params, nonzero = parameter_counts(model)
            entry = {
                "name": name,
                "path": path,
                "scheme": scheme,
                "runtime": runtime,
                "perplexity": ppl,
                "eval_loss": loss,
                "eval_tokens": tokens,
                "params": params,
                "nonzero_params": nonzero,
                "size_bytes": size,
                "dtype": dtype_name(model),
                "prefill_ms": None,
                "decode_tokens_per_s": None,
                "latency_batch_size": lat.batch_size,
                "prefill_len": lat.prefill_len,
                "decode_tokens": lat.decode_tokens,
                "latency_statistic": lat.statistic,
                "latency_interleaved": lat.interleave,
                "device": where.type,
                "threads": torch.get_num_threads(),
            }
            if data.entropy_floor is not None:
                entry["entropy_floor"] = data.entropy_floor
            if tasks is not None:
                entry.update(
                    evaluate_tasks(model, tokenizer, cfg.tasks, cfg.lm_eval, tasks)
                )  # its own tokenizer
            if lat.interleave:
                print(f"{name}: ppl {ppl:.3f}; timed with the others once all are loaded", flush=True)
                # written now, so that an interruption before the timing keeps it: resume=true times only it
                done[(path, name)] = entry | {"settings": settings, "latency_pending": True}
                write()
                held.append(((path, name), entry, model))
                continue
            entry.update(latency(model, lat))
            finish((path, name), entry)
            del model
        if held:
            timings = interleaved_latency([model for _, _, model in held], lat)
            for (key, entry, _), timing in zip(held, timings, strict=True):
                entry.update(timing)
                finish(key, entry)
            held.clear()
    write()  # also when every entry was kept: the unlisted ones are dropped
    return [done[k] for k in keys]


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate_models(cfg)
    print(f"wrote {cfg.output}")


if __name__ == "__main__":
    run(main)
