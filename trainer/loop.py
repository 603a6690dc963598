"""The one training loop. Strategies (with their precision) and extensions (distillation, pruning, QAT) plug in
through small interfaces: trainer/strategies/ and trainer/extensions.py."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trainer import checkpoint as ckpt
from trainer.activation_checkpointing import enable_activation_checkpointing
from trainer.config import validate_config
from trainer.data import build_data
from trainer.data.prefetch import Prefetcher
from trainer.data.prepared import real_tokens
from trainer.distributed import ParallelEnv, all_gather_ints, all_reduce_sum, barrier, init_distributed
from trainer.errors import ConfigError, DataError, DivergenceError, TrainerWarning
from trainer.extensions import Extension
from trainer.logger import ExperimentLog
from trainer.loss import IGNORE_INDEX
from trainer.metrics import mfu, peak_flops, peak_memory_bytes
from trainer.models import CausalLMWithLoss, build_model, count_params, flops_per_token, max_seq_len
from trainer.optim import build_optimizer, schedule_factor, set_lr
from trainer.preemption import Preempted, PreemptionWatch, clear_marker, write_marker
from trainer.profiling import StepProfiler, describe
from trainer.strategies import build_strategy
from trainer.strategies.base import named_parameters
from trainer.utils import resolve_device, resolve_dtype


def build_extensions(
    cfg: Any, *, strategy: Any, data: Any, env: ParallelEnv, device: torch.device, dtype: torch.dtype
) -> list[Extension]:
    """The active extensions, in hook order. Each feature is imported only when it is on.

    The order, and why: distillation first, because it loads the teacher that the student may be cut from
    (`build_model`), before any other hook sees the model; QAT next, so that its fake-quantized linears are in
    place before pruning (pruning calibrates and masks the model as it will train); pruning last, so that its
    masks are restored or computed on the final module structure and attached after the teacher is placed.
    Adapters (LoRA, DoRA) last: they freeze and adapt the final model (a distillation student included), and
    their `export_weights` merges the weights every other extension left.
    """
    out: list[Extension] = []
    if cfg.distill.name != "none":
        from trainer.distill.extension import Distillation

        out.append(Distillation(cfg, tokenizer=data.tokenizer, dtype=dtype, env=env, device=device))
    if cfg.quant.name != "none":
        from trainer.quant.qat import QAT

        out.append(QAT(cfg.quant, strategy=strategy, env=env))
    # Under adapters the base is frozen: prune=keep_zeros (the only pruning validate_peft lets through) holds
    # its zeros by itself, and the adapters' extension masks the merged delta.
    adapters = cfg.peft.name != "none"
    if cfg.prune.name != "none" and not adapters:
        from trainer.prune.pruner import Pruner

        t = cfg.train
        out.append(
            Pruner(
                cfg.prune,
                env=env,
                device=device,
                max_steps=t.max_steps,
                seed=t.seed,
                train_data=data.train,
                micro_batch_size=t.micro_batch_size,
            )
        )
    if adapters:
        from trainer.peft.extension import Adapters

        out.append(Adapters(cfg, strategy=strategy, env=env))
    return out


class Trainer:
    """One run: set-up in `__init__`, then `train()`; features plug in as extensions (trainer/extensions.py)."""

    def __init__(self, cfg: Any, *, run_dir: Path, env: ParallelEnv) -> None:
        """Set-up, in this order and for these reasons:

        1. Validate the config and build the strategy: a bad value or rank count fails before any work.
        2. The process group, the checkpoint to resume from (a run directory that holds checkpoints, with no
           `resume` given, is refused here), the run directory and the experiment log (a missing wandb fails here).
        3. The data: the tokenizer fixes the vocabulary the model is built for.
        4. The extensions: distillation loads its teacher now, since the student may be cut from it.
        5. The model (an extension may build it), then every extension's `before_wrap` (QAT, pruning) on the
           bare HF model, then the loss module (an extension's, or the plain causal-LM loss).
        6. The strategy places the model and builds the optimizer together; extensions see the result.
        7. Compile, per-rank RNG, and the resume from a checkpoint (which overwrites weights and states).
        """
        self.cfg, self.run_dir, self.env = cfg, Path(run_dir), env
        t = cfg.train
        self.grad_accum = validate_config(cfg, world_size=env.world_size)
        self.device = resolve_device(t.device, env.local_rank)
        self.strategy = build_strategy(cfg, env, self.device)  # fails early on a bad rank count
        init_distributed(
            env,
            backend=cfg.strategy.backend,
            device=self.device,
            one_rank_group=not self.strategy.one_process,
        )
        self.ckpt_root = self.run_dir / "checkpoints"
        # Before anything is written to the run directory: one that holds checkpoints is refused unless resume
        # says whether to continue them or start over.
        resume = ckpt.resolve_resume(cfg.resume, self.ckpt_root)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clear_marker(self.run_dir)
        barrier()
        # Before data and model: a missing wandb/tensorboard fails early. Rank 0 only writes.
        self.log = ExperimentLog(cfg, run_dir=self.run_dir, enabled=env.is_main)
        if resume is not None:
            self._check_same_seq_len(resume)  # before the data is tokenized and packed again

        self.data = self._load_data()
        dtype = resolve_dtype(t.dtype)
        self.extensions: list[Extension] = build_extensions(
            cfg, strategy=self.strategy, data=self.data, env=env, device=self.device, dtype=dtype
        )
        self.hf_model = self._build_model(dtype)
        for ext in self.extensions:
            ext.before_wrap(self.hf_model, resume=resume)
        self.num_params = count_params(self.hf_model)
        self.flops_per_token = flops_per_token(self.hf_model, cfg.data.seq_len)

        module = self._first("wrap_loss", self.hf_model, loss_chunk_size=t.loss_chunk_size, seed=t.seed)
        # No extension brings its own loss: the causal-LM loss (fused chunked cross-entropy).
        if module is None:
            module = CausalLMWithLoss(self.hf_model, loss_chunk_size=t.loss_chunk_size)
        self.module, self.optimizer = self.strategy.setup(
            module,
            lambda m: build_optimizer(
                cfg.optimizer, m, device=self.device, offload=self.strategy.offloads_optimizer
            ),
        )
        for ext in self.extensions:
            ext.after_setup(self.strategy, self.module, self.optimizer)
        if t.compile:
            self.module.compile()  # in place: state-dict keys stay as they are
        torch.manual_seed(t.seed + env.rank)  # dropout differs per rank, reproducibly

        # A pure function of the seed and the count consumed (an in-memory permutation, or a weighted mixture).
        self.order = self.data.train.order(seed=t.seed)
        # The next step's micro-batches are assembled on a thread while this one trains.
        self.prefetcher = Prefetcher(
            self.data.train, micro_batch_size=t.micro_batch_size, rank=env.rank, world_size=env.world_size
        )
        self._data_wait = (0.0, 0)  # (seconds waited for batches, steps) since the last metrics record
        self.step = 0
        self.tokens_seen = 0
        # This run's input tokens that were not padding: what tokens/s and MFU count.
        self.real_tokens_seen = 0
        # Conversations' packing (trainer/data/conversations.py): printed at the start, logged with each step.
        self.packing: dict[str, Any] = dict(getattr(self.data.train, "stats", None) or {})
        self.resumed_from = self._resume(resume)
        self.peak = peak_flops(self.device, cfg.metrics.peak_flops)

    def extension(self, name: str) -> Extension | None:
        """The active extension called `name` (distill, quant, prune), or None when that feature is off."""
        return {ext.name: ext for ext in self.extensions}.get(name)

    def _first(self, hook: str, *args: Any, **kwargs: Any) -> Any:
        """The first extension's non-None answer to `hook`, or None."""
        for ext in self.extensions:
            out = getattr(ext, hook)(*args, **kwargs)
            if out is not None:
                return out
        return None

    def _merged(self, hook: str) -> dict[str, Any]:
        """Every extension's metrics from `hook`, merged in extension order."""
        out: dict[str, Any] = {}
        for ext in self.extensions:
            out |= getattr(ext, hook)()
        return out

    def _load_data(self):
        cfg, t = self.cfg, self.cfg.train
        data = build_data(
            cfg.data,
            run_dir=self.run_dir,
            model_name_or_path=cfg.model.name_or_path,
            trust_remote_code=cfg.model.trust_remote_code,
            model_gguf_file=cfg.model.gguf_file,
            is_main=self.env.is_main,
            barrier=barrier,
        )
        if len(data.train) < t.global_batch_size:
            raise DataError(
                f"the training data gives {len(data.train)} sequences of data.seq_len={cfg.data.seq_len} tokens, "
                f"fewer than one global batch (train.global_batch_size={t.global_batch_size}); "
                "lower data.seq_len or the batch size, or add data"
            )
        if len(data.eval) == 0:
            raise DataError(
                f"the eval split gives no sequence of data.seq_len={cfg.data.seq_len} tokens; lower data.seq_len or add eval data"
            )
        return data

    def _build_model(self, dtype: torch.dtype):
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)  # identical init on every rank
        vocab_size = len(self.data.tokenizer)
        model = self._first("build_model", vocab_size=vocab_size, dtype=dtype)
        if model is None:  # no extension builds it (a distillation student): the model group's
            model = build_model(cfg.model, vocab_size=vocab_size, dtype=dtype)
        limit = max_seq_len(model)
        if limit is not None and cfg.data.seq_len > limit:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} exceeds the model's maximum of {limit} positions; use data.seq_len<={limit}"
            )
        enable_activation_checkpointing(model, t.activation_checkpointing)
        model.config.use_cache = False
        return model

    def _check_same_seq_len(self, path: Path) -> None:
        """The data position is a count of packed sequences: another data.seq_len packs other sequences, so
        the checkpoint's position means nothing in them. (data=tokenized records seq_len in its mixture's
        identity and checks it itself, where data.allow_changed=true lets a run go on.)"""
        if self.cfg.data.source == "tokenized":
            return
        saved = json.loads((path / ckpt.STATE_FILE).read_text()).get("seq_len")  # None: an older checkpoint
        if saved is not None and saved != self.cfg.data.seq_len:
            raise ConfigError(
                f"data.seq_len={self.cfg.data.seq_len}: the checkpoint {path} was taken with data.seq_len={saved}, "
                f"and its data position counts sequences of that length; resume with data.seq_len={saved}, or "
                "start a new run (resume=none, or another hydra.run.dir) to train on the new length"
            )

    def _resume(self, path: Path | None) -> Path | None:
        """Restore model, optimizer, RNG and loop state from the checkpoint `path`, if any."""
        if path is not None:
            state = ckpt.load_checkpoint(
                path, strategy=self.strategy, module=self.module, optimizer=self.optimizer, env=self.env
            )
            self.step = state["step"]
            self.tokens_seen = state["tokens_seen"]
            self.order.load_state_dict(state["data"])
            self.strategy.precision.load_state_dict(state.get("precision", {}))
        return path

    # ---- steps -------------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        return self.cfg.optimizer.lr * schedule_factor(
            step, self.cfg.scheduler, max_steps=self.cfg.train.max_steps
        )

    def train_step(self) -> dict[str, float]:
        """One optimizer step over a global batch: accumulate micro-batches, clip, step."""
        t = self.cfg.train
        # This rank's micro-batches of the next global batch (prefetched); the last step prefetches nothing.
        batches, waited = self.prefetcher.next_batches(
            self.order, t.global_batch_size, prefetch=self.step + 1 < t.max_steps
        )
        self._data_wait = (self._data_wait[0] + waited, self._data_wait[1] + 1)
        # The loss is the mean over every target token of the global batch, whatever the padding per micro-batch;
        # the input tokens that are not padding are the work tokens/s and MFU count. One all-reduce for both.
        local = [
            sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches),
            sum(real_tokens(b) for b in batches),
        ]
        num_targets, num_real = all_reduce_sum(torch.tensor(local, device=self.device)).tolist()
        # Data-parallel strategies average gradients over ranks: scale each rank's share up to match.
        num_targets_per_rank = num_targets / self.env.world_size

        lr = self.lr_at(self.step)
        set_lr(self.optimizer, lr)
        overflows_before = self.strategy.precision.skipped_steps
        self.module.train()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)  # synced once per step
        for i, batch in enumerate(batches):
            with self.strategy.accumulation_context(self.module, sync=i == len(batches) - 1):
                inputs = batch.inputs.to(self.device)
                positions = None if batch.position_ids is None else batch.position_ids.to(self.device)
                with self.strategy.forward_context(), contextlib.ExitStack() as stack:
                    extra: dict[str, Any] = {}
                    for ext in self.extensions:  # e.g. the teacher's outputs for distillation
                        extra |= stack.enter_context(ext.forward_inputs(inputs, positions))
                    loss = self.module(
                        inputs,
                        batch.labels.to(self.device),
                        num_targets=num_targets_per_rank,
                        position_ids=positions,
                        **extra,
                    )
                self.strategy.backward(self.module, loss)
            loss_sum += loss.detach().float()
        # Each rank's loss_sum is its share of the global mean x world_size (DDP scaling): average it back.
        # Reduced before the step, so that every rank skips a step with a non-finite loss alike.
        loss_value = all_reduce_sum(loss_sum).item() / self.env.world_size
        grad_norm = float(
            self.strategy.clip_and_step(
                self.module, self.optimizer, t.grad_clip, skip=not math.isfinite(loss_value)
            )
        )
        # A step the fp16 scaler skipped as an overflow is its business (it lowers the scale, and stops the run
        # at its minimum); any other non-finite loss or norm is divergence, and the strategy did not apply it.
        overflowed = self.strategy.precision.skipped_steps > overflows_before
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        self.step_nonfinite = not finite and not overflowed
        self.step += 1
        for ext in self.extensions:
            ext.after_step(self.step)  # e.g. gradual pruning's mask updates
        self.tokens_seen += t.global_batch_size * self.cfg.data.seq_len  # every slot, padding included
        self.real_tokens_seen += num_real
        # target_tokens: the tokens the loss was taken on (all but padding for text; the trained ones of SFT)
        out = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "target_tokens": int(num_targets)}
        out["real_tokens"] = int(num_real)  # the input tokens that were not padding (text, prompts included)
        out |= self._merged("step_metrics")  # distill=kd: each loss term, the teacher's parameters per rank
        return out | self.strategy.precision.metrics()  # fp16: loss_scale, skipped_steps

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean token loss and perplexity over the eval split (or its first eval_batches batches), all ranks."""
        t = self.cfg.train
        self.module.eval()
        n = len(self.data.eval)
        if t.eval_batches > 0:
            n = min(n, t.eval_batches * t.micro_batch_size)
        mine = torch.arange(self.env.rank, n, self.env.world_size)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        model = self.strategy.eval_module(self.module)
        # Every rank runs the same number of forwards (sharded strategies gather parameters collectively). A short
        # last batch, or a rank out of data, is filled up with masked rows that add nothing: every batch has one
        # shape, so a compiled model does not recompile for the last one.
        num_batches = math.ceil(math.ceil(n / self.env.world_size) / t.micro_batch_size)
        for b in range(num_batches):
            chunk = mine[b * t.micro_batch_size : (b + 1) * t.micro_batch_size]
            real = len(chunk)
            filler = torch.zeros(t.micro_batch_size - real, dtype=torch.long)  # sequence 0, masked below
            batch = self.data.eval.batch(torch.cat([chunk, filler]))
            batch.labels[real:] = IGNORE_INDEX
            inputs, labels = batch.inputs.to(self.device), batch.labels.to(self.device)
            positions = None if batch.position_ids is None else batch.position_ids.to(self.device)
            with self.strategy.forward_context():
                loss_sum = model(inputs, labels, num_targets=1, position_ids=positions)
                for ext in self.extensions:
                    ext.eval_batch(inputs, labels, positions)  # e.g. the teacher's loss
            totals[0] += loss_sum.double()
            totals[1] += int((labels != IGNORE_INDEX).sum())
        all_reduce_sum(totals)
        loss = (totals[0] / totals[1]).item()
        out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))} | self._merged("eval_metrics")
        if self.data.entropy_floor is not None:
            out["entropy_floor"] = self.data.entropy_floor
        return out

    def save(self) -> Path:
        self._check_weights_finite("a checkpoint")
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data": self.order.state_dict(),
            "precision": self.strategy.precision.state_dict(),
            "lr_horizon": self._lr_horizon(),  # a resume that changes it is warned (_continue_after_resume)
            "seq_len": self.cfg.data.seq_len,  # a resume that changes it is refused (_check_same_seq_len)
            **self._merged("checkpoint_state"),  # e.g. the adapters' base model reference
        }
        return ckpt.save_checkpoint(
            self.ckpt_root,
            strategy=self.strategy,
            module=self.module,
            optimizer=self.optimizer,
            trainer_state=state,
            env=self.env,
            hf_config=self.hf_model.config,  # the model trained: a cut student, a structured-pruned model
            tokenizer=self.data.tokenizer,
            keep_last=self.cfg.checkpoint.keep_last,
            extra_slices=[s for ext in self.extensions for s in ext.checkpoint_slices()],
        )

    # ---- the loop ----------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Step until train.max_steps: log, evaluate and checkpoint on their schedules, stop cleanly on a
        preemption signal; then `finish()` (export, extensions' end-of-run work, summary)."""
        t, c = self.cfg.train, self.cfg.checkpoint
        if self.env.is_main:
            self._print_header()
        # The bar only on a terminal: in a file (Slurm, nohup, CI) its frames are noise, and a plain line per
        # logged step says the same (_log_step).
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not (self.env.is_main and t.progress_bar and sys.stderr.isatty()),
            dynamic_ncols=True,
            desc="train",
        )
        self._log_lines = self.env.is_main and not sys.stdout.isatty()
        # (time, tokens, tokens that were not padding) where this logging window began
        self._window = (time.perf_counter(), self.tokens_seen, self.real_tokens_seen)
        run_start, start_step, start_real = time.perf_counter(), self.step, self.real_tokens_seen
        self._run_start = (run_start, start_step)  # for the ETA
        last: dict[str, Any] = {}
        evaluation: dict[str, float] = {}
        saved_step = -1
        self.num_nonfinite_steps = 0  # this run's, a resume starts afresh
        self._continue_after_resume()
        # Every way out of the loop (the end, an error, a preemption, a second Ctrl-C) closes these once, in
        # reverse order: after an error no handler of ours is left to keep the launcher's SIGTERM from ending it.
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)
            stack.callback(self.prefetcher.close)
            # SIGUSR1/SIGTERM/Ctrl-C: checkpoint at the next step boundary, then exit
            preemption = stack.enter_context(contextlib.closing(PreemptionWatch()))
            profiler = StepProfiler(
                self.cfg.profile, out_dir=self.run_dir / "profile", rank=self.env.rank, device=self.device
            )
            stack.callback(profiler.close)
            try:
                while self.step < t.max_steps:
                    profiler.before_step(self.step + 1)
                    stats = self.train_step()
                    if self.step == start_step + 1:
                        self._warn_if_mostly_padding(stats)
                    if (profiled := profiler.after_step(self.step)) is not None and self.env.is_main:
                        bar.write(describe(profiled, profiler.out_dir))
                    bar.update(1)
                    at_end = self.step == t.max_steps
                    if self.step % t.log_every == 0 or at_end or self.step_nonfinite:
                        last = self._log_step(stats, bar)  # a non-finite step is always on record
                    if self.step_nonfinite:
                        self._count_nonfinite_step(stats, bar)
                    if (t.eval_every and self.step % t.eval_every == 0) or at_end:
                        evaluation = self.evaluate()
                        self.log.write({"step": self.step, **evaluation})
                        if self.env.is_main and not at_end:  # the summary reports the last one
                            bar.write(self._format_eval(evaluation))
                    if (c.every_steps and self.step % c.every_steps == 0) or (at_end and c.at_end):
                        self.save()
                        saved_step = self.step
                    if (signum := preemption.requested(self.device)) is not None and not at_end:
                        self._stop_for_preemption(
                            signum, saved=saved_step == self.step, bar=bar, watch=preemption
                        )
            except BaseException:
                self.log.close(exit_code=1)
                raise
        if not evaluation:  # nothing trained this run (max_steps=0, or already complete): where it stands
            evaluation = self.evaluate()
            self.log.write({"step": self.step, **evaluation})
        seconds = time.perf_counter() - run_start
        tokens = self.real_tokens_seen - start_real
        summary = {
            "steps": self.step - start_step,
            "final_step": self.step,
            "train_loss": last.get("loss"),
            **evaluation,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "seconds": seconds,
        }
        summary["mfu"] = mfu(summary["tokens_per_s"], self.flops_per_token, self.peak, self.env.world_size)
        return self.finish(summary)

    def _count_nonfinite_step(self, stats: dict[str, Any], bar: tqdm) -> None:
        """A step with a non-finite loss or gradient norm (the strategy did not apply it): tolerated up to
        train.max_nonfinite_steps, then the run stops on every rank (the values are reduced over ranks, so
        every rank counts the same), saving nothing; the last checkpoint stays `latest`."""
        t = self.cfg.train
        self.num_nonfinite_steps += 1
        what = f"step {self.step}: loss {stats['loss']}, gradient norm {stats['grad_norm']}"
        if self.num_nonfinite_steps <= t.max_nonfinite_steps:
            if self.env.is_main:
                bar.write(
                    f"{what}: not finite, step skipped (weights unchanged); {self.num_nonfinite_steps} of "
                    f"train.max_nonfinite_steps={t.max_nonfinite_steps} tolerated"
                )
            return
        latest = self.ckpt_root / "latest"
        kept = (
            f"the last checkpoint ({self.ckpt_root / latest.read_text().strip()}) is untouched and resume=auto "
            "continues from it"
            if latest.is_file()
            else "no checkpoint was saved before it"
        )
        clipping = (
            f"a tighter train.grad_clip (now {t.grad_clip:g})"
            if t.grad_clip > 0
            else "gradient clipping (train.grad_clip=1.0)"
        )
        remedies = [
            f"a lower optimizer.lr (now {self.cfg.optimizer.lr:g}) or a longer scheduler.warmup_steps "
            f"(now {self.cfg.scheduler.warmup_steps})",
            clipping,
            *(["precision=bf16 (fp16's range is narrow)"] if self.strategy.precision.loss_scaling else []),
            "train.max_nonfinite_steps=N to skip up to N such steps",
        ]
        raise DivergenceError(
            f"{what}: the training diverged (not finite; {self.num_nonfinite_steps} such step(s) this run, "
            f"train.max_nonfinite_steps={t.max_nonfinite_steps}). The run stops without saving: {kept}. "
            f"Remedies: {'; '.join(remedies)}"
        )

    def _check_weights_finite(self, what: str) -> None:
        """Refuse to write non-finite weights (a step that overflowed them with a finite gradient, or a strategy
        that applied a non-finite step): one collective, so every rank refuses together."""
        names = {name for name, _ in named_parameters(self.module)}
        flags = [
            torch.isfinite(piece.tensor).all().to(self.device)
            for piece in self.strategy.pieces(self.module, self.optimizer, names)
            if piece.kind == "weight"
        ]
        local = (~torch.stack(flags)).sum().float() if flags else torch.zeros((), device=self.device)
        if all_reduce_sum(local).item() > 0:
            raise DivergenceError(
                f"step {self.step}: the weights hold non-finite values; {what} of them is not written. The "
                "training diverged: resume=auto continues from the last checkpoint, with a lower optimizer.lr, "
                "gradient clipping (train.grad_clip) or precision=bf16 rather than fp16"
            )

    def _lr_horizon(self) -> int:
        """The steps the learning-rate schedule decays over: scheduler.decay_steps, or train.max_steps."""
        return self.cfg.scheduler.decay_steps or self.cfg.train.max_steps

    def _continue_after_resume(self) -> None:
        """A resumed run: metrics.jsonl drops the records after the checkpoint (this run logs those steps
        again), and a schedule horizon that differs from the checkpoint's is warned about."""
        if self.resumed_from is None or not self.env.is_main:
            return
        self.log.drop_after(self.step)
        saved = json.loads((self.resumed_from / ckpt.STATE_FILE).read_text()).get("lr_horizon")
        now = self._lr_horizon()
        if saved is None or saved == now:
            return
        cause = (
            f"it follows train.max_steps={self.cfg.train.max_steps} while scheduler.decay_steps is null"
            if self.cfg.scheduler.decay_steps is None
            else f"scheduler.decay_steps={self.cfg.scheduler.decay_steps}"
        )
        warnings.warn(
            f"the learning-rate schedule's horizon changed on resume: {saved} steps in {self.resumed_from}, {now} "
            f"now ({cause}), so the learning rate jumps at this step; set scheduler.decay_steps={saved} to keep "
            "the schedule the run started with",
            TrainerWarning,
            stacklevel=3,
        )

    def _warn_if_mostly_padding(self, stats: dict[str, Any]) -> None:
        """Say so when most of a step's tokens are padding: the run spends its compute on them (and tokens/s and
        MFU, which count only the rest, look poor for a reason the user can fix)."""
        slots = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        padding = 1.0 - stats["real_tokens"] / slots
        if padding <= 0.5 or not self.env.is_main:
            return
        seq_len = self.cfg.data.seq_len
        fix = (
            f"conversations longer than half of data.seq_len={seq_len} fill a window each even packed (they are "
            "kept whole): a larger data.seq_len packs several to a window"
            if self.cfg.data.packing
            else f"documents much shorter than data.seq_len={seq_len} get a window each: set data.packing=true "
            f"(windows full of documents{', conversations kept whole' if self.packing else ''}) or a smaller "
            "data.seq_len"
        )
        warnings.warn(
            f"padding is {100 * padding:.1f}% of the input tokens of step {self.step} ({stats['real_tokens']:,} "
            f"of {slots:,} are data), and tokens/s and MFU count only the data; {fix}",
            TrainerWarning,
            stacklevel=2,
        )

    def _log_step(self, stats: dict[str, Any], bar: tqdm) -> dict[str, Any]:
        """One metrics.jsonl record: the step's stats, the extensions' (e.g. sparsity), throughput and memory;
        where stdout is not a terminal, a plain line of it too."""
        start, start_tokens, start_real = self._window
        tokens_per_s = (self.real_tokens_seen - start_real) / max(time.perf_counter() - start, 1e-9)
        slots = self.tokens_seen - start_tokens
        peak_per_rank = all_gather_ints(peak_memory_bytes(self.device), self.device)
        record = {
            "step": self.step,
            **stats,
            **self._merged("log_metrics"),  # e.g. the achieved sparsity of the pruned layers (a collective)
            "tokens": self.tokens_seen,
            **({"packing_efficiency": self.packing["packing_efficiency"]} if self.packing else {}),
            # The share of this window's input tokens that were padding; tokens/s and MFU count the others.
            "padding_fraction": 1.0 - (self.real_tokens_seen - start_real) / max(slots, 1),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak, self.env.world_size),
            "peak_mem_bytes": max(peak_per_rank),
            "peak_mem_bytes_per_rank": peak_per_rank,
            # Seconds per step the training thread waited for its batches (prefetching hides the rest).
            "data_wait_s": self._data_wait[0] / max(self._data_wait[1], 1),
        }
        self.log.write(record)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if self._log_lines:
            print(self._format_step(record), flush=True)
        self._window = (time.perf_counter(), self.tokens_seen, self.real_tokens_seen)
        self._data_wait = (0.0, 0)
        return record

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """End-of-run work: the hf/ export, then each extension's (sparsity report, QAT conversion), then the
        summary on the console; returns the summary."""
        if self.cfg.train.export_hf:
            try:
                self._check_weights_finite("the hf/ export")
            except DivergenceError:
                self.log.close(exit_code=1)
                raise
            state_dict, hf_model = self.strategy.full_state_dict(self.module), self.hf_model
            for ext in self.extensions:  # e.g. adapters merged into a plain model
                state_dict, hf_model = ext.export_weights(state_dict, hf_model)
            ckpt.export_hf(
                self.run_dir / "hf",
                state_dict=state_dict,
                hf_model=hf_model,
                tokenizer=self.data.tokenizer,
                env=self.env,
            )
        for ext in self.extensions:
            ext.finish(self.run_dir)
        if self.env.is_main:
            self._print_summary(summary)
            for ext in self.extensions:
                for line in ext.summary_lines():
                    print(line, flush=True)
        self.log.close()
        return summary

    def _stop_for_preemption(self, signum: int, *, saved: bool, bar: tqdm, watch: PreemptionWatch) -> None:
        """Checkpoint (unless this step just did), leave the marker for the batch script (not after a Ctrl-C: a
        person stopped the run, no scheduler should start it again), and raise Preempted."""
        path = (self.ckpt_root / (self.ckpt_root / "latest").read_text().strip()) if saved else self.save()
        bar.close()
        error = Preempted(step=self.step, signum=signum)
        if self.env.is_main:
            if signum == signal.SIGINT:
                print(
                    f"interrupted (Ctrl-C) at step {self.step}: checkpoint written to {path}; the same command "
                    f"with resume=auto (run dir {self.run_dir}) continues from it",
                    flush=True,
                )
            else:
                write_marker(self.run_dir, step=self.step, signum=signum, checkpoint=path)
                print(f"{error}: {path}; resume=auto in {self.run_dir} continues from it", flush=True)
        self.log.close(exit_code=1)
        watch.hand_over(signum)  # a handler that was there before ours (submitit's requeue) runs now
        raise error

    # ---- console -----------------------------------------------------------------------------------

    def _print_header(self) -> None:
        t = self.cfg.train
        resumed = f", resumed from {self.resumed_from}" if self.resumed_from else ""
        print(
            f"run dir {self.run_dir}{resumed}\n"
            f"model {self.num_params / 1e6:.2f}M params, {self.flops_per_token / 1e6:.1f} MFLOP/token; "
            f"data {len(self.data.train)} train / {len(self.data.eval)} eval sequences of {self.cfg.data.seq_len} tokens; "
            f"{self.env.world_size} rank(s) x {t.micro_batch_size} x {self.grad_accum} accumulation = {t.global_batch_size} sequences/step; "
            f"{self.strategy}, precision {self.strategy.precision.name} on {self.device.type}; "
            + (f"peak {self.peak / 1e9:.0f} GFLOP/s per device" if self.peak else "peak unknown (no MFU)"),
            flush=True,
        )
        if self.packing:
            p = self.packing
            print(
                f"conversations packed whole: {100 * p['packing_efficiency']:.1f}% of the train windows' tokens are "
                f"not padding; {p['truncated']} truncated and {p['dropped']} dropped for data.seq_len="
                f"{self.cfg.data.seq_len} (data.truncation={self.cfg.data.truncation}), "
                f"{p['lost_trainable']} trained tokens lost with them",
                flush=True,
            )

    def _format_step(self, r: dict[str, Any]) -> str:
        """A logged step as one plain line: step, loss, lr, tokens/s, MFU and the ETA from this run's pace."""
        started, start_step = self._run_start
        per_step = (time.perf_counter() - started) / max(self.step - start_step, 1)
        eta = datetime.timedelta(seconds=round(per_step * (self.cfg.train.max_steps - self.step)))
        mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "not reported"
        return (
            f"step {self.step}/{self.cfg.train.max_steps}: loss {r['loss']:.4f}, lr {r['lr']:.3g}, "
            f"{r['tokens_per_s']:,.0f} tokens/s, MFU {mfu_text}, ETA {eta}"
        )

    @staticmethod
    def _format_eval(e: dict[str, float]) -> str:
        text = f"eval: loss {e['eval_loss']:.4f}, ppl {e['eval_ppl']:.2f}"
        if "teacher_eval_loss" in e:
            text += f" (teacher: loss {e['teacher_eval_loss']:.4f}, ppl {e['teacher_eval_ppl']:.2f})"
        if "entropy_floor" in e:
            text += f" (source entropy floor {e['entropy_floor']:.4f}, gap {e['eval_loss'] - e['entropy_floor']:.4f})"
        return text

    def _print_summary(self, s: dict[str, Any]) -> None:
        lines = [
            f"done: {s['steps']} steps this run (step {s['final_step']}) in {s['seconds']:.1f}s, "
            f"{s['tokens_per_s']:,.0f} tokens/s, MFU "
            + (
                f"{100 * s['mfu']:.1f}%"
                if s["mfu"] is not None
                else "not reported (metrics.peak_flops unknown)"
            ),
            self._format_eval(s),
            *(
                [
                    f"fp16: {self.strategy.precision.skipped_steps} overflowing step(s) skipped, loss scale now "
                    f"{self.strategy.precision.loss_scale:g}"
                ]
                if self.strategy.precision.loss_scaling
                else []
            ),
            "outputs: "
            + ", ".join(
                str(p)
                for p in (self.run_dir / "metrics.jsonl", self.ckpt_root, self.run_dir / "hf")
                if p.exists()  # a max_steps=0 run saves no checkpoint
            ),
        ]
        print("\n".join(lines), flush=True)
