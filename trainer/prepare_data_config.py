"""trainer.prepare_data's schema (conf/prepare_data.yaml), registered by the command alone (as each command's
schema is): composing it imports nothing of training's.

Every default lives in conf/prepare_data.yaml, which sets every key (tests/test_config.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.data.config import ChatFields


@dataclass
class PrepareDataConfig(ChatFields):
    # Local files: a path, a glob, or a list of them (.jsonl/.json, .parquet, .txt; .gz too), read in order.
    data_files: Any = MISSING
    # A hub dataset name instead of data_files.
    path: str | None = MISSING
    # The hub dataset's configuration name.
    name: str | None = MISSING
    # The hub dataset's split read for training.
    split: str = MISSING
    # The hub dataset's split written as eval; null holds out `eval_fraction` of the documents.
    eval_split: str | None = MISSING
    # Local files written as the eval split, whole (with data_files; null: eval_split or eval_fraction).
    eval_data_files: Any = MISSING
    # Fraction of the documents (evenly spread) written to the eval split when eval_split is null.
    eval_fraction: float = MISSING
    # Stream the hub dataset (nothing larger than a buffer held) instead of downloading it whole first.
    streaming: bool = MISSING
    # The field (column, JSON key) holding each document's text; .txt files: one document per line.
    text_field: str = MISSING
    # An AutoTokenizer name or directory (the model's), or `bpe` / `wordlevel` to build one from the train split.
    tokenizer: str = MISSING
    # Vocabulary of a built `bpe` tokenizer.
    tokenizer_vocab_size: int = MISSING
    # Where the prepared dataset is written (a killed run continues when run again with the same settings).
    output_dir: str = MISSING
    # A shard is closed once it holds this many tokens (documents are never split over shards).
    shard_tokens: int = MISSING
    # Tokenizer processes.
    num_proc: int = MISSING
    # Documents per tokenizer task (2 x num_proc tasks in flight bound the memory).
    batch_docs: int = MISSING
    # The progress bar (documents, tokens, tokens/s).
    progress_bar: bool = MISSING


def register_prepare_data_configs() -> None:
    ConfigStore.instance().store(name="schema_prepare_data", node=PrepareDataConfig)
