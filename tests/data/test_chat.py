"""Conversations to token ids and loss masks (trainer/data/chat.py), on SmolLM2's real ChatML template, a
Llama-3-style template and a template with generation markers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.chat_fixtures import (
    CHATML_GENERATION_TEMPLATE,
    CONVERSATIONS,
    LLAMA3_SPECIAL,
    LLAMA3_TEMPLATE,
    with_template,
)
from trainer.data.chat import ChatEncoder, TemplateError, row_messages
from trainer.errors import DataError


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer_dir):
    from trainer.data.tokenizer import load_tokenizer

    return load_tokenizer(str(smollm2_tokenizer_dir))


def trained_runs(tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The decoded text of each run of consecutive trained tokens."""
    runs, start = [], None
    for i, m in enumerate([*mask.tolist(), 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tokenizer.decode(ids[start:i].tolist(), skip_special_tokens=False))
            start = None
    return runs


def assistant_turns(conversation, *, end_of_turn: str, trim: bool = False) -> list[str]:
    return [
        (m["content"].strip() if trim else m["content"]) + end_of_turn
        for m in conversation
        if m["role"] == "assistant"
    ]


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_smollm2_trains_exactly_each_assistant_content_and_its_end_of_turn(smol, conversation):
    messages = CONVERSATIONS[conversation]
    ids, mask = ChatEncoder(smol).encode(messages)
    assert trained_runs(smol, ids, mask) == assistant_turns(messages, end_of_turn="<|im_end|>")
    # the ids are the rendered text's own tokens: what the model is prompted with at inference starts them
    rendered = smol.apply_chat_template(messages, tokenize=False)
    assert ids.tolist() == smol(rendered, add_special_tokens=False)["input_ids"]
    own_system = messages[0]["role"] == "system"
    default_system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    assert rendered.startswith(default_system) != own_system  # the template adds its default system prompt


def test_with_pad_equal_to_eos_the_eos_that_ends_each_assistant_turn_is_trained(smol):
    assert smol.pad_token_id == smol.eos_token_id  # SmolLM2: <|im_end|> is both
    messages = CONVERSATIONS[1]
    ids, mask = ChatEncoder(smol).encode(messages)
    trained = ids[mask == 1].tolist()
    assert trained.count(smol.eos_token_id) == sum(m["role"] == "assistant" for m in messages)
    assert trained[-1] == smol.eos_token_id


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_a_llama3_style_template_trains_each_assistant_content_and_eot_with_one_bos(smol, conversation):
    tok = with_template(smol, LLAMA3_TEMPLATE, LLAMA3_SPECIAL, bos="<|begin_of_text|>")
    messages = CONVERSATIONS[conversation]
    ids, mask = ChatEncoder(tok).encode(messages)
    # the template trims contents; no whitespace follows <|eot_id|>
    assert trained_runs(tok, ids, mask) == assistant_turns(messages, end_of_turn="<|eot_id|>", trim=True)
    assert ids.tolist().count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_the_mask_equals_transformers_assistant_mask_on_a_template_with_generation_markers(
    smol, conversation
):
    tok = with_template(smol, CHATML_GENERATION_TEMPLATE)
    messages = CONVERSATIONS[conversation]
    ids, mask = ChatEncoder(tok).encode(messages)
    reference = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids.tolist() == list(reference["input_ids"])
    assert mask.tolist() == list(reference["assistant_masks"])


def test_train_on_last_trains_the_final_assistant_turn_only_and_all_trains_every_token(smol):
    messages = CONVERSATIONS[2]
    ids, mask = ChatEncoder(smol, train_on="last").encode(messages)
    assert trained_runs(smol, ids, mask) == ['"héllo"!<|im_end|>']
    ids, mask = ChatEncoder(smol, train_on="all").encode(messages)
    assert mask[0] == 0 and mask[1:].all()  # every token is a target but the first, which nothing predicts


def test_a_message_marked_train_false_is_never_trained(smol):
    messages = [dict(m) for m in CONVERSATIONS[1]]
    messages[2]["train"] = False  # the first assistant turn
    for train_on in ("assistant", "all"):
        ids, mask = ChatEncoder(smol, train_on=train_on).encode(messages)
        text = "".join(trained_runs(smol, ids, mask))
        assert " 4<|im_end|>" not in text and "9.\n<|im_end|>" in text


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_chat_template(smol):
    # renders the last message otherwise than when it is not last (as templates that drop past reasoning do)
    rewriting = (
        "{%- for m in messages %}{{- m['role'] + ': ' + m['content'] }}{% if loop.last %} (last){% endif %}"
        "{{- '<|im_end|>' }}{%- endfor %}"
    )
    with pytest.raises(TemplateError, match="chat_template=PATH"):
        ChatEncoder(with_template(smol, rewriting)).encode(CONVERSATIONS[1])


def test_a_tokenizer_without_a_chat_template_is_refused_naming_chat_template(smol):
    bare = with_template(smol, None)
    with pytest.raises(DataError, match="no chat template.*chat_template=PATH"):
        ChatEncoder(bare)


READ = dict(
    fmt="messages",
    messages_field="conversations",
    role_key="from",
    content_key="value",
    roles={"human": "user", "gpt": "assistant", "system": "system"},
    prompt_field="prompt",
    completion_field="completion",
)


def test_sharegpt_rows_read_with_their_own_keys_and_roles():
    row = {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello", "train": False}]
    }
    assert row_messages(row, "f.jsonl, line 3", **READ) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "train": False},
    ]
    pair = {"prompt": "2+2?", "completion": "4"}
    assert row_messages(pair, "x", **{**READ, "fmt": "prompt_completion"}) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


@pytest.mark.parametrize(
    "row, fmt, error",
    [
        ({"conversations": [{"from": "robot", "value": "x"}]}, "messages", "role 'robot'.*roles="),
        ({"conversations": []}, "messages", "empty conversation"),
        ({"text": "x"}, "messages", "no field 'conversations'.*messages_field"),
        (
            {"conversations": [{"from": "human"}]},
            "messages",
            "message 0 is not an object with 'from' and 'value'",
        ),
        ({"conversations": [{"from": "gpt", "value": None}]}, "messages", "message 0's 'value' is null"),
        ({"prompt": "x"}, "prompt_completion", "no field 'completion'.*completion_field"),
    ],
)
def test_a_malformed_row_is_named_with_its_file_and_line(row, fmt, error):
    with pytest.raises(DataError, match=f"^data.jsonl, line 7: .*{error}"):
        row_messages(row, "data.jsonl, line 7", **{**READ, "fmt": fmt})
