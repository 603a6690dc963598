"""Supervised fine-tuning on conversations: prepare_data's masks, whole-conversation packing, document masking
(packed conversations never see each other), the loss over trained tokens of the global batch, and bad input.

The tokenizer is SmolLM2-135M-Instruct's (real ChatML template, default system prompt, pad == eos); the model is
a tiny Llama on its vocabulary."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.chat_fixtures import WORDS, with_template
from tests.conftest import TINY_MODEL, compose_config, make_trainer, run_command, tiny_llama, train_losses
from tests.test_cli import assert_explained, run_commands
from tests.test_data_tokenized import prepare_config
from trainer.data.chat import ChatEncoder
from trainer.data.conversations import ConversationWindows, best_fit_decreasing, pack_whole
from trainer.data.prepare import prepare
from trainer.data.prepared import PreparedSplit, read_meta
from trainer.data.tokenizer import load_tokenizer
from trainer.loss import IGNORE_INDEX


def conversation_rows(num: int, *, seed: int = 0) -> list[dict]:
    """Word-reversal conversations of one or two assistant turns (trained-token counts from ~3 to ~40), a
    long one now and then, and every 25th row without an assistant turn (nothing to train: dropped)."""
    rng = random.Random(seed)
    rows = []
    for i in range(num):
        words = rng.sample(WORDS, rng.randint(2, 12 if i % 10 else 18))
        messages = [
            {"role": "user", "content": "Reverse: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]
        if i % 3 == 0:
            messages += [
                {"role": "user", "content": "Its first word?"},
                {"role": "assistant", "content": words[-1]},
            ]
        if i % 25 == 7:
            messages = messages[:1]
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module")
def smol_dir(smollm2_tokenizer_dir) -> Path:
    return smollm2_tokenizer_dir


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversation_rows(300)))
    return path


@pytest.fixture(scope="module")
def chat_prepared(chat_jsonl, smol_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "chat"
    return prepare(
        prepare_config(
            f"data_files={chat_jsonl}",
            f"tokenizer={smol_dir}",
            f"output_dir={out}",
            "format=messages",
            "eval_fraction=0.1",
        )
    )


def test_prepare_data_stores_each_conversations_tokens_and_mask_and_counts_them_in_meta(
    chat_prepared, chat_jsonl, smol_dir
):
    meta = read_meta(chat_prepared)
    tok = load_tokenizer(str(smol_dir))
    encoder = ChatEncoder(tok)
    rows = [json.loads(line)["messages"] for line in chat_jsonl.read_text().splitlines()]
    kept = [r for r in rows if any(m["role"] == "assistant" for m in r)]
    train = PreparedSplit(chat_prepared, "train", meta)
    evals = PreparedSplit(chat_prepared, "eval", meta)
    assert train.num_documents + evals.num_documents == len(kept)
    # the eval split holds rows 9, 19, ... of the source (evenly spread): compare the train split's in order
    train_rows = [r for i, r in enumerate(rows) if (i + 1) % 10 and any(m["role"] == "assistant" for m in r)]
    for d, messages in enumerate(train_rows):
        ids, mask = encoder.encode(messages)
        assert train.document(d).tolist() == ids.tolist()
        assert train.document_mask(d).tolist() == mask.astype(bool).tolist()
    chat = meta["chat"]
    assert chat["format"] == "messages" and chat["train_on"] == "assistant"
    assert sum(sum(d.values()) for d in chat["dropped"].values()) == len(rows) - len(kept) == 12
    trained = sum(int(train.document_mask(d).sum()) for d in range(train.num_documents))
    assert chat["trainable_tokens"]["train"] == trained
    assert chat["trainable_fraction"]["train"] == pytest.approx(trained / train.num_tokens)
    assert chat["template_hash"] and (chat_prepared / "train" / "shard_00000.mask").is_file()


def test_packing_keeps_every_item_whole_within_capacity_and_fills_windows():
    rng = np.random.default_rng(0)
    for lengths, capacity in [
        (rng.integers(20, 400, size=2000), 1024),  # conversations of 20-400 tokens into 1024-token windows
        (rng.integers(100, 300, size=2000), 512),  # alike lengths: best-fit decreasing leaves 2% empty
    ]:
        bins = pack_whole(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(lengths[b].sum() <= capacity for b in bins)
        assert len(bins) <= len(best_fit_decreasing(lengths, capacity))
        assert lengths.sum() / (len(bins) * capacity) >= 0.99  # against padding each row to the longest: ~0.5
        assert bins == pack_whole(lengths, capacity)  # deterministic: every rank builds the same windows


def test_repacking_finds_the_fewer_windows_best_fit_decreasing_misses():
    # Best-fit decreasing: [4, 4], [4, 3, 3], [3, 3, 3], [3]. Three windows of [4, 3, 3] hold them all.
    lengths = np.array([4, 4, 4, 3, 3, 3, 3, 3, 3])
    assert len(best_fit_decreasing(lengths, 10)) == 4
    bins = pack_whole(lengths, 10)
    assert sorted(sorted(lengths[b].tolist()) for b in bins) == [[3, 3, 4]] * 3


def test_packed_windows_hold_whole_conversations_with_restarting_positions_and_masked_labels(chat_prepared):
    meta = read_meta(chat_prepared)
    split = PreparedSplit(chat_prepared, "train", meta)
    windows = ConversationWindows(split, 256, pad_id=2, packing=True, truncation="truncate")
    assert windows.stats["truncated"] == 0 and windows.stats["packing_efficiency"] > 0.9
    seen = []
    for w in range(len(windows)):
        batch = windows.batch(torch.tensor([w]))
        at = 0
        for d in windows.window(w):
            ids, mask = split.document(d), split.document_mask(d)
            n = len(ids)
            assert batch.inputs[0, at : at + n].tolist() == ids.tolist()  # whole, never split
            assert batch.position_ids[0, at : at + n].tolist() == list(range(n))
            want = np.where(mask[1:], ids[1:], IGNORE_INDEX).tolist() + [IGNORE_INDEX]
            assert batch.labels[0, at : at + n].tolist() == want
            seen.append(d)
            at += n
        assert (batch.labels[0, at:] == IGNORE_INDEX).all() and (batch.inputs[0, at:] == 2).all()
        # the tokens tokens/s counts: every conversation's, prompts included (more than the trained ones)
        assert batch.num_tokens == at > int((batch.labels != IGNORE_INDEX).sum())
    assert sorted(seen) == list(range(split.num_documents))


def test_conversations_longer_than_seq_len_are_truncated_or_dropped_counting_the_trained_tokens_lost(
    chat_prepared,
):
    split = PreparedSplit(chat_prepared, "train", read_meta(chat_prepared))
    lengths = split.document_lengths()
    L = int(np.percentile(lengths, 80))
    long = [d for d in range(split.num_documents) if lengths[d] > L]
    cut = ConversationWindows(split, L, pad_id=2, packing=True, truncation="truncate")
    assert cut.stats["truncated"] == len(long) > 0
    assert cut.stats["lost_trainable"] == sum(int(split.document_mask(d)[L:].sum()) for d in long)
    dropped = ConversationWindows(split, L, pad_id=2, packing=False, truncation="drop")
    assert dropped.stats["dropped"] == len(long) and len(dropped) == split.num_documents - len(long)
    assert dropped.stats["lost_trainable"] == sum(int(split.document_mask(d)[1:].sum()) for d in long)


def isolated_logits(model, windows, w: int, *, packed_forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the packed window's logits at its conversations' tokens, each conversation's logits run alone);
    `packed_forward` runs the packed window instead of the model (a compiled forward)."""
    batch = windows.batch(torch.tensor([w]))
    forward = model if packed_forward is None else packed_forward
    packed = forward(input_ids=batch.inputs, position_ids=batch.position_ids, use_cache=False).logits[0]
    parts, alone = [], []
    at = 0
    for d in windows.window(w):
        ids = torch.from_numpy(windows.split.document(d))[None]
        alone.append(model(input_ids=ids, use_cache=False).logits[0])
        parts.append(packed[at : at + ids.shape[1]])
        at += ids.shape[1]
    return torch.cat(parts), torch.cat(alone)


def check_isolation(chat_prepared, *, compiled: bool, checkpointing: bool) -> None:
    split = PreparedSplit(chat_prepared, "train", read_meta(chat_prepared))
    windows = ConversationWindows(split, 256, pad_id=2, packing=True, truncation="truncate")
    w = max(range(len(windows)), key=lambda i: len(windows.window(i)))
    assert len(windows.window(w)) >= 3
    model = tiny_llama(49152)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing acts in training mode; the tiny Llama has no dropout
    packed_forward = torch.compile(model) if compiled else None  # the packed window only: one graph
    with torch.set_grad_enabled(checkpointing):
        packed, alone = isolated_logits(model, windows, w, packed_forward=packed_forward)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "activation_checkpointing"])
def test_a_packed_windows_logits_equal_each_conversations_logits_alone(chat_prepared, checkpointing):
    check_isolation(chat_prepared, compiled=False, checkpointing=checkpointing)


@pytest.mark.parametrize(
    "checkpointing", [False, True], ids=["compiled", "compiled_activation_checkpointing"]
)
def test_a_compiled_models_packed_logits_equal_each_conversations_logits_alone(chat_prepared, checkpointing):
    check_isolation(chat_prepared, compiled=True, checkpointing=checkpointing)


CHAT_RUN = [
    *TINY_MODEL,
    "data=tokenized",
    "data.seq_len=128",
    "train.max_steps=3",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=0",
    "train.progress_bar=false",
    "checkpoint.every_steps=0",
    "train.export_hf=false",
    "scheduler=constant",
]


@torch.no_grad()
def reference_loss(model, windows, indices: list[int]) -> float:
    """The mean cross-entropy over every trained token of these windows, each conversation run alone."""
    total, count = 0.0, 0
    for w in indices:
        for d in windows.window(w):
            ids = torch.from_numpy(windows.split.document(d))
            mask = torch.from_numpy(windows.split.document_mask(d))
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
            losses = F.cross_entropy(logits, ids[1:], reduction="none")
            total += float(losses[mask[1:]].sum())
            count += int(mask[1:].sum())
    return total / count


def test_the_first_step_loss_and_gradients_are_the_mean_over_the_trained_tokens_of_the_global_batch(
    chat_prepared, tmp_path
):
    """Whatever the split into micro-batches (16 sequences at once or 4 x 4 accumulated): the same loss and
    gradients (plain SGD: the step is -lr x the gradient), and the loss is the mean over trained tokens of the
    conversations run alone, rows with ~3 to ~40 trained tokens alike."""
    grads = []
    for micro in (16, 4):
        trainer = make_trainer(
            tmp_path / f"micro{micro}",
            *CHAT_RUN,
            f"data.path={chat_prepared}",
            "train.global_batch_size=16",
            f"train.micro_batch_size={micro}",
            "optimizer=sgd",
            "train.grad_clip=0",
        )
        indices = trainer.order.peek(16).tolist()
        want = reference_loss(trainer.hf_model, trainer.data.train.windows[0], indices)
        before = [p.detach().clone() for p in trainer.hf_model.parameters()]
        assert trainer.train_step()["loss"] == pytest.approx(want, rel=1e-5)
        lr = trainer.lr_at(0)
        grads.append(
            [(b - p.detach()) / lr for b, p in zip(before, trainer.hf_model.parameters(), strict=True)]
        )
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_the_eval_loss_is_taken_over_trained_tokens_of_conversations_alone(chat_prepared, tmp_path):
    trainer = make_trainer(
        tmp_path,
        *CHAT_RUN,
        f"data.path={chat_prepared}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
    )
    windows = trainer.data.eval.windows[0]
    want = reference_loss(trainer.hf_model, windows, list(range(len(windows))))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-5)


def sharded_run(chat_prepared) -> list[str]:
    return [*CHAT_RUN, f"data.path={chat_prepared}", "train.global_batch_size=16", "train.micro_batch_size=4"]


@pytest.fixture(scope="module")
def single_chat_run(chat_prepared, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single_chat")
    make_trainer(run_dir, *sharded_run(chat_prepared)).train()  # in this process: no imports to wait for
    return run_dir


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_ranks_follow_the_single_process_on_packed_conversations(
    chat_prepared, single_chat_run, strategy, tmp_path
):
    """2 ranks x 8 sequences (fsdp) or 2 ranks x 4 x 2 accumulated (zero3) against 1 rank x 4 x 4: packed
    conversations keep to themselves under sharding (the single process's do: the tests above), and the loss
    normalisation spans micro-batches and ranks."""
    micro = ["train.micro_batch_size=8"] if strategy == "fsdp" else []  # 2 ranks x 8, or 2 ranks x 4 x 2
    run_command(
        [*sharded_run(chat_prepared), f"strategy={strategy}", *micro, f"hydra.run.dir={tmp_path}"], nproc=2
    )
    single, sharded = train_losses(single_chat_run), train_losses(tmp_path)
    assert sorted(sharded) == [1, 2, 3]
    for step in single:
        assert sharded[step] == pytest.approx(single[step], rel=1e-4), (single, sharded)


def _sharded_isolation(rank: int, port: int, chat_prepared: str, out: str) -> None:
    """One of 2 ranks: under fsdp, then zero3, the sharded model's logits of the packed window with the most
    conversations against each of its conversations run alone, written to out/STRATEGY-RANK.json."""
    import os

    from trainer.distributed import ParallelEnv, destroy
    from trainer.loop import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    try:
        for strategy in ("fsdp", "zero3"):
            cfg = compose_config(*sharded_run(Path(chat_prepared)), f"strategy={strategy}")
            trainer = Trainer(cfg, run_dir=Path(out) / strategy, env=ParallelEnv(rank, 2, rank))
            windows = trainer.data.train.windows[0]
            w = max(range(len(windows)), key=lambda i: len(windows.window(i)))
            # the model inside the strategy's wrapper, its root's own parameters (embedding, head) gathered
            with torch.no_grad(), trainer.strategy.gathered(trainer.module):
                packed, alone = isolated_logits(trainer.hf_model, windows, w)
            result = {
                "conversations": len(windows.window(w)),
                "max_diff": float((packed - alone).abs().max()),
            }
            (Path(out) / f"{strategy}-{rank}.json").write_text(json.dumps(result))
            del trainer
    finally:
        destroy()


def test_a_packed_windows_logits_equal_each_conversations_alone_under_fsdp_and_zero3_on_two_ranks(
    chat_prepared, tmp_path
):
    from tests.conftest import free_port, spawn_ranks

    spawn_ranks(_sharded_isolation, free_port(), str(chat_prepared), str(tmp_path))
    for strategy in ("fsdp", "zero3"):
        for rank in (0, 1):
            result = json.loads((tmp_path / f"{strategy}-{rank}.json").read_text())
            assert result["conversations"] >= 3
            assert result["max_diff"] <= 1e-5, (strategy, rank, result)


def test_data_hf_reads_the_conversations_prepare_data_writes(chat_prepared, chat_jsonl, smol_dir, tmp_path):
    from trainer.data import build_data

    def conversations(*windows) -> list[tuple[int, ...]]:
        """Every conversation the windows hold, as (its tokens, then its trained tokens), sorted."""
        out = []
        for w in windows:
            for d in w.docs.tolist():
                ids, mask = w.split.document(d), w.split.document_mask(d)
                out.append((*ids.tolist(), -1, *ids[mask].tolist()))
        return sorted(out)

    cfg = compose_config(*CHAT_RUN, f"data.path={chat_prepared}")
    tokenized = build_data(cfg.data, run_dir=tmp_path / "tokenized")
    cfg = compose_config(
        *[o.replace("data=tokenized", "data=hf") for o in CHAT_RUN],
        f"data.data_files={chat_jsonl}",
        "data.format=messages",
        f"data.tokenizer={smol_dir}",
    )
    hf = build_data(cfg.data, run_dir=tmp_path / "hf")
    # data=hf holds out a random share for eval, prepare_data every tenth row: the same conversations in all
    assert conversations(hf.train, hf.eval) == conversations(
        tokenized.train.windows[0], tokenized.eval.windows[0]
    )


def test_bad_conversational_input_exits_2_with_one_paragraph_naming_the_fix(smol_dir, tmp_path):
    bare = tmp_path / "bare_tokenizer"
    with_template(load_tokenizer(str(smol_dir)), None).save_pretrained(str(bare))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    rows = {
        "good": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
        * 20,
        "role": [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}] * 3,
        "empty": [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": []},
        ],
        "field": [{"conversation": []}],
    }
    files = {}
    for name, r in rows.items():
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(x) + "\n" for x in r))

    def prep(data, tokenizer=smol_dir, *extra):
        out = tmp_path / f"out_{len(cases)}"
        return [
            f"data_files={files[data]}",
            f"tokenizer={tokenizer}",
            f"output_dir={out}",
            "format=messages",
            *extra,
        ]

    cases: list = []
    for args, names in [
        (prep("good", bare), ["has no chat template", "chat_template=PATH"]),
        (prep("role"), [f"{files['role']}, line 1", "'bot'", "roles="]),
        (prep("empty"), [f"{files['empty']}, line 2", "empty conversation"]),
        (prep("field"), [f"{files['field']}, line 1", "'messages'", "messages_field"]),
        (prep("good", "bpe"), ["format=messages", "model's tokenizer"]),
    ]:
        cases.append(("trainer.prepare_data", args, names))
    cases.append(
        ("trainer.train", ["data=pydoc", "data.format=messages"], ["data.format=messages", "data=hf"])
    )
    results = run_commands(tmp_path, [{"module": m, "args": a} for m, a, _ in cases])
    for (module, args, names), result in zip(cases, results, strict=True):
        assert_explained(result, *names)
        if module == "trainer.prepare_data":  # refused before anything is written
            assert not list(Path(args[2].removeprefix("output_dir=")).glob("*/shard_*"))


def test_chat_settings_compose_and_a_built_tokenizer_is_refused_for_conversations():
    from trainer.config import validate_config
    from trainer.errors import ConfigError

    cfg = compose_config(
        "data=hf", "data.format=prompt_completion", "data.tokenizer=bpe", "data.data_files=x.jsonl"
    )
    with pytest.raises(ConfigError, match="model's tokenizer"):
        validate_config(cfg, world_size=1)


def test_a_teacher_equal_to_the_student_sees_the_same_positions_and_mask_its_divergence_is_zero(
    chat_prepared, tmp_path
):
    """KD on packed conversations: a student cut from every layer of the teacher is the teacher, so the
    divergence is 0 only if the teacher sees the student's positions and document mask, on the CE's tokens."""
    teacher = tmp_path / "teacher"
    common = [
        *CHAT_RUN,
        f"data.path={chat_prepared}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
    ]
    make_trainer(teacher, *common, "train.max_steps=1").train()
    student = make_trainer(
        tmp_path / "student",
        *common,
        "distill=kd",
        f"distill.teacher={teacher}",
        "distill.alpha=0.5",
        "distill.student_init=teacher_layers",
        "distill.student_layer_stride=1",
    )
    stats = student.train_step()
    assert stats["kd_loss"] == pytest.approx(0.0, abs=1e-8)  # without the positions: ~1e-5
    assert stats["ce_loss"] > 1.0 and stats["loss"] == pytest.approx(0.5 * stats["ce_loss"], rel=1e-5)


def test_pruning_calibrates_on_packed_conversations_each_seeing_only_itself(chat_prepared):
    """Wanda's and SparseGPT's input statistics over packed windows equal those over every conversation (and
    the padding) run alone: calibration keeps the document mask too."""
    from trainer.calibration import calibration_batches, update_blocks_sequentially

    split = PreparedSplit(chat_prepared, "train", read_meta(chat_prepared))
    windows = ConversationWindows(split, 256, pad_id=2, packing=True, truncation="truncate")
    model = tiny_llama(49152)
    targets = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}

    def stats_of(batches) -> dict[str, torch.Tensor]:
        out = {}
        update_blocks_sequentially(
            model, batches, targets, lambda n, _m, s: out.__setitem__(n, s.hessian), with_hessian=True
        )
        return out

    packed = calibration_batches(windows, num_batches=2, batch_size=2, seed=0)
    alone = []
    for batch in packed:
        for row in range(batch.inputs.shape[0]):
            starts = (batch.position_ids[row] == 0).nonzero().flatten().tolist() + [batch.inputs.shape[1]]
            alone += [batch.inputs[row : row + 1, a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    want, got = stats_of(alone), stats_of(packed)
    for name in targets:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_quantization_calibrates_on_packed_conversations_each_seeing_only_itself(chat_prepared, smol_dir):
    """SmoothQuant's per-channel activation maxima (int8_smooth, compressed-tensors w8a8) over the packed windows
    trainer.quantize and trainer.export calibrate on equal those over every conversation (and the padding) run
    alone; without the positions, tokens attend across conversations and the maxima differ."""
    from trainer.calibration import data_calibration_batches
    from trainer.quant.smooth import calibrate

    data_cfg = compose_config(*CHAT_RUN, f"data.path={chat_prepared}").data
    packed = data_calibration_batches(data_cfg, tokenizer=str(smol_dir), num_batches=2, batch_size=1)
    alone = []
    for batch in packed:
        for row in range(batch.inputs.shape[0]):
            starts = (batch.position_ids[row] == 0).nonzero().flatten().tolist() + [batch.inputs.shape[1]]
            alone += [batch.inputs[row : row + 1, a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    model = tiny_llama(49152)
    got, want = calibrate(model, packed)[0], calibrate(model, alone)[0]
    ids_only = calibrate(model, [b.inputs for b in packed])[0]
    assert got.keys() == want.keys() and "head" in got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(ids_only[k], want[k], rtol=1e-3) for k in want)


def test_trainer_evaluate_measures_a_chat_dataset_over_its_trained_tokens(chat_prepared, tmp_path):
    from trainer.data import build_data
    from trainer.evaluate import perplexity

    data = build_data(compose_config(*CHAT_RUN, f"data.path={chat_prepared}").data, run_dir=tmp_path)
    model = tiny_llama(49152)
    ppl, loss, count = perplexity(model, data.eval, batch_size=4)
    windows = data.eval.windows[0]
    assert loss == pytest.approx(reference_loss(model, windows, list(range(len(windows)))), rel=1e-5)
    assert count == read_meta(chat_prepared)["chat"]["trainable_tokens"]["eval"]


@pytest.mark.parametrize("adapter", ["peft=lora", "peft.base_dtype=nf4"])
def test_adapters_train_on_packed_conversations_from_the_base_models_loss(adapter, chat_prepared, tmp_path):
    """LoRA and QLoRA start as the base model (B = 0): the first step's loss is the base's mean over the
    trained tokens of conversations run alone, and the adapters then learn. (DoRA's forward takes the
    positions as LoRA's does: the adapters wrap the linears, not the model.)"""
    extra = ["peft=lora", adapter] if adapter.startswith("peft.") else [adapter]
    if "nf4" in adapter:  # NF4 quantizes whole blocks of 64 x 64 weights
        extra += ["model.arch.hidden_size=64", "model.arch.intermediate_size=64"]
    trainer = make_trainer(
        tmp_path,
        *CHAT_RUN,
        f"data.path={chat_prepared}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        *extra,
    )
    indices = trainer.order.peek(8).tolist()
    want = reference_loss(trainer.hf_model, trainer.data.train.windows[0], indices)
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    tolerance = 1e-4 if "nf4" in adapter else 1e-5  # NF4: the same quantized base, dequantized per call
    assert losses[0] == pytest.approx(want, rel=tolerance)
    assert losses[-1] < losses[0]


def test_a_resumed_chat_run_continues_with_exactly_the_losses_of_a_straight_one(chat_prepared, tmp_path):
    common = [
        *CHAT_RUN,
        f"data.path={chat_prepared}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "scheduler.decay_steps=6",
    ]
    make_trainer(tmp_path / "a", *common, "train.max_steps=6").train()
    make_trainer(tmp_path / "b", *common, "train.max_steps=3").train()
    make_trainer(tmp_path / "b", *common, "train.max_steps=6", "resume=auto").train()
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [b[s] for s in range(1, 7)] == [a[s] for s in range(1, 7)]
    with pytest.raises(Exception, match="truncation was truncate, now drop"):  # other windows: refused
        make_trainer(tmp_path / "b", *common, "train.max_steps=7", "resume=auto", "data.truncation=drop")


def test_prepare_data_writes_the_same_conversations_and_masks_with_several_processes(
    chat_prepared, chat_jsonl, smol_dir, tmp_path
):
    out = prepare(
        prepare_config(
            f"data_files={chat_jsonl}",
            f"tokenizer={smol_dir}",
            f"output_dir={tmp_path / 'two'}",
            "format=messages",
            "eval_fraction=0.1",
            "num_proc=2",
            "batch_docs=16",
        )
    )
    assert read_meta(out)["fingerprint"] == read_meta(chat_prepared)["fingerprint"]  # tokens and masks
    assert read_meta(out)["chat"] == read_meta(chat_prepared)["chat"]
