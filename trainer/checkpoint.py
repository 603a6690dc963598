"""Checkpoints that survive a crash mid-save, and the final HF export.

Layout under the run directory:

    checkpoints/step_00000100/   shards/rank_XXXXX.safetensors (model + optimizer, the flat ranges each
                                 rank holds: see shards.py), trainer_state.json (step, data position, ...),
                                 rng/rank_XXXXX.pt, and what the model is: config.json (transformers' config
                                 of the model trained, after a distillation student was cut or structured
                                 pruning shrank it) beside the tokenizer's files (tokenizer.json, ...)
    checkpoints/latest           text file naming the newest complete checkpoint directory

A checkpoint is written under a temporary name and renamed when every rank has finished, then `latest`
is replaced atomically: a crash or kill at any moment leaves the previous checkpoint and pointer intact.
The tensor format does not depend on the strategy or world size, so any checkpoint resumes under any
strategy on any number of ranks, and config.json + tokenizer let `trainer.export` rebuild the model from
the checkpoint alone. Loading never unpickles arbitrary objects: safetensors for tensors, JSON for the
loop state and the model description, and `torch.load(weights_only=True)` for RNG states.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from trainer.distributed import ParallelEnv, barrier
from trainer.shards import load_slices, write_shards
from trainer.utils import fsync_dir, write_atomic, write_json_atomic

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
LATEST = "latest"  # the pointer file naming the newest complete checkpoint
# transformers' name: AutoConfig.from_pretrained and AutoTokenizer.from_pretrained read a step directory.
CONFIG_FILE = "config.json"
# Keys of the trained module that are not the HF model's (a distillation run's learned projections): kept in
# checkpoints to resume, left out of every export.
WRAPPER_ONLY_PREFIX = "distill_projections."


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def describes_model(path: Path) -> bool:
    """Whether checkpoint `path` holds its model's config and tokenizer (those written before they did do not)."""
    return (Path(path) / CONFIG_FILE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (a temporary or half-written one is never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(
    root: Path,
    *,
    strategy: Any,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    env: ParallelEnv,
    hf_config: PretrainedConfig,
    tokenizer: Any,
    keep_last: int = 0,
    extra_slices: list | None = None,
) -> Path:
    """Save model, optimizer, loop state and RNG; every rank calls this and writes its own shard file.

    `hf_config` and `tokenizer` describe the model (the HF model's own config, as shrunk or cut by then):
    rank 0 writes them before the rename, so a complete checkpoint is never without them.
    """
    step = int(trainer_state["step"])
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        tmp.mkdir()
        # What the model is, so that loading it needs neither the run's config nor distill or prune code.
        config = copy.deepcopy(hf_config)
        config.use_cache = True  # off while training (the loop's choice), not a property of the model
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    barrier()
    # extra_slices: more flat-shard tensors to keep with the model (pruning masks).
    slices = strategy.save_slices(module, optimizer) + list(extra_slices or [])
    write_shards(tmp / "shards", slices, rank=env.rank)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{env.rank:05d}.pt")
    barrier()
    if env.is_main:
        state = {**trainer_state, "world_size": env.world_size}
        write_json_atomic(tmp / STATE_FILE, state)
        if final.exists():  # saving the same step again (e.g. a resumed run that ends where it started)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        write_atomic(root / LATEST, final.name + "\n")
        if keep_last > 0:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def find_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint that `path` names: a step directory, the `latest` pointer file, or a run
    directory (its newest complete checkpoint). None when it names none of ours (e.g. a HF model directory)."""
    path = Path(path)
    if path.is_file():  # only the `latest` pointer names a checkpoint
        return None if path.name != LATEST else find_checkpoint(path.parent / path.read_text().strip())
    if (path / STATE_FILE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        return resolve_resume("auto", path / "checkpoints")
    return None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint to resume from: None for a fresh start, a directory otherwise."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        pointer = root / LATEST
        if pointer.is_file():
            named = root / pointer.read_text().strip()
            if (named / STATE_FILE).is_file():
                return named
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(resume)
    if path.is_file() and path.name != LATEST:
        raise FileNotFoundError(f"resume={resume}: a file, but not a checkpoints/{LATEST} pointer")
    if path.is_file():
        path = path.parent / path.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume={resume}: not a complete checkpoint (no {STATE_FILE}); give a checkpoints/step_XXXXXXXX "
            "directory, `auto`, or `none`"
        )
    return path


def load_checkpoint(
    path: Path, *, strategy: Any, module: nn.Module, optimizer: torch.optim.Optimizer, env: ParallelEnv
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG in place; returns the saved loop state."""
    load_slices(path / "shards", strategy.load_slices(module, optimizer))
    rng_file = path / "rng" / f"rank_{env.rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())


def export_hf(
    out_dir: Path,
    *,
    state_dict: dict[str, torch.Tensor],
    hf_model: nn.Module,
    tokenizer: Any,
    env: ParallelEnv,
) -> None:
    """A `save_pretrained` export (safetensors + config + tokenizer) of whole weights held by rank 0.

    Written under a temporary name, then renamed, so a half-written export is never taken for a complete one.
    """
    if env.is_main:
        # Only the HF model's own weights: a distillation wrapper's projections are not part of it.
        own = set(hf_model.state_dict())
        state_dict = {k: v for k, v in state_dict.items() if k in own}
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    barrier()
