"""The error types that are ours to explain: each message names the key or file at fault and the fix.

They live here, apart from the modules that raise them, so that any module can raise one without importing
the config schemas, the data pipeline or the launcher (and so without an import cycle).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


class DataError(ValueError):
    """The data cannot be used as configured; the message says why and what to change."""


class MissingPackageError(ImportError):
    """An optional package is needed by the config; the message names the extra that installs it."""


class LaunchError(RuntimeError):
    """The launcher's environment does not describe a job that can run (e.g. srun tasks with no rendezvous)."""


class LossScaleError(RuntimeError):
    """fp16 overflowed even at the smallest allowed loss scale: the run cannot go on in fp16."""


class DivergenceError(RuntimeError):
    """The loss or the gradient norm went non-finite more often than train.max_nonfinite_steps allows: the run
    stops on every rank, saving nothing of the diverged weights; the message names the step and the remedies."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked (damaged, or not the model's); the message names the file or
    the tensors at fault and the fix."""
