"""Start-up messages of dependencies that say nothing about the run, dropped from their loggers.

Every command printed them (five lines before any of ours): torchao failing to load optional C++ kernels
built for other torch versions and CUDA architectures (its Python paths, the ones used here, do not need
them), torch's deprecation notice for torchao registering enums with pytree, and DeepSpeed "unable to detect"
a GPU on machines that have none. Each filter matches its message exactly; everything else still shows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable


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
    }
    for name, matches in known.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(matches))
