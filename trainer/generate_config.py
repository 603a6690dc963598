"""trainer.generate's schema (conf/generate/generate.yaml). Beside the command, as each command's schema is, in
a module that imports only Hydra and trainer.choices: registering or composing it needs no model code.

Every default lives in conf/generate/generate.yaml, which sets every key (tests/test_config.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import Dtype


@dataclass
class GenerateConfig:
    # A checkpoint (checkpoints/step_N, or a run directory: its latest), an hf/ export, an adapter/ directory,
    # a trainer.quantize output, a compressed-tensors export, or a .gguf file (or a directory holding one).
    model: str = MISSING
    # The base an adapter/ directory adapts; null: its adapter_config.json's base_model_name_or_path.
    base: str | None = MISSING
    # One user message (chat=true) or the raw prompt text (chat=false); give it or `messages`, not both.
    prompt: str | None = MISSING
    # A .json file holding one conversation (a list of {role, content}), or a .jsonl file of them, one a line
    # (a list, or an object with a `messages` key): one completion per conversation.
    messages: str | None = MISSING
    # A system message put before each conversation.
    system: str | None = MISSING
    # Render the conversation with the chat template; false: `prompt` is the model's input as it is.
    chat: bool = MISSING
    # A Jinja file that replaces the tokenizer's chat template.
    chat_template: str | None = MISSING
    max_new_tokens: int = MISSING
    # false: greedy decoding; true: sampling with temperature, top_p and top_k, from `seed`.
    do_sample: bool = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    # 0: no top-k cut.
    top_k: int = MISSING
    seed: int = MISSING
    # Strings that end the completion (not included), besides the end-of-turn and EOS tokens.
    stop: list[str] = MISSING
    # A JSONL file: one record per conversation (messages, prompt, completion, new_tokens, stop_reason).
    output: str | None = MISSING
    # `auto` (cuda when available), `cpu` or `cuda`; int8_smooth models run on the CPU.
    device: str = MISSING
    # The dtype float (unquantized) models run in.
    dtype: Dtype = MISSING


def register_generate_configs() -> None:
    ConfigStore.instance().store(name="schema_generate", node=GenerateConfig)
