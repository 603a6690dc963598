"""Gradual magnitude pruning's schedule (Zhu & Gupta 2017, "To prune, or not to prune").

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))^3      for t_0 <= t <= t_end,

updated every `frequency` steps: fast at first, while many redundant weights remain, slow at the end.
"""

from __future__ import annotations


def gmp_sparsity(
    step: int, *, initial: float, final: float, start_step: int, end_step: int, frequency: int
) -> float:
    """Target sparsity after optimizer step `step`: held between updates, `final` from end_step on."""
    if step < start_step:
        return 0.0
    if step >= end_step:
        return final
    updated_at = start_step + (step - start_step) // frequency * frequency  # the last update step
    progress = (updated_at - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - progress) ** 3


def is_update_step(step: int, *, start_step: int, end_step: int, frequency: int) -> bool:
    """Whether the masks are recomputed after optimizer step `step`."""
    if step < start_step or step > end_step:
        return False
    return (step - start_step) % frequency == 0 or step == end_step
