"""From a data config to token windows: text sources, the tokenizer, tokenization and packing.

Every source ends as an HF `datasets` split with a text column, so the embedded corpus and pydoc go
through exactly the code path of user data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from trainer.data import markov
from trainer.data.order import SampleOrder
from trainer.data.prepared import Batch
from trainer.data.tokenizer import build_bpe_tokenizer, build_wordlevel_tokenizer, load_tokenizer
from trainer.data.windows import windows_of
from trainer.errors import DataError
from trainer.loss import IGNORE_INDEX
from trainer.utils import loading_from, looks_local, write_atomic

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


@dataclass
class TokenWindows:
    """Fixed-length training sequences: `inputs[i]` and `labels[i]` (the next tokens; IGNORE_INDEX for padding)."""

    inputs: torch.Tensor  # [n, seq_len] int64
    labels: torch.Tensor  # [n, seq_len] int64

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, indices: torch.Tensor) -> Batch:
        return Batch(self.inputs[indices], self.labels[indices])

    def order(self, *, seed: int) -> SampleOrder:
        """The training order over these windows (a fresh permutation per epoch)."""
        return SampleOrder(len(self), seed=seed)


@dataclass
class Data:
    tokenizer: Any
    # TokenWindows, or a data=tokenized Mixture: both give len(), batch(indices) and order(seed=).
    train: Any
    eval: Any
    # Entropy rate of the source in nats/token when it is known (the embedded corpus), else None.
    entropy_floor: float | None = None


def pack(docs: list[list[int]], seq_len: int, eos_id: int) -> TokenWindows:
    """Concatenate documents with EOS after each and cut into windows that share no input token.

    Window i reads tokens [i*L, (i+1)*L) and predicts [i*L+1, (i+1)*L+1): every token is an input once and
    a target once (but the very first), and no padding is spent.
    """
    lengths = [len(d) + 1 for d in docs]
    stream = np.empty(sum(lengths), dtype=np.int64)
    pos = 0
    for d, n in zip(docs, lengths, strict=True):
        stream[pos : pos + n - 1] = d
        stream[pos + n - 1] = eos_id
        pos += n
    num = (len(stream) - 1) // seq_len
    t = torch.from_numpy(stream)
    inputs = t[: num * seq_len].view(num, seq_len)
    labels = t[1 : num * seq_len + 1].view(num, seq_len)
    return TokenWindows(inputs.clone(), labels.clone())


def pad_each(docs: list[list[int]], seq_len: int, eos_id: int, pad_id: int) -> TokenWindows:
    """One window per document (+EOS), truncated to seq_len+1 tokens, padding ignored by the loss."""
    inputs = torch.full((len(docs), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(docs), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, d in enumerate(docs):
        ids = torch.tensor([*d, eos_id][: seq_len + 1], dtype=torch.long)
        n = len(ids) - 1
        if n <= 0:
            continue
        inputs[i, :n] = ids[:n]
        labels[i, :n] = ids[1:]
    keep = (labels != IGNORE_INDEX).any(dim=1)
    return TokenWindows(inputs[keep], labels[keep])


def _write_jsonl(path: Path, texts: list[str]) -> None:
    write_atomic(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))


def _config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def markov_settings(cfg: Any) -> dict[str, Any]:
    defaults = dict(
        num_words=512,
        successors=12,
        zipf=1.1,
        mean_doc_words=200,
        train_tokens=1_000_000,
        eval_tokens=50_000,
        seed=0,
    )
    given = OmegaConf.to_container(cfg.markov) if OmegaConf.is_config(cfg.markov) else dict(cfg.markov)
    unknown = set(given) - set(defaults)
    if unknown:
        raise DataError(f"data.markov has unknown keys {sorted(unknown)}; valid keys: {sorted(defaults)}")
    return {**defaults, **given}


def materialize_embedded(cfg: Any, cache_dir: Path) -> tuple[dict[str, str], float]:
    """Write the embedded corpus as jsonl files (once) and return them with the source's entropy rate."""
    m = markov_settings(cfg)
    source = markov.build_source(
        num_words=m["num_words"],
        successors=m["successors"],
        zipf=m["zipf"],
        mean_doc_words=m["mean_doc_words"],
        seed=m["seed"],
    )
    out = cache_dir / f"embedded-{_config_hash(m)}"
    files = {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl")}
    if not all(Path(f).exists() for f in files.values()):
        out.mkdir(parents=True, exist_ok=True)
        _write_jsonl(
            Path(files["train"]), markov.sample_documents(source, m["train_tokens"], seed=m["seed"] + 1)
        )
        _write_jsonl(
            Path(files["eval"]), markov.sample_documents(source, m["eval_tokens"], seed=m["seed"] + 2)
        )
    return files, markov.entropy_rate(source)


def materialize_pydoc(eval_fraction: float, cache_dir: Path) -> dict[str, str]:
    """CPython's pydoc topic pages, sorted by key; the last `eval_fraction` of them held out."""
    from pydoc_data.topics import topics

    texts = [topics[k].strip() for k in sorted(topics)]
    texts = [t for t in texts if t]
    num_eval = max(1, round(len(texts) * eval_fraction))
    out = cache_dir / f"pydoc-{_config_hash([len(texts), eval_fraction])}"
    files = {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl")}
    if not all(Path(f).exists() for f in files.values()):
        out.mkdir(parents=True, exist_ok=True)
        _write_jsonl(Path(files["train"]), texts[:-num_eval])
        _write_jsonl(Path(files["eval"]), texts[-num_eval:])
    return files


def _patterns(data_files: Any) -> list[str]:
    if OmegaConf.is_config(data_files):
        data_files = OmegaConf.to_container(data_files)
    if isinstance(data_files, dict):
        return [p for v in data_files.values() for p in ([v] if isinstance(v, str) else v)]
    return [data_files] if isinstance(data_files, str) else list(data_files)


def _local_files(data_files: Any) -> list[str]:
    import glob

    found = (glob.glob(os.path.expanduser(p)) for p in _patterns(data_files) if "://" not in p)
    return sorted({f for files in found for f in files})


def _bad_line(path: str, text_field: str | None) -> str | None:
    """The first line of a local JSON-lines or text file that `datasets` cannot read, or whose text field is
    not a string, as "FILE, line N: why"; None when every line is good."""
    import gzip

    is_json = Path(path.removesuffix(".gz")).suffix in (".json", ".jsonl")
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}, line {number}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
            if not is_json or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}, line {number}: not JSON ({e.msg}, column {e.colno})"
            if not isinstance(record, dict):
                return (
                    f"{path}, line {number}: a JSON {type(record).__name__}, not an object with a text field"
                )
            if text_field is not None and text_field in record and not isinstance(record[text_field], str):
                value = record[text_field]
                what = "null" if value is None else f"a {type(value).__name__} ({json.dumps(value)[:40]})"
                return f"{path}, line {number}: the text field {text_field!r} is {what}, not a string"
    return None


def _first_bad_line(data_files: Any, text_field: str | None) -> str | None:
    for path in _local_files(data_files):
        if Path(path.removesuffix(".gz")).suffix in (".json", ".jsonl", ".txt"):
            found = _bad_line(path, text_field)
            if found:
                return found
    return None


def _check_text_field(split: Any, name: str, text_field: str, data_files: Any) -> None:
    """Every record's text is a string of UTF-8 text: a null, a number or bytes that are not UTF-8 (which
    `datasets` reads from JSON lines and fails on later) are named, by file and line for local files."""
    column = split.data.column(text_field)  # the whole table under the split: cheap to ask
    if column.null_count == 0 and str(column.type) in ("string", "large_string"):
        try:
            column.validate(full=True)  # checks the UTF-8 of every string, in C++
            return
        except Exception:
            pass
    where = _first_bad_line(data_files, text_field) if data_files else None
    if where is None:
        values = split[text_field]
        row = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)  # not UTF-8: raises
        if row is None:
            return  # the table's nulls are in rows of the other split
        what = "null" if values[row] is None else f"a {type(values[row]).__name__}"
        where = f"the {name} split, row {row}: the text field {text_field!r} is {what}, not a string"
    raise DataError(f"{where}; every record needs its text as a UTF-8 string: fix or remove that record")


def _files_under(path: str | None) -> list[str] | None:
    """The files of a local dataset directory (or the one file) that data.path names; None for a hub name."""
    if path is None or not os.path.exists(os.path.expanduser(path)):
        return None
    root = Path(path).expanduser()
    if root.is_file():
        return [str(root)]
    return sorted(str(f) for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))


def _check_parquet_files(files: Any) -> None:
    """A file named .parquet must be one: pyarrow's "Parquet magic bytes not found" names no file."""
    for path in _local_files(files) if files else []:
        if not path.endswith(".parquet"):
            continue
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(os.path.getsize(path) - 4, 0))
            tail = f.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            raise DataError(
                f"{path}: not a Parquet file, though its name ends in .parquet (it lacks Parquet's PAR1 marks at "
                "its start and end: another format, or a copy cut short); write it again as Parquet, or give it "
                "the extension of its real format (.jsonl, .txt, .csv)"
            )


def _check_local_files(data_files: Any) -> None:
    """Missing or empty local files are named before `datasets` fails on them less clearly."""
    import glob

    for pattern in _patterns(data_files):
        if "://" in pattern:
            continue
        matches = glob.glob(os.path.expanduser(pattern))
        if not matches:
            raise DataError(f"data.data_files: {pattern!r} matches no file; check the path")
        if all(os.path.getsize(m) == 0 for m in matches):
            raise DataError(f"data.data_files: {pattern!r} is empty; point data at files with documents")


def load_splits(cfg: Any, cache_dir: Path) -> tuple[Any, Any, float | None]:
    """The train and eval splits as HF datasets, and the entropy floor when the source has one."""
    import datasets

    floor = None
    eval_split = cfg.eval_split
    local = None  # data=hf's local files
    if cfg.source == "embedded":
        files, floor = materialize_embedded(cfg, cache_dir)
        ds = datasets.load_dataset("json", data_files=files)
        train_split, eval_split = "train", "eval"
    elif cfg.source == "pydoc":
        files = materialize_pydoc(cfg.eval_fraction, cache_dir)
        ds = datasets.load_dataset("json", data_files=files)
        train_split, eval_split = "train", "eval"
    else:
        path, data_files = cfg.path, cfg.data_files
        if OmegaConf.is_config(data_files):
            data_files = OmegaConf.to_container(data_files)
        if path is None:
            if not data_files:
                raise DataError(
                    "data.source=hf needs data.path (a hub dataset) or data.data_files (local files)"
                )
            first = (
                data_files
                if isinstance(data_files, str)
                else next(iter(data_files.values() if isinstance(data_files, dict) else data_files))
            )
            first = first if isinstance(first, str) else first[0]
            ext = Path(first.removesuffix(".gz")).suffix
            if ext not in _BUILDERS:
                raise DataError(
                    f"cannot tell the format of {first!r}; set data.path to one of json, parquet, text, csv"
                )
            path = _BUILDERS[ext]
        if data_files:
            _check_local_files(data_files)
        elif looks_local(path) and not os.path.exists(os.path.expanduser(path)):
            raise DataError(
                f"data.path={path}: no such file or directory; give a local dataset directory, a hub dataset "
                "name (org/name), or local files with data.data_files=PATH"
            )
        local = data_files or _files_under(path)  # the local files read, to name a bad one
        _check_parquet_files(local)
        key = "data.data_files" if data_files else "data.path"
        try:
            ds = datasets.load_dataset(path, cfg.name, data_files=data_files)
        except StopIteration as e:  # what `datasets` raises on a file with no rows
            raise DataError(
                f"{key}={data_files or path}: no documents could be read; the data is empty"
            ) from e
        except Exception as e:  # a line that is not JSON or not UTF-8: `datasets` does not say which
            where = _first_bad_line(local, cfg.text_field) if local else None
            if where is not None:
                raise DataError(f"{where}; fix or remove that line ({key})") from e
            if isinstance(e, FileNotFoundError) and not data_files:
                reason = " ".join(str(e).split())
                raise DataError(
                    f"data.path={path}: no dataset found there ({reason}); give a local dataset directory, a hub "
                    "dataset name (org/name), or local files with data.data_files=PATH"
                ) from e
            raise
        train_split = cfg.train_split
        if train_split not in ds:
            raise DataError(
                f"dataset {path!r} has no split {train_split!r}; its splits: {list(ds)}; set data.train_split"
            )
        if eval_split is not None and eval_split not in ds:
            raise DataError(
                f"dataset {path!r} has no split {eval_split!r}; its splits: {list(ds)}; set data.eval_split or null"
            )
    train = ds[train_split]
    if eval_split is None:
        if len(train) < 2:
            raise DataError(
                f"the train split has {len(train)} document(s); at least 2 are needed to hold out an eval split"
            )
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=0, shuffle=True)
        train, evals = parts["train"], parts["test"]
    else:
        evals = ds[eval_split]
    for name, split in (("train", train), ("eval", evals)):
        if len(split) == 0:
            raise DataError(f"the {name} split is empty; point data at a dataset with documents")
        if cfg.format != "text":
            continue  # each conversation is read and checked as it is tokenized (trainer.data.chat)
        if cfg.text_field not in split.column_names:
            raise DataError(
                f"the {name} split has no text field {cfg.text_field!r}; its columns: {split.column_names}; "
                "set data.text_field to the column holding the text"
            )
        _check_text_field(split, name, cfg.text_field, local)
    return train, evals, floor


def tokenize(split: Any, tokenizer: Any, text_field: str, num_proc: int) -> list[list[int]]:
    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [t if isinstance(t, str) else "" for t in batch[text_field]]
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}

    out = split.map(
        encode, batched=True, remove_columns=split.column_names, num_proc=num_proc if num_proc > 1 else None
    )
    return [ids for ids in out["input_ids"] if ids]


def build_tokenizer(
    cfg: Any,
    train_split: Any,
    tokenizer_dir: Path,
    model_name_or_path: str | None,
    trust_remote_code: bool,
    model_gguf_file: str | None = None,
) -> Any:
    """The run's tokenizer: reloaded from the run directory if it was built before, so a resume uses the same one."""
    choice = cfg.tokenizer
    if choice in ("wordlevel", "bpe"):
        if (tokenizer_dir / "tokenizer.json").exists():
            return load_tokenizer(str(tokenizer_dir))
        texts = (t for t in train_split[cfg.text_field] if isinstance(t, str))
        tok = (
            build_wordlevel_tokenizer(texts)
            if choice == "wordlevel"
            else build_bpe_tokenizer(texts, cfg.tokenizer_vocab_size)
        )
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(tokenizer_dir))
        return tok
    name = choice or model_name_or_path
    if not name:
        raise DataError(
            "data.tokenizer is null and the model has no name_or_path to take a tokenizer from; "
            "set data.tokenizer=bpe (build one from the data) or a tokenizer name/path"
        )
    # The model's own tokenizer: a GGUF model carries it inside the .gguf file.
    gguf_file = model_gguf_file if name == model_name_or_path else None
    with loading_from(name, key="data.tokenizer" if choice else "model.name_or_path"):
        return load_tokenizer(name, trust_remote_code=trust_remote_code, gguf_file=gguf_file)


def _column(split: Any, field: str) -> Iterator[Any]:
    """A split's text column, a thousand rows at a time (not the whole column as one list)."""
    for rows in split.iter(batch_size=1000):
        yield from rows[field]


def _conversations(split: Any, name: str, cfg: Any) -> Iterator[list[dict[str, Any]]]:
    """A split's rows as conversations (format=messages or prompt_completion), each checked as it is read."""
    from trainer.data.prepare import row_field

    read = row_field(cfg)
    for i, record in enumerate(split):
        yield read(record, f"the {name} split of data.data_files/data.path, row {i}")


def build_data(
    cfg: Any,
    *,
    run_dir: Path,
    model_name_or_path: str | None = None,
    trust_remote_code: bool = False,
    model_gguf_file: str | None = None,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Data:
    """Load, tokenize and pack. Rank 0 writes generated files and the tokenizer first; the others then read them.

    data=tokenized reads prepared datasets instead (every rank maps the same files; nothing is written).
    """
    if cfg.source == "tokenized":
        from trainer.data.tokenized import build_tokenized

        tokenizer, train, evals = build_tokenized(
            cfg, model_name_or_path=model_name_or_path, trust_remote_code=trust_remote_code
        )
        return Data(tokenizer=tokenizer, train=train, eval=evals)
    cache_dir = Path(cfg.cache_dir) if os.path.isabs(cfg.cache_dir) else run_dir / cfg.cache_dir
    tokenizer_dir = run_dir / "tokenizer"
    if is_main:
        train, evals, floor = load_splits(cfg, cache_dir)
        tokenizer = build_tokenizer(
            cfg, train, tokenizer_dir, model_name_or_path, trust_remote_code, model_gguf_file
        )
    barrier()
    if not is_main:
        train, evals, floor = load_splits(cfg, cache_dir)
        tokenizer = build_tokenizer(
            cfg, train, tokenizer_dir, model_name_or_path, trust_remote_code, model_gguf_file
        )
    # One path for every source: the splits are tokenized once into a prepared dataset in the cache (reused
    # while the text, the tokenizer and the settings are the same), and read like data=tokenized's.
    from trainer.data.prepare import write_splits
    from trainer.data.prepared import PreparedSplit, read_meta, tokenizer_hash

    chat = cfg.format != "text"
    if chat:
        from trainer.data.chat import ChatEncoder, template_hash
        from trainer.data.prepare import chat_template_of

        template = chat_template_of(cfg)
        if template is not None:  # the run's tokenizer (saved with checkpoints and hf/) carries it
            tokenizer.chat_template = template
        ChatEncoder(tokenizer, train_on=str(cfg.train_on))  # no chat template: refused before any work
    settings = OmegaConf.to_container(cfg, enum_to_str=True) if OmegaConf.is_config(cfg) else dict(cfg)
    for key in (
        "seq_len",
        "packing",
        "num_proc",
        "allow_changed",
        "cache_dir",
        "document_mask",
        "truncation",
    ):
        settings.pop(key, None)
    if chat:
        settings["chat_template"] = template_hash(tokenizer.chat_template)
    key = [settings, tokenizer_hash(tokenizer), train._fingerprint, evals._fingerprint]
    prepared = cache_dir / f"prepared-{_config_hash(key)}"
    if is_main:
        if chat:
            texts = {"train": _conversations(train, "train", cfg), "eval": _conversations(evals, "eval", cfg)}
        else:
            texts = {"train": _column(train, cfg.text_field), "eval": _column(evals, cfg.text_field)}
        write_splits(
            prepared,
            texts,
            tokenizer,
            num_proc=cfg.num_proc,
            description={"data": settings},
            train_on=str(cfg.train_on) if chat else None,
        )
    barrier()
    meta = read_meta(prepared, key="data.cache_dir")
    train_windows, eval_windows = (
        windows_of(PreparedSplit(prepared, split, meta), cfg, tokenizer, chat=chat)
        for split in ("train", "eval")
    )
    return Data(tokenizer=tokenizer, train=train_windows, eval=eval_windows, entropy_floor=floor)
