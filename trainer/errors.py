"""The error types that are ours to explain: each message names the key or file at fault and the fix.

They live here, apart from the modules that raise them, so that any module can raise one without importing
the config schemas, the data pipeline or the launcher (and so without an import cycle).
"""

from __future__ import annotations


class TrainerError(Exception):
    """Marker of every error that is ours to explain: a command prints its message alone, as one paragraph
    with no traceback, and exits with status 2 (trainer/cli.py). Every error type here inherits it; give a
    new one this base too."""


class ConfigError(TrainerError, ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


class DataError(TrainerError, ValueError):
    """The data cannot be used as configured; the message says why and what to change."""


class MissingPackageError(TrainerError, ImportError):
    """An optional package is needed by the config; the message names the extra that installs it."""


class LaunchError(TrainerError, RuntimeError):
    """The launcher's environment does not describe a job that can run (e.g. srun tasks with no rendezvous)."""


class LossScaleError(TrainerError, RuntimeError):
    """fp16 overflowed even at the smallest allowed loss scale: the run cannot go on in fp16."""


class DivergenceError(TrainerError, RuntimeError):
    """The loss or the gradient norm went non-finite more often than train.max_nonfinite_steps allows: the run
    stops on every rank, saving nothing of the diverged weights; the message names the step and the remedies."""


class CheckpointError(TrainerError, ValueError):
    """A checkpoint that cannot be loaded as asked (damaged, or not the model's); the message names the file or
    the tensors at fault and the fix."""


class InputNotFoundError(TrainerError, FileNotFoundError):
    """A path the user gave (a model, a tokenizer, a checkpoint, a report input) names nothing we can read as
    what it should be; the message names the key or file and what to give instead."""


class CorruptFileError(TrainerError, ValueError):
    """A file the user gave is there but damaged (a truncated safetensors file, a JSON that is not the one
    expected); the message names the file and how to get a good one."""


class DeviceError(TrainerError, RuntimeError):
    """The device a config asks for is not on this machine (`device=cuda` with no GPU visible)."""


class TrainerWarning(UserWarning):
    """A warning of ours: the message names what is odd and the fix, so it prints as `warning: MESSAGE` alone,
    without the file, line and source line Python adds (trainer/quiet.py); filters still match it as a
    UserWarning."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line a command has to say about it: what was kept and how to continue. The command
    prints it alone, with no traceback, and exits 130 (trainer/cli.py)."""
