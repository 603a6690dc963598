"""The prepared-dataset format (`python -m trainer.prepare_data` writes it, `data=tokenized` reads it).

    DIR/meta.json             what the dataset is: tokenizer (name, hash, vocabulary size), dtype, the source,
                              per split the documents, tokens and each shard's tokens, documents and checksum;
                              written last, so a directory without it is not (yet) a prepared dataset
    DIR/tokenizer/            the tokenizer the documents were tokenized with (save_pretrained)
    DIR/{train,eval}/shard_NNNNN.bin   token ids, raw little-endian uint16 (a vocabulary of <= 65536) or uint32
    DIR/{train,eval}/shard_NNNNN.idx   int64 document boundaries within the shard: [0, end_1, ..., end_n]
    DIR/{train,eval}/shard_NNNNN.mask  conversations only (meta.json's `chat`): one uint8 per token, 1 where the
                              token is a trained target (an assistant's content and end-of-turn), with its own
                              checksum in the shard's record (`mask_checksum`) and in the fingerprint

Every text document ends with EOS (a conversation ends as its chat template renders it) and lies whole in one
shard; a shard is closed once it holds `shard_tokens` tokens or more. The reader maps shards with numpy.memmap and only slices them, so what a run holds in memory
does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import xxhash

from trainer.data.order import SampleOrder
from trainer.errors import DataError
from trainer.loss import IGNORE_INDEX
from trainer.utils import write_atomic

FORMAT = "trainer-prepared/1"
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "eval")


class Batch(NamedTuple):
    """A micro-batch of windows: input ids and next-token labels [rows, seq_len] (IGNORE_INDEX where no loss is
    taken), and position ids that restart at each document of a packed window (None: one document per row, the
    model's own 0..L-1). Restarting positions with no attention mask is what makes transformers' attention keep
    packed documents apart."""

    inputs: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    # The input tokens that are not padding, where they are not the labelled ones (conversations: a prompt's
    # tokens are text but hold no label); None: exactly the labelled positions (text windows pad where, and
    # only where, no loss is taken).
    num_tokens: int | None = None


def real_tokens(batch: Batch) -> int:
    """The input tokens of `batch` that are not padding: the work tokens/s and MFU count."""
    return batch.num_tokens if batch.num_tokens is not None else int((batch.labels != IGNORE_INDEX).sum())


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(number: int) -> str:
    return f"shard_{number:05d}"


def tokenizer_hash(tokenizer: Any) -> str:
    """A hash of what the tokenizer maps text to: its tokenizer.json serialization (fast tokenizers), else its
    vocabulary. The same for the same tokenizer files wherever they are loaded from."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def bytes_checksum(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def write_shard(directory: Path, number: int, docs: list[np.ndarray], dtype: np.dtype) -> dict[str, Any]:
    """Write one shard (its .idx first: the .bin's rename completes it) and return its meta.json record."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    tokens = np.concatenate(docs).astype(dtype, copy=False).tobytes()
    name = shard_name(number)
    write_atomic(directory / f"{name}.idx", offsets.tobytes())
    write_atomic(directory / f"{name}.bin", tokens)
    return {
        "name": name,
        "documents": len(docs),
        "tokens": int(offsets[-1]),
        "checksum": bytes_checksum(tokens),
    }


class ShardWriter:
    """One shard written as its documents come: the tokens streamed to a temporary file (checksummed on the
    way), the index kept as the documents' ends; `close` puts both in place and returns the meta.json record.
    Memory: 8 bytes per document, whatever the shard's size."""

    def __init__(self, directory: Path, number: int, dtype: np.dtype, *, masked: bool = False) -> None:
        self.directory, self.name, self.dtype = Path(directory), shard_name(number), dtype
        self.tmp = self.directory / f".{self.name}.bin.{os.getpid()}.tmp"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed by close or abort)
        self.hasher = xxhash.xxh3_128()
        self.ends = [0]
        self.masked, self.trainable = masked, 0  # a conversation dataset: its trained tokens, in the record
        if masked:
            self.mask_tmp = self.directory / f".{self.name}.mask.{os.getpid()}.tmp"
            self.mask_file = open(self.mask_tmp, "wb")  # noqa: SIM115 (closed by close)
            self.mask_hasher = xxhash.xxh3_128()

    @property
    def num_tokens(self) -> int:
        return self.ends[-1]

    def add(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        """One document's tokens (a text's EOS included), and a conversation's mask of trained tokens."""
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self.file.write(data)
        self.hasher.update(data)
        self.ends.append(self.ends[-1] + len(tokens))
        if self.masked:
            bits = mask.astype(np.uint8, copy=False).tobytes()
            self.mask_file.write(bits)
            self.mask_hasher.update(bits)
            self.trainable += int(mask.sum())

    def close(self) -> dict[str, Any]:
        record = {"name": self.name, "documents": len(self.ends) - 1, "tokens": self.ends[-1]}
        for file in (self.file, self.mask_file) if self.masked else (self.file,):
            file.flush()
            os.fsync(file.fileno())
            file.close()
        write_atomic(self.directory / f"{self.name}.idx", np.array(self.ends, dtype="<i8").tobytes())
        if self.masked:
            os.replace(self.mask_tmp, self.directory / f"{self.name}.mask")
            record |= {"mask_checksum": self.mask_hasher.hexdigest(), "trainable": self.trainable}
        os.replace(self.tmp, self.directory / f"{self.name}.bin")  # the .bin's rename completes the shard
        return record | {"checksum": self.hasher.hexdigest()}


def remove_partial_shards(directory: Path) -> None:
    """The temporary files of shards a killed run did not finish."""
    for tmp in Path(directory).glob(".shard_*.tmp"):
        tmp.unlink(missing_ok=True)


def fingerprint(meta: dict[str, Any]) -> str:
    """What identifies the data of a prepared dataset: its tokenizer, dtype and every shard's checksum (not the
    package version or the paths it was read from, which do not change the tokens)."""
    what = {
        "tokenizer": meta["tokenizer"]["hash"],
        "dtype": meta["dtype"],
        "splits": {s: [r["checksum"] for r in meta["splits"][s]["shards"]] for s in meta["splits"]},
    }
    if meta.get("chat"):  # a conversation dataset: its masks are its data too
        what["masks"] = {s: [r["mask_checksum"] for r in meta["splits"][s]["shards"]] for s in meta["splits"]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def make_meta(
    *,
    tokenizer: Any,
    tokenizer_name: str,
    dtype: np.dtype,
    source: dict[str, Any],
    settings: dict[str, Any],
    shards: dict[str, list[dict[str, Any]]],
    package_version: str,
    known_hash: str | None = None,
    chat: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """meta.json of a prepared dataset whose splits hold these shard records (write_shard's, ShardWriter's).
    `known_hash`: the tokenizer's `tokenizer_hash`, where the caller has computed it already. `chat`: a
    conversation dataset's settings (format, template hash, train_on) and its rows dropped per split and
    reason, to which the trained-token counts are added."""
    splits = {
        s: {
            "documents": sum(r["documents"] for r in shards[s]),
            "tokens": sum(r["tokens"] for r in shards[s]),
            "shards": shards[s],
        }
        for s in SPLITS
    }
    meta = {
        "format": FORMAT,
        "package_version": package_version,
        "tokenizer": {
            "name": tokenizer_name,
            "hash": known_hash or tokenizer_hash(tokenizer),
            "vocab_size": len(tokenizer),
            "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id,
        },
        "dtype": np.dtype(dtype).name,
        "source": source,
        "settings": settings,
        "documents": sum(v["documents"] for v in splits.values()),
        "tokens": sum(v["tokens"] for v in splits.values()),
        "splits": splits,
    }
    if chat is not None:
        trainable = {s: sum(r["trainable"] for r in shards[s]) for s in SPLITS}
        meta["chat"] = {
            **chat,
            "trainable_tokens": trainable,
            "trainable_fraction": {s: trainable[s] / max(splits[s]["tokens"], 1) for s in SPLITS},
        }
    meta["fingerprint"] = fingerprint(meta)
    return meta


def read_meta(directory: Path, *, key: str = "data.path") -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            f"{key}={directory}: no such directory; give a directory written by `python -m trainer.prepare_data`"
        )
    meta_file = directory / META_FILE
    if not meta_file.is_file():
        unfinished = (directory / PROGRESS_FILE).is_file()
        why = (
            "its prepare_data run has not finished (run the same command again: it continues where it stopped)"
            if unfinished
            else "it has no meta.json"
        )
        raise DataError(
            f"{key}={directory}: not a prepared dataset ({why}); prepare one with "
            "`python -m trainer.prepare_data data_files=... output_dir=DIR`"
        )
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, not {FORMAT!r}")
    except ValueError as e:
        raise DataError(f"{meta_file}: not a prepared dataset's meta.json ({e}); prepare it again") from e
    return meta


def _advise(array: np.memmap, advice: int, start: int = 0, length: int | None = None) -> None:
    """madvise over bytes [start, start + length) of a memmap's mapping, widened to whole pages."""
    mapping = getattr(array, "_mmap", None)
    if mapping is None or len(mapping) == 0:
        return
    first = start - start % mmap.PAGESIZE
    stop = len(mapping) if length is None else min(len(mapping), start + length)
    if stop > first:
        mapping.madvise(advice, first, stop - first)


class PreparedSplit:
    """One split of a prepared dataset as a token stream and a list of documents, read through memmaps."""

    def __init__(self, directory: Path, split: str, meta: dict[str, Any]) -> None:
        self.directory = Path(directory) / split
        self.dtype = np.dtype(meta["dtype"])
        records = meta["splits"][split]["shards"]
        self.names = [r["name"] for r in records]
        counts = np.array([r["tokens"] for r in records], dtype=np.int64)
        docs = np.array([r["documents"] for r in records], dtype=np.int64)
        self.token_starts = np.concatenate([[0], np.cumsum(counts)])
        self.doc_starts = np.concatenate([[0], np.cumsum(docs)])
        self.num_tokens = int(self.token_starts[-1])
        self.num_documents = int(self.doc_starts[-1])
        self.masked = bool(meta.get("chat"))  # a conversation dataset: a .mask beside each .bin
        self._bins: dict[int, np.memmap] = {}
        self._idxs: dict[int, np.memmap] = {}
        self._masks: dict[int, np.memmap] = {}
        for i, name in enumerate(self.names):
            self._check_shard(i, name, int(counts[i]), int(docs[i]))

    def _check_shard(self, i: int, name: str, tokens: int, docs: int) -> None:
        """Each file's byte length against meta.json, and the index's end against the shard's tokens."""
        bin_file, idx_file = self.directory / f"{name}.bin", self.directory / f"{name}.idx"
        files = [(bin_file, tokens * self.dtype.itemsize), (idx_file, (docs + 1) * 8)]
        if self.masked:
            files.append((self.directory / f"{name}.mask", tokens))
        for file, want in files:
            if not file.is_file():
                raise DataError(f"{file}: missing (meta.json lists it); prepare the dataset again")
            size = file.stat().st_size
            if size != want:
                raise DataError(
                    f"{file}: {size} bytes where meta.json and the index say {want} (truncated or overwritten); "
                    "prepare the dataset again"
                )
        end = int(self._idx(i)[-1])
        if end != tokens:
            raise DataError(
                f"{idx_file}: its last document ends at token {end} but the shard holds {tokens}; prepare the "
                "dataset again"
            )

    def _bin(self, i: int) -> np.memmap:
        if i not in self._bins:
            self._bins[i] = np.memmap(self.directory / f"{self.names[i]}.bin", dtype=self.dtype, mode="r")
            _advise(self._bins[i], mmap.MADV_RANDOM)  # no readahead around a window read at random
        return self._bins[i]

    def _idx(self, i: int) -> np.memmap:
        if i not in self._idxs:
            self._idxs[i] = np.memmap(self.directory / f"{self.names[i]}.idx", dtype="<i8", mode="r")
        return self._idxs[i]

    def _mask(self, i: int) -> np.memmap:
        if i not in self._masks:
            self._masks[i] = np.memmap(self.directory / f"{self.names[i]}.mask", dtype=np.uint8, mode="r")
            _advise(self._masks[i], mmap.MADV_RANDOM)
        return self._masks[i]

    def document_lengths(self) -> np.ndarray:
        """Every document's token count, in order (from the indexes: no token is read)."""
        return np.concatenate(
            [np.diff(np.asarray(self._idx(i))) for i in range(len(self.names))] or [[]]
        ).astype(np.int64)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream (the shards one after the other), as int64."""
        out = np.empty(stop - start, dtype=np.int64)
        pos = start
        shard = int(np.searchsorted(self.token_starts, start, side="right")) - 1
        while pos < stop:
            begin = int(self.token_starts[shard])
            end = min(stop, int(self.token_starts[shard + 1]))
            tokens = self._bin(shard)
            out[pos - start : end - start] = tokens[pos - begin : end - begin]
            # The pages just read leave this process's mapping (they stay in the page cache): its resident
            # memory does not grow with the part of the corpus read so far.
            _advise(
                tokens,
                mmap.MADV_DONTNEED,
                (pos - begin) * self.dtype.itemsize,
                (end - pos) * self.dtype.itemsize,
            )
            pos, shard = end, shard + 1
        return out

    def document(self, d: int) -> np.ndarray:
        """Document d's tokens (its EOS included), as int64."""
        shard, a, b = self._where(d)
        tokens = self._bin(shard)
        out = np.asarray(tokens[a:b], dtype=np.int64)
        _advise(tokens, mmap.MADV_DONTNEED, a * self.dtype.itemsize, (b - a) * self.dtype.itemsize)
        return out

    def document_mask(self, d: int) -> np.ndarray:
        """A conversation's trained-token mask (bool), aligned with `document(d)`."""
        shard, a, b = self._where(d)
        return np.asarray(self._mask(shard)[a:b]) != 0

    def _where(self, d: int) -> tuple[int, int, int]:
        shard = int(np.searchsorted(self.doc_starts, d, side="right")) - 1
        local = d - int(self.doc_starts[shard])
        a, b = (int(x) for x in self._idx(shard)[local : local + 2])
        return shard, a, b


def restart_positions(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids that restart after each EOS of each row: every document of a packed window (and the part of
    one a window starts in) counts its positions from 0, and attention keeps to it (document masking)."""
    index = torch.arange(inputs.shape[1]).expand_as(inputs)
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 1:] = inputs[:, :-1] == eos_id
    return index - torch.where(starts, index, 0).cummax(dim=1).values


class PackedWindows:
    """Windows cut from the concatenated stream as `pack` does: window i reads tokens [iL, (i+1)L) and predicts
    [iL+1, (i+1)L+1); (tokens - 1) // L windows, every token an input once and a target once. `document_mask_eos`:
    the EOS id after which positions restart and attention does not reach back (data.document_mask); None: the
    window is one sequence, as in pretraining without document masking."""

    def __init__(self, split: PreparedSplit, seq_len: int, *, document_mask_eos: int | None = None) -> None:
        self.split, self.seq_len, self.eos = split, seq_len, document_mask_eos

    def __len__(self) -> int:
        return max(0, (self.split.num_tokens - 1) // self.seq_len)

    def order(self, *, seed: int) -> SampleOrder:
        """The in-memory presets' order over these windows: a fresh permutation per epoch."""
        return SampleOrder(len(self), seed=seed)

    def batch(self, indices: torch.Tensor) -> Batch:
        L = self.seq_len
        rows = np.empty((len(indices), L + 1), dtype=np.int64)
        for row, i in enumerate(indices.tolist()):
            rows[row] = self.split.tokens(i * L, i * L + L + 1)
        t = torch.from_numpy(rows)
        inputs = t[:, :-1].clone()
        positions = None if self.eos is None else restart_positions(inputs, self.eos)
        return Batch(inputs, t[:, 1:].clone(), positions)


class DocumentWindows:
    """One window per document (its EOS included), truncated to seq_len + 1 tokens, padded as `pad_each` does."""

    def __init__(self, split: PreparedSplit, seq_len: int, pad_id: int) -> None:
        self.split, self.seq_len, self.pad_id = split, seq_len, pad_id

    def __len__(self) -> int:
        return self.split.num_documents

    def order(self, *, seed: int) -> SampleOrder:
        return SampleOrder(len(self), seed=seed)

    def batch(self, indices: torch.Tensor) -> Batch:
        L = self.seq_len
        inputs = torch.full((len(indices), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(indices), L), IGNORE_INDEX, dtype=torch.long)
        for row, d in enumerate(indices.tolist()):
            ids = torch.from_numpy(self.split.document(d)[: L + 1])
            n = len(ids) - 1
            inputs[row, :n] = ids[:n]
            labels[row, :n] = ids[1:]
        return Batch(inputs, labels)
