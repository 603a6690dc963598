"""Look at what a model says: `python -m trainer.generate model=PATH prompt="text"` (or `messages=FILE`).

The model is any path `trainer.evaluate` takes (a checkpoint or a run directory's latest, an hf/ export, a
trainer.quantize output, a compressed-tensors export, a .gguf file or a directory holding one), loaded by the
same loaders, or an adapter/ directory (the peft format) on its base. Each conversation is rendered with the
chat template (the tokenizer's, or `chat_template=FILE`) and a generation prompt, and tokenized as rendered:
the template writes its own special tokens (BOS included), none is added again. With `chat=false` the prompt
is the model's raw input.

Decoding is transformers' `generate` (greedy, or sampling from `seed`), streamed to stdout token by token. A
completion ends at the end of a turn: the tokenizer's EOS, the model's generation_config EOS ids, and the
template's end-of-turn token when it is one special token (`<|im_end|>` of ChatML, `<|eot_id|>` of Llama 3);
at one of the `stop` strings; or after `max_new_tokens`. What ends it is not printed. With `output=FILE.jsonl`
each completion is also a record: the messages, the rendered prompt, the completion, the number of new tokens
and the stop reason (`end_of_turn`, `stop` or `max_new_tokens`).
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import hydra
import torch
from omegaconf import DictConfig
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from trainer.cli import run
from trainer.errors import ConfigError, DataError, InputNotFoundError
from trainer.generate_config import register_generate_configs
from trainer.model_paths import (
    ADAPTER_CONFIG,
    MODEL_KINDS,
    is_adapter_dir,
    load_adapter,
    load_model,
    tokenizer_of,
)
from trainer.utils import (
    check_output_file,
    register_package_resolver,
    resolve_device,
    resolve_dtype,
)

# A directory of its own: in conf/, `model=PATH` would be taken for an option of the training config's model group.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf" / "generate")
register_generate_configs()  # its own schema only: generating imports nothing of training's
register_package_resolver()

Message = dict[str, str]


@dataclass
class Completion:
    """What one conversation got: the text (up to a stop string) and the new token ids but an end-of-turn."""

    text: str
    token_ids: list[int]
    stop_reason: str  # end_of_turn, stop or max_new_tokens


# ---- the checks, before any model is loaded ---------------------------------------------------------------


def check_generate_config(cfg: Any) -> torch.device:
    """Refuse a value that cannot work, naming the key; the device to run on."""
    if (cfg.prompt is None) == (cfg.messages is None):
        given = "both" if cfg.prompt is not None else "neither"
        raise ConfigError(
            f'prompt and messages: {given} given; give one: prompt="text" (one user message) or '
            "messages=FILE (a .json conversation or a .jsonl file of them)"
        )
    if not cfg.chat and (cfg.messages is not None or cfg.system is not None):
        key = "messages" if cfg.messages is not None else "system"
        raise ConfigError(
            f'{key} with chat=false: a raw prompt has no roles; give prompt="text" alone, or chat=true'
        )
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens}: must be >= 1")
    if cfg.output is not None:
        check_output_file("output", cfg.output)
    if cfg.do_sample:
        if cfg.temperature <= 0:
            raise ConfigError(
                f"temperature={cfg.temperature} with do_sample=true: must be > 0 (for greedy decoding, "
                "do_sample=false)"
            )
        if not 0 < cfg.top_p <= 1:
            raise ConfigError(f"top_p={cfg.top_p}: must be in (0, 1] (1.0: no cut)")
        if cfg.top_k < 0:
            raise ConfigError(f"top_k={cfg.top_k}: must be >= 0 (0: no cut)")
    if any(s == "" for s in cfg.stop):
        raise ConfigError("stop: an empty string would end every completion at once; remove it")
    if not Path(cfg.model).exists():
        raise InputNotFoundError(f"model={cfg.model}: no such file or directory; give {MODEL_KINDS}")
    if cfg.base is not None and not is_adapter_dir(Path(cfg.model)):
        raise ConfigError(
            f"base={cfg.base} with model={cfg.model}, which is not an adapter/ directory (no {ADAPTER_CONFIG}): "
            "base= names the model an adapter adapts; drop it"
        )
    for key in ("chat_template", "messages"):
        path = cfg[key]
        if path is not None and not Path(path).is_file():
            raise InputNotFoundError(f"{key}={path}: no such file")
    return resolve_device(cfg.device, key="device")


def read_conversations(path: str | Path) -> list[list[Message]]:
    """The conversations of a messages file: a .json file holds one (a list of {role, content}, or an object
    with a `messages` key), a .jsonl file one per non-empty line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"messages={path}: not UTF-8 text ({err})") from err
    if path.suffix == ".jsonl":
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        lines = [(None, text)]
    conversations = []
    for number, line in lines:
        where = f"messages={path}" + (f", line {number}" if number is not None else "")
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err})") from err
        conversations.append(_conversation(value, where))
    if not conversations:
        raise DataError(f"messages={path}: holds no conversation; give one list of {{role, content}} a line")
    return conversations


def _conversation(value: Any, where: str) -> list[Message]:
    shape = (
        'a conversation is a list of {"role": ..., "content": ...} messages (or an object with a "messages" '
        "key holding one)"
    )
    if isinstance(value, dict) and "messages" in value:
        value = value["messages"]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {'an empty list' if value == [] else type(value).__name__}; {shape}")
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: message {i} is {json.dumps(message)[:80]}, not {{role, content}} strings; {shape}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def conversations_of(cfg: Any) -> list[list[Message]] | None:
    """The conversations to complete, the system message first in each; None for a raw prompt (chat=false)."""
    if not cfg.chat:
        return None
    found = (
        read_conversations(cfg.messages)
        if cfg.messages is not None
        else [[{"role": "user", "content": cfg.prompt}]]
    )
    if cfg.system is None:
        return found
    for n, conversation in enumerate(found):
        if conversation[0]["role"] == "system":
            raise ConfigError(
                f"system= and messages={cfg.messages}: conversation {n + 1} has its own system message; give "
                "the system message once, in the file or with system="
            )
    return [[{"role": "system", "content": cfg.system}, *c] for c in found]


# ---- the prompt -------------------------------------------------------------------------------------------


def chat_template_of(tokenizer: Any, template_file: str | None, model: str) -> str:
    """The template text: `template_file`'s, else the tokenizer's; a tokenizer without one is an error."""
    if template_file is not None:
        return Path(template_file).read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise ConfigError(
            f"model={model}: its tokenizer has no chat template; give one with chat_template=PATH (a Jinja "
            "file), or chat=false to pass the prompt to the model as raw text"
        )
    return tokenizer.chat_template


def render_prompt(tokenizer: Any, messages: list[Message], template: str) -> str:
    """The conversation as the model reads it, up to the start of the assistant's turn."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def prompt_ids(tokenizer: Any, text: str, *, chat: bool) -> list[int]:
    """A rendered template already holds its special tokens (BOS): none is added again. A raw prompt gets what
    the tokenizer adds to any text."""
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


# An assistant message no template changes (Llama 3's trims the content: no space-like character), to find
# what the template writes after a turn.
_PROBE = "Zq7EndOfTurnProbe7qZ"


def end_of_turn_id(tokenizer: Any, template: str) -> int | None:
    """The special token the template writes right after an assistant message (`<|im_end|>`, `<|eot_id|>`),
    or None when it writes none there (or the template cannot render a user-assistant exchange)."""
    exchange = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(exchange, chat_template=template, tokenize=False)
    except Exception:  # a template may refuse this exchange (raise_exception): then it names no token
        return None
    after = text.partition(_PROBE)[2]
    special = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token in sorted(special, key=len, reverse=True):  # the longest match: `<|im_end|>` before `<|im`
        if after.startswith(token):
            return special[token]
    return None


def end_ids(tokenizer: Any, model: Any, end_of_turn: int | None) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, the model's generation_config EOS ids, the
    template's end of turn."""
    ids = [tokenizer.eos_token_id, end_of_turn]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


# ---- decoding ---------------------------------------------------------------------------------------------


class _Streamer(BaseStreamer):
    """Receives each new token from `generate`, writes the text that is final to `out`, and ends the
    completion at an end id or a stop string. Text that may yet become a stop string, or an incomplete UTF-8
    character, is held back until the next token decides."""

    def __init__(self, tokenizer: Any, *, end: list[int], stop: list[str], out: TextIO | None) -> None:
        self.tokenizer, self.end_ids, self.stop, self.out = tokenizer, set(end), list(stop), out
        self.prompt_seen = False
        self.ids: list[int] = []
        self.text = ""
        self.printed = 0
        self.reason: str | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate passes the prompt first
            self.prompt_seen = True
            return
        if self.reason is not None:
            return
        token = int(value.reshape(-1)[0])
        if token in self.end_ids:
            self.reason = "end_of_turn"
            return
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        cut = min((self.text.find(s) for s in self.stop if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.reason = self.text[:cut], "stop"
            self._write(len(self.text))
            return
        held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        final = len(self.text) - held
        if self.text[:final].endswith("\ufffd"):  # the start of a character whose bytes are still to come
            final -= 1
        self._write(final)

    def end(self) -> None:
        self._write(len(self.text))

    def _write(self, upto: int) -> None:
        if self.out is not None and upto > self.printed:
            self.out.write(self.text[self.printed : upto])
            self.out.flush()
        self.printed = max(self.printed, upto)


class _StopWhenStreamerStops(StoppingCriteria):
    def __init__(self, streamer: _Streamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.streamer.reason == "stop", dtype=torch.bool)


@torch.no_grad()
def complete(
    model: Any,
    tokenizer: Any,
    ids: list[int],
    *,
    end: list[int],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop: list[str] | tuple[str, ...] = (),
    out: TextIO | None = None,
) -> Completion:
    """One completion of the prompt `ids`, streamed to `out` as it is produced; sampling starts from `seed`."""
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=end or None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (end or [0])[0],
        **sampling,
    )
    streamer = _Streamer(tokenizer, end=end, stop=list(stop), out=out)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    torch.manual_seed(seed)
    model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_StopWhenStreamerStops(streamer)]),
    )
    return Completion(streamer.text, streamer.ids, streamer.reason or "max_new_tokens")


# ---- the command ------------------------------------------------------------------------------------------


def generate(cfg: Any, *, out: TextIO | None = None) -> list[dict[str, Any]]:
    """Complete each conversation of `cfg` (printing to `out`, default stdout); the records, also written to
    `cfg.output` when it is set."""
    out = sys.stdout if out is None else out
    device = check_generate_config(cfg)
    conversations = conversations_of(cfg)
    path = Path(cfg.model)
    # The tokenizer first: a missing chat template is said before the weights load.
    tokenizer = tokenizer_of(path, base=cfg.base)
    end_of_turn = None
    if cfg.chat:
        template = chat_template_of(tokenizer, cfg.chat_template, cfg.model)
        end_of_turn = end_of_turn_id(tokenizer, template)
        prompts = [render_prompt(tokenizer, c, template) for c in conversations]
    else:
        prompts = [cfg.prompt]
    dtype = resolve_dtype(cfg.dtype)
    if is_adapter_dir(path):
        model = load_adapter(path, base=cfg.base, device=device, dtype=dtype)
    else:
        model = load_model(path, device=device, dtype=dtype)
    end = end_ids(tokenizer, model, end_of_turn)
    decoding = {k: cfg[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed")}
    records = []
    with ExitStack() as stack:
        log = stack.enter_context(open(cfg.output, "w", encoding="utf-8")) if cfg.output else None
        for n, text in enumerate(prompts):
            if len(prompts) > 1:  # a header before each completion, a blank line between them
                out.write(("\n" if n else "") + f"--- {n + 1}/{len(prompts)}\n")
            ids = prompt_ids(tokenizer, text, chat=cfg.chat)
            done = complete(model, tokenizer, ids, end=end, stop=list(cfg.stop), out=out, **decoding)
            out.write("\n")
            out.flush()
            record = {
                "messages": conversations[n] if conversations is not None else None,
                "prompt": text,
                "completion": done.text,
                "new_tokens": len(done.token_ids) + (done.stop_reason == "end_of_turn"),
                "stop_reason": done.stop_reason,
            }
            records.append(record)
            if log is not None:
                log.write(json.dumps(record, ensure_ascii=False) + "\n")
                log.flush()
    return records


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)
    if cfg.output:
        print(f"wrote {cfg.output}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
