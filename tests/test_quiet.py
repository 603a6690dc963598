"""The dependencies' noise is dropped, and only it; our own warnings print as one plain line."""

import logging
import warnings

import torch
import torch.distributed as dist

from trainer import quiet
from trainer.errors import TrainerWarning


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_known_startup_noise_is_dropped_and_every_other_message_kept():
    quiet.install()
    quiet.install()  # idempotent
    sent = {
        "torchao": [
            "Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load",
            "Failed to load a config",  # not an optional kernel: kept
        ],
        "torch.utils._pytree": [
            "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile",
            "some other pytree warning",
        ],
        "DeepSpeed": [
            "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
            "DeepSpeed info worth reading",
        ],
        # bitsandbytes' optional CPU kernel from the Hub, which it does without: as printed, online and offline
        "bitsandbytes.backends.cpu.ops": [
            "Failed to load CPU gemm_4bit_forward from kernels-community: Kernel repository "
            "'kernels-community/quantization-bitsandbytes' could not verify publisher trust status. Set "
            "trust_remote_code=True or add the repository ID to the trust_remote_code allowlist to allow loading "
            "kernels from untrusted sources.. Please make sure you already `pip install kernels` and the kernels "
            ">= 0.11.1",
            "Failed to load the CUDA binary",
        ],
        "kernels._internals.hf_hub": [
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
            "Hub is in offline mode.",
            "Skipping publisher trust check for 'someone/their-kernel' because Hugging Face Hub is in offline mode.",
        ],
    }
    for name, messages in sent.items():
        logger = logging.getLogger(name)
        assert sum(isinstance(f, quiet._Drop) for f in logger.filters) == 1
        kept = _Kept()
        logger.addHandler(kept)
        try:
            for message in messages:
                logger.warning(message)
        finally:
            logger.removeHandler(kept)
        assert kept.messages == messages[1:], name  # this machine has no GPU: DeepSpeed's notice is noise


def test_torchs_deprecation_of_the_collectives_deepspeed_calls_is_dropped_and_other_future_warnings_kept():
    """ZeRO calls reduce_scatter_tensor and all_gather_into_tensor on every step: torch's own FutureWarning for
    each (raised here by the real calls, on a one-process gloo group) is dropped; the same words from elsewhere
    are not."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.resetwarnings()
            quiet.install()
            warnings.simplefilter("always", append=True)  # below ours: everything else shows, every time
            dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))
            dist.reduce_scatter_tensor(torch.zeros(2), torch.ones(2))
            message = "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ... instead."
            warnings.warn_explicit(message, FutureWarning, "ours.py", 1, module="trainer.strategies.zero")
            warnings.warn_explicit(
                "something else", FutureWarning, "c10d_logger.py", 83, module="torch.distributed.c10d_logger"
            )
    finally:
        dist.destroy_process_group()
    assert [str(w.message) for w in seen] == [message, "something else"]


def test_our_warnings_print_as_warning_and_the_message_alone_and_others_as_python_prints_them():
    quiet.install()
    quiet.install()  # wraps Python's format once
    # formatwarning is what Python's display of a warning calls once it is replaced
    ours = warnings.formatwarning(
        TrainerWarning("padding is 97.0%"), TrainerWarning, "/x/trainer/loop.py", 9, "src"
    )
    assert ours == "warning: padding is 97.0%\n"
    for category in (UserWarning, FutureWarning):
        args = (category("theirs"), category, "/x/lib.py", 3, "their_source_line()")
        assert warnings.formatwarning(*args) == warnings._formatwarning_orig(*args)
        assert "their_source_line()" in warnings.formatwarning(*args)
