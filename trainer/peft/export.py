"""An adapter checkpoint (peft=lora|dora) to `hf/` (merged) and `adapter/` (the peft format), offline.

The checkpoint holds only what trained; the base is loaded from the name its trainer_state.json records and
checked against the recorded hash of its weights, so a checkpoint is never merged into another base.
`trainer.export` calls `export_adapter_checkpoint` for a checkpoint that holds adapters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import STATE_FILE
from trainer.errors import CheckpointError
from trainer.peft.extension import (
    ADAPTER,
    ADAPTER_DIR,
    STATE_KEY,
    conv1d_targets,
    lora_config,
    merge_adapters,
    modules_of,
    peft_state_dict,
    plain_model,
    store_base,
    weights_hash,
    write_adapter,
)
from trainer.shards import ShardReader
from trainer.utils import loading_from


def adapter_state(checkpoint: Path) -> dict[str, Any] | None:
    """The `peft` entry of a checkpoint's trainer_state.json, or None for a checkpoint without adapters."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text()).get(STATE_KEY)


def export_adapter_checkpoint(
    checkpoint: Path, output: Path, *, config: Any, tokenizer: Any, trust_remote_code: bool = False
) -> None:
    """`output`: the merged model (save_pretrained + tokenizer); `output/adapter/`: the adapters, peft format.

    `config` and `tokenizer` are the checkpoint's own (trainer.export.describe_checkpoint)."""
    from peft import inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    state = adapter_state(checkpoint)
    base_ref = state["base"]
    name = base_ref["name_or_path"]
    if name is None:
        raise CheckpointError(
            f"{checkpoint} holds adapters of a base built from its config (model.source=config), which only "
            "its training run can rebuild: use that run's hf/ (merged) and adapter/, written at its end"
        )
    dtype = getattr(torch, base_ref.get("dtype", "float32"))
    with loading_from(name, key="the adapters' base (trainer_state.json: peft.base.name_or_path)"):
        model = AutoModelForCausalLM.from_pretrained(
            name, config=config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    if weights_hash(model) != base_ref["weights_xxh3_128"]:
        raise CheckpointError(
            f"{checkpoint}: the base {name} as loaded now is not the one its adapters were trained on (the hash "
            "of its weights differs); export with the base files the run used"
        )
    targets = list(state["targets"])
    conv1d = conv1d_targets(model, targets)
    # As in training: the base frozen, then the adapters (created trainable) and train_also trainable.
    model.requires_grad_(False)
    inject_adapter_in_model(
        lora_config(
            state["name"],
            rank=state["rank"],
            alpha=state["alpha"],
            targets=targets,
            fan_in_fan_out=bool(conv1d),
        ),
        model,
        adapter_name=ADAPTER,
    )
    for param in state["train_also"]:
        model.get_parameter(param).requires_grad_(True)
    store_base(model, state.get("base_dtype", "float"), targets)  # the base the adapters trained against
    reader = ShardReader(Path(checkpoint) / "shards")
    trained = {
        key.removeprefix("model/"): reader.read(key, 0, math.prod(shape)).view(shape)
        for key, shape in reader.shapes.items()
        if key.startswith("model/")
    }
    result = model.load_state_dict(trained, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{checkpoint}: tensors {result.unexpected_keys[:5]} are not parameters of the adapted base"
        )
    full = {k: v.detach() for k, v in model.state_dict().items()}
    merged = merge_adapters(
        full,
        targets,
        scaling=state["alpha"] / state["rank"],
        keep_zeros=state.get("keep_zeros", False),
        conv1d=conv1d,
    )
    output.mkdir(parents=True, exist_ok=True)
    plain = plain_model(config, merged)
    plain.save_pretrained(str(output), state_dict=merged, safe_serialization=True)
    tokenizer.save_pretrained(str(output))
    modules = modules_of(list(state["train_also"]))
    write_adapter(
        output / ADAPTER_DIR,
        peft_state_dict(model, full, modules_to_save=modules),
        lora_config(
            state["name"],
            rank=state["rank"],
            alpha=state["alpha"],
            dropout=state.get("dropout", 0.0),
            targets=targets,
            fan_in_fan_out=bool(conv1d),
            modules_to_save=modules,
            base_model_name_or_path=name,
            inference_mode=True,
        ),
    )
