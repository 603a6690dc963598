"""The prune group's schemas (conf/prune/*.yaml) and the checks their types cannot express.

Every default lives in the YAML options, each of which sets every key of its schema (tests/test_config.py
checks both). Patterns that match no module are checked against the model, in pruner.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from trainer.choices import Choice
from trainer.errors import ConfigError

PruneMethod = Choice("PruneMethod", "none magnitude wanda sparsegpt gmp nm structured keep_zeros")
# Which weights of an N:M group to keep: by magnitude, Wanda score, or SparseGPT (with reconstruction).
NMCriterion = Choice("NMCriterion", "magnitude wanda sparsegpt")


@dataclass
class PruneConfig:
    # `none`, `magnitude`, `wanda`, `sparsegpt`, `gmp`, `nm`, `structured` or `keep_zeros` (see trainer/prune/).
    name: PruneMethod = MISSING
    # Fraction of each targeted layer's weights set to zero, in [0, 1) (null where the method fixes it).
    sparsity: float | None = MISSING
    # Module-name glob patterns of the layers to prune; null: the linear layers of the transformer blocks.
    targets: list[str] | None = MISSING
    # Per-layer sparsity: {glob pattern: sparsity}; the first matching pattern overrides `sparsity`; null for
    # none. Typed Any so that `prune.layer_sparsity={...}` replaces it whole (a typed dict refuses new keys).
    layer_sparsity: Any = MISSING


@dataclass
class CalibratedPruneConfig(PruneConfig):
    # Batches of train.micro_batch_size training sequences whose activations calibrate the pruning.
    calibration_batches: int = MISSING
    # SparseGPT: columns per block of the lazy update, and the Hessian damping (fraction of its mean diagonal).
    block_size: int = MISSING
    damp: float = MISSING


@dataclass
class NMPruneConfig(CalibratedPruneConfig):
    # Keep n weights in every group of m consecutive inputs of a row (sparsity 1 - n/m).
    n: int = MISSING
    m: int = MISSING
    criterion: NMCriterion = MISSING


@dataclass
class GMPPruneConfig(PruneConfig):
    # Sparsity at start_step; it rises on a cubic to `sparsity` at end_step (null: train.max_steps).
    initial_sparsity: float = MISSING
    start_step: int = MISSING
    end_step: int | None = MISSING
    # Optimizer steps between mask updates.
    frequency: int = MISSING


@dataclass
class StructuredPruneConfig(PruneConfig):
    # Fraction of attention heads (whole key/value groups under GQA) removed from every layer.
    heads: float = MISSING
    # Fraction of MLP hidden channels removed from every layer.
    mlp_channels: float = MISSING
    # Indices of the transformer layers removed whole.
    drop_layers: list[int] = MISSING


def register_prune_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="prune", name="schema", node=PruneConfig)
    cs.store(group="prune", name="schema_calibrated", node=CalibratedPruneConfig)
    cs.store(group="prune", name="schema_nm", node=NMPruneConfig)
    cs.store(group="prune", name="schema_gmp", node=GMPPruneConfig)
    cs.store(group="prune", name="schema_structured", node=StructuredPruneConfig)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_prune(cfg: Any) -> None:
    """The prune group's values (cfg is the whole run config: gmp's schedule reads train.max_steps)."""
    p = cfg.prune
    if p.name is PruneMethod.none:
        return
    fraction = "a fraction in [0, 1), e.g. 0.5"
    if p.name in ("nm", "structured", "keep_zeros"):
        _check(
            p.sparsity is None,
            f"prune.sparsity={p.sparsity} does not apply to prune={p.name}: "
            + {
                "nm": "set prune.n and prune.m (sparsity 1 - n/m)",
                "structured": "set prune.heads, prune.mlp_channels or prune.drop_layers",
                "keep_zeros": "the loaded model's zeros are the mask",
            }[p.name],
        )
    else:
        _check(p.sparsity is not None, f"prune={p.name} needs prune.sparsity, {fraction}")
        _check(0.0 <= p.sparsity < 1.0, f"prune.sparsity={p.sparsity}: must be {fraction}")
    _check(
        p.name != "keep_zeros" or p.layer_sparsity is None,
        "prune.layer_sparsity does not apply to prune=keep_zeros: the loaded model's zeros are the mask",
    )
    _check(
        p.layer_sparsity is None or OmegaConf.is_dict(p.layer_sparsity) or isinstance(p.layer_sparsity, dict),
        f"prune.layer_sparsity={p.layer_sparsity}: must be a mapping {{glob: sparsity}}, e.g. "
        "'prune.layer_sparsity={model.layers.0.*: 0.3}'",
    )
    for pattern, value in (p.layer_sparsity or {}).items():
        _check(
            isinstance(value, (int, float)) and 0.0 <= value < 1.0,
            f"prune.layer_sparsity[{pattern}]={value}: must be {fraction}",
        )
    if "calibration_batches" in p:
        _check(p.calibration_batches > 0, f"prune.calibration_batches={p.calibration_batches}: must be >= 1")
        _check(p.block_size > 0, f"prune.block_size={p.block_size}: must be >= 1")
        _check(p.damp > 0, f"prune.damp={p.damp}: must be > 0 (it keeps the Hessian invertible)")
    if p.name is PruneMethod.nm:
        _check(0 < p.n < p.m, f"prune.n={p.n}, prune.m={p.m}: need 0 < n < m (e.g. 2:4)")
        _check(
            p.block_size % p.m == 0,
            f"prune.block_size={p.block_size} must be a multiple of prune.m={p.m} (groups may not straddle blocks)",
        )
    if p.name is PruneMethod.gmp:
        end = cfg.train.max_steps if p.end_step is None else p.end_step
        _check(
            0.0 <= p.initial_sparsity <= p.sparsity,
            f"prune.initial_sparsity={p.initial_sparsity}: must be in [0, prune.sparsity]",
        )
        _check(p.frequency > 0, f"prune.frequency={p.frequency}: must be >= 1")
        _check(cfg.train.max_steps > 0, "prune=gmp prunes while training: set train.max_steps > 0")
        _check(
            0 <= p.start_step < end,
            f"prune.start_step={p.start_step}, end step {end}: need 0 <= start_step < end_step (end_step null: train.max_steps)",
        )
    if p.name is PruneMethod.structured:
        for key in ("heads", "mlp_channels"):
            _check(0.0 <= p[key] < 1.0, f"prune.{key}={p[key]}: must be {fraction}")
        _check(
            p.heads > 0 or p.mlp_channels > 0 or len(p.drop_layers) > 0,
            "prune=structured removes nothing: set prune.heads, prune.mlp_channels or prune.drop_layers",
        )
