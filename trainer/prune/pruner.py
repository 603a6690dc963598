"""Pruning as a loop extension (see trainer/extensions.py for the hooks): one-shot pruning before the model is
wrapped, masks enforced from then on (see masks.py), gradual pruning on its schedule, masks in checkpoints,
and the sparsity metrics, summary table and per-layer report.
"""

from __future__ import annotations

import fnmatch
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.calibration import InputStats, calibration_batches, update_blocks_sequentially
from trainer.distributed import ParallelEnv, all_reduce_sum
from trainer.errors import ConfigError
from trainer.extensions import Extension
from trainer.models import (
    as_weight_layout,
    fused_experts,
    is_linear,
    layer_types,
    linear_weight,
    transformer_blocks,
)
from trainer.prune.masks import (
    MaskEnforcer,
    broadcast_masks,
    broadcast_weights,
    mask_save_slices,
    owned_zero_counts,
    read_masks,
)
from trainer.prune.methods import magnitude_mask, nm_mask, sparsegpt_prune, wanda_mask, wanda_scores
from trainer.prune.schedule import gmp_sparsity, is_update_step
from trainer.prune.structured import prune_structured
from trainer.shards import SaveSlice

REPORT_FILE = "sparsity.json"
CALIBRATED = ("wanda", "sparsegpt")


def _is_prunable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, nn.Parameter) and w.ndim == 2


def _refuse_fused_experts(model: nn.Module) -> None:
    """An MoE whose routed experts are fused 3-D parameters (transformers' Qwen2MoeExperts, MixtralExperts): the
    blocks' linears alone are a small part of its weights, and pruning them would report the sparsity asked
    for a model whose experts stay dense."""
    fused = fused_experts(model)
    if fused:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            f"prune.targets=null on model_type={model_type}: its routed experts are fused 3-D parameters "
            f"({', '.join(fused)} in each block), not linear layers, which pruning does not handle; pruning the "
            "other linears of the blocks alone would leave most of the weights dense. Name the layers to prune "
            "with prune.targets (e.g. ['*.self_attn.*', '*.shared_expert.*']) to prune those alone"
        )


def select_targets(model: nn.Module, patterns: list[str] | None) -> dict[str, nn.Module]:
    """Modules to prune by name: every glob must match at least one module with a 2-D weight.

    With no patterns: the linear layers inside the transformer blocks (not embeddings, not the LM head);
    GPT-2's Conv1D counts as a linear (models.is_linear). Selecting nothing is an error, never a no-op.
    """
    named = dict(model.named_modules())
    if patterns is None:
        _refuse_fused_experts(model)
        inside = {id(m) for b in transformer_blocks(model) for m in b.modules()}
        found = {n: m for n, m in named.items() if is_linear(m) and id(m) in inside}
        if not found:
            prunable = [n for n, m in named.items() if _is_prunable(m)]
            raise ConfigError(
                f"prune.targets=null selects the linear layers (nn.Linear, GPT-2's Conv1D) of the transformer "
                f"blocks, and {type(model).__name__}'s blocks hold none (its layer types: "
                f"{', '.join(layer_types(model))}); its layers with a 2-D weight are {prunable[:6]}: name the "
                "ones to prune with prune.targets"
            )
        return found
    out: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {n: m for n, m in named.items() if n and fnmatch.fnmatchcase(n, pattern) and _is_prunable(m)}
        if not hits:
            examples = [n for n, m in named.items() if _is_prunable(m)][:6]
            raise ConfigError(
                f"prune.targets pattern {pattern!r} matches no module with a 2-D weight; module names look like "
                f"{examples} (globs: e.g. 'model.layers.*.mlp.*')"
            )
        out.update(hits)
    tied = {id(p) for n, p in model.named_parameters()}  # named_parameters lists a tied weight once
    for n, m in out.items():
        if id(m.weight) in tied and f"{n}.weight" not in dict(model.named_parameters()):
            raise ConfigError(
                f"prune.targets: {n}.weight is tied to another parameter; target that one instead"
            )
    return out


def _linear_view(module: nn.Module) -> torch.Tensor:
    """The weight the per-row criteria (wanda, n:m, sparsegpt) compare in: [out, in], inputs along dim 1
    (a transposed view of a GPT-2 Conv1D's [in, out] weight; an embedding's as it is)."""
    return linear_weight(module) if is_linear(module) else module.weight


def _sparsity_for(name: str, cfg: Any) -> float:
    for pattern, value in (cfg.layer_sparsity or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(value)
    return float(cfg.sparsity) if cfg.sparsity is not None else 1.0 - cfg.n / cfg.m


class Pruner(Extension):
    """Pruning for one run (`prune=...`); every method is a no-op with prune=none."""

    name = "prune"

    def __init__(
        self,
        cfg: Any,
        *,
        env: ParallelEnv,
        device: torch.device,
        max_steps: int,
        seed: int,
        train_data: Any = None,
        micro_batch_size: int = 1,
    ) -> None:
        """`train_data` and `micro_batch_size`: the calibration windows of wanda, sparsegpt and nm's criteria."""
        self.cfg, self.env, self.device, self.seed = cfg, env, device, seed
        self.train_data, self.micro_batch_size = train_data, micro_batch_size
        self.report_data: dict[str, Any] = {}
        self.method = cfg.name
        self.end_step = cfg.get("end_step") or max_steps
        self.masks: dict[str, torch.Tensor] = {}
        self.target_sparsity: dict[str, float] = {}
        self.enforcer: MaskEnforcer | None = None
        self.structured: dict[str, Any] | None = None
        self.seconds = 0.0

    @property
    def masking(self) -> bool:
        return self.method not in ("none", "structured")

    # ---- extension hooks ---------------------------------------------------------------------------

    def before_wrap(self, model: nn.Module, *, resume: Path | None) -> None:
        self.prepare(model, train_data=self.train_data, micro_batch_size=self.micro_batch_size, resume=resume)

    def after_setup(self, strategy: Any, module: nn.Module, optimizer: Any) -> None:
        self.attach(strategy, module, optimizer)

    def checkpoint_slices(self) -> list[SaveSlice]:
        return self.save_slices()

    def log_metrics(self) -> dict[str, float]:
        return self.metrics()

    def finish(self, run_dir: Path) -> None:
        """The per-layer report (a collective), written beside the run and its hf/ export."""
        self.report_data = self.report()
        self.write_report(self.report_data, [run_dir, run_dir / "hf"])

    def summary_lines(self) -> list[str]:
        return [self.table(self.report_data)] if self.report_data else []

    # ---- before wrapping ---------------------------------------------------------------------------

    def prepare(self, model: nn.Module, *, train_data, micro_batch_size: int, resume: Path | None) -> None:
        """Prune `model` (not yet wrapped) in place, or restore the masks of the checkpoint resumed from."""
        if self.method == "none":
            return
        c = self.cfg
        start = time.perf_counter()
        if self.method == "structured":
            self.structured = prune_structured(
                model, heads=c.heads, mlp_channels=c.mlp_channels, layers=list(c.drop_layers)
            )
            self.seconds = time.perf_counter() - start
            return
        targets = select_targets(model, c.targets)
        self._check_targets(model, targets)
        if self.method == "keep_zeros":  # the targets are the zeros there are
            self.target_sparsity = {
                n: 1.0 - float((m.weight != 0).float().mean()) for n, m in self._weights(targets)
            }
        else:
            self.target_sparsity = {f"{n}.weight": _sparsity_for(n, c) for n in targets}
        if resume is not None:
            self.masks = self._restored(resume)
        elif self.method == "keep_zeros":
            self.masks = self._existing_zeros(targets)
        elif self.method == "gmp":
            self.masks = {
                n: torch.ones_like(m.weight, dtype=torch.bool, device="cpu")
                for n, m in self._weights(targets)
            }
            if c.start_step == 0:
                self.masks = self._gmp_masks(
                    {n: m.weight.detach() for n, m in self._weights(targets)}, step=0
                )
        else:
            self.masks = self._one_shot(model, targets, train_data, micro_batch_size)
        with torch.no_grad():
            for name, module in self._weights(targets):
                module.weight.mul_(self.masks[name].to(module.weight.device, module.weight.dtype))
        self.seconds = time.perf_counter() - start

    @staticmethod
    def _weights(targets: dict[str, nn.Module]):
        return [(f"{n}.weight", m) for n, m in targets.items()]

    def _check_targets(self, model: nn.Module, targets: dict[str, nn.Module]) -> None:
        c = self.cfg
        if self.method in CALIBRATED or (self.method == "nm" and c.criterion != "magnitude"):
            inside = {id(m) for b in transformer_blocks(model) for m in b.modules()}
            outside = [n for n, m in targets.items() if id(m) not in inside or not is_linear(m)]
            if outside:
                raise ConfigError(
                    f"prune={self.method} calibrates linear layers inside the transformer blocks; {outside[:3]} "
                    "is not one: narrow prune.targets or use prune=magnitude for it"
                )
        if self.method == "nm":
            inputs = {n: _linear_view(m).shape[1] for n, m in targets.items()}
            bad = [(n, k) for n, k in inputs.items() if k % c.m]
            if bad:
                raise ConfigError(
                    f"prune=nm with m={c.m}: {bad[0][0]} has {bad[0][1]} input features, not a multiple of {c.m} "
                    f"({len(bad)} layer(s) like it); pick an m that divides them or exclude them with prune.targets"
                )

    def _existing_zeros(self, targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """The loaded model's exact zeros become the masks (every rank loaded the same weights): fine-tuning a
        model pruned elsewhere, e.g. by a max_steps=0 one-shot run, without pruning it again."""
        masks = {n: (m.weight.detach() != 0).cpu() for n, m in self._weights(targets)}
        zeros = sum(int((~keep).sum()) for keep in masks.values())
        if zeros == 0:
            raise ConfigError(
                "prune=keep_zeros: the targeted layers hold no zero weights, so there is nothing to keep; load a "
                "pruned model (model=hf model.name_or_path=RUN/hf of a pruning run) or pick a pruning method"
            )
        return masks

    def _restored(self, resume: Path) -> dict[str, torch.Tensor]:
        masks = read_masks(resume)
        if not masks:
            raise ConfigError(
                f"resume={resume}: the checkpoint has no pruning masks but prune={self.method}; resume it with "
                "prune=none, or prune its hf/ export: model=hf model.name_or_path=RUN/hf"
            )
        if set(masks) != set(self.target_sparsity):
            raise ConfigError(
                f"the checkpoint's masks cover {sorted(masks)[:3]}... but prune.targets selects "
                f"{sorted(self.target_sparsity)[:3]}...; resume with the prune settings it was saved with"
            )
        return masks

    def _one_shot(
        self, model: nn.Module, targets, train_data, micro_batch_size: int
    ) -> dict[str, torch.Tensor]:
        """Rank 0 prunes; every rank receives its masks (and SparseGPT's updated weights) bit for bit."""
        c = self.cfg
        names = [n for n, _ in self._weights(targets)]
        masks = {
            n: torch.ones_like(m.weight, dtype=torch.bool, device="cpu") for n, m in self._weights(targets)
        }
        if self.env.is_main:
            criterion = c.criterion if self.method == "nm" else self.method
            nm = (c.n, c.m) if self.method == "nm" else None
            if criterion == "magnitude":
                for name, m in self._weights(targets):
                    w = _linear_view(m).detach()
                    keep = nm_mask(w.abs(), *nm) if nm else magnitude_mask(w, self.target_sparsity[name])
                    masks[name] = as_weight_layout(m, keep).cpu()
            else:
                batches = calibration_batches(
                    train_data, num_batches=c.calibration_batches, batch_size=micro_batch_size, seed=self.seed
                )
                home = next(model.parameters()).device
                model.to(self.device)  # calibrate where the model will train

                def prune_layer(name: str, module: nn.Module, stats: InputStats) -> None:
                    key = f"{name}.weight"
                    w = _linear_view(module)  # Conv1D: a transposed view; written through below
                    if criterion == "wanda":
                        keep = (
                            nm_mask(wanda_scores(w, stats.sq_norm), *nm)
                            if nm
                            else wanda_mask(w, stats.sq_norm, self.target_sparsity[key])
                        )
                        new = w.detach() * keep
                    else:
                        n, m = nm or (0, 0)
                        new, keep = sparsegpt_prune(
                            w,
                            stats.hessian,
                            sparsity=self.target_sparsity[key],
                            n=n,
                            m=m,
                            block_size=c.block_size,
                            damp=c.damp,
                        )
                    with torch.no_grad():
                        w.copy_(new)
                    masks[key] = as_weight_layout(module, keep).cpu()

                update_blocks_sequentially(
                    model, batches, targets, prune_layer, with_hessian=criterion == "sparsegpt"
                )
                model.to(home)
        masks = broadcast_masks(masks, device=self.device)
        broadcast_weights(model, names, device=self.device)
        return masks

    def _gmp_masks(self, weights: dict[str, torch.Tensor], *, step: int) -> dict[str, torch.Tensor]:
        """Magnitude masks at the schedule's sparsity for `step`; what is pruned stays pruned."""
        c, out = self.cfg, {}
        for name, w in weights.items():
            s = gmp_sparsity(
                step,
                initial=c.initial_sparsity,
                final=self.target_sparsity[name],
                start_step=c.start_step,
                end_step=self.end_step,
                frequency=c.frequency,
            )
            scores = w.detach().abs().float().cpu()
            scores[~self.masks[name]] = -1.0  # below every kept weight: pruned first, never revived
            out[name] = magnitude_mask(scores + 1.0, s)  # shifted so the pruned rank lowest by magnitude
        return out

    # ---- after wrapping ----------------------------------------------------------------------------

    def attach(self, strategy, module: nn.Module, optimizer) -> None:
        """Enforce the masks on the wrapped model from now on (and once now)."""
        if not self.masking:
            return
        self.strategy, self.module, self.optimizer = strategy, module, optimizer
        self.enforcer = MaskEnforcer(self.masks, device=self.device)
        self.enforcer.attach(strategy, module, optimizer)

    def after_step(self, step: int) -> None:
        """Gradual pruning: new masks on the schedule's steps, from the whole current weights."""
        c = self.cfg
        if self.method != "gmp" or not is_update_step(
            step, start_step=c.start_step, end_step=self.end_step, frequency=c.frequency
        ):
            return
        full = self.strategy.full_state_dict(self.module)  # a collective; whole weights on rank 0
        if self.env.is_main:
            masks = self._gmp_masks({n: full[n] for n in self.masks}, step=step)
        else:
            masks = {n: m.clone() for n, m in self.masks.items()}
        self.masks = broadcast_masks(masks, device=self.device)
        self.enforcer.set_masks(self.masks)
        self.enforcer.apply()

    # ---- reporting and checkpoints -----------------------------------------------------------------

    def layer_zeros(self) -> dict[str, int]:
        """Zeros per targeted weight, each element counted once over all ranks (a collective)."""
        names = sorted(self.masks)
        counts = owned_zero_counts(self.strategy, self.module, self.optimizer, names).to(self.device)
        all_reduce_sum(counts)
        return {n: int(c) for n, c in zip(names, counts.tolist(), strict=True)}

    def metrics(self) -> dict[str, float]:
        """Achieved sparsity over all targeted weights (a collective on every rank)."""
        if not self.masking:
            return {}
        zeros = self.layer_zeros()
        total = sum(self.masks[n].numel() for n in zeros)
        out = {"sparsity": sum(zeros.values()) / total}
        if self.method == "gmp":
            out["mask_sparsity"] = sum(int((~m).sum()) for m in self.masks.values()) / total
        return out

    def save_slices(self) -> list[SaveSlice]:
        if not self.masking:
            return []
        return mask_save_slices(self.masks, rank=self.env.rank, world_size=self.env.world_size)

    def report(self) -> dict[str, Any]:
        """Per-layer sparsity (a collective), or what structured pruning removed."""
        if self.method == "none":
            return {}
        if self.structured is not None:
            return {"method": "structured", "seconds": self.seconds, **self.structured}
        zeros = self.layer_zeros()
        layers = {
            n: {
                "shape": list(self.masks[n].shape),
                "zeros": zeros[n],
                "sparsity": zeros[n] / self.masks[n].numel(),
                "target": self.target_sparsity[n],
            }
            for n in sorted(self.masks)
        }
        total = sum(self.masks[n].numel() for n in layers)
        return {
            "method": self.method,
            "seconds": self.seconds,
            "sparsity": sum(v["zeros"] for v in layers.values()) / total,
            "layers": layers,
        }

    def write_report(self, report: dict[str, Any], directories: list[Path]) -> None:
        if not report or not self.env.is_main:
            return
        text = json.dumps(report, indent=2)
        for d in directories:
            if d.is_dir():
                (d / REPORT_FILE).write_text(text)

    @staticmethod
    def table(report: dict[str, Any]) -> str:
        """The per-layer summary printed at the end of the run."""
        if not report:
            return ""
        if report["method"] == "structured":
            r = report
            return (
                f"prune=structured: {r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M params; "
                f"layers {r['num_hidden_layers']} (dropped {r['layers_dropped']}), heads {r['num_attention_heads']}, "
                f"MLP channels {r['intermediate_size']}"
            )
        width = max(len(n) for n in report["layers"])
        lines = [f"prune={report['method']}: per-layer sparsity (achieved / target)"]
        lines += [
            f"  {n:<{width}}  {v['sparsity']:.4f} / {v['target']:.4f}  ({v['zeros']} of {v['shape'][0]}x{v['shape'][1]})"
            for n, v in report["layers"].items()
        ]
        lines.append(f"  {'all targeted layers':<{width}}  {report['sparsity']:.4f}")
        return "\n".join(lines)
