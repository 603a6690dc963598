"""Tokenizers: built from the training text (saved with the run) or loaded with AutoTokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, TokenizersBackend

from trainer.errors import ConfigError

EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def build_wordlevel_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word, in order of first appearance (deterministic)."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for text in texts:
        for word in text.split():
            if word not in vocab:
                vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return _wrap(tok)


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the given texts (GPT-2 style: every byte representable, no unknowns)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def _saved_as_generic(name_or_path: str) -> bool:
    """Whether a local directory holds a tokenizer saved as transformers' generic class (as ours are, built from the
    data). AutoTokenizer would otherwise pick the class that config.json's model_type names for some families
    (qwen2, for one), whose own pre-tokenizer and normalizer then replace the saved ones: the ids change."""
    file = Path(name_or_path) / "tokenizer_config.json"
    try:
        saved = json.loads(file.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return False
    return saved == "TokenizersBackend" and (file.parent / "tokenizer.json").is_file()


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False, gguf_file: str | None = None
) -> PreTrainedTokenizerBase:
    """A hub or local tokenizer (or the one inside a .gguf file), with EOS required and PAD defaulting to EOS."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if not gguf_file and _saved_as_generic(name_or_path):
        tok = TokenizersBackend.from_pretrained(name_or_path)
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    if tok.eos_token_id is None:
        raise ConfigError(
            f"tokenizer {name_or_path}: it has no EOS token (eos_token in its tokenizer_config.json), which "
            "marks where each document ends; pick a tokenizer that has one (data.tokenizer=NAME for "
            "trainer.train, tokenizer=NAME for trainer.prepare_data), set its eos_token, or build one from the "
            "data (data.tokenizer=bpe, tokenizer=bpe)"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
