"""`data=tokenized`: prepared datasets (trainer/data/prepared.py) as the loop's train and eval windows.

One source (`data.path`) or a weighted mixture (`data.sources`); the train windows are a `Mixture`, whose
`order(seed=)` is the weighted, resumable training order (trainer/data/mixture.py), and the eval windows are
every source's eval split, taken in turns (a window of each source, then the next of each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.data.mixture import Mixture, check_weights
from trainer.data.prepared import TOKENIZER_DIR, PreparedSplit, read_meta, tokenizer_hash
from trainer.data.tokenizer import load_tokenizer
from trainer.data.windows import windows_of
from trainer.errors import DataError
from trainer.utils import loading_from


def source_entries(cfg: Any) -> list[tuple[str, float, str]]:
    """(path, weight, the key it was given as) of each configured source."""
    if cfg.sources:
        return [(str(s.path), float(s.weight), f"data.sources[{i}].path") for i, s in enumerate(cfg.sources)]
    if cfg.path is None:
        raise DataError("data=tokenized needs data.path=DIR or data.sources=[{path: DIR, weight: W}, ...]")
    return [(str(cfg.path), 1.0, "data.path")]


def _tokenizer(
    cfg: Any, first: Path, meta: dict[str, Any], model_name_or_path: str | None, trust_remote_code: bool
):
    """The prepared tokenizer; a tokenizer named by data.tokenizer or the model must be that very one."""
    prepared = load_tokenizer(str(first / TOKENIZER_DIR))
    named, key = (
        (cfg.tokenizer, "data.tokenizer") if cfg.tokenizer else (model_name_or_path, "model.name_or_path")
    )
    if named:
        with loading_from(named, key=key):
            other = load_tokenizer(named, trust_remote_code=trust_remote_code)
        if tokenizer_hash(other) != meta["tokenizer"]["hash"]:
            raise DataError(
                f"{key}={named}: its tokenizer ({len(other)} tokens) is not the one {first} was prepared with "
                f"({meta['tokenizer']['name']}, {meta['tokenizer']['vocab_size']} tokens); the model would read "
                "other token ids than the data holds: prepare the data with this tokenizer "
                f"(prepare_data tokenizer={named}), or train with data.tokenizer=null and a model of its vocabulary"
            )
    if len(prepared) != meta["tokenizer"]["vocab_size"]:
        raise DataError(
            f"{first / TOKENIZER_DIR}: {len(prepared)} tokens where meta.json says "
            f"{meta['tokenizer']['vocab_size']}; prepare the dataset again"
        )
    return prepared


def build_tokenized(
    cfg: Any, *, model_name_or_path: str | None = None, trust_remote_code: bool = False
) -> tuple[Any, Mixture, Mixture]:
    """(tokenizer, train windows, eval windows) of the configured prepared datasets."""
    entries = source_entries(cfg)
    weights = check_weights([w for _, w, _ in entries])
    metas = [read_meta(Path(p), key=key) for p, _, key in entries]
    first = Path(entries[0][0])
    for (path, _, key), meta in zip(entries[1:], metas[1:], strict=True):
        if meta["tokenizer"]["hash"] != metas[0]["tokenizer"]["hash"]:
            raise DataError(
                f"{key}={path} was prepared with another tokenizer ({meta['tokenizer']['name']}) than {first} "
                f"({metas[0]['tokenizer']['name']}); every source of a mixture needs the same: prepare it again "
                f"with tokenizer={first / TOKENIZER_DIR}"
            )
    tokenizer = _tokenizer(cfg, first, metas[0], model_name_or_path, trust_remote_code)
    train, evals = [], []
    for (path, weight, key), meta in zip(entries, metas, strict=True):
        for split, out in (("train", train), ("eval", evals)):
            reader = PreparedSplit(Path(path), split, meta)
            windows = windows_of(reader, cfg, tokenizer, chat=bool(meta.get("chat")))
            if split == "train" and weight > 0 and len(windows) == 0:
                raise DataError(
                    f"{key}={path}: its train split gives no sequence of data.seq_len={cfg.seq_len} tokens "
                    f"({reader.num_tokens} tokens); lower data.seq_len, add data, or give it weight 0"
                )
            out.append(windows)
    identity = {
        "sources": [
            {"path": str(Path(p).resolve()), "fingerprint": m["fingerprint"], "weight": w}
            for (p, _, _), w, m in zip(entries, weights, metas, strict=True)
        ],
        "seq_len": int(cfg.seq_len),
        "packing": bool(cfg.packing),
        "truncation": str(cfg.truncation),
        "tokenizer": metas[0]["tokenizer"]["hash"],
    }
    allow = bool(cfg.allow_changed)
    return (
        tokenizer,
        Mixture(train, weights, identity=identity, allow_changed=allow),
        Mixture(evals, [1.0] * len(evals), identity=identity, in_turns=True),
    )
