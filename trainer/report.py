"""Compare the variants of a run: `python -m trainer.report input=FILE.json output_dir=DIR`.

Reads the JSON that trainer.evaluate wrote (the numbers are never typed in) and writes `report.md`, a
markdown table with each model's perplexity, size, latency and their ratios to a baseline entry, and
`report.png`, perplexity against size on disk and against prefill latency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from trainer.config import ConfigError, register_configs
from trainer.utils import require

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()

REQUIRED = (
    "name",
    "perplexity",
    "params",
    "nonzero_params",
    "size_bytes",
    "prefill_ms",
    "decode_tokens_per_s",
)
CHARTS = ("size_bytes", "prefill_ms", "both")
AXIS_LABELS = {"size_bytes": "size on disk (MB)", "prefill_ms": "prefill latency (ms)"}


def load_entries(path: Path) -> list[dict[str, Any]]:
    entries = json.loads(Path(path).read_text())
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"input={path}: expected the non-empty JSON list that trainer.evaluate writes")
    for e in entries:
        missing = [k for k in REQUIRED if k not in e]
        if missing:
            raise ConfigError(
                f"input={path}: entry {e.get('name', '?')} lacks {', '.join(missing)}; rerun trainer.evaluate"
            )
    return entries


def pick_baseline(entries: list[dict[str, Any]], baseline: str | None) -> dict[str, Any]:
    if baseline is None:
        return entries[0]
    for e in entries:
        if baseline in (e["name"], e.get("path")):
            return e
    raise ConfigError(
        f"baseline={baseline}: no entry has that name or path ({', '.join(e['name'] for e in entries)})"
    )


def markdown_table(entries: list[dict[str, Any]], base: dict[str, Any]) -> str:
    head = (
        "| model | scheme | perplexity | vs base | params | non-zero | size (MB) | size vs base "
        "| prefill (ms) | speed-up | decode (tok/s) | decode vs base |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = []
    for e in entries:
        rows.append(
            f"| {e['name']} | {e.get('scheme', '')} | {e['perplexity']:.3f} "
            f"| {100 * (e['perplexity'] / base['perplexity'] - 1):+.2f}% | {e['params'] / 1e6:.2f}M "
            f"| {e['nonzero_params'] / max(e['params'], 1):.1%} | {e['size_bytes'] / 1e6:.2f} "
            f"| {e['size_bytes'] / base['size_bytes']:.2f}x | {e['prefill_ms']:.1f} "
            f"| {base['prefill_ms'] / e['prefill_ms']:.2f}x | {e['decode_tokens_per_s']:.1f} "
            f"| {e['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |"
        )
    return head + "\n".join(rows) + "\n"


def write_chart(entries: list[dict[str, Any]], out: Path, *, chart: str) -> None:
    matplotlib = require("matplotlib", extra="dev")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    axes_keys = ["size_bytes", "prefill_ms"] if chart == "both" else [chart]
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(6 * len(axes_keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], axes_keys, strict=True):
        scale = 1e6 if key == "size_bytes" else 1.0
        for e in entries:
            x = e[key] / scale
            ax.scatter(x, e["perplexity"], s=40)
            ax.annotate(
                e["name"], (x, e["perplexity"]), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        ax.set_xlabel(AXIS_LABELS[key])
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
    fig.suptitle("perplexity against " + " and ".join(AXIS_LABELS[k] for k in axes_keys))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_report(
    input_path: Path, output_dir: Path, *, baseline: str | None = None, chart: str = "both"
) -> Path:
    if chart not in CHARTS:
        raise ConfigError(f"chart={chart}: choose one of {', '.join(CHARTS)}")
    entries = load_entries(input_path)
    base = pick_baseline(entries, baseline)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_chart(entries, output_dir / "report.png", chart=chart)
    first = entries[0]
    setting = (
        f"Perplexity over {first.get('eval_tokens', '?')} eval tokens; latency at batch "
        f"{first.get('latency_batch_size', '?')}, prefill of {first.get('prefill_len', '?')} tokens, "
        f"{first.get('decode_tokens', '?')} decoded tokens, on {first.get('device', '?')} "
        f"({first.get('threads', '?')} threads). Ratios against `{base['name']}`; speed-up = base time / time."
    )
    text = (
        f"# Compression report\n\nFrom `{input_path}` (written by `trainer.evaluate`).\n\n{setting}\n\n"
        + markdown_table(entries, base)
        + "\n![perplexity against size and latency](report.png)\n"
    )
    (output_dir / "report.md").write_text(text)
    return output_dir / "report.md"


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="report")
def main(cfg: DictConfig) -> None:
    path = write_report(Path(cfg.input), Path(cfg.output_dir), baseline=cfg.baseline, chart=cfg.chart)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
