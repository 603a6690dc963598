"""The data group's schema (conf/data/*.yaml) and the checks its types cannot express.

Training, trainer.quantize (calibration data) and trainer.evaluate (the eval split) compose the same group.
Every default lives in the YAML options, each of which sets every key (tests/test_config.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import Choice
from trainer.errors import ConfigError

# `embedded` (generated Markov corpus), `pydoc` (CPython's pydoc topics), `hf` (hub dataset or local files).
DataSource = Choice("DataSource", "embedded pydoc hf")


@dataclass
class DataConfig:
    source: DataSource = MISSING
    # Hub dataset name, or a builder (`json`, `parquet`, `text`) for local files; inferred from `data_files` when null.
    path: str | None = MISSING
    # Dataset configuration name on the hub.
    name: str | None = MISSING
    # Local files (a path, a glob, or a list), loaded with the builder their extension names.
    data_files: Any = MISSING
    # Column holding the text.
    text_field: str = MISSING
    train_split: str = MISSING
    # Split used for evaluation; when null, `eval_fraction` of the train documents is held out.
    eval_split: str | None = MISSING
    # Fraction of documents held out for evaluation when there is no eval split.
    eval_fraction: float = MISSING
    # Tokens per training sequence.
    seq_len: int = MISSING
    # Concatenate documents (separated by EOS) into full windows; false pads each document to seq_len.
    packing: bool = MISSING
    # `wordlevel` or `bpe` build a tokenizer from the train split and save it with the run;
    # anything else is an AutoTokenizer name or path; null uses the model's own.
    tokenizer: str | None = MISSING
    # Vocabulary size for a built `bpe` tokenizer.
    tokenizer_vocab_size: int = MISSING
    # Settings of the embedded Markov source (ignored by other sources).
    markov: dict[str, Any] = MISSING
    # Where generated corpora are written (relative paths are inside the run directory).
    cache_dir: str = MISSING
    # Processes used to tokenize.
    num_proc: int = MISSING


def register_data_configs() -> None:
    ConfigStore.instance().store(group="data", name="schema", node=DataConfig)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_data(d: Any) -> None:
    """The data group's values (the source is a closed choice: Hydra has checked it)."""
    _check(d.seq_len > 1, f"data.seq_len={d.seq_len}: must be at least 2")
    _check(0.0 < d.eval_fraction < 1.0, f"data.eval_fraction={d.eval_fraction}: must be in (0, 1)")
