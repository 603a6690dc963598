"""Knowledge distillation (distill=kd): the losses against hand-computed values, then real runs.

A small teacher (wider and deeper than the student) is trained once per module with the real loop; the
student runs distill from its checkpoint. Multi-rank runs use 2 CPU ranks (gloo) under torchrun and are
compared with the single-process run of the same config (the loss is a mean over the global batch, so it
does not depend on how the batch is split over ranks and micro-batches).
"""

import math
import shutil

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.conftest import (
    TINY,
    compose_config,
    composition_error,
    make_trainer,
    read_metrics,
    run_command,
    strip_model_description,
    train_losses,
)
from trainer.config import validate_config
from trainer.distill.hidden import default_layer_map, resolve_layer_map
from trainer.distill.losses import distillation_loss, hidden_state_loss, mixed_distillation_loss
from trainer.errors import ConfigError

# ---- the losses ---------------------------------------------------------------------------------------
# Student logits [0, 0] -> s = [1/2, 1/2]; teacher logits [ln 3, 0] -> t = [3/4, 1/4].
S, T = [1 / 2, 1 / 2], [3 / 4, 1 / 4]
M = [(a + b) / 2 for a, b in zip(T, S, strict=True)]  # the JSD mixture at beta = 1/2: [5/8, 3/8]
HAND = {
    "forward_kl": 3 / 4 * math.log(3 / 2) + 1 / 4 * math.log(1 / 2),
    "reverse_kl": 1 / 2 * math.log(2 / 3) + 1 / 2 * math.log(2),
    "jsd": 1 / 2 * sum(t * math.log(t / m) for t, m in zip(T, M, strict=True))
    + 1 / 2 * sum(s * math.log(s / m) for s, m in zip(S, M, strict=True)),
    "tvd": 1 / 2 * (abs(3 / 4 - 1 / 2) + abs(1 / 4 - 1 / 2)),
}


@pytest.mark.parametrize("kind", sorted(HAND))
def test_each_loss_matches_its_hand_computed_value(kind):
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3), 0.0]])
    loss = distillation_loss(student, teacher, torch.tensor([0]), kind=kind)
    assert loss.item() == pytest.approx(HAND[kind], rel=1e-6)
    assert HAND["forward_kl"] == pytest.approx(0.130812, abs=1e-6)  # the arithmetic above, done by hand


@pytest.mark.parametrize("kind", sorted(HAND))
def test_temperature_softens_both_sides_and_scales_by_its_square(kind):
    # With T = 2, logits twice as far apart give the same tempered distributions as above: T^2 x the value.
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2 * math.log(3), 0.0]])
    loss = distillation_loss(student, teacher, torch.tensor([0]), kind=kind, temperature=2.0)
    assert loss.item() == pytest.approx(4 * HAND[kind], rel=1e-6)


def test_ignored_labels_are_masked_and_the_sum_divides_by_num_targets():
    student = torch.tensor([[0.0, 0.0], [5.0, -5.0], [0.0, 0.0]])
    teacher = torch.tensor([[math.log(3), 0.0], [-5.0, 5.0], [math.log(3), 0.0]])
    labels = torch.tensor([1, -100, 0])  # the middle row disagrees wildly but is ignored
    loss = distillation_loss(student, teacher, labels, kind="forward_kl")
    assert loss.item() == pytest.approx(HAND["forward_kl"], rel=1e-6)  # mean over the 2 targets
    loss = distillation_loss(student, teacher, labels, kind="forward_kl", num_targets=8)
    assert loss.item() == pytest.approx(2 * HAND["forward_kl"] / 8, rel=1e-6)


@pytest.mark.parametrize("kind", sorted(HAND))
def test_chunked_equals_unchunked_with_gradients(kind):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    head = torch.randn(50, 8, requires_grad=True)
    t_hidden, t_head = torch.randn(2, 9, 12), torch.randn(50, 12)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    options = dict(kind=kind, temperature=1.5, beta=0.3)

    # Reference: full logits, plain autograd.
    full = distillation_loss(hidden @ head.t(), t_hidden @ t_head.t(), labels, chunk_size=0, **options)
    want = torch.autograd.grad(full, (hidden, head))
    for chunk in (0, 4, 5, 100):
        loss = distillation_loss(
            hidden, t_hidden, labels, student_weight=head, teacher_weight=t_head, chunk_size=chunk, **options
        )
        got = torch.autograd.grad(loss, (hidden, head))
        assert loss.item() == pytest.approx(full.item(), rel=1e-5)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(HAND))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mixed_loss_equals_plain_cross_entropy_plus_divergence_with_gradients(kind, temperature):
    # Reference: full logits, F.cross_entropy and the divergence of the logits, mixed by alpha, autograd.
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    head = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    t_hidden, t_head = torch.randn(2, 9, 12), torch.randn(50, 12)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, 4:] = -100
    alpha, options = 0.7, dict(kind=kind, temperature=temperature, beta=0.3)
    logits = hidden @ head.t() + bias
    ce_ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    kd_ref = distillation_loss(logits, t_hidden @ t_head.t(), labels, chunk_size=0, **options)
    want = torch.autograd.grad((1 - alpha) * ce_ref + alpha * kd_ref, (hidden, head, bias))
    for chunk in (0, 4):
        loss, ce, kd = mixed_distillation_loss(
            hidden, t_hidden, labels, alpha=alpha, student_weight=head, student_bias=bias,
            teacher_weight=t_head, chunk_size=chunk, **options,
        )  # fmt: skip
        assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-5)
        assert kd.item() == pytest.approx(kd_ref.item(), rel=1e-5)
        assert loss.item() == pytest.approx((1 - alpha) * ce_ref.item() + alpha * kd_ref.item(), rel=1e-5)
        got = torch.autograd.grad(loss, (hidden, head, bias))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_the_loss_leaves_logits_given_to_it_unchanged():
    student, teacher = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)
    before = student.detach().clone(), teacher.clone()
    loss, _, _ = mixed_distillation_loss(student, teacher, torch.arange(5), alpha=0.5, temperature=2.0)
    loss.backward()
    assert torch.equal(student.detach(), before[0]) and torch.equal(teacher, before[1])


def test_hidden_state_losses_match_hand_computed_values():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [9.0, 9.0]])
    t = torch.tensor([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, -100])
    # mse per token: (1 + 1) / 2 = 1 and (1 + 1) / 2 = 1; cosine: 1 - 0 = 1 and 1 - 1 = 0.
    assert hidden_state_loss(s, t, labels, kind="mse", num_targets=None).item() == pytest.approx(1.0)
    assert hidden_state_loss(s, t, labels, kind="cosine", num_targets=None).item() == pytest.approx(0.5)
    # normalized_mse: each token's mse over the teacher's mean square, (0 + 1) / 2 and (4 + 4) / 2.
    got = hidden_state_loss(s, t, labels, kind="normalized_mse", num_targets=None).item()
    assert got == pytest.approx((1 / (1 / 2) + 1 / 4) / 2)


def test_default_layer_map_spreads_student_layers_over_the_teacher_last_to_last():
    assert default_layer_map(2, 4) == [2, 4]
    assert default_layer_map(3, 4) == [1, 3, 4]
    assert default_layer_map(4, 4) == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="one teacher layer"):
        resolve_layer_map([1], num_student_layers=2, num_teacher_layers=4)
    with pytest.raises(ConfigError, match="do not exist"):
        resolve_layer_map([1, 5], num_student_layers=2, num_teacher_layers=4)


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("distill.temperature=0", "distill.temperature"),
        ("distill.alpha=1.5", "distill.alpha"),
        ("distill.beta=1", "distill.beta"),
    ],
)
def test_bad_distill_values_fail_before_work(override, fragment, kd_config):
    cfg = kd_config.copy()
    key, value = override.split("=")
    OmegaConf.update(cfg, key, yaml.safe_load(value))
    with pytest.raises(ConfigError, match=fragment):
        validate_config(cfg)


@pytest.mark.parametrize(
    "override,allowed",
    [
        ("distill.loss=kl", "forward_kl, reverse_kl, jsd, tvd"),
        ("distill.hidden_loss=l1", "mse, normalized_mse, cosine"),
        ("distill.student_init=random", "model, teacher_layers"),
        ("distill.name=dkd", "none, kd"),
    ],
)
def test_a_distill_value_outside_its_choices_is_refused_at_composition(override, allowed):
    key, value = override.split("=")
    message = composition_error("distill=kd", "distill.teacher=some/model", override)
    assert f"Invalid value '{value}', expected one of [{allowed}]" in message
    assert f"full_key: {key}" in message


@pytest.fixture(scope="module")
def kd_config():
    return compose_config("distill=kd", "distill.teacher=some/model")


def test_kd_without_a_teacher_says_what_to_give():
    with pytest.raises(ConfigError, match="needs distill.teacher"):
        validate_config(compose_config("distill=kd"))


# ---- runs -----------------------------------------------------------------------------------------------

STEPS = 6
COMMON = [*TINY, f"train.max_steps={STEPS}", "train.log_every=1", "metrics.peak_flops=1e11"]
TEACHER = ["model.arch.hidden_size=48", "model.arch.num_hidden_layers=3"]


def distill_args(teacher, *extra):
    return [
        *COMMON,
        "distill=kd",
        f"distill.teacher={teacher}",
        "distill.loss=forward_kl",
        "distill.temperature=2.0",
        "distill.alpha=0.7",
        "distill.hidden_weight=0.5",  # student width 32, teacher 48: learned projections
        *extra,
    ]


def train_in_process(run_dir, overrides):
    """The real loop in this process; leaves what the command leaves (the resolved config included)."""
    summary = make_trainer(run_dir, *overrides).train()
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(compose_config(*overrides), run_dir / ".hydra" / "config.yaml")  # what Hydra writes
    return run_dir, summary


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher (width 48, 3 layers) trained by the real loop: checkpoint, hf/ export, resolved config."""
    return train_in_process(tmp_path_factory.mktemp("teacher"), [*COMMON, *TEACHER])


@pytest.fixture(scope="module")
def straight(teacher, tmp_path_factory):
    """A student (width 32, 2 layers) distilled from the teacher's checkpoint in one go."""
    return train_in_process(tmp_path_factory.mktemp("straight"), distill_args(teacher[0]))


def test_each_term_is_logged_and_mixed_by_alpha(straight):
    run_dir, _ = straight
    train = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        mixed = 0.3 * r["ce_loss"] + 0.7 * r["kd_loss"] + 0.5 * r["hidden_loss"]
        assert r["loss"] == pytest.approx(mixed, rel=1e-5)
        assert r["kd_loss"] > 0 and r["hidden_loss"] > 0
    assert train[-1]["hidden_loss"] < train[0]["hidden_loss"]  # the projections and the student learn


def test_evaluation_reports_the_teachers_perplexity_beside_the_students(straight, teacher):
    run_dir, summary = straight
    _, teacher_summary = teacher
    # The teacher is frozen and the eval split is the same: its loss is what its own run measured last.
    assert summary["teacher_eval_loss"] == pytest.approx(teacher_summary["eval_loss"], rel=1e-5)
    assert summary["teacher_eval_ppl"] == pytest.approx(math.exp(summary["teacher_eval_loss"]), rel=1e-6)
    assert "eval_loss" in summary and summary["eval_loss"] != summary["teacher_eval_loss"]


def test_export_is_the_student_alone_and_the_checkpoint_adds_only_the_projections(straight, teacher):
    run_dir, _ = straight
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")  # a plain model
    plain = AutoModelForCausalLM.from_config(model.config)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2  # the student's shape
    with safe_open(str(run_dir / "hf" / "model.safetensors"), framework="pt") as f:
        exported = set(f.keys())
    assert exported <= set(plain.state_dict()) and not any("distill" in k for k in exported)

    shards = run_dir / "checkpoints" / "step_00000006" / "shards"
    with safe_open(str(next(shards.glob("*.safetensors"))), framework="pt") as f:
        keys = {k.split("@")[0] for k in f.keys() if k.startswith("model/")}  # noqa: SIM118
    student = {f"model/{k}" for k, _ in plain.named_parameters()}
    assert {k for k in keys if "distill_projections" not in k} == student  # no teacher, no wrapper keys
    assert {k for k in keys if "distill_projections" in k} == {
        "model/distill_projections.0.weight",
        "model/distill_projections.1.weight",
    }

    from trainer.export import export_checkpoint

    export_checkpoint(shards.parent, run_dir / "hf_again")  # the export command drops the projections too
    again = AutoModelForCausalLM.from_pretrained(run_dir / "hf_again")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_resume_restores_the_projections_and_continues_the_same_loss_curve(straight, teacher, tmp_path):
    args = [*distill_args(teacher[0]), "checkpoint.every_steps=3"]
    make_trainer(tmp_path, *args, "train.max_steps=3").train()
    make_trainer(tmp_path, *args, "resume=auto").train()
    want = {r["step"]: r for r in read_metrics(straight[0]) if "loss" in r}
    got = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    for step in range(4, STEPS + 1):  # after the resume: the hidden term depends on the projections
        for key in ("loss", "ce_loss", "kd_loss", "hidden_loss"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)


def test_student_cut_from_every_kth_teacher_layer(teacher, tmp_path):
    from trainer.distill.student import kept_layers, student_from_teacher
    from trainer.distill.teacher import checkpoint_dir
    from trainer.export import load_checkpoint_model

    source, _ = load_checkpoint_model(checkpoint_dir(str(teacher[0])), device="cpu")
    assert kept_layers(3, stride=2) == [0, 2]
    student = student_from_teacher(source, keep=[0, 2], dtype=torch.float32)  # teacher layers 0 and 2 of 3
    assert student.config.num_hidden_layers == 2
    t, s = source.state_dict(), student.state_dict()
    for new, old in ((0, 0), (1, 2)):
        name = "model.layers.{}.mlp.down_proj.weight"
        torch.testing.assert_close(s[name.format(new)], t[name.format(old)])
    torch.testing.assert_close(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    torch.testing.assert_close(s["model.norm.weight"], t["model.norm.weight"])

    # The same through the loop (distill.student_init=teacher_layers): the model it trains is that cut.
    trainer = make_trainer(tmp_path, *distill_args(teacher[0] / "hf"), "distill.student_init=teacher_layers")
    for name, p in trainer.hf_model.named_parameters():
        torch.testing.assert_close(p, s[name], msg=name)

    # The teacher is frozen: eval mode, no gradients, nothing of it in the optimizer or the trained module.
    teacher_params = list(trainer.extension("distill").teacher.parameters())
    assert not trainer.extension("distill").teacher.training and not any(
        p.requires_grad for p in teacher_params
    )
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher_params}
    assert not {id(p) for p in trainer.module.parameters()} & {id(p) for p in teacher_params}


def test_a_cut_students_checkpoint_loads_from_its_own_files_and_through_the_old_fallback(teacher, tmp_path):
    from trainer.distill.teacher import checkpoint_dir
    from trainer.export import load_checkpoint_model

    # The teacher: a copy of its checkpoint alone, without its run's resolved config beside it.
    alone = tmp_path / "teacher_step"
    shutil.copytree(checkpoint_dir(str(teacher[0])), alone)
    overrides = [*distill_args(alone), "distill.student_init=teacher_layers", "train.max_steps=2"]
    run = tmp_path / "student"
    trainer = make_trainer(run, *overrides)
    trainer.train()
    step = run / "checkpoints" / "step_00000002"
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    trainer.hf_model.eval()
    with torch.no_grad():
        want = trainer.hf_model(ids).logits
        model, tokenizer = load_checkpoint_model(step, device="cpu")  # no .hydra/: the checkpoint's files
        assert (model.config.hidden_size, model.config.num_hidden_layers) == (48, 2)  # layers 0 and 2 of 3
        assert torch.equal(model(ids).logits, want)
        assert tokenizer.get_vocab() == trainer.data.tokenizer.get_vocab()
        strip_model_description(step, overrides)  # an old checkpoint: the cut rebuilt from distill.*
        old, _ = load_checkpoint_model(step, device="cpu")
        assert torch.equal(old(ids).logits, want)


def test_student_layers_pick_the_teacher_layers_exactly_and_bad_ones_fail_naming_the_range(teacher, tmp_path):
    from trainer.distill.student import kept_layers
    from trainer.errors import ConfigError

    assert (
        kept_layers(30, stride=3, layers=[0, 3, 6, 10, 13, 16, 19, 23, 26, 29])[-1] == 29
    )  # first and last kept
    for bad in ([], [2, 1], [0, 0], [0, 3]):
        with pytest.raises(ConfigError, match=r"student_layers=.*\[0, 2\]"):
            kept_layers(3, stride=1, layers=bad)
    with pytest.raises(ConfigError, match="student_layer_stride=3 keeps 1"):
        kept_layers(3, stride=3)
    # Through the loop: teacher layers 1 and 2 (of 0, 1, 2) become the student's 0 and 1.
    trainer = make_trainer(
        tmp_path,
        *distill_args(teacher[0] / "hf"),
        "distill.student_init=teacher_layers",
        "distill.student_layers=[1,2]",
    )
    t = {
        k.removeprefix("model."): v for k, v in trainer.extension("distill").teacher.state_dict().items()
    }  # its loss wrapper
    s = trainer.hf_model.state_dict()
    assert trainer.hf_model.config.num_hidden_layers == 2
    for new, old in ((0, 1), (1, 2)):
        name = "model.layers.{}.self_attn.q_proj.weight"
        torch.testing.assert_close(s[name.format(new)], t[name.format(old)])


def test_vocabulary_mismatch_fails_before_training(teacher, tmp_path):
    from trainer.data.tokenizer import build_wordlevel_tokenizer

    # Same number of logits, another tokenizer: caught by comparing the vocabularies.
    other = tmp_path / "other_tokenizer"
    shutil.copytree(teacher[0] / "hf", other)
    build_wordlevel_tokenizer(["zebra yak xylophone " * 3]).save_pretrained(str(other))
    with pytest.raises(ConfigError, match="vocabularies differ: the teacher's tokenizer has"):
        make_trainer(tmp_path / "a", *distill_args(other))

    # Another number of logits (no tokenizer to compare): caught by the sizes.
    wide = tmp_path / "wide_vocab"
    model = AutoModelForCausalLM.from_pretrained(teacher[0] / "hf")
    model.resize_token_embeddings(256)
    model.save_pretrained(str(wide))
    with pytest.raises(ConfigError, match="predicts 256 token ids"):
        make_trainer(tmp_path / "b", *distill_args(wide))
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_two_ranks_follow_the_single_run_and_shard_the_teacher(strategy, straight, teacher, tmp_path):
    run_command([*distill_args(teacher[0]), f"strategy={strategy}", f"hydra.run.dir={tmp_path}"], nproc=2)
    want, got = train_losses(straight[0]), train_losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, want, got)
    # The teacher's parameters each rank holds, measured after every step.
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher[0] / "hf").parameters())
    for r in (r for r in read_metrics(tmp_path) if "loss" in r):
        per_rank = r["teacher_params_per_rank"]
        assert r["teacher_params"] == total
        if strategy == "ddp":
            assert per_rank == [total, total]  # a replica per rank
        else:
            assert sum(per_rank) == total and max(per_rank) <= 0.55 * total  # a shard each
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.hidden_size == 32


def test_gguf_teacher_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    from trainer.errors import MissingPackageError

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(MissingPackageError, match=r"trainer\[gguf\]"):
        make_trainer(
            tmp_path, *TINY, "distill=kd", "distill.teacher=some/dir", "distill.teacher_gguf_file=t.gguf"
        )
