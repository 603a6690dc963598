"""Every shipped config composes; bad input fails before training with a message naming the fix."""

import dataclasses
import json
import pickle
import typing
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from tests.conftest import (
    TINY,
    TINY_LOOP,
    TINY_MARKOV,
    TINY_MODEL,
    compose_config,
    composition_error,
    make_trainer,
)
from trainer.choices import Choice
from trainer.config import validate_config
from trainer.errors import ConfigError, DataError, MissingPackageError
from trainer.train import CONF_DIR
from trainer.utils import require

USER = TINY_MODEL + TINY_LOOP

# Directories of conf/ that hold one command's own config, not a group: trainer.generate's (in conf/, its
# `model=PATH` would be taken for an option of the model group).
COMMAND_DIRS = ("generate",)
# The training config's groups (chain/ and experiment/ belong to trainer.pipeline: tests/test_pipeline.py).
GROUPS = sorted(
    p.name
    for p in Path(CONF_DIR).iterdir()
    if p.is_dir() and p.name not in ("chain", "experiment", *COMMAND_DIRS)
)


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((Path(CONF_DIR) / g).glob("*.yaml"))],
)
def test_every_shipped_config_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("model", "hf"):
        overrides.append("model.name_or_path=some/model")
    if (group, option) == ("distill", "kd"):
        overrides.append("distill.teacher=some/model")
    if (group, option) == ("data", "tokenized"):
        overrides.append("data.path=some/prepared_dir")
    cfg = compose_config(*overrides)
    assert validate_config(cfg) >= 1


def test_unknown_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="micro_batch"):
        compose_config("train.micro_batchsize=4")


def test_unknown_group_option_is_refused():
    with pytest.raises(ConfigCompositionException, match="nosuch"):
        compose_config("optimizer=nosuch")


def test_wrong_type_is_refused():
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        compose_config("optimizer.lr=fast")


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.micro_batch_size=0", "train.micro_batch_size=0"),
        ("train.global_batch_size=-8", "train.global_batch_size=-8"),
        ("optimizer.lr=0", "optimizer.lr=0"),
        ("optimizer.lr=-1e-3", "learning rate"),
        ("scheduler.warmup_steps=-1", "scheduler.warmup_steps"),
        ("train.global_batch_size=12", "not divisible"),
        ("model.source=pretrained", "model.name_or_path"),
        ("strategy.deepspeed=5", "must be a mapping"),
        ("precision.min_loss_scale=0", "precision.min_loss_scale"),
        ("strategy.deepspeed={zero_optimization:{stage:2}}", "does not run DeepSpeed"),
        (
            "train.activation_checkpointing=partial",
            "train.activation_checkpointing=partial: must be false, true",
        ),
        ("train.activation_checkpointing=1", "train.activation_checkpointing=1: must be false, true"),
        ("precision.fp8_all_gather=true", "precision.fp8_all_gather=true all-gathers FSDP's float8 weights"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    cfg = compose_config("train.micro_batch_size=8", "train.global_batch_size=16", override)
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("+", r"\+")):
        validate_config(cfg)


@pytest.mark.parametrize(
    "override,allowed",
    [
        ("precision.name=fp4", "fp32, bf16, fp16, fp8"),
        ("precision.reduce_dtype=fp64", "float32, bfloat16, float16"),
        ("strategy.name=zero4", "single, ddp, fsdp, zero1, zero2, zero3"),
        ("strategy.offload_optimizer=nvme", "none, cpu"),
        ("scheduler.name=step", "constant, linear, cosine, wsd"),
        ("train.dtype=float64", "float32, bfloat16, float16"),
        ("data.source=s3", "embedded, pydoc, hf, tokenized"),
        ("model.source=hub", "config, pretrained"),
        ("logger.wandb.mode=offlne", "online, offline, disabled"),
        ("quant.name=int2", "none, int8_dynamic, int8_weight, int4_weight"),
        ("prune.name=random", "none, magnitude, wanda, sparsegpt, gmp, nm, structured, keep_zeros"),
        ("distill.loss=kl", "forward_kl, reverse_kl, jsd, tvd"),
    ],
)
def test_a_value_outside_a_closed_choice_is_refused_at_composition(override, allowed):
    key, value = override.split("=")
    message = composition_error(override)
    assert f"Invalid value '{value}', expected one of [{allowed}]" in message
    assert f"full_key: {key}" in message


def test_closed_choices_read_as_their_plain_values(tmp_path):
    """Code compares, formats, json-dumps and keys dicts with them as strings; YAML shows the plain value."""
    cfg = compose_config("strategy=zero2", "scheduler=wsd", "precision=bf16")
    name, shape = cfg.strategy.name, cfg.scheduler.decay_shape
    assert isinstance(name, Choice) and name == "zero2" and name.startswith("zero") and name in ("zero2",)
    assert (
        f"strategy={name}" == "strategy=zero2" and format(name, ">6") == " zero2" and str(shape) == "1-sqrt"
    )
    assert {"zero2": 1}[name] == 1 and hash(name) == hash("zero2")
    assert json.loads(json.dumps({name: OmegaConf.to_container(cfg.precision)}))["zero2"]["name"] == "bf16"
    assert "decay_shape: 1-sqrt" in OmegaConf.to_yaml(cfg) and "name: zero2" in OmegaConf.to_yaml(cfg)
    OmegaConf.save(cfg, tmp_path / "config.yaml")  # what Hydra writes to .hydra/config.yaml
    assert OmegaConf.load(tmp_path / "config.yaml").strategy.name == "zero2"
    assert pickle.loads(pickle.dumps(cfg)).strategy.name is name
    for choice in Choice.__subclasses__():  # OmegaConf reads a YAML string as a member's name
        assert all(m.name == m.value for m in choice), choice


# ---- each default written once -------------------------------------------------------------------------
# The rule: a default lives in the YAML under conf/, beside its one-line comment. A schema field that a YAML
# sets has no default in its dataclass (MISSING), and every YAML sets every key of its schema (`???` where the
# user must give it). Dataclass defaults remain only for keys no YAML sets: the class an optimizer schema
# names (`_target_`), and the items of lists and mappings (report targets, pipeline stages).

# Groups of commands' configs; experiment/ holds overrides (no defaults), hydra/ is the submitit plugin's.
SCHEMA_GROUPS = sorted(
    p.name
    for p in Path(CONF_DIR).iterdir()
    if p.is_dir() and p.name not in ("experiment", "hydra", *COMMAND_DIRS)
)
SCHEMA_YAMLS = (
    [p.name for p in sorted(Path(CONF_DIR).glob("*.yaml"))]
    + [f"{d}/{p.name}" for d in COMMAND_DIRS for p in sorted((Path(CONF_DIR) / d).glob("*.yaml"))]
    + [f"{g}/{p.name}" for g in SCHEMA_GROUPS for p in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]
)


def _default(f: dataclasses.Field) -> typing.Any:
    """The field's default, or "???" (omegaconf.MISSING) where it has none."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???" if f.default is dataclasses.MISSING else f.default


def _written_twice_or_unset(schema: type, values: dict, key: str, groups: set[str]) -> list[str]:
    """Keys of `schema` with a default in both the dataclass and the YAML's `values`, or in neither."""
    problems = []
    types = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        name = f"{key}{f.name}"
        if dataclasses.is_dataclass(types[f.name]) and f.name not in groups:
            # a section of the config (train, latency, smooth, logger.wandb): its keys are checked one by one
            problems += _written_twice_or_unset(types[f.name], values.get(f.name, {}), f"{name}.", set())
            continue
        default = _default(f)
        if f.name not in values:
            if default == "???" and f.name not in groups:
                problems.append(f"{name}: no default in the dataclass or the YAML; set it in the YAML")
            continue
        if default == "???":
            continue
        given = values[f.name]
        if given != default:
            problems.append(f"{name}: the YAML says {given!r}, the dataclass {default!r}; keep the YAML's")
        else:
            problems.append(f"{name}: {given!r} is written in both; drop the dataclass default")
    return problems


@pytest.mark.parametrize("path", SCHEMA_YAMLS)
def test_each_default_is_written_once_in_the_yaml(path):
    yaml = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / path))  # `???` kept as a value
    defaults = yaml.pop("defaults")
    yaml.pop("hydra", None)
    [schema_name] = [d for d in defaults if isinstance(d, str) and d.startswith("schema")]
    group = path.rpartition("/")[0]
    group = "" if group in COMMAND_DIRS else group  # a command's config: its schema is at the root
    node = ConfigStore.instance().load(f"{group}/{schema_name}.yaml" if group else f"{schema_name}.yaml").node
    # keys the defaults list fills from a group (`- data: embedded`), not from this file
    groups = {k for d in defaults if isinstance(d, dict) for k in d}
    groups = {k.removeprefix("override ").split("/")[-1] for k in groups}
    assert _written_twice_or_unset(OmegaConf.get_type(node), yaml, "", groups) == []


def test_global_batch_must_divide_over_ranks():
    cfg = compose_config("train.micro_batch_size=4", "train.global_batch_size=8")
    assert validate_config(cfg, world_size=2) == 1
    with pytest.raises(ConfigError, match="world size 3") as refused:
        validate_config(cfg, world_size=3)
    assert "keep it with" not in str(refused.value)  # 8 sequences do not split over 3 ranks at all
    # the defaults (16 of 16) on 8 ranks: the micro-batch that keeps the global batch is named
    with pytest.raises(ConfigError, match=r"or keep it with train\.micro_batch_size=2$"):
        validate_config(compose_config(), world_size=8)


def test_sequence_longer_than_the_model_allows(tmp_path):
    with pytest.raises(ConfigError, match="model's maximum of 16"):
        make_trainer(tmp_path, *TINY, "model.arch.max_position_embeddings=16")


def test_too_little_data_for_one_global_batch(tmp_path):
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_trainer(tmp_path, *TINY, "data.markov.train_tokens=300", "train.global_batch_size=16")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_empty_dataset(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(Exception, match="(?i)empty|no data|split"):
        make_trainer(tmp_path / "run", *USER, "data=hf", f"data.data_files={f}", "data.tokenizer=wordlevel")


def test_missing_text_field_lists_the_columns(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"content": f"words {i}"} for i in range(50)])
    with pytest.raises(DataError, match=r"no text field 'text'.*content"):
        make_trainer(tmp_path / "run", *USER, "data=hf", f"data.data_files={f}", "data.tokenizer=wordlevel")


def test_user_jsonl_data_trains(tmp_path):
    rows = [{"body": " ".join(f"w{(i * 7 + j) % 50}" for j in range(40))} for i in range(200)]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    trainer = make_trainer(
        tmp_path / "run",
        *USER,
        "data=hf",
        f"data.data_files={f}",
        "data.text_field=body",
        "data.tokenizer=wordlevel",
    )
    summary = trainer.train()
    assert summary["final_step"] == 6 and summary["eval_loss"] < 10


def test_tokenizer_needed_when_model_has_none(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": f"words {i}"} for i in range(50)])
    with pytest.raises(DataError, match="data.tokenizer=bpe"):
        make_trainer(tmp_path / "run", *USER, "data=hf", f"data.data_files={f}")


def test_missing_optional_package_names_the_extra():
    with pytest.raises(MissingPackageError, match=r"pip install 'hydra-llm-trainer\[gguf\]'"):
        require("a_package_that_does_not_exist", extra="gguf")


def test_gguf_model_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(MissingPackageError, match=r"trainer\[gguf\]"):
        make_trainer(
            tmp_path,
            *TINY_LOOP,
            *TINY_MARKOV,
            "model=hf",
            "model.name_or_path=some/dir",
            "model.gguf_file=model.gguf",
        )
