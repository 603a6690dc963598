"""Optimizers torch does not ship, with the torch interface (`_target_: trainer.optimizers.NAME`)."""

from trainer.optimizers.lion import Lion

__all__ = ["Lion"]
