"""Every command line README.md and docs/*.md show works as written: a documented command cannot rot.

Each `python -m trainer.*`, `torchrun ... -m trainer.*`, `deepspeed ... --module trainer.*`, `sbatch
launch/slurm/train.sbatch`, launch script and `make` command in a fenced code block or an inline code span is
composed in process with Hydra's compose API, as the command composes it, and checked by the same checks the
command runs before any work (`validate_config` for training, each other command's own). That catches an
override Hydra cannot parse, an unknown key or option and a bad value, without the minutes a real run takes.
Inputs that an earlier command makes (a checkpoint, an export) are not there: such a command is checked at
config level, up to the refusal of that path. Two cheap commands run for real. The test prints what it checked
only partly or skipped, and why.
"""

from __future__ import annotations

import itertools
import re
import shlex
import sys

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import ROOT
from trainer.cli import explain
from trainer.errors import DeviceError, InputNotFoundError, MissingPackageError

CONF = ROOT / "conf"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What starts a command of this project.
COMMAND = re.compile(
    r"^(\w+=\S+\s+)*(python3? -m trainer\.|torchrun |deepspeed |sbatch |launch/\S+\.(sh|sbatch)\b|make\b)"
)
# A synopsis or a fragment rather than a command: `launch/torchrun.sh [--nnodes N ...] OVERRIDES`,
# `python -m trainer.train strategy=fsdp ...`, `format=gguf|compressed_tensors`, `torchrun --max-restarts N`.
SYNOPSIS = re.compile(
    r"(\.\.\.|\[--|\bOVERRIDES\b|=\w+\|\w+|^(torchrun|deepspeed) (?!.*(-m|--module) trainer))"
)
MAKE_TARGETS_NOT_RUN = {
    "test": "the test suite (this test is part of it)",
    "test-fast": "the in-process part of the test suite",
    "demo": "the whole compression pipeline (~1.5 h); `trainer.pipeline chain=compress dry_run=true` runs here",
    "install": "installs packages",
}
# Run for real: cheap, and nothing they need is made by an earlier command.
RUN = ["python -m trainer.pipeline chain=compress dry_run=true", "python -m trainer.train --cfg job"]


def _lines(text: str) -> list[tuple[str, bool]]:
    """Fenced code blocks' lines (continuations joined) and inline code spans, each with whether it is inline."""
    lines = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        lines += [(line, False) for line in block.replace("\\\n", " ").splitlines()]
    inline = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [(span, True) for span in re.findall(r"`([^`\n]+)`", inline.replace("\n", " "))]
    return lines


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) for every command of this project the docs show, each once (as a shell reads it:
    without its comment). An inline span that is a command's bare name (`python -m trainer.export`) names it."""
    found: dict[str, str] = {}
    for doc in DOCS:
        for line, inline in _lines(doc.read_text()):
            line = line.strip()
            if not COMMAND.match(line) or (inline and re.fullmatch(r"python -m [\w.]+", line)):
                continue
            command = shlex.join(shlex.split(line, comments=True))
            found.setdefault(command, str(doc.relative_to(ROOT)))
    return sorted((where, command) for command, where in found.items())


def _option(argv: list[str], *names: str, default: int = 1) -> int:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name:
                return int(argv[i + 1])
            if arg.startswith(f"{name}="):
                return int(arg.split("=", 1)[1])
    return default


def as_command(line: str) -> tuple[str, list[str], int] | str:
    """(module, arguments, world size) of a command line, or why it is not composed here."""
    if SYNOPSIS.search(line):
        return "a synopsis, not a command"
    argv = shlex.split(line, comments=True)
    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value before the program
        argv = argv[1:]
    program = argv[0]
    if program.startswith("python"):
        return argv[2], argv[3:], 1
    if program == "torchrun":
        at = argv.index("-m")
        nodes = _option(argv[:at], "--nnodes")
        return (
            argv[at + 1],
            argv[at + 2 :],
            nodes * _option(argv[:at], "--nproc_per_node", "--nproc-per-node"),
        )
    if program == "deepspeed":
        at = argv.index("--module")
        return argv[at + 1], argv[at + 2 :], _option(argv[:at], "--num_gpus", "--num-gpus")
    if program == "sbatch":
        at = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
        gpus = _option(argv[:at], "--gpus-per-node")
        return "trainer.train", argv[at + 1 :], _option(argv[:at], "-N", "--nodes") * gpus
    if program.startswith("launch/"):
        return "trainer.train", [a for a in argv[1:] if "=" in a and not a.startswith("-")], 1
    if program == "make":
        target = argv[1] if len(argv) > 1 and "=" not in argv[1] else "train"
        makefile = (ROOT / "Makefile").read_text()
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), (
            f"no target {target} in the Makefile"
        )
        if target != "train":
            return f"make {target}: {MAKE_TARGETS_NOT_RUN[target]}"
        variables = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
        return "trainer.train", shlex.split(variables.get("ARGS", "")), 1
    raise AssertionError(f"no reading of {line!r}")


def _sweep(args: list[str]) -> list[list[str]]:
    """The jobs of a `-m` sweep: every combination of the swept values (`optimizer.lr=1e-3,3e-3`)."""
    choices = []
    for arg, parsed in zip(args, OverridesParser.create().parse_overrides(args), strict=True):
        if parsed.is_sweep_override():
            choices.append([f"{parsed.get_key_element()}={v}" for v in parsed.sweep_string_iterator()])
        else:
            choices.append([arg])
    return [list(job) for job in itertools.product(*choices)]


def _compose(name: str, overrides: list[str]):
    """The config `name` in conf/, composed as its command composes it (in the Hydra context the test opened)."""
    return compose(name, overrides=overrides)


def check_command(module: str, args: list[str], world_size: int) -> None:
    """Compose the command's config from `args` and run the checks the command runs before any work."""
    flags = {"--cfg", "-c", "--resolve", "-m", "--multirun"}
    overrides = [
        a for i, a in enumerate(args) if a not in flags and (i == 0 or args[i - 1] not in ("--cfg", "-c"))
    ]
    jobs = _sweep(overrides) if {"-m", "--multirun"} & set(args) else [overrides]
    for job in jobs:
        if module == "trainer.train":
            from trainer.config import validate_config

            validate_config(_compose("config", job), world_size=world_size)
        elif module == "trainer.pipeline":
            from trainer.pipeline import check_pipeline_config

            check_pipeline_config(_compose("pipeline", job))  # what trainer.pipeline.compose_pipeline does
        elif module == "trainer.export":
            from trainer.export import is_hydra_form
            from trainer.export_config import validate_export

            if is_hydra_form(job):
                validate_export(_compose("export", job))
            else:
                positional = [a for a in job if not a.startswith("--")]
                assert len(positional) == 2 and set(job) - set(positional) <= {"--trust-remote-code"}, job
        elif module == "trainer.quantize":
            from trainer.quantize import check_quantize_config

            check_quantize_config(_compose("quantize", job))
        elif module == "trainer.evaluate":
            from trainer.evaluate import check_evaluate_config

            check_evaluate_config(_compose("evaluate", job))
        elif module == "trainer.generate":
            raise _Generate
        elif module == "trainer.prepare_data":
            from trainer.data.prepare import check_settings

            check_settings(_compose("prepare_data", job))
        elif module == "trainer.report":
            _compose("report", job)
        elif module == "trainer.plan":
            from trainer.plan.__main__ import compose_plan

            compose_plan(job)  # the training config and plan.*, checked for the planned world size
        else:
            import importlib.util

            assert importlib.util.find_spec(module) is not None, f"no module {module}"
            raise _NotHydra


class _NotHydra(Exception):
    pass


class _Generate(Exception):
    """trainer.generate composes from its own directory, conf/generate/: checked after the others."""


def _check_generate(args: list[str]) -> None:
    from tests.test_generate import compose_generate
    from trainer.generate import check_generate_config

    check_generate_config(compose_generate(*args))


def test_the_docs_show_commands_of_every_kind():
    """The extraction itself: a change of the docs' layout that hid their commands would fail here."""
    commands = [line for _, line in documented_commands()]
    for start in (
        "python -m trainer.train",
        "torchrun ",
        "deepspeed ",
        "sbatch ",
        "make ",
        "python -m trainer.export",
    ):
        assert any(c.startswith(start) for c in commands), start
    assert len(commands) > 60, len(commands)


def test_every_documented_command_composes_and_passes_the_commands_own_checks():
    failed, partly, skipped, generate = [], [], [], []

    def check(where: str, run_checks) -> None:
        try:
            run_checks()
        except _NotHydra:
            skipped.append(f"{where}\n    not a Hydra command: its module exists")
        except InputNotFoundError as e:  # made by an earlier command (a run, an export) or a placeholder
            partly.append(f"{where}\n    checked up to its input: {str(e).split(';')[0]}")
        except MissingPackageError as e:
            partly.append(f"{where}\n    checked up to a package this machine lacks: {str(e).split(';')[0]}")
        except DeviceError as e:
            partly.append(f"{where}\n    checked up to the device (needs a GPU): {str(e).split(';')[0]}")
        except _Generate:
            generate.append((where, args))
        except Exception as e:
            failed.append(f"{where}\n    {explain(e) or f'{type(e).__name__}: {e}'}")

    composed = set()  # `python -m trainer.train`, `make train`, `... --cfg job`: one config, composed once
    with initialize_config_dir(config_dir=str(CONF), version_base=None):  # once: composing is what costs
        for doc, line in documented_commands():
            where = f"{doc}: {line}"
            command = as_command(line)
            if isinstance(command, str):
                skipped.append(f"{where}\n    skipped: {command}")
                continue
            module, args, world_size = command
            key = (module, tuple(a for a in args if a not in ("--cfg", "job")), world_size)
            if key in composed:
                continue
            composed.add(key)
            check(where, lambda: check_command(module, args, world_size))  # noqa: B023 - called at once
    for where, args in generate:
        check(where, lambda: _check_generate(args))  # noqa: B023 - called at once
    print("\n".join(["checked only partly:", *partly, "skipped:", *skipped]))
    assert not failed, "documented commands that do not work as written:\n" + "\n".join(failed)


def test_the_cheap_documented_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Run in this process as `python -m` runs them (trainer.pipeline's run_as_main), in an empty directory."""
    from trainer.pipeline import run_as_main

    shown = {line for _, line in documented_commands()}
    assert shown.issuperset(RUN), f"{set(RUN) - shown} no longer in the docs: pick other cheap commands"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", list(sys.argv))  # run_as_main sets the command's
    for line in RUN:
        module, args, _ = as_command(line)
        assert run_as_main(module, args) == 0, (line, capsys.readouterr())
    printed = capsys.readouterr().out
    assert re.search(r"pipeline compress: \d+ stage\(s\) in outputs/pipeline/compress \(dry run\)", printed)
    assert "\nresume: null\n" in printed  # the resolved training config
    assert list(tmp_path.iterdir()) == []  # neither wrote anything
