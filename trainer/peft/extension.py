"""Adapters (LoRA, DoRA) as a loop extension (see trainer/extensions.py for the hooks).

`before_wrap` freezes the base model and injects the peft library's own LoRA layers (`inject_adapter_in_model`,
`use_dora` for DoRA) into the targeted linears, so that the saved `adapter/` is the peft format by
construction and `peft.PeftModel.from_pretrained(base, "adapter/")` is its reader. The module names stay those
of the HF model plus peft's (`q_proj.base_layer.weight`, `q_proj.lora_A.default.weight`): every strategy
shards, reduces and checkpoints them like any parameter, and, the base being frozen, the optimizer and the
checkpoints see only the adapters and `peft.train_also` (trainer/strategies/base.py `trained_parameters`).

A checkpoint records which base it adapts (`checkpoint_state`: the model's name and a hash of its weights as
built); resuming against another base is refused before any training. At the end, `export_weights` merges
each adapter into its base weight for `hf/` (a plain `AutoModelForCausalLM`; under prune=keep_zeros the
delta is masked, so the merged weight keeps the base's zeros) and `finish` writes `adapter/`.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors.torch import save_file
from torch import nn

from trainer.checkpoint import STATE_FILE
from trainer.distributed import ParallelEnv, barrier
from trainer.errors import CheckpointError, ConfigError
from trainer.extensions import Extension
from trainer.models import is_conv1d, is_linear, layer_types, warn_unhandled_experts
from trainer.utils import staged

ADAPTER_DIR = "adapter"
ADAPTER = "default"  # the peft library's name of the one adapter
STATE_KEY = "peft"  # in trainer_state.json


def select_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear modules the globs select; every glob must select at least one.

    A glob without a dot matches the last part of a module's name (`q_proj`), one with dots the whole name
    (`model.layers.0.*`). GPT-2's Conv1D layers are linears (the peft library adapts them, fan_in_fan_out)."""
    linears = [n for n, m in model.named_modules() if is_linear(m)]
    out: set[str] = set()
    for pattern in patterns:
        hits = [
            n for n in linears if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, f"*.{pattern}")
        ]
        if not hits:
            examples = sorted({n.rpartition(".")[2] for n in linears})
            raise ConfigError(
                f"peft.targets pattern {pattern!r} matches no linear module (nn.Linear, GPT-2's Conv1D) of "
                f"{type(model).__name__}; its linears are named {examples} (a glob without a dot matches the last "
                "name part, e.g. q_proj; with dots the whole name, e.g. 'model.layers.0.*'); its layer types are "
                f"{', '.join(layer_types(model))}"
            )
        out.update(hits)
    owner = {id(p): n for n, p in model.named_parameters()}  # a tied weight is listed once, by its first name
    modules = dict(model.named_modules())
    for name in sorted(out):
        first = owner[id(modules[name].weight)]
        if first != f"{name}.weight":
            raise ConfigError(
                f"peft.targets: {name}.weight is tied to {first}; an adapter on it would untie them in the merged "
                f"model. Leave {name} out of peft.targets, or train the shared weight in full: "
                f"peft.train_also=[{first}]"
            )
    return sorted(out)


def conv1d_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The targets that are GPT-2 Conv1D layers (their weights stored [in, out]), before injection."""
    return [n for n in targets if is_conv1d(model.get_submodule(n))]


def check_conv1d_base(conv1d: list[str], base_dtype: str) -> None:
    """QLoRA's NF4 base is torchao's NF4Tensor, which computes as an nn.Linear weight only."""
    if conv1d and base_dtype in ("nf4",):
        raise ConfigError(
            f"peft.base_dtype=nf4 with GPT-2 Conv1D targets ({conv1d[0]}, {len(conv1d)} in all): torchao's "
            "NF4Tensor computes only as an nn.Linear weight, and Conv1D multiplies by its weight transposed; "
            "use peft.base_dtype=bf16 or float for this model"
        )


def select_train_also(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the base parameters the globs select (matched like targets); every glob must select one."""
    names = [n for n, _ in model.named_parameters()]
    out: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, f"*.{pattern}")]
        if not hits:
            raise ConfigError(
                f"peft.train_also pattern {pattern!r} matches no parameter of this model; parameter names look "
                f"like {names[:4]} (e.g. '*norm*' for the norms, lm_head.weight)"
            )
        out.update(hits)
    return sorted(out)


def store_base(model: nn.Module, base_dtype: str, targets: list[str], *, shards: int = 1) -> None:
    """The frozen base in `base_dtype` (after injection; the adapters and train_also keep train.dtype): bf16
    for every frozen parameter, nf4 for the targeted linears' weights, float as it is."""
    if base_dtype in ("bf16",):
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    elif base_dtype in ("nf4",):
        to_nf4_weights(model, targets, shards=shards)
    if base_dtype in ("bf16", "nf4"):
        copy_out_of_checkpoint_file(model)


def copy_out_of_checkpoint_file(model: nn.Module) -> None:
    """Give every plain CPU tensor of the model its own memory, so that the checkpoint file transformers mapped
    at loading is unmapped. The float weights a bf16/nf4 base replaced would otherwise stay resident for the
    whole run: the file's pages stay mapped while any tensor (the embedding, a norm) still views into it."""
    seen: set[int] = set()
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(tensor) in seen or type(tensor.data) is not torch.Tensor or tensor.device.type != "cpu":
                continue  # tied (done), an NF4Tensor (its own memory), or on a device (copied there)
            seen.add(id(tensor))
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.clone()
            else:
                setattr(module, name, tensor.clone())


NF4_BLOCK = 64  # weights per scale (QLoRA's, torchao's default)
# Scales quantized together: QLoRA's 256 where it divides, else the largest of these that does (SmolLM2's
# 576 x 576 attention weights have 5184 blocks: 64 divides them, 256 does not).
NF4_SCALER_BLOCKS = (256, 128, 64)


def nf4_scaler_block(numel: int, *, shards: int = 1) -> int | None:
    """The scaler block of a weight of `numel` elements split over `shards` FSDP shards (None: none divides)."""
    return next((s for s in NF4_SCALER_BLOCKS if numel % (NF4_BLOCK * s * shards) == 0), None)


def to_nf4_weights(model: nn.Module, targets: list[str], *, shards: int = 1) -> None:
    """The targeted linears' frozen base weights as torchao NF4Tensors (QLoRA); the rest of the base stays.

    `shards`: FSDP2 splits each NF4Tensor's blocks and scales over the ranks, so their counts must divide."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    modules = dict(model.named_modules())
    bad = [
        n for n in targets if nf4_scaler_block(modules[n].base_layer.weight.numel(), shards=shards) is None
    ]
    if bad:
        unit = NF4_BLOCK * NF4_SCALER_BLOCKS[-1] * shards
        raise ConfigError(
            f"peft.base_dtype=nf4: {bad[0]} has {modules[bad[0]].base_layer.weight.numel()} weights, not a "
            f"multiple of {unit} (NF4 blocks of {NF4_BLOCK} weights, scales quantized at least "
            f"{NF4_SCALER_BLOCKS[-1]} at a time"
            + (f", split over {shards} FSDP shards" if shards > 1 else "")
            + f"; {len(bad)} layer(s) like it); leave them out of peft.targets or use peft.base_dtype=bf16"
        )
    for name in targets:
        layer = modules[name].base_layer
        scaler_block = nf4_scaler_block(layer.weight.numel(), shards=shards)
        weight = to_nf4(layer.weight.detach(), NF4_BLOCK, scaler_block)
        layer.weight = nn.Parameter(weight, requires_grad=False)


def weights_hash(model: nn.Module) -> str:
    """xxh3-128 of every parameter (name, dtype, shape, bytes) as built: identifies the base exactly, whether
    loaded from files or initialised from a seed."""
    h = xxhash.xxh3_128()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # read in place: no copy of the tensor
    return h.hexdigest()


def lora_config(
    name: str,
    *,
    rank: int,
    alpha: float,
    targets: list[str],
    dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
    fan_in_fan_out: bool = False,
    **kwargs: Any,
):
    """The peft library's config of our adapters: `name` is lora or dora, `targets` full module names;
    `fan_in_fan_out` when they are GPT-2 Conv1D layers (weights stored [in, out])."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(targets),
        use_dora=name in ("dora",),
        bias="none",
        modules_to_save=modules_to_save or None,
        fan_in_fan_out=bool(fan_in_fan_out),
        **kwargs,
    )


def merge_adapters(
    state_dict: dict[str, torch.Tensor],
    targets: list[str],
    *,
    scaling: float,
    keep_zeros: bool = False,
    conv1d: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """The plain HF weights of an adapted state dict: each target's W + s B A (DoRA: m * (W + s B A) / ||.||
    per output row), in the adapter's dtype; `keep_zeros`: the delta masked where W is zero, so the merged
    weight keeps the base's (pruned) zeros. The targets named in `conv1d` are GPT-2 Conv1D layers, whose W is
    stored transposed: merged in nn.Linear orientation, stored back as theirs. The peft library's
    `merge_and_unload` computes the same."""
    out = dict(state_dict)
    for name in targets:
        base = out.pop(f"{name}.base_layer.weight")
        a = out.pop(f"{name}.lora_A.{ADAPTER}.weight")
        b = out.pop(f"{name}.lora_B.{ADAPTER}.weight")
        magnitude = out.pop(f"{name}.lora_magnitude_vector.{ADAPTER}.weight", None)
        w = base.to(a.dtype)  # an NF4 base dequantized: the weight the adapter trained against
        if name in conv1d:
            w = w.T
        merged = w + scaling * (b @ a)
        if magnitude is not None:
            merged = (magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged
        if keep_zeros:
            merged = torch.where(w == 0, torch.zeros_like(merged), merged)
        out[f"{name}.weight"] = (merged.T if name in conv1d else merged).contiguous()
        if (bias := out.pop(f"{name}.base_layer.bias", None)) is not None:
            out[f"{name}.bias"] = bias
    return out


class Adapters(Extension):
    """LoRA or DoRA adapters for one run (`peft=lora|dora`)."""

    name = "peft"

    def __init__(self, cfg: Any, *, strategy: Any, env: ParallelEnv) -> None:
        self.cfg, self.env, self.strategy = cfg, env, strategy
        if cfg.peft.base_dtype in ("nf4",) and strategy.flat_partitions:
            raise ConfigError(
                f"peft.base_dtype=nf4 with {strategy}: DeepSpeed cannot partition torchao's NF4Tensor; use "
                "strategy=fsdp to shard an NF4 base (or single, ddp), or peft.base_dtype=bf16 under ZeRO"
            )
        self.keep_zeros = cfg.prune.name in ("keep_zeros",)
        self.targets: list[str] = []
        self.conv1d: list[str] = []  # the targets that are GPT-2 Conv1D layers
        self.train_also: list[str] = []
        self.base: dict[str, Any] = {}
        self.hf_model: nn.Module | None = None
        self.module: nn.Module | None = None
        self.adapter_state: dict[str, torch.Tensor] | None = None
        self.num_trained = self.num_total = 0

    @property
    def scaling(self) -> float:
        return float(self.cfg.peft.alpha) / int(self.cfg.peft.rank)

    def lora_config(self, **kwargs: Any):
        p = self.cfg.peft
        return lora_config(
            str(p.name),
            rank=p.rank,
            alpha=p.alpha,
            dropout=p.dropout,
            targets=self.targets,
            fan_in_fan_out=bool(self.conv1d),
            **kwargs,
        )

    # ---- before wrapping ---------------------------------------------------------------------------

    def before_wrap(self, model: nn.Module, *, resume: Path | None) -> None:
        """Check the globs, record the base, refuse a checkpoint of another base, freeze, inject, unfreeze
        `train_also`, and store the frozen base in `base_dtype`."""
        from peft import inject_adapter_in_model

        p, m = self.cfg.peft, self.cfg.model
        self.targets = select_targets(model, list(p.targets))
        if self.env.is_main:
            warn_unhandled_experts(
                model,
                feature="peft",
                consequence="they stay frozen, and the adapters train on the peft.targets linears alone "
                "(attention, shared expert); to train them in full too, peft.train_also=['*.mlp.experts.*']",
            )
        self.conv1d = conv1d_targets(model, self.targets)
        check_conv1d_base(self.conv1d, str(p.base_dtype))
        self.train_also = select_train_also(model, list(p.train_also))
        self.base = {
            "name_or_path": m.name_or_path if m.source in ("pretrained",) else None,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "weights_xxh3_128": weights_hash(model),
        }
        if resume is not None:
            self._check_base(resume)
        model.requires_grad_(False)
        inject_adapter_in_model(self.lora_config(), model, adapter_name=ADAPTER)
        params = dict(model.named_parameters())
        for name in self.train_also:
            params[name].requires_grad_(True)
        shards = self.env.world_size if self.strategy.dtensor_parameters else 1
        store_base(model, str(p.base_dtype), self.targets, shards=shards)
        self.hf_model = model
        self.num_trained = sum(x.numel() for x in params.values() if x.requires_grad)
        self.num_total = sum(x.numel() for x in params.values())

    def _check_base(self, resume: Path) -> None:
        saved = json.loads((resume / STATE_FILE).read_text()).get(STATE_KEY)
        if saved is None:
            raise CheckpointError(
                f"resume={resume}: the checkpoint holds no adapters (it was saved with peft=none) but "
                f"peft={self.cfg.peft.name}; resume it with peft=none, or fine-tune its export: "
                "model=hf model.name_or_path=RUN/hf"
            )
        base = saved["base"]
        if base["weights_xxh3_128"] != self.base["weights_xxh3_128"]:
            raise CheckpointError(
                f"resume={resume}: its adapters were trained on another base model (saved: "
                f"{base['name_or_path'] or 'model.source=config'}, weights hash {base['weights_xxh3_128']}; now: "
                f"{self.base['name_or_path'] or 'model.source=config'}, {self.base['weights_xxh3_128']}); resume with "
                "the model group it was saved with (model.*, train.seed for a model built from its config)"
            )

    # ---- after wrapping, checkpoints ---------------------------------------------------------------

    def after_setup(self, strategy: Any, module: nn.Module, optimizer: Any) -> None:
        self.strategy, self.module = strategy, module

    def checkpoint_state(self) -> dict[str, Any]:
        p = self.cfg.peft
        return {
            STATE_KEY: {
                "base": self.base,
                "name": str(p.name),
                "rank": int(p.rank),
                "alpha": float(p.alpha),
                "dropout": float(p.dropout),
                "targets": self.targets,
                "train_also": self.train_also,
                "keep_zeros": self.keep_zeros,
                "base_dtype": str(p.base_dtype),
            }
        }

    # ---- exports -----------------------------------------------------------------------------------

    def export_weights(
        self, state_dict: dict[str, torch.Tensor], hf_model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], nn.Module]:
        """The merged plain weights and a plain model to save them with (rank 0; others get {})."""
        # Every rank: the weights are gathered now, `finish` must not gather them again (a collective).
        self.adapter_state = (
            peft_state_dict(self.hf_model, state_dict, modules_to_save=self.modules_to_save())
            if state_dict
            else {}
        )
        if not state_dict:
            return state_dict, hf_model
        merged = merge_adapters(
            state_dict, self.targets, scaling=self.scaling, keep_zeros=self.keep_zeros, conv1d=self.conv1d
        )
        return merged, plain_model(hf_model.config, merged)

    def modules_to_save(self) -> list[str]:
        return modules_of(self.train_also)

    def finish(self, run_dir: Path) -> None:
        """adapter/: adapter_config.json and adapter_model.safetensors, as `PeftModel.save_pretrained` writes."""
        if self.adapter_state is None:  # no hf/ export gathered the weights (train.export_hf=false)
            full = self.strategy.full_state_dict(self.module)  # a collective, on every rank
            self.adapter_state = (
                peft_state_dict(self.hf_model, full, modules_to_save=self.modules_to_save()) if full else {}
            )
        if self.env.is_main:
            write_adapter(
                run_dir / ADAPTER_DIR,
                self.adapter_state,
                self.lora_config(
                    modules_to_save=self.modules_to_save(),
                    base_model_name_or_path=self.base["name_or_path"],
                    inference_mode=True,
                ),
            )
        barrier()

    def summary_lines(self) -> list[str]:
        share = self.num_trained / max(self.num_total, 1)
        return [
            f"peft={self.cfg.peft.name}: {self.num_trained / 1e6:.3f}M of {self.num_total / 1e6:.2f}M parameters "
            f"trained ({100 * share:.2f}%), rank {self.cfg.peft.rank} on {len(self.targets)} linears; "
            f"adapter/ (peft format) and hf/ (merged)"
        ]


def modules_of(parameters: list[str]) -> list[str]:
    return sorted({name.rpartition(".")[0] for name in parameters})


def peft_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, modules_to_save: list[str]
) -> dict[str, torch.Tensor]:
    """The peft library's saved keys of an adapted `model`'s state dict: `base_model.model.` + the name without
    the adapter's, and the whole modules that train in full (its `modules_to_save`)."""
    from peft.utils import get_peft_model_state_dict

    out = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER)
    for module in modules_to_save:
        out |= {k: v for k, v in state_dict.items() if k.startswith(f"{module}.")}
    return {f"base_model.model.{k}": v.detach().contiguous().clone() for k, v in out.items()}


def plain_model(config: Any, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The model class of `config` without adapters, holding `state_dict` (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    return model


def write_adapter(out_dir: Path, state_dict: dict[str, torch.Tensor], config: Any) -> None:
    """Written under a temporary name, then renamed: a half-written adapter/ is never taken for one, and nothing
    is left of it when writing fails."""
    with staged(out_dir) as tmp:
        save_file(state_dict, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
