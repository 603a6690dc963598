"""The dependencies' start-up noise is dropped, and only it."""

import logging

from trainer import quiet


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
