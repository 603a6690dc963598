"""Instruction data made here, deterministically, since none can be downloaded: `python -m trainer.data.instructions
OUTPUT_DIR` writes two conversational datasets as JSON lines ({"messages": [{role, content}, ...]} per row).

- `pydoc_qa.{train,eval}.jsonl`: multi-turn questions and answers about CPython's pydoc topics (real English
  text every CPython ships): a paragraph of a topic asked for by its opening words and answered with its first
  sentences, then often a follow-up for the next sentence; some rows open with a system prompt. Every tenth
  topic is held out whole for eval: its text is never trained on.
- `reverse.{train,eval}.jsonl`: a task a tiny model learns from scratch: "Reverse: w1 ... wn" answered by the
  words in reverse order, over a small vocabulary; the eval items are word sequences the train split lacks, so
  exact-match accuracy on them measures what was learned, not what was memorized. `reverse_tokenizer/` is a
  tokenizer for it: a word per token, ChatML's special tokens and template (a real chat template, with its
  end-of-turn token as EOS), so that a tiny model on a vocabulary of a few dozen trains in seconds.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

QUESTIONS = [
    "In the Python documentation on '{key}', what does the paragraph starting \"{opening}\" say?",
    "Quote the Python docs on '{key}': the passage that begins \"{opening}\".",
    "What does Python's '{key}' topic say, from \"{opening}\" on?",
]
FOLLOW_UPS = ["Tell me more.", "What comes next in that section?", "Go on.", "And then?"]
SYSTEM = "You answer questions about Python's documentation, quoting it."
REVERSE_WORDS = [
    *("apple", "river", "stone", "cloud", "tiger", "paper", "music", "green", "silver", "window"),
    *("garden", "candle", "rocket", "ocean", "forest", "pencil", "violet", "thunder", "marble", "lantern"),
]


def _paragraphs(text: str) -> list[list[str]]:
    """The sentences of each prose paragraph of a topic (headings, their underlines and code left out)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or block.startswith((" ", "\t", ">>>")):
            continue  # code and indented examples
        if len(lines) >= 2 and re.fullmatch(r"[*=\-~^]{3,}", lines[1].strip()):
            lines = lines[2:]  # a heading and its underline
        prose = " ".join(" ".join(lines).split())
        sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", prose) if 20 <= len(s) <= 400]
        if sentences:
            out.append(sentences)
    return out


def pydoc_conversations(*, seed: int = 0, per_topic: int = 8) -> dict[str, list[dict]]:
    """{'train': rows, 'eval': rows}: up to `per_topic` conversations per pydoc topic, one per prose paragraph
    (its opening sentences, and often a follow-up for the next one); every tenth topic is held out whole."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    for i, key in enumerate(sorted(topics)):
        for sentences in [p for p in _paragraphs(topics[key]) if len(p) >= 2][:per_topic]:
            opening = " ".join(sentences[0].split()[:6])
            messages = [
                {"role": "user", "content": rng.choice(QUESTIONS).format(key=key, opening=opening)},
                {
                    "role": "assistant",
                    "content": " ".join(sentences[:2]) if len(sentences) > 2 else sentences[0],
                },
            ]
            if len(sentences) > 2 and rng.random() < 0.6:
                messages += [
                    {"role": "user", "content": rng.choice(FOLLOW_UPS)},
                    {"role": "assistant", "content": sentences[2]},
                ]
            elif len(sentences) == 2:
                messages += [
                    {"role": "user", "content": rng.choice(FOLLOW_UPS)},
                    {"role": "assistant", "content": sentences[1]},
                ]
            if rng.random() < 0.25:
                messages.insert(0, {"role": "system", "content": SYSTEM})
            out["eval" if i % 10 == 9 else "train"].append({"messages": messages})
    return out


def reverse_conversations(
    *, num_train: int = 4000, num_eval: int = 200, min_words: int = 2, max_words: int = 5, seed: int = 0
) -> dict[str, list[dict]]:
    """{'train': rows, 'eval': rows} of word-reversal conversations; no eval sequence occurs in train."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    for split, count in (("eval", num_eval), ("train", num_train)):
        while len(out[split]) < count:
            words = tuple(rng.choice(REVERSE_WORDS) for _ in range(rng.randint(min_words, max_words)))
            if words in seen:
                continue
            seen.add(words)
            out[split].append(
                {
                    "messages": [
                        {"role": "user", "content": "Reverse: " + " ".join(words)},
                        {"role": "assistant", "content": " ".join(reversed(words))},
                    ]
                }
            )
    return out


CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# ChatML with `{% generation %}` markers around what the assistant writes (its content and <|im_end|>): the same
# tokens as SmolLM2's template given an explicit system message, for tools that need the markers (TRL's
# assistant_only_loss, transformers' return_assistant_tokens_mask); this project's masks do not.
CHATML_GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def reverse_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer for the reversal task with ChatML's special tokens and template, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
    words = ["system", "user", "assistant", "Reverse:", *REVERSE_WORDS]
    vocab = {w: i for i, w in enumerate([*special, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>", unk_token="<|unk|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(directory))
    return Path(directory)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def write_all(directory: Path) -> list[Path]:
    """Both datasets' train and eval files under `directory`."""
    written = []
    for name, splits in (("pydoc_qa", pydoc_conversations()), ("reverse", reverse_conversations())):
        for split, rows in splits.items():
            written.append(write_jsonl(Path(directory) / f"{name}.{split}.jsonl", rows))
    reverse_tokenizer(Path(directory) / "reverse_tokenizer")
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m trainer.data.instructions OUTPUT_DIR", file=sys.stderr)
        sys.exit(2)
    for path in write_all(Path(sys.argv[1])):
        print(f"{path}: {sum(1 for _ in path.open())} conversations")
