"""How every command ends when it fails: an error a person can act on prints as one paragraph, exit status 2.

Every entry point (`train`, `export`, `quantize`, `evaluate`, `report`, `pipeline`) runs its `main` through
`run`. Errors that are ours to explain (any `TrainerError`: a bad config value, unusable data, a missing
path or package, a damaged file) and Hydra's refusals to compose a config (an option or closed-choice value
that does not exist, an unknown key, an override it cannot parse) print `error: ` and one paragraph naming
the key or file and the fix, with no traceback, and the process exits with status 2. Anything else is a bug
and keeps its traceback (status 1). `TRAINER_TRACEBACK=1` shows the traceback of every error.

Ctrl-C prints one line (an `Interrupted`'s message: what was kept and how to continue), no traceback, and exits
130 as a shell reports a command it stopped.

Under torchrun every rank exits 2 and the message is printed once: rank 0 prints at once, the other ranks hold
their exit for a grace period first. A launcher ends every rank when one fails, so a rank that exited first would
otherwise get rank 0 killed before it printed; when rank 0 exits, the launcher ends the waiting ranks. A rank still
alive after the grace (an error rank 0 does not share) prints the message itself, naming its rank. A rank whose
collective fails because another rank's process is gone (gloo's "Connection closed by peer") did not find the
error: it prints no traceback over the message of the rank that did, but waits for the launcher to end it, and
after the grace says in one line that it lost a rank.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from trainer.errors import TrainerError

EXIT_USAGE = 2  # the status of an error the message explains (argparse's too)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command that Ctrl-C stopped
OTHER_RANKS_GRACE_S = (
    3.0  # how long ranks other than 0 wait for rank 0 to say it (torchrun checks every 0.1 s)
)
TRACEBACK_VAR = "TRAINER_TRACEBACK"  # set to 1: every error with its traceback, as Python prints it

# What a collective raises on a rank when another rank's process has exited (gloo, NCCL, the TCP store).
_LOST_PEER = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|failed to recv|remote process exited"
    r"|NCCL communicator was aborted",
    re.IGNORECASE,
)

# OmegaConf's refusal of a value outside a closed choice (an Enum field).
_ENUM_VALUE = re.compile(r"Invalid value '(?P<value>[^']*)', expected one of \[(?P<allowed>[^\]]*)\]")


def is_schema(option: str) -> bool:
    """A group's registered type (`schema`, `schema_adamw`, ...; the ConfigStore entries its YAML options
    build on), which Hydra lists among the options a user can choose."""
    return option == "schema" or option.startswith("schema_")


def hide_schemas_from_help() -> None:
    """`--help` lists each group's options without its schema entries (Hydra offers no filter for them).

    The groups are read from the config repository once: Hydra's own listing deep-copies it per group (72 times
    for train's groups, ~5 s), the same answer when the primary config adds no `hydra.searchpath` (ours do not).
    """
    from hydra._internal.hydra import Hydra
    from hydra.core.object_type import ObjectType

    if getattr(Hydra.format_config_groups, "hides_schemas", False):
        return

    def format_config_groups(self: Hydra, predicate: Callable[[str], bool], compact: bool = True) -> str:
        repo = self.config_loader.repository

        def groups(parent: str) -> list[str]:
            out = []
            for name in repo.get_group_options(parent, ObjectType.GROUP):
                group = f"{parent}/{name}" if parent else name
                out += [group] * bool(repo.get_group_options(group, ObjectType.CONFIG)) + groups(group)
            return out

        lines = []
        for group in sorted(g for g in groups("") if predicate(g)):
            options = sorted(o for o in repo.get_group_options(group, ObjectType.CONFIG) if not is_schema(o))
            if options:
                listed = ", ".join(options) if compact else "\n" + "\n".join(f"  {o}" for o in options)
                lines.append(f"{group}: {listed}" if compact else f"{group}:{listed}")
        return "".join(f"{line}\n" for line in lines)

    format_config_groups.hides_schemas = True  # type: ignore[attr-defined]
    Hydra.format_config_groups = format_config_groups  # type: ignore[method-assign]


def quiet_explained_job_errors() -> None:
    """Hydra writes "Error executing job with overrides: [...]" to stderr before it raises a job's error again;
    over an error `explain` prints as one paragraph that line is noise (a bug's traceback keeps it)."""
    from hydra.core.utils import JobReturn, JobStatus

    hydras = JobReturn.return_value
    if getattr(hydras.fget, "quiet_explained", False):
        return

    def return_value(self: JobReturn) -> Any:
        error = self._return_value
        if self.status == JobStatus.FAILED and not _traceback_asked() and explain(error) is not None:
            raise error
        return hydras.fget(self)

    return_value.quiet_explained = True  # type: ignore[attr-defined]
    JobReturn.return_value = property(return_value, hydras.fset)  # type: ignore[method-assign]


def _traceback_asked() -> bool:
    return os.environ.get(TRACEBACK_VAR, "") not in ("", "0")


def _one_paragraph(text: str) -> str:
    return " ".join(str(text).split())


def _quoted_list_form(override: str) -> str | None:
    """`key=[a=1,b=2]` as Hydra parses it, `"key=['a=1','b=2']"`; None for an override without such a list."""
    key, _, value = override.partition("=")
    if not (value.startswith("[") and value.endswith("]") and "=" in value):
        return None
    elements = [e.strip().strip("'\"") for e in value[1:-1].split(",")]
    return '"' + key + "=[" + ",".join(f"'{e}'" for e in elements) + ']"'


def _hydra_paragraph(err: Exception) -> str | None:
    """Hydra's refusal to compose a config, as one paragraph naming the key, or None for another error."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue

    # A `???` key the command line did not set, read by the command.
    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or "a required key"
        return (
            f"{key} is required and was not given; add {key}=VALUE to the command line (the command's YAML in "
            "conf/ says what it takes; `--cfg job` prints every key, ??? marking the required ones)"
        )
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        options = [o for o in err.options or [] if not is_schema(o)]
        allowed = f"; choose one of {', '.join(options)}" if options else ""
        return f"{group.replace('/', '.')}={name}: there is no such option{allowed} (conf/{group}/)"
    if isinstance(err, OverrideParseException):
        reason = _one_paragraph(str(err.message).split("See https://")[0])
        quoted = _quoted_list_form(str(err.override))
        if quoted:
            return (
                f"the override {err.override!r} cannot be parsed: an element of a list that holds `=` must be "
                f"quoted inside the brackets; write it as {quoted} (the double quotes are for the shell)"
            )
        return (
            f"the override {err.override!r} cannot be parsed ({reason}); write it as key=value, quoted for "
            "the shell when it holds brackets or spaces ('key=[a,b]'): "
            "https://hydra.cc/docs/advanced/override_grammar/basic/"
        )
    if not isinstance(err, ConfigCompositionException):
        return None
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    match = _ENUM_VALUE.search(str(cause or ""))
    if key and match:
        return (
            f"{key}={match['value']} is not one of the allowed values; choose one of {match['allowed']} "
            f"(e.g. {key}={match['allowed'].split(',')[0].strip()})"
        )
    detail = str(cause or "").strip().split("\n")[0]
    if key and detail.startswith("Key '") and " not in " in detail:
        return (
            f"{key}: there is no such key ({detail}); check its spelling (`--cfg job` after the command "
            "prints every key and its value)"
        )
    return _one_paragraph(f"{err} {detail}" + (f" (key: {key})" if key else ""))


def _run_dir_paragraph(err: BaseException) -> str | None:
    """Hydra making the run directory (hydra.run.dir) where a file is, or under one; None for another error."""
    if not isinstance(err, (FileExistsError, NotADirectoryError)):
        return None
    where = [(frame.filename, frame.name) for frame in traceback.extract_tb(err.__traceback__)]
    if not any(func == "run_job" and f"hydra{os.sep}core" in file for file, func in where):
        return None
    return (
        f"hydra.run.dir={err.filename}: a file is in the way of the run directory ({err.strerror}); give another "
        "hydra.run.dir, or move the file"
    )


def explain(err: BaseException) -> str | None:
    """The paragraph to print for an error a person can act on; None for one that is a bug."""
    if isinstance(err, TrainerError):
        lines = [line.rstrip() for line in str(err).strip().splitlines()]
        return "\n".join(line for line in lines if line)  # a message's own line breaks stay; no blank lines
    if isinstance(err, Exception) and "hydra" in sys.modules:
        return _run_dir_paragraph(err) or _hydra_paragraph(err)
    return None


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _world_size() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective failing because another rank of this job is gone."""
    return _world_size() > 1 and isinstance(err, RuntimeError) and bool(_LOST_PEER.search(str(err)))


def run(main: Callable[[], Any]) -> Any:
    """Call an entry point's `main`; an error `explain` knows prints as one paragraph (once) and exits 2.

    Hydra's `@hydra.main` catches errors itself to print them with "Set the environment variable
    HYDRA_FULL_ERROR=1"; with that variable set it lets them through to here instead.
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    hide_schemas_from_help()
    quiet_explained_job_errors()
    try:
        return main()
    except KeyboardInterrupt as err:
        if os.environ.get(TRACEBACK_VAR, "") not in ("", "0"):
            raise
        if _rank() == 0:  # every rank got the Ctrl-C: one of them says it
            sys.stdout.flush()
            print(str(err) or "interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        code = report_error(err)
        if code is None:
            code = report_lost_peer(err)
        if code is None:
            raise
        _exit(code)


def _exit(code: int) -> None:
    """Exit with `code`; a rank of a multi-rank job skips the interpreter's teardown, which takes seconds for a
    process holding torch on a busy machine: the launcher ends the other ranks only once this one is gone (and a
    rank that lost this one prints, after the grace, what the launcher would have spared us)."""
    if _world_size() <= 1:
        sys.exit(code)
    logging.shutdown()  # the job log's last lines
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def report_error(err: BaseException) -> int | None:
    """Print an error `explain` knows as one paragraph (another rank than 0 after the grace) and return
    EXIT_USAGE; None, printing nothing, for an error that is a bug or when TRAINER_TRACEBACK asks for the
    traceback."""
    message = explain(err)
    if message is None or os.environ.get(TRACEBACK_VAR, "") not in ("", "0"):
        return None
    rank = _rank()
    if rank != 0:
        time.sleep(OTHER_RANKS_GRACE_S)  # rank 0 says it and exits; the launcher then ends this rank
    sys.stdout.flush()
    print(
        f"error: {message}" if rank == 0 else f"error (rank {rank}): {message}", file=sys.stderr, flush=True
    )
    return EXIT_USAGE


def report_lost_peer(err: BaseException) -> int | None:
    """A rank that lost another rank: wait for the launcher to end it (the rank that failed says why), then say
    so in one line and return EXIT_USAGE; None for any other error, or when TRAINER_TRACEBACK asks for it."""
    if not lost_peer(err) or os.environ.get(TRACEBACK_VAR, "") not in ("", "0"):
        return None
    time.sleep(OTHER_RANKS_GRACE_S)
    detail = _one_paragraph(str(err).split(". ")[0])
    print(
        f"error (rank {_rank()}): another rank of the job stopped ({detail}); its own message says why",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_USAGE
