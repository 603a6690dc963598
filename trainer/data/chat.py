"""Conversations as token ids and a per-token loss mask, for any chat template.

A row of the source becomes a list of `{role, content}` messages (`row_messages`: the `messages` and
`prompt_completion` formats, with configurable field names and a role map), which the tokenizer's chat template
(or `chat_template=PATH`) renders to text. The text is tokenized once, without adding special tokens a second
time (so at most the BOS the template writes), and the mask marks the tokens the loss is taken on.

Which characters belong to which message is found by rendering prefixes of the conversation: message i spans
from the end of render(messages[:i]) to the end of render(messages[:i+1]), and an assistant message's trained
part starts after render(messages[:i], add_generation_prompt=True), the text a model is prompted with. This
needs no `{% generation %}` markers, and it holds for any template whose render of a prefix is a prefix of the
whole (`TemplateError` otherwise). Tokens are mapped to characters through the tokenizer's offsets, so content
that tokenizes differently in context is still masked right. The end-of-turn token after an assistant's content
is trained (the model learns to stop; with pad == eos that is the EOS itself); whitespace the template writes
after that special token is not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from trainer.errors import DataError

STANDARD_ROLES = ("system", "user", "assistant", "tool")
DROP_NO_TRAINABLE = "no_trainable_tokens"  # meta.json's reason for a dropped row


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def row_messages(
    record: Any,
    where: str,
    *,
    fmt: str,
    messages_field: str,
    role_key: str,
    content_key: str,
    roles: Mapping[str, str],
    prompt_field: str,
    completion_field: str,
) -> list[dict[str, Any]]:
    """The row's conversation as `[{role, content, train?}]` with template roles; a malformed row is a
    DataError that names it (`where`: its file and line, or its row)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}, not an object (a row of the {fmt} format)")
    if fmt == "prompt_completion":
        out = []
        for field, role in ((prompt_field, "user"), (completion_field, "assistant")):
            if field not in record:
                raise DataError(
                    f"{where}: no field {field!r} (its keys: {sorted(record)[:10]}); set "
                    f"{'prompt_field' if role == 'user' else 'completion_field'} to the key holding it"
                )
            if not isinstance(record[field], str):
                raise DataError(f"{where}: the field {field!r} is {_what(record[field])}, not a string")
            out.append({"role": role, "content": record[field]})
        return out
    if messages_field not in record:
        raise DataError(
            f"{where}: no field {messages_field!r} (its keys: {sorted(record)[:10]}); set messages_field to the "
            "key holding the list of messages"
        )
    messages = record[messages_field]
    if not isinstance(messages, list):
        raise DataError(f"{where}: the field {messages_field!r} is {_what(messages)}, not a list of messages")
    if not messages:
        raise DataError(f"{where}: an empty conversation (no messages); remove that row")
    known = dict(roles) if roles else {r: r for r in STANDARD_ROLES}
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            keys = sorted(m)[:10] if isinstance(m, dict) else _what(m)
            raise DataError(
                f"{where}: message {i} is not an object with {role_key!r} and {content_key!r} (it has {keys}); "
                "set role_key and content_key to the keys the messages use"
            )
        role = m[role_key]
        if role not in known:
            raise DataError(
                f"{where}: message {i} has the role {role!r}, which the role map does not know ({sorted(known)}); "
                "map it with roles={SOURCE_ROLE: user|assistant|system}, e.g. 'roles={human: user, gpt: assistant}'"
            )
        content = m[content_key]
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i}'s {content_key!r} is {_what(content)}, not a string")
        train = m.get("train", True)
        if not isinstance(train, bool):
            raise DataError(f"{where}: message {i}'s 'train' is {_what(train)}, not true or false")
        message = {"role": known[role], "content": content}
        if not train:
            message["train"] = False
        out.append(message)
    return out


def _what(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


class TemplateError(DataError):
    """The chat template renders a prefix of a conversation otherwise than the start of the whole."""


class ChatEncoder:
    """Conversations -> (token ids, trained-token mask) with a tokenizer and its (or a given) chat template."""

    def __init__(self, tokenizer: Any, *, template: str | None = None, train_on: str = "assistant") -> None:
        self.tokenizer = tokenizer
        self.template = template or getattr(tokenizer, "chat_template", None)
        if not self.template:
            raise DataError(
                f"the tokenizer {getattr(tokenizer, 'name_or_path', '') or ''} has no chat template to render "
                "conversations with; give one with chat_template=PATH (a Jinja file, e.g. the template of the "
                "model family you fine-tune), or use a tokenizer that ships one"
            )
        self.train_on = str(train_on)
        # Special tokens after which the template's trailing whitespace (ChatML's "\n") is not trained.
        self.special = sorted({t for t in tokenizer.all_special_tokens if t} | _added_special(tokenizer))

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool = False) -> str:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self.tokenizer.apply_chat_template(
            plain, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans [start, end) the loss is taken on."""
        full = self.render(messages)
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        spans: list[tuple[int, int]] = []
        previous_end = 0
        for i, m in enumerate(messages):
            end = len(self._prefix(messages, i + 1, full))
            trained = m.get("train", True)
            if self.train_on == "all":
                if trained:
                    spans.append((previous_end, end))
            elif (
                m["role"] == "assistant" and trained and (self.train_on == "assistant" or i == last_assistant)
            ):
                start = len(self._prefix(messages, i, full, generation_prompt=True))
                spans.append((start, self._trim_after_end_of_turn(full, start, end)))
            previous_end = end
        if self.train_on == "all" and previous_end < len(full):
            spans.append((previous_end, len(full)))  # what the template writes after the last message
        return full, spans

    def _prefix(
        self, messages: list[dict[str, Any]], n: int, full: str, *, generation_prompt: bool = False
    ) -> str:
        text = self.render(messages[:n], generation_prompt=generation_prompt) if n else ""
        if n and not full.startswith(text):
            what = "prompted for the next message" if generation_prompt else "cut after it"
            raise TemplateError(
                f"the chat template renders the conversation's first {n} message(s) ({what}) otherwise than the "
                f"start of the whole conversation, so the trained tokens cannot be located (templates that rewrite "
                f"earlier turns, e.g. dropping past reasoning, do this); give chat_template=PATH with a template "
                f"that renders each turn the same wherever it stands. Prefix: {text[-80:]!r}"
            )
        return text

    def _trim_after_end_of_turn(self, full: str, start: int, end: int) -> int:
        stripped = len(full[start:end].rstrip()) + start
        if stripped < end and any(full.endswith(t, start, stripped) for t in self.special):
            return stripped
        return end

    def encode(self, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (uint32) and a mask (uint8, 1 where the token is a trained target) of one conversation."""
        full, spans = self.spans(messages)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.uint32)
        mask = np.zeros(len(ids), dtype=np.uint8)
        if spans and len(ids):
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            for start, end in spans:
                mask[(offsets[:, 1] > start) & (offsets[:, 0] < end)] = 1
        mask[:1] = 0  # nothing predicts the first token
        return ids, mask


def _added_special(tokenizer: Any) -> set[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
