"""trainer.report's schema (conf/report.yaml). Beside the command, as each command's schema is, in a module
that imports only the standard library, Hydra and trainer.choices: registering or composing it (tests, the
pipeline's stages) needs nothing of the command's code or of training's.

Every default lives in conf/report.yaml, which sets every key (tests/test_config.py checks both); a target,
an item of a list, takes its defaults from TargetConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import Choice

# Chart x axis against perplexity: size on disk, prefill latency, or both panels.
Chart = Choice("Chart", "size_bytes prefill_ms both")


@dataclass
class TargetConfig:
    # Entry (name or path) whose metric is checked.
    model: str = MISSING
    # Entry (name or path) it is divided by: ratio = model[metric] / against[metric].
    against: str = MISSING
    # A numeric key of evaluate's entries: perplexity, size_bytes, prefill_ms, decode_tokens_per_s, ...
    metric: str = "perplexity"
    # The ratio must be <= max_ratio and/or >= min_ratio (at least one of the two).
    max_ratio: float | None = None
    min_ratio: float | None = None
    # Shown in the Targets table and the printed line.
    label: str = ""


@dataclass
class ReportConfig:
    # A JSON file written by trainer.evaluate.
    input: str = MISSING
    # Directory for report.md and report.png.
    output_dir: str = MISSING
    # Name (or path) of the entry the ratios are taken against; null: the first entry.
    baseline: str | None = MISSING
    chart: Chart = MISSING
    # Entry name -> the entry its ratios are taken against (others: `baseline`).
    compare: dict[str, str] = MISSING
    # Ratio limits checked in report.md's Targets section and printed one line each.
    targets: list[TargetConfig] = MISSING


def register_report_configs() -> None:
    ConfigStore.instance().store(name="schema_report", node=ReportConfig)
