"""Documents streamed from a source, one text at a time: local json/jsonl/parquet/text files (a path, a glob or
a list of them, read in sorted order) or a hub dataset (`datasets`, streaming when asked). Nothing larger than
one file's read buffer (a parquet row group) is held.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainer.errors import DataError

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def patterns(data_files: Any) -> list[str]:
    if OmegaConf.is_config(data_files):
        data_files = OmegaConf.to_container(data_files)
    if data_files is None:
        return []
    return [data_files] if isinstance(data_files, str) else [str(p) for p in data_files]


def local_files(data_files: Any, *, key: str = "data_files") -> list[str]:
    """The files the patterns name, each pattern's sorted, in the patterns' order; a pattern that matches
    nothing, an unknown format or all-empty input is refused."""
    out: list[str] = []
    for pattern in patterns(data_files):
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise DataError(f"{key}: {pattern!r} matches no file; check the path")
        for m in matches:
            if _format(m) is None:
                raise DataError(
                    f"{key}: cannot tell the format of {m!r}; give .jsonl/.json, .parquet or .txt files"
                )
            if m not in out:
                out.append(m)
    if out and all(os.path.getsize(f) == 0 for f in out):
        raise DataError(
            f"{key}={patterns(data_files)}: every file is empty; point it at files with documents"
        )
    return out


def _format(path: str) -> str | None:
    return FORMATS.get(Path(path.removesuffix(".gz")).suffix)


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


# What a row holds: a text field's name (format=text), or a function (record, where) -> the row's value that
# checks the record and names `where` (its file and line, or its row) in its error (a conversation's messages).
Field = str | Callable[[Any, str], Any]


def _text_of(record: Any, where: str, text_field: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}, not an object with a text field")
    if text_field not in record:
        raise DataError(
            f"{where}: no text field {text_field!r} (its keys: {sorted(record)[:10]}); "
            "set text_field to the key holding the text"
        )
    value = record[text_field]
    if not isinstance(value, str):
        what = "null" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: the text field {text_field!r} is {what}, not a string")
    return value


def _value(record: Any, where: str, field: Field) -> Any:
    return _text_of(record, where, field) if isinstance(field, str) else field(record, where)


def _json_texts(
    path: str, field: Field, *, start: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[Any]:
    """The value (`field`) of each JSON line; of the lines in bytes [start, end) only, when given (`start` at the
    beginning of a line, numbered `first_line`)."""
    with _open(path) as f:
        f.seek(start)
        position = start
        for number, raw in enumerate(f, first_line):
            if end is not None and position >= end:
                return
            position += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(
                    f"{path}, line {number}: not a JSON line ({e}); fix or remove that line"
                ) from e
            yield _value(record, f"{path}, line {number}", field)


def line_ranges(path: str, parts: int) -> list[tuple[int, int, int]]:
    """(start, end, number of the first line) of about `parts` byte ranges of a file, each cut at a line end,
    that together hold every line once."""
    size = os.path.getsize(path)
    cuts, line = [(0, 1)], 1
    with open(path, "rb") as f:
        for k in range(1, parts):
            target = size * k // parts
            if target <= cuts[-1][0]:
                continue
            f.seek(cuts[-1][0])
            line += f.read(target - cuts[-1][0]).count(b"\n")
            rest = f.readline()  # to the end of the line the cut falls in
            if not rest:
                break
            line += rest.endswith(b"\n")
            cuts.append((target + len(rest), line))
    cuts = [c for c in cuts if c[0] < size] or [(0, 1)]
    return [(s, e, first) for (s, first), (e, _) in zip(cuts, [*cuts[1:], (size, 0)], strict=True)]


def count_json_range(path: str, field: Field, start: int, end: int, first_line: int) -> int:
    """The documents of JSON lines in bytes [start, end), every line checked as `file_texts` checks it."""
    return sum(1 for _ in _json_texts(path, field, start=start, end=end, first_line=first_line))


def splittable(path: str) -> bool:
    """Whether a file's documents can be counted in byte ranges (an uncompressed JSON-lines file)."""
    return _format(path) == "json" and not path.endswith(".gz") and path.endswith(".jsonl")


def _text_lines(path: str) -> Iterator[str]:
    """One document per line, as `datasets`' text builder reads a .txt file."""
    with _open(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {number}: not UTF-8 text ({e})") from e


def _parquet_texts(path: str, field: Field) -> Iterator[Any]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except pyarrow.ArrowInvalid as e:  # "Parquet magic bytes not found in footer": it names no file
        raise DataError(
            f"{path}: not a Parquet file, though its name ends in .parquet ({e}); write it again as Parquet, or "
            "give it the extension of its real format (.jsonl, .txt)"
        ) from e
    if isinstance(field, str):
        if field not in f.schema_arrow.names:
            raise DataError(
                f"{path}: no column {field!r} (its columns: {f.schema_arrow.names}); set text_field"
            )
        row = 0
        for batch in f.iter_batches(columns=[field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if not isinstance(value, str):
                    raise DataError(f"{path}, row {row}: the text field {field!r} is not a string")
                row += 1
                yield value
        return
    row = 0
    for batch in f.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield field(record, f"{path}, row {row}")
            row += 1


def file_texts(files: list[str], field: Field) -> Iterator[Any]:
    """Each row's value, file after file: the text of a text field, or what the `field` function reads."""
    for path in files:
        kind = _format(path)
        if kind == "json":
            yield from _json_texts(path, field)
        elif kind == "parquet":
            yield from _parquet_texts(path, field)
        elif isinstance(field, str):
            yield from _text_lines(path)
        else:
            raise DataError(
                f"{path}: a .txt file holds one text per line, not conversations; give .jsonl or .parquet"
            )


def hub_texts(path: str, name: str | None, split: str, field: Field, *, streaming: bool) -> Iterator[Any]:
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split, streaming=streaming)
    except ValueError as e:
        raise DataError(f"path={path}: cannot load split {split!r} ({e})") from e
    for row, record in enumerate(ds):
        where = f"path={path}, split {split}, row {row}"
        if not isinstance(field, str):
            yield field(record, where)
            continue
        if field not in record:
            raise DataError(
                f"{where}: no text field {field!r} (its fields: {sorted(record)}); set text_field"
            )
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{where}: the text field {field!r} is not a string")
        yield value
