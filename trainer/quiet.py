"""Messages of dependencies that say nothing about the run, dropped; our own warnings printed plainly.

Every command printed them (five lines before any of ours): torchao failing to load optional C++ kernels
built for other torch versions and CUDA architectures (its Python paths, the ones used here, do not need
them), torch's deprecation notice for torchao registering enums with pytree, and DeepSpeed "unable to detect"
a GPU on machines that have none. bitsandbytes, on a CPU with AVX512-BF16, tries to download an optional
kernel and, failing (offline, or the publisher check), tells the user to "Set trust_remote_code=True": it
falls back to its own implementation, and the advice is not one to take. DeepSpeed ZeRO calls torch's
`reduce_scatter_tensor` and `all_gather_into_tensor`, which torch deprecates with a FutureWarning per call
(78 in a 2-step zero3 run): DeepSpeed's to change, not the user's. Each filter matches its message (and
logger or module) exactly; everything else still shows.

Our warnings (`TrainerWarning`) print as `warning: MESSAGE`: the file, line and source line Python adds
would point into the trainer, which tells the user nothing the message does not.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

from trainer.errors import TrainerWarning


class _Drop(logging.Filter):
    def __init__(self, matches: Callable[[str], bool]) -> None:
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.matches(record.getMessage())


def _no_gpu() -> bool:
    import torch

    return torch.cuda.device_count() == 0  # NVML: does not initialise CUDA


def install() -> None:
    """Add the filters, once per logger (calling it again adds nothing)."""
    known = {
        "torchao": lambda m: m.startswith("Failed to load") and "/torchao/_C" in m,
        "torch.utils._pytree": lambda m: "is an Enum subclass and is now natively supported" in m,
        "DeepSpeed": lambda m: m.startswith("Setting accelerator to CPU") and _no_gpu(),
        "bitsandbytes.backends.cpu.ops": lambda m: m.startswith(
            "Failed to load CPU gemm_4bit_forward from kernels-community"
        ),
        "kernels._internals.hf_hub": lambda m: m.startswith(
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
        ),
    }
    for name, matches in known.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(matches))
    # filterwarnings moves an identical filter to the front instead of adding it again
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        category=FutureWarning,
        module=r"torch\.distributed\.",
    )
    if not getattr(warnings.formatwarning, "plain_for_ours", False):
        warnings.formatwarning = _plain_for_ours(warnings.formatwarning)


def _plain_for_ours(python_format: Callable[..., str]) -> Callable[..., str]:
    """Python's warning format for others' warnings; `warning: MESSAGE` for a TrainerWarning."""

    def formatwarning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - Python's signature
        if issubclass(category, TrainerWarning):
            return f"warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    formatwarning.plain_for_ours = True  # type: ignore[attr-defined]
    return formatwarning
