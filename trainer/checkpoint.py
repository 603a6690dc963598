"""Checkpoints that survive a crash mid-save, and the final HF export.

Layout under the run directory:

    checkpoints/step_00000100/   shards/rank_XXXXX.safetensors (model + optimizer, the flat ranges each
                                 rank holds: see shards.py), trainer_state.json (step, data position, ...),
                                 rng/rank_XXXXX.pt, and what the model is: config.json (transformers' config
                                 of the model trained, after a distillation student was cut or structured
                                 pruning shrank it) beside the tokenizer's files (tokenizer.json, ...), and
                                 manifest.json: the size and checksum of every other file
    checkpoints/latest           text file naming the newest complete checkpoint directory

A checkpoint is written under a temporary name and renamed when every rank has finished, then `latest`
is replaced atomically: a crash or kill at any moment leaves the previous checkpoint and pointer intact.
Each rank checksums the files it wrote and rank 0 gathers them into manifest.json before the rename, so a
complete checkpoint always has one; choosing a checkpoint to resume from verifies it (`resolve_resume`:
resume=auto passes over a damaged one, naming the file and why, to the newest intact one). Old checkpoints
are removed by renaming them first (`.step_XXXXXXXX.deleting`), and whatever a kill left behind (those, a
`.step_XXXXXXXX.tmp`) is removed at the next save.

The tensor format does not depend on the strategy or world size, so any checkpoint resumes under any
strategy on any number of ranks, and config.json + tokenizer let `trainer.export` rebuild the model from
the checkpoint alone. Loading never unpickles arbitrary objects: safetensors for tensors, JSON for the
loop state and the model description, and `torch.load(weights_only=True)` for RNG states.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch import nn
from transformers import PretrainedConfig

from trainer.distributed import ParallelEnv, barrier
from trainer.errors import CheckpointError, ConfigError, InputNotFoundError
from trainer.shards import load_slices, shard_file, shown, write_shards
from trainer.utils import fsync_dir, staged, write_atomic, write_json_atomic

STEP_DIR = re.compile(r"^step_(\d{8})$")
# What a kill leaves behind: a save's temporary directory, an old checkpoint renamed for deletion.
LEFTOVER_DIR = re.compile(r"^\.step_\d{8}\.(tmp|deleting)$")
STATE_FILE = "trainer_state.json"
# Size and checksum of every file of the checkpoint, written last; trainer_state.json names it, so that a
# checkpoint that lost it is told from one written before checkpoints held one.
MANIFEST_FILE = "manifest.json"
# xxh3 (xxhash comes with `datasets`): 2.5 GB/s on one core against sha256's 0.76 GB/s (a 1 GB file on an
# AMD EPYC; reading it from the page cache alone took 0.31 s). It detects damage, not tampering.
DIGESTS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
DIGEST = "xxh3_128"
# Flat-shard keys that no strategy reads because an extension reads them itself: pruning's masks.
READ_ELSEWHERE = ("mask/",)
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
    with _disk_full_explained(root, tmp, step):
        return _write_checkpoint(
            root,
            final,
            tmp,
            strategy,
            module,
            optimizer,
            trainer_state,
            env,
            hf_config,
            tokenizer,
            keep_last,
            extra_slices,
        )


@contextlib.contextmanager
def _disk_full_explained(root: Path, tmp: Path, step: int) -> Iterator[None]:
    """A disk that fills during a save: the partial save is removed (freeing what it took) and the error names
    the file and the checkpoint that is still there, since the save is atomic and `latest` was not moved."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        latest = root / LATEST
        previous = latest.read_text().strip() if latest.is_file() else None
        intact = (
            f"the previous checkpoint, {root / previous}, is intact ({latest} still names it): resume=auto "
            "continues from it"
            if previous
            else "no earlier checkpoint of this run exists"
        )
        raise CheckpointError(
            f"{e.filename or tmp}: the disk is full ({e.strerror}) while saving the checkpoint of step {step}; "
            f"nothing of that save is kept, and {intact}; free space on the disk of {root} (or keep fewer "
            "checkpoints with checkpoint.keep_last, or give hydra.run.dir on a larger disk) and run again"
        ) from e


def _write_checkpoint(
    root: Path,
    final: Path,
    tmp: Path,
    strategy: Any,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    env: ParallelEnv,
    hf_config: PretrainedConfig,
    tokenizer: Any,
    keep_last: int,
    extra_slices: list | None,
) -> Path:
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)  # of a save or a deletion that a kill interrupted
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
    rng_file = tmp / "rng" / f"rank_{env.rank:05d}.pt"
    torch.save(rng_state(), rng_file)
    # Each rank checksums its own files (still in its page cache); gathering them is the barrier.
    written = [shard_file(tmp / "shards", env.rank), rng_file]
    parts = gather_objects(describe_files(tmp, [str(f.relative_to(tmp)) for f in written]))
    if env.is_main:
        state = {**trainer_state, "world_size": env.world_size, "manifest": MANIFEST_FILE}
        write_json_atomic(tmp / STATE_FILE, state)
        files = {name: entry for part in parts for name, entry in part.items()}
        files |= describe_files(tmp, [n for n in _relative_files(tmp) if n not in files])  # rank 0's own
        write_json_atomic(tmp / MANIFEST_FILE, {"digest": DIGEST, "files": files})
        if final.exists():  # saving the same step again (e.g. a resumed run that ends where it started)
            _remove(final)
        os.rename(tmp, final)
        fsync_dir(root)
        write_atomic(root / LATEST, final.name + "\n")
        if keep_last > 0:
            # Those before this step: checkpoints after it (of a run resumed from an older one) are not
            # counted, so the one just written is never the one removed.
            older = [p for p in complete_checkpoints(root) if p.name < final.name]
            for old in older[: max(0, len(older) - (keep_last - 1))]:
                _remove(old)
    barrier()
    return final


def _remove(path: Path) -> None:
    """Rename, then delete: a kill half-way leaves a `.deleting` directory, never a half-deleted checkpoint."""
    doomed = path.with_name(f".{path.name}.deleting")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(root: Path) -> None:
    """Remove what a kill during a save or a deletion left: `.step_*.tmp` and `.step_*.deleting` directories,
    and step directories without trainer_state.json (half-deleted before deletions renamed first)."""
    for path in root.iterdir():
        half_deleted = STEP_DIR.match(path.name) and path.is_dir() and not (path / STATE_FILE).exists()
        if LEFTOVER_DIR.match(path.name) or half_deleted:
            shutil.rmtree(path, ignore_errors=True)


# ---- verification -----------------------------------------------------------------------------------


def file_digest(path: Path, digest: str = DIGEST) -> str:
    """The checksum of a file, read in 16 MiB blocks (any size, constant memory)."""
    h = DIGESTS[digest]()
    buffer = bytearray(1 << 24)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Manifest entries (size, checksum) of files given relative to `directory`."""
    return {
        name: {"bytes": (directory / name).stat().st_size, "checksum": file_digest(directory / name)}
        for name in names
    }


def _relative_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def gather_objects(value: Any) -> list[Any]:
    """`value` from every rank, in rank order ([value] without a process group); a barrier too.

    Over gloo: a NCCL group would need each rank's CUDA device set, and these are a few kilobytes.
    """
    if not dist.is_initialized():
        return [value]
    group = None
    if dist.get_backend() != "gloo":
        world = dist.group.WORLD
        if world not in _GLOO_GROUPS:
            _GLOO_GROUPS[world] = dist.new_group(backend="gloo")
        group = _GLOO_GROUPS[world]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=group)
    return out


_GLOO_GROUPS: dict[Any, Any] = {}


def checkpoint_problems(path: Path, *, rank: int = 0, world_size: int = 1) -> list[str] | None:
    """What is wrong with checkpoint `path`, one line per file at fault naming it and why ([] when intact);
    None for a checkpoint written before checkpoints held a manifest (nothing to verify against).

    The files are checksummed by rank `rank` of `world_size`, each taking every world_size-th file.
    """
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except FileNotFoundError:
            return [f"{path / STATE_FILE}: missing"]
        except ValueError as e:
            return [f"{path / STATE_FILE}: not valid JSON ({e})"]
        if isinstance(state, dict) and "manifest" not in state:
            return None
        return [f"{manifest_file}: missing, though {STATE_FILE} says it was written"]
    try:
        manifest = json.loads(manifest_file.read_text())
        digest, files = manifest["digest"], manifest["files"]
        entries = {name: (int(e["bytes"]), str(e["checksum"])) for name, e in files.items()}
        if digest not in DIGESTS:
            raise ValueError(f"unknown checksum {digest}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{manifest_file}: damaged ({type(e).__name__}: {e})"]
    problems = []
    for name in sorted(entries)[rank::world_size]:
        file, (size, checksum) = path / name, entries[name]
        if not file.is_file():
            problems.append(f"{file}: missing (the manifest lists it)")
        elif (actual := file.stat().st_size) != size:
            problems.append(f"{file}: {actual} bytes where {size} were written (truncated or overwritten)")
        elif file_digest(file, digest) != checksum:
            problems.append(
                f"{file}: its {digest} checksum differs from the one recorded at save (the bytes changed)"
            )
    if rank == 0:  # files the readers would take up although the save did not write them
        for sub in ("shards", "rng"):
            for file in sorted((path / sub).glob("*")):
                if f"{sub}/{file.name}" not in entries:
                    problems.append(f"{file}: not in the manifest (added after the save)")
    return problems


def verify_checkpoint(path: Path) -> list[str] | None:
    """`checkpoint_problems` with the checksumming split over the ranks; every rank gets the same answer."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    parts = gather_objects(checkpoint_problems(path, rank=rank, world_size=world_size))
    if any(p is None for p in parts):
        return None
    return sorted({line for p in parts for line in p})


_SAID: set[str] = set()


def say(message: str, *, once: bool = False) -> None:
    """Print on rank 0 (`once`: once per process)."""
    if once and message in _SAID:
        return
    _SAID.add(message)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def unverified_note(path: Path) -> str:
    return f"{path} has no {MANIFEST_FILE} (written before checkpoints held checksums): loading it unverified"


def find_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint that `path` names: a step directory, the `latest` pointer file, or a run
    directory (its newest complete checkpoint). None when it names none of ours (e.g. a HF model directory).
    Not verified here: loading it does that (`trainer.checkpoint_model.load_checkpoint_model`)."""
    path = Path(path)
    if path.is_file():  # only the `latest` pointer names a checkpoint
        return None if path.name != LATEST else find_checkpoint(path.parent / path.read_text().strip())
    if (path / STATE_FILE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = _newest_first(path / "checkpoints")
        return found[0] if found else None
    return None


def _newest_first(root: Path) -> list[Path]:
    """Complete checkpoints, the one `latest` names first, then the others newest first."""
    done = complete_checkpoints(root)[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in done:
            done = [named] + [p for p in done if p != named]
    return done


def refuse_unasked_overwrite(root: Path) -> None:
    """resume=null: a run directory whose `root` holds checkpoints is refused (training from step 0 would
    overwrite them)."""
    found = complete_checkpoints(root)
    if found:
        raise ConfigError(
            f"{root.parent} already holds checkpoints ({len(found)}, the newest {found[-1].name}) and resume is "
            "not set: training from step 0 would overwrite them. Continue that run with resume=auto, start "
            "over with resume=none (steps saved again overwrite the old ones), or give another run directory "
            "(hydra.run.dir=DIR)"
        )


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """The checkpoint to resume from, verified: None for a fresh start, a directory otherwise.

    resume=null (not given) starts fresh, and refuses a run directory whose `root` holds checkpoints: training
    from step 0 would overwrite them. resume=none starts fresh anyway, said explicitly. resume=auto takes the
    newest intact checkpoint, saying which file of each newer one failed and why; resume=PATH to a damaged
    checkpoint raises CheckpointError naming the file. Every rank calls this (the checksumming is split over
    them) and gets the same answer.
    """
    if resume is None:
        refuse_unasked_overwrite(root)
        return None
    if resume in ("none", ""):
        return None
    if resume == "auto":
        skipped = []
        for path in _newest_first(root):
            problems = verify_checkpoint(path)
            if problems:
                say(f"resume=auto: {path.name} is damaged, passing over it: " + "; ".join(problems))
                skipped.append(path.name)
                continue
            if problems is None:
                say(unverified_note(path), once=True)
            if skipped:
                say(
                    f"resume=auto: resuming from {path}, the newest intact checkpoint (not {', '.join(skipped)})"
                )
            return path
        if skipped:
            raise CheckpointError(
                f"resume=auto: every checkpoint in {root} is damaged ({', '.join(skipped)}, see above); "
                "start afresh with resume=none (steps saved again overwrite them), or move them away"
            )
        return None
    path = Path(resume)
    if path.is_file() and path.name != LATEST:
        raise InputNotFoundError(
            f"resume={resume}: a file, but not a checkpoints/{LATEST} pointer; give a checkpoints/step_XXXXXXXX "
            "directory, `auto`, or `none`"
        )
    if path.is_file():
        path = path.parent / path.read_text().strip()
    if not path.exists():
        raise InputNotFoundError(
            f"resume={resume}: no such file or directory; give a checkpoints/step_XXXXXXXX directory, "
            "`auto` (the run directory's newest, hydra.run.dir), or `none`"
        )
    if not (path / STATE_FILE).is_file():
        raise InputNotFoundError(
            f"resume={resume}: not a complete checkpoint (no {STATE_FILE}); give a checkpoints/step_XXXXXXXX "
            "directory, `auto`, or `none`"
        )
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(
            f"resume={resume}: the checkpoint is damaged: {'; '.join(problems)}; resume from another "
            "checkpoints/step_XXXXXXXX, or resume=auto to take the newest intact one"
        )
    if problems is None:
        say(unverified_note(path), once=True)
    return path


def load_checkpoint(
    path: Path, *, strategy: Any, module: nn.Module, optimizer: torch.optim.Optimizer, env: ParallelEnv
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG in place; returns the saved loop state.

    `path` as `resolve_resume` returns it, verified. Every tensor of the checkpoint must be read by some rank
    (or be one an extension reads, READ_ELSEWHERE): one that is not (a 4-layer checkpoint into a 2-layer
    model) would be dropped silently, so the load is refused, naming them.
    """
    unread = load_slices(path / "shards", strategy.load_slices(module, optimizer))
    unread = set.intersection(*(set(u) for u in gather_objects(sorted(unread))))
    unused = sorted(k for k in unread if not k.startswith(READ_ELSEWHERE))
    if unused:
        raise CheckpointError(
            f"the checkpoint {path} holds {len(unused)} tensor(s) that the model and optimizer do not take: "
            f"{shown(unused)}; it was saved from a bigger or another model (or optimizer): resume with the "
            "configuration it was saved with, or start afresh (resume=none)"
        )
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
        with staged(out_dir) as tmp:  # nothing is left of it when writing fails
            hf_model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
    barrier()
