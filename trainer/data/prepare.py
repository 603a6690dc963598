"""Tokenize a source once into a prepared dataset (trainer/data/prepared.py has the format); the work of
`python -m trainer.prepare_data`.

Deterministic: documents are read in a fixed order (files sorted within each pattern), document i of the
source goes to eval when floor((i + 1) f) > floor(i f) (f = eval_fraction: evenly spread, exactly f of them,
decided without reading ahead), and the tokenizer processes return their batches in order. Each shard is
written atomically and recorded in progress.json; a run started again on the same output_dir with the same
settings skips (without tokenizing) every document already in a recorded shard, so a killed run continues
where it stopped and writes the same bytes. meta.json is written last, and progress.json then removed.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

from trainer.data import documents
from trainer.data.chat import DROP_NO_TRAINABLE, ChatEncoder, row_messages, template_hash
from trainer.data.prepared import (
    META_FILE,
    PROGRESS_FILE,
    SPLITS,
    TOKENIZER_DIR,
    ShardWriter,
    make_meta,
    remove_partial_shards,
    token_dtype,
    tokenizer_hash,
)
from trainer.data.tokenizer import build_bpe_tokenizer, build_wordlevel_tokenizer, load_tokenizer
from trainer.errors import ConfigError, DataError
from trainer.utils import check_output_dir, loading_from, write_json_atomic

BUILT = ("bpe", "wordlevel")
CACHE_SHARD_TOKENS = 1 << 26  # the in-memory presets' cache: a few shards at most


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hydra-llm-trainer")
    except PackageNotFoundError:
        return "unknown"


def is_eval(index: int, fraction: float) -> bool:
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def check_settings(cfg: Any) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    if OmegaConf.is_config(cfg):
        missing = sorted(OmegaConf.missing_keys(cfg))
        check(
            not missing,
            f"{', '.join(missing)} required: e.g. python -m trainer.prepare_data 'data_files=corpus/*.jsonl' "
            "tokenizer=NAME_OR_DIR output_dir=DIR (tokenizer: a tokenizer name or directory, or bpe / wordlevel)",
        )
    check(bool(cfg.output_dir), "output_dir is required: the directory the prepared dataset is written to")
    check(
        (cfg.data_files is not None) != (cfg.path is not None),
        "give data_files (local files or globs) or path (a hub dataset name), one of them",
    )
    check(bool(cfg.tokenizer), "tokenizer is required: a tokenizer name or directory, or bpe / wordlevel")
    check(
        cfg.format == "text" or cfg.tokenizer not in BUILT,
        f"format={cfg.format} renders conversations with a chat template and its special tokens: give the "
        f"model's tokenizer (tokenizer=NAME_OR_DIR), not a built {cfg.tokenizer} one",
    )
    check(cfg.shard_tokens > 0, f"shard_tokens={cfg.shard_tokens}: must be a positive number of tokens")
    check(cfg.num_proc >= 1, f"num_proc={cfg.num_proc}: must be >= 1")
    check(cfg.batch_docs >= 1, f"batch_docs={cfg.batch_docs}: must be >= 1")
    if cfg.eval_data_files is not None:
        check(
            cfg.data_files is not None and cfg.eval_split is None,
            "eval_data_files are local files written as the eval split: give them with data_files (for a hub "
            "dataset, eval_split names its eval split)",
        )
    elif cfg.eval_split is None:
        check(
            0.0 < cfg.eval_fraction < 1.0,
            f"eval_fraction={cfg.eval_fraction}: must be in (0, 1) (or name an eval_split of a hub dataset, "
            "or give eval_data_files)",
        )
    else:
        check(
            cfg.path is not None,
            "eval_split names a split of a hub dataset: give path=NAME, or eval_fraction",
        )


def chat_fields(cfg: Any) -> dict[str, Any]:
    """How a conversational source's rows read (what meta.json and the settings record)."""
    roles = OmegaConf.to_container(cfg.roles) if OmegaConf.is_config(cfg.roles) else dict(cfg.roles or {})
    if cfg.format == "prompt_completion":
        return {
            "format": str(cfg.format),
            "prompt_field": cfg.prompt_field,
            "completion_field": cfg.completion_field,
        }
    return {
        "format": str(cfg.format),
        "messages_field": cfg.messages_field,
        "role_key": cfg.role_key,
        "content_key": cfg.content_key,
        "roles": roles,
    }


def row_field(cfg: Any) -> documents.Field:
    """What a row of the source is read as: the text field's name, or a reader of its conversation."""
    if cfg.format == "text":
        return str(cfg.text_field)
    f = chat_fields(cfg)
    return functools.partial(
        row_messages,
        fmt=f["format"],
        messages_field=str(cfg.messages_field),
        role_key=str(cfg.role_key),
        content_key=str(cfg.content_key),
        roles=f.get("roles", {}),
        prompt_field=str(cfg.prompt_field),
        completion_field=str(cfg.completion_field),
    )


def chat_template_of(cfg: Any) -> str | None:
    """The text of chat_template=PATH, or None (the tokenizer's own)."""
    if cfg.chat_template is None:
        return None
    path = Path(str(cfg.chat_template)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"chat_template={cfg.chat_template}: no such file; give the path of a Jinja chat template"
        )
    return path.read_text()


class Source:
    """The documents of the source as (index, split, text), the same every time it is read."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.field = row_field(cfg)
        self.files = documents.local_files(cfg.data_files) if cfg.data_files is not None else None
        self.eval_files = (
            documents.local_files(cfg.eval_data_files, key="eval_data_files")
            if cfg.eval_data_files is not None
            else None
        )

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        fields = {"text_field": c.text_field} if c.format == "text" else chat_fields(c)
        if self.files is not None:
            out = {"data_files": [str(Path(f).resolve()) for f in self.files], **fields}
            if self.eval_files is not None:
                out["eval_data_files"] = [str(Path(f).resolve()) for f in self.eval_files]
            return out
        return {"path": c.path, "name": c.name, "split": c.split, "eval_split": c.eval_split, **fields}

    def _texts(self, split: str) -> Iterator[str]:
        c = self.cfg
        if self.files is not None:
            return documents.file_texts(self.files, self.field)
        return documents.hub_texts(c.path, c.name, split, self.field, streaming=c.streaming)

    def _eval_texts(self) -> Iterator[str]:
        if self.eval_files is not None:
            return documents.file_texts(self.eval_files, self.field)
        return self._texts(self.cfg.eval_split)

    def __iter__(self) -> Iterator[tuple[int, str, str]]:
        c = self.cfg
        if c.eval_split is not None or self.eval_files is not None:
            index = 0
            for split, texts in (("train", lambda: self._texts(c.split)), ("eval", self._eval_texts)):
                for text in texts():
                    yield index, split, text
                    index += 1
            return
        fraction = float(c.eval_fraction)  # read once: a config access costs ~100 us, a document ~1 us here
        for index, text in enumerate(self._texts(c.split)):
            yield index, "eval" if is_eval(index, fraction) else "train", text

    def check(self, *, num_proc: int = 1) -> None:
        """Read the source once before writing anything: a bad line or field fails here, with its file and
        line; empty input, or a split that would get no document, too. (A hub dataset: its first record.)
        JSON-lines files are read in `num_proc` processes, in byte ranges."""
        counts = dict.fromkeys(SPLITS, 0)
        if self.files is None and self.cfg.eval_split is not None:  # the first record of each split
            for split, texts in (("train", self._texts(self.cfg.split)), ("eval", self._eval_texts())):
                counts[split] = int(next(iter(texts), None) is not None)
        elif self.files is None:
            for _, split, _ in self:
                counts[split] += 1
                if counts["train"] and counts["eval"]:
                    return
        elif self.eval_files is not None:
            counts["train"] = self._count_documents(self.files, num_proc)
            counts["eval"] = self._count_documents(self.eval_files, num_proc)
        else:
            fraction = float(self.cfg.eval_fraction)
            for index in range(self._count_documents(self.files, num_proc)):
                counts["eval" if is_eval(index, fraction) else "train"] += 1
        if not any(counts.values()):
            raise DataError(f"{self.describe()}: no documents could be read; the input is empty")
        for split in SPLITS:
            if counts[split] == 0 and self.files is not None:
                raise DataError(
                    f"the {split} split gets no document of the {sum(counts.values())} read "
                    f"(eval_fraction={self.cfg.eval_fraction}); raise eval_fraction or add documents"
                )

    def _count_documents(self, files: list[str], num_proc: int) -> int:
        """The documents of local files, each checked; the first bad line (in file order) is the error."""
        field = self.field
        if num_proc <= 1 or not all(documents.splittable(f) for f in files):
            return sum(1 for _ in documents.file_texts(files, field))
        ranges = [(f, field, *r) for f in files for r in documents.line_ranges(f, 4 * num_proc)]
        with worker_pool("fork", num_proc) as pool:
            # in order: a bad line in an early range is raised before any later one's
            return sum(pool.imap(_count_range, ranges))


@contextlib.contextmanager
def worker_pool(start_method: str, num_proc: int, **kwargs: Any) -> Iterator[Any]:
    """A multiprocessing pool that its workers leave by finishing their tasks (close, join), also when the caller
    raised, e.g. a bad line a worker found. `with Pool()` terminates instead: a worker killed while it holds the
    lock of the pool's result queue leaves the pool's teardown waiting for that lock forever (reproduced: about
    one bad-line error in a few hundred). Ctrl-C still terminates the workers. A start method the platform
    lacks (fork on macOS and Windows) falls back to spawn. The workers ignore Ctrl-C: a terminal sends it to the
    whole process group, and the parent alone stops them (each would print a traceback)."""
    if start_method not in multiprocessing.get_all_start_methods():
        start_method = "spawn"
    initargs = (kwargs.pop("initializer", None), *kwargs.pop("initargs", ()))
    pool = multiprocessing.get_context(start_method).Pool(
        num_proc, initializer=_ignore_interrupt_then, initargs=initargs, **kwargs
    )
    interrupted = False
    try:
        yield pool
    except KeyboardInterrupt:
        interrupted = True
        pool.terminate()
        raise
    finally:
        if not interrupted:
            pool.close()
        pool.join()


def _ignore_interrupt_then(initializer: Any, *initargs: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def _count_range(args: tuple[str, str, int, int, int]) -> int:
    return documents.count_json_range(*args)


# ---- tokenizer processes ---------------------------------------------------------------------------------

_ENCODE: Any = None  # texts -> their token ids, in this process
_CHAT: ChatEncoder | None = None  # conversations -> token ids and masks, in this process


def batch_encoder(tokenizer: Any) -> Any:
    """texts -> token ids without special tokens, as `tokenizer(texts, add_special_tokens=False)` gives them.
    Where the tokenizer is transformers' plain fast tokenizer (no Python of its own around the Rust one), the
    Rust tokenizer's encode_batch_fast, which computes no character offsets: 1.5x faster on pydoc text."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
        and hasattr(backend, "encode_batch_fast")
    ):
        # what transformers' _encode_plus sets before each call: no truncation or padding, special tokens
        # in the text split or not as the tokenizer says
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(tokenizer.split_special_tokens)
        return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def _set_encoders(tokenizer: Any, train_on: str | None) -> None:
    """This process's encoders; `train_on`: conversations (rendered with the tokenizer's chat template)."""
    global _ENCODE, _CHAT
    _CHAT = ChatEncoder(tokenizer, train_on=train_on) if train_on is not None else None
    _ENCODE = batch_encoder(tokenizer)


def _load_worker_tokenizer(directory: str, train_on: str | None = None) -> None:
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: num_proc processes in all
    _set_encoders(load_tokenizer(directory), train_on)


def _encode(texts: list[Any]) -> tuple[np.ndarray, ...]:
    """The token ids of `texts` (or of conversations, with their masks), concatenated, and where each one's ids
    end: a few arrays cross the process boundary in one pickle each, not one small array per document."""
    if _CHAT is not None:
        pairs = [_CHAT.encode(messages) for messages in texts]
        ids, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        ids, masks = _ENCODE(texts), None
    ends = np.cumsum([len(x) for x in ids], dtype=np.int64)
    count = int(ends[-1]) if len(ends) else 0
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=count)
    if masks is None:
        return flat, ends
    return flat, ends, np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)


def _split(encoded: tuple[np.ndarray, ...]) -> list[Any]:
    """One token array per text; (tokens, mask) per conversation. Views, not copies."""
    if len(encoded) == 2:
        flat, ends = encoded
        return np.split(flat, ends[:-1])
    flat, ends, masks = encoded
    return list(zip(np.split(flat, ends[:-1]), np.split(masks, ends[:-1]), strict=True))


def _ordered_map(
    chunks: Iterator[tuple[Any, list[str]]],
    *,
    num_proc: int,
    tokenizer_dir: str,
    tokenizer: Any = None,
    start_method: str = "spawn",
    train_on: str | None = None,
) -> Iterator[tuple[Any, list[Any]]]:
    """(tag, token arrays) for each (tag, texts), in order; at most 2 x num_proc batches in flight. One
    process: `tokenizer` when given (else the one saved in tokenizer_dir). `fork` starts the processes
    without importing anything again (the prepare_data command); `spawn` is for a process that may hold
    threads (a training run's cache). `train_on`: the texts are conversations, encoded with their masks
    (`_split`'s pairs) by the tokenizer's chat template."""
    if num_proc <= 1:
        if tokenizer is None:
            _load_worker_tokenizer(tokenizer_dir, train_on)
        else:
            _set_encoders(tokenizer, train_on)
        for tag, texts in chunks:
            yield tag, _split(_encode(texts))
        return
    with worker_pool(
        start_method, num_proc, initializer=_load_worker_tokenizer, initargs=(tokenizer_dir, train_on)
    ) as pool:
        pending: deque = deque()
        for tag, texts in chunks:
            pending.append((tag, pool.apply_async(_encode, (texts,))))
            if len(pending) >= 2 * num_proc:
                tag0, result = pending.popleft()
                yield tag0, _split(result.get())
        while pending:
            tag0, result = pending.popleft()
            yield tag0, _split(result.get())


# ---- the run ---------------------------------------------------------------------------------------------


def _settings(cfg: Any, source: Source, template: str | None) -> dict[str, Any]:
    chat = (
        {}
        if cfg.format == "text"
        else {
            "chat": {"template": template_hash(template) if template else None, "train_on": str(cfg.train_on)}
        }
    )
    return chat | {
        "source": source.describe(),
        "tokenizer": cfg.tokenizer,
        "tokenizer_vocab_size": cfg.tokenizer_vocab_size if cfg.tokenizer in BUILT else None,
        "shard_tokens": cfg.shard_tokens,
        "eval_fraction": cfg.eval_fraction
        if cfg.eval_split is None and cfg.eval_data_files is None
        else None,
    }


def _tokenizer(
    cfg: Any, source: Source, out: Path, resuming: bool, template: str | None = None, loaded: Any = None
) -> Any:
    """Build (bpe, wordlevel: from the train documents) or load the tokenizer, and save it in output_dir (with
    `template`, chat_template=PATH's text, as its chat template: training and generation render with it)."""
    directory = out / TOKENIZER_DIR
    if resuming and (directory / "tokenizer_config.json").is_file():
        return load_tokenizer(str(directory))
    if cfg.tokenizer in BUILT:
        texts = (text for _, split, text in source if split == "train")
        tok = (
            build_wordlevel_tokenizer(texts)
            if cfg.tokenizer == "wordlevel"
            else build_bpe_tokenizer(texts, cfg.tokenizer_vocab_size)
        )
    else:
        tok = loaded if loaded is not None else load_tokenizer(cfg.tokenizer)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(directory))
    return load_tokenizer(str(directory))  # as the workers and training load it: the same hash


def prepare(cfg: Any) -> Path:
    """Write the prepared dataset `cfg.output_dir` (continuing an interrupted run); returns its path."""
    check_settings(cfg)
    check_output_dir("output_dir", cfg.output_dir)
    out = Path(cfg.output_dir)
    source = Source(cfg)
    chat = cfg.format != "text"
    template = chat_template_of(cfg) if chat else None
    settings = _settings(cfg, source, template)
    if (out / META_FILE).is_file():
        meta = json.loads((out / META_FILE).read_text())
        if meta.get("settings") == settings:
            print(f"{out} is already prepared with these settings", flush=True)
            return out
        raise DataError(
            f"output_dir={out} holds a dataset prepared with other settings ({meta.get('settings')}); "
            "give another output_dir, or remove that one"
        )
    progress_file = out / PROGRESS_FILE
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else None
    resuming = progress is not None and progress.get("settings") == settings
    if progress is not None and not resuming:
        raise DataError(
            f"output_dir={out} holds an unfinished prepare_data run with other settings; run it with the "
            "settings it started with, or remove the directory"
        )
    train_on = str(cfg.train_on) if chat else None
    loaded = None
    # A path or name that loads no tokenizer (or one without EOS) fails here, before anything is read.
    if cfg.tokenizer not in BUILT:
        with loading_from(cfg.tokenizer, key="tokenizer"):
            loaded = load_tokenizer(cfg.tokenizer)
    if chat:  # as does a tokenizer with no chat template (and none given)
        ChatEncoder(loaded, template=template, train_on=train_on)
    source.check(num_proc=int(cfg.num_proc))  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(cfg, source, out, resuming, template, loaded)
    vocab_size, eos = len(tok), tok.eos_token_id
    dtype = token_dtype(vocab_size)
    tok_hash = tokenizer_hash(tok)
    if resuming and progress["tokenizer_hash"] != tok_hash:
        raise DataError(
            f"{out / TOKENIZER_DIR}: not the tokenizer the unfinished run started with; remove {out}"
        )
    if not resuming:
        progress = {
            "settings": settings,
            "tokenizer_hash": tok_hash,
            "splits": {s: {"shards": [], "covered": 0, "dropped": {}} for s in SPLITS},
        }
    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)
        remove_partial_shards(out / split)
    splits = progress["splits"]
    covered = {s: splits[s]["covered"] for s in SPLITS}
    writers: dict[str, ShardWriter | None] = dict.fromkeys(SPLITS)
    # Conversations dropped (no trained token) since the split's last shard: recorded with the next one, so
    # that a continued run, which reads again the rows after it, counts each row once.
    dropped = dict.fromkeys(SPLITS, 0)

    def count_dropped(split: str) -> None:
        if dropped[split]:
            counts = splits[split]["dropped"]
            counts[DROP_NO_TRAINABLE] = counts.get(DROP_NO_TRAINABLE, 0) + dropped[split]
            dropped[split] = 0

    def flush(split: str, upto: int) -> None:
        splits[split]["shards"].append(writers[split].close())
        splits[split]["covered"] = upto
        count_dropped(split)
        write_json_atomic(progress_file, progress)
        writers[split] = None

    batch_docs, shard_tokens = int(cfg.batch_docs), int(cfg.shard_tokens)  # read once, not per document

    def chunks() -> Iterator[tuple[list[tuple[int, str]], list[str]]]:
        tags: list[tuple[int, str]] = []
        texts: list[str] = []
        for index, split, text in source:
            if index < covered[split]:
                continue  # in a shard a previous run wrote
            tags.append((index, split))
            texts.append(text)
            if len(texts) >= batch_docs:
                yield tags, texts
                tags, texts = [], []
        if texts:
            yield tags, texts

    done_docs = sum(r["documents"] for s in SPLITS for r in splits[s]["shards"])
    done_tokens = sum(r["tokens"] for s in SPLITS for r in splits[s]["shards"])
    bar = tqdm(
        desc="prepare", unit=" docs", initial=done_docs, disable=not cfg.progress_bar, dynamic_ncols=True
    )
    start, new_tokens, last = time.perf_counter(), 0, -1
    encoded = _ordered_map(
        chunks(),
        num_proc=cfg.num_proc,
        tokenizer_dir=str(out / TOKENIZER_DIR),
        start_method="fork",
        train_on=train_on,
    )
    for tags, ids in encoded:
        for (index, split), doc in zip(tags, ids, strict=True):
            last = max(last, index)
            if chat:
                doc, mask = doc
                if not mask[1:].any():  # nothing to learn from: no trained target
                    dropped[split] += 1
                    continue
            elif len(doc) == 0:
                continue  # an empty document: nothing to learn from (as the in-memory path drops it)
            if writers[split] is None:
                writers[split] = ShardWriter(out / split, len(splits[split]["shards"]), dtype, masked=chat)
            if chat:
                writers[split].add(doc, mask)  # as the template rendered it: its end-of-turn, no EOS added
            else:
                writers[split].add(np.append(doc, np.uint32(eos)))
            new_tokens += len(doc) + (not chat)
            if writers[split].num_tokens >= shard_tokens:
                flush(split, index + 1)
        bar.update(len(tags))
        seconds = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(
            tokens=f"{done_tokens + new_tokens:,}", tok_s=f"{new_tokens / seconds:,.0f}", refresh=False
        )
    bar.close()
    for split in SPLITS:
        if writers[split] is not None:
            flush(split, last + 1)
        count_dropped(split)
        if chat and not splits[split]["shards"]:
            raise DataError(
                f"the {split} split has no conversation with a trained token ({splits[split]['dropped']} dropped); "
                f"check train_on={train_on}, the roles (an assistant turn is what trains) and eval_fraction"
            )
    chat_meta = None
    if chat:
        chat_meta = {
            "format": str(cfg.format),
            "train_on": train_on,
            "template_hash": template_hash(tok.chat_template),
            "dropped": {s: splits[s]["dropped"] for s in SPLITS},
        }
    meta = make_meta(
        tokenizer=tok,
        tokenizer_name=cfg.tokenizer,
        dtype=dtype,
        source=source.describe(),
        settings=settings,
        shards={s: splits[s]["shards"] for s in SPLITS},
        package_version=_package_version(),
        known_hash=tok_hash,
        chat=chat_meta,
    )
    write_json_atomic(out / META_FILE, meta)
    progress_file.unlink()
    what = "conversations" if chat else "documents"
    print(
        f"{out}: {meta['splits']['train']['documents']:,} train / {meta['splits']['eval']['documents']:,} eval "
        f"{what}, {meta['tokens']:,} tokens ({dtype.name}) in "
        f"{sum(len(splits[s]['shards']) for s in SPLITS)} shard(s)",
        flush=True,
    )
    if chat:
        c = meta["chat"]
        print(
            f"trained tokens: {c['trainable_tokens']['train']:,} train "
            f"({100 * c['trainable_fraction']['train']:.1f}%), {c['trainable_tokens']['eval']:,} eval; rows dropped "
            f"with no trained token: {sum(sum(d.values()) for d in c['dropped'].values()):,}",
            flush=True,
        )
    return out


def write_splits(
    out: Path,
    texts: dict[str, Iterable[Any]],
    tokenizer: Any,
    *,
    num_proc: int,
    description: dict[str, Any],
    train_on: str | None = None,
) -> Path:
    """A prepared dataset of the given splits' texts, tokenized by `tokenizer` (the in-memory presets' cache);
    with `train_on`, of conversations (message lists) rendered by the tokenizer's chat template, with masks.

    Written under a temporary name and renamed when complete, so a half-written one is never read; one that
    is there already is kept.
    """
    if (out / META_FILE).is_file():
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # per process: runs sharing a cache_dir
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_splits_into(
            tmp, texts, tokenizer, num_proc=num_proc, description=description, train_on=train_on
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted run leaves nothing behind
        raise
    if (out / META_FILE).is_file():  # another run sharing the cache finished first: the same bytes
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    shutil.rmtree(out, ignore_errors=True)  # what a killed run left, if anything
    os.replace(tmp, out)
    return out


def _write_splits_into(
    tmp: Path,
    texts: dict[str, Iterable[Any]],
    tokenizer: Any,
    *,
    num_proc: int,
    description: dict[str, Any],
    train_on: str | None,
) -> None:
    tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
    vocab_size, eos = len(tokenizer), tokenizer.eos_token_id
    dtype = token_dtype(vocab_size)
    chat = train_on is not None
    shards_of: dict[str, list[dict[str, Any]]] = {}
    dropped: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        (tmp / split).mkdir()
        shards: list[dict[str, Any]] = []
        writer: ShardWriter | None = None
        dropped[split] = {DROP_NO_TRAINABLE: 0}

        def batches(split: str = split) -> Iterator[tuple[None, list[Any]]]:
            chunk: list[Any] = []
            for text in texts[split]:
                chunk.append(text if chat or isinstance(text, str) else "")
                if len(chunk) >= 1000:
                    yield None, chunk
                    chunk = []
            if chunk:
                yield None, chunk

        encoded = _ordered_map(
            batches(),
            num_proc=num_proc,
            tokenizer_dir=str(tmp / TOKENIZER_DIR),
            tokenizer=tokenizer,
            train_on=train_on,
        )
        for _, ids in encoded:
            for doc in ids:
                mask = None
                if chat:
                    doc, mask = doc
                    if not mask[1:].any():
                        dropped[split][DROP_NO_TRAINABLE] += 1
                        continue
                elif len(doc) == 0:
                    continue
                if writer is None:
                    writer = ShardWriter(tmp / split, len(shards), dtype, masked=chat)
                writer.add(doc if chat else np.append(doc, np.uint32(eos)), mask)
                if writer.num_tokens >= CACHE_SHARD_TOKENS:
                    shards.append(writer.close())
                    writer = None
        if writer is not None:
            shards.append(writer.close())
        shards_of[split] = shards
    meta = make_meta(
        tokenizer=tokenizer,
        tokenizer_name=getattr(tokenizer, "name_or_path", None) or "built",
        dtype=dtype,
        source=description,
        settings={"source": description},
        shards=shards_of,
        package_version=_package_version(),
        chat=None
        if not chat
        else {
            "train_on": train_on,
            "template_hash": template_hash(tokenizer.chat_template),
            "dropped": dropped,
        },
    )
    write_json_atomic(tmp / META_FILE, meta)
