"""The peft group's schema (conf/peft/*.yaml) and the checks its types cannot express.

Every default lives in the YAML options, each of which sets every key (tests/test_config.py checks both).
Target globs that match no module are checked against the built model, in extension.py, before wrapping.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import Choice
from trainer.errors import ConfigError, MissingPackageError
from trainer.utils import DISTRIBUTION

# `none` (every weight trains), `lora` (low-rank deltas B A on frozen linears), `dora` (LoRA with a learned
# per-output-row magnitude: m * (W + s B A) / ||W + s B A||).
PeftName = Choice("PeftName", "none lora dora")
# The frozen base's storage: `float` keeps train.dtype; `bf16` halves its memory (needs precision=bf16); `nf4`
# stores the targeted linears' weights in 4-bit NormalFloat (QLoRA; torchao's NF4Tensor).
BaseDtype = Choice("BaseDtype", "float bf16 nf4")


@dataclass
class PeftConfig:
    name: PeftName = MISSING
    # Rank r of each adapter (A: r x in, B: out x r).
    rank: int = MISSING
    # The adapter's delta is scaled by alpha / rank.
    alpha: float = MISSING
    # Dropout on the adapter's input, in [0, 1).
    dropout: float = MISSING
    # Module-name globs of the linears that get an adapter: a glob without a dot matches the last name part
    # (q_proj), one with dots the whole name (model.layers.0.*).
    targets: list[str] = MISSING
    # Parameter-name globs of base parameters that train in full beside the adapters (norms, lm_head).
    train_also: list[str] = MISSING
    base_dtype: BaseDtype = MISSING


def register_peft_configs() -> None:
    ConfigStore.instance().store(group="peft", name="schema", node=PeftConfig)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_peft_installed() -> None:
    """The peft library, only when an adapter is asked for (its layers are the adapters: adapter/ is its format)."""
    if importlib.util.find_spec("peft") is None:
        raise MissingPackageError(
            "peft=lora/dora needs the Python package 'peft', which is not installed; install it with: "
            f"pip install '{DISTRIBUTION}[peft]' (or, in this checkout, pip install -e '.[peft]')"
        )


def validate_peft(cfg: Any) -> None:
    """The peft group's values and the combinations that cannot work (cfg is the whole run config)."""
    p = cfg.peft
    if p.name is PeftName.none:
        return
    _check(p.rank > 0, f"peft.rank={p.rank}: must be a positive integer, e.g. peft.rank=8")
    _check(p.alpha > 0, f"peft.alpha={p.alpha}: must be > 0 (the delta is scaled by alpha / rank), e.g. 16")
    _check(
        0.0 <= p.dropout < 1.0,
        f"peft.dropout={p.dropout}: must be in [0, 1) (0 turns the adapter dropout off)",
    )
    _check(bool(p.targets), "peft.targets is empty: name the linears to adapt, e.g. [q_proj,v_proj]")
    _check(
        cfg.prune.name in ("none", "keep_zeros"),
        f"prune={cfg.prune.name} with peft={p.name}: the base is frozen under an adapter, so pruning cannot "
        "change it; prune first (a train.max_steps=0 run), then fine-tune its hf/ export with prune=keep_zeros "
        f"peft={p.name} (the merged hf/ keeps the zeros)",
    )
    _check(
        cfg.quant.name in ("none",),
        f"quant={cfg.quant.name} with peft={p.name}: QAT's fake-quantized linears are not layers the peft "
        "library adapts; use one or the other",
    )
    _check(
        p.base_dtype != "bf16" or cfg.precision.name in ("bf16",),
        f"peft.base_dtype=bf16 with precision={cfg.precision.name}: a bf16 base computes only under bf16 "
        "autocast; set precision=bf16 (the adapters and their optimizer states stay in train.dtype)",
    )
    _check(
        p.base_dtype != "nf4" or p.name in ("lora",),
        "peft.base_dtype=nf4 with peft=dora: DoRA reads the whole base weight to normalise it, which the peft "
        "library cannot dequantize from torchao's NF4Tensor; use peft=lora with nf4, or base_dtype=bf16/float",
    )
    check_peft_installed()
    if p.base_dtype in ("nf4",) and importlib.util.find_spec("torchao") is None:
        raise MissingPackageError(
            "peft.base_dtype=nf4 stores the base in torchao's NF4Tensor; torchao is not installed: "
            f"pip install '{DISTRIBUTION}[quant]' (or, in this checkout, pip install -e '.[quant]')"
        )
