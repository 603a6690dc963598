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

# `embedded` (generated Markov corpus), `pydoc` (CPython's pydoc topics), `hf` (hub dataset or local files),
# `tokenized` (directories written by `python -m trainer.prepare_data`, read through memmaps).
DataSource = Choice("DataSource", "embedded pydoc hf tokenized")
# `text`: a document per row (pretraining); `messages`: a list of {role, content} per row; `prompt_completion`: a
# prompt and a completion per row (a user turn and an assistant turn). The last two are chat-template rendered.
DataFormat = Choice("DataFormat", "text messages prompt_completion")
# The loss mask of a conversation: `assistant` every assistant turn (content and end-of-turn token), `last` the
# final assistant turn, `all` every token.
TrainOn = Choice("TrainOn", "assistant last all")
# A conversation longer than data.seq_len: cut to its first seq_len tokens, or left out.
Truncation = Choice("Truncation", "truncate drop")


@dataclass
class ChatFields:
    """How rows of a conversational source read (trainer.prepare_data and data=hf share them)."""

    format: DataFormat = MISSING
    # format=messages: the field holding each row's list of messages, and the keys of each message.
    messages_field: str = MISSING
    role_key: str = MISSING
    content_key: str = MISSING
    # The source's roles -> the template's (system, user, assistant, tool); {} keeps those four as they are.
    roles: dict[str, str] = MISSING
    # format=prompt_completion: the fields of the prompt (a user turn) and the completion (the assistant's).
    prompt_field: str = MISSING
    completion_field: str = MISSING
    # A Jinja chat template file instead of the tokenizer's own.
    chat_template: str | None = MISSING
    # Which tokens of a conversation are trained: assistant, last or all.
    train_on: TrainOn = MISSING


@dataclass
class SourceConfig:
    """One prepared dataset of a `data=tokenized` mixture: `{path: DIR, weight: W}`."""

    # A directory written by `python -m trainer.prepare_data`.
    path: str = MISSING
    # Its share of the training samples (weights are normalized to sum to 1).
    weight: float = MISSING


@dataclass
class DataConfig(ChatFields):
    source: DataSource = MISSING
    # Hub dataset name, or a builder (`json`, `parquet`, `text`) for local files; inferred from `data_files` when null.
    # data=tokenized: the one prepared directory to train on (or use `sources`).
    path: str | None = MISSING
    # data=tokenized: a weighted mixture of prepared directories, [{path: DIR, weight: W}, ...] (instead of path).
    sources: list[SourceConfig] = MISSING
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
    # Conversations: packed whole into windows (best-fit decreasing, least-full repacked), or one per window.
    packing: bool = MISSING
    # Text windows: positions restart and attention stops at each document's EOS (conversations always are).
    document_mask: bool = MISSING
    # A conversation longer than seq_len: truncate (its first seq_len tokens) or drop it.
    truncation: Truncation = MISSING
    # `wordlevel` or `bpe` build a tokenizer from the train split and save it with the run;
    # anything else is an AutoTokenizer name or path; null uses the model's own.
    tokenizer: str | None = MISSING
    # Vocabulary size for a built `bpe` tokenizer.
    tokenizer_vocab_size: int = MISSING
    # Settings of the embedded Markov source (ignored by other sources).
    markov: dict[str, Any] = MISSING
    # Where generated corpora and the tokenized cache (a prepared dataset, reused while its text, tokenizer and
    # settings are the same) are written; relative paths are inside the run directory.
    cache_dir: str = MISSING
    # Processes used to tokenize.
    num_proc: int = MISSING
    # Resume a checkpoint trained on other data (sources, weights, tokenizer, seq_len) on purpose: training
    # continues on this data from the checkpoint's global sample count (data=tokenized).
    allow_changed: bool = MISSING


def register_data_configs() -> None:
    ConfigStore.instance().store(group="data", name="schema", node=DataConfig)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_data(d: Any) -> None:
    """The data group's values (the source is a closed choice: Hydra has checked it)."""
    _check(d.seq_len > 1, f"data.seq_len={d.seq_len}: must be at least 2")
    _check(0.0 < d.eval_fraction < 1.0, f"data.eval_fraction={d.eval_fraction}: must be in (0, 1)")
    _check(
        d.format == "text" or d.source == "hf",
        f"data.format={d.format} reads conversations from user data: use it with data=hf (or prepare them "
        f"with `python -m trainer.prepare_data format={d.format}` and train with data=tokenized); "
        f"data={d.source} is text",
    )
    _check(
        d.format == "text" or d.tokenizer not in ("bpe", "wordlevel"),
        f"data.format={d.format} renders conversations with a chat template and its special tokens: train with "
        f"the model's tokenizer (data.tokenizer=null, or a name/path), not a built {d.tokenizer} one",
    )
    if d.source == "embedded":
        _validate_markov(d.markov)
    if d.source == "tokenized":
        _check(
            bool(d.sources) != (d.path is not None),
            "data=tokenized reads prepared directories: give data.path=DIR, or "
            "'data.sources=[{path: DIR1, weight: 0.7}, {path: DIR2, weight: 0.3}]', one of them",
        )
        weights = [float(s.weight) for s in d.sources]
        for i, w in enumerate(weights):
            _check(
                w >= 0 and w != float("inf"), f"data.sources[{i}].weight={w}: must be a finite number >= 0"
            )
        _check(
            not weights or sum(weights) > 0,
            f"data.sources: every weight is 0 ({weights}); give at least one source a positive weight",
        )


def _validate_markov(m: Any) -> None:
    """The generated corpus's settings, each named before the corpus is generated."""
    num_words = m.get("num_words", 1)
    _check(num_words >= 1, f"data.markov.num_words={num_words}: must be at least 1 (the source's vocabulary)")
    successors = m.get("successors", 1)
    _check(
        1 <= successors <= num_words,
        f"data.markov.successors={successors}: must be between 1 and data.markov.num_words={num_words}",
    )
    mean_doc_words = m.get("mean_doc_words", 2)
    _check(mean_doc_words > 1, f"data.markov.mean_doc_words={mean_doc_words}: must be > 1")
    for key in ("train_tokens", "eval_tokens"):
        value = m.get(key, 1)
        _check(value >= 1, f"data.markov.{key}={value}: must be at least 1 (words generated)")
