"""Compare the variants of a run: `python -m trainer.report input=FILE.json output_dir=DIR`.

Reads the JSON that trainer.evaluate wrote (the numbers are never typed in) and writes `report.md`, a
markdown table with each model's perplexity, size, latency and their ratios to a baseline entry (or to
the entry `compare` names for it); where evaluate ran lm-eval tasks, a table of each task's accuracy with its
standard error, the mean, and the difference to the same baseline; and `report.png`, perplexity (log axis)
against size on disk and against prefill latency, each model a numbered point, the Pareto front drawn and the
baselines as reference lines, with a panel of mean accuracy against size when there are tasks. `targets`
(limits on ratios between two entries) add a Targets section to report.md and one printed line each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.cli import run
from trainer.errors import ConfigError, CorruptFileError, InputNotFoundError
from trainer.report_config import Chart, TargetConfig, register_report_configs
from trainer.utils import check_output_dir, register_package_resolver, require

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_report_configs()
register_package_resolver()

REQUIRED = (
    "name",
    "perplexity",
    "params",
    "nonzero_params",
    "size_bytes",
    "prefill_ms",
    "decode_tokens_per_s",
)
CHARTS: tuple[str, ...] = tuple(Chart.__members__)  # write_report is also called with plain strings
AXIS_LABELS = {"size_bytes": "size on disk (MB)", "prefill_ms": "prefill latency (ms)"}


def load_entries(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(
            f"input={path}: {'a directory' if path.is_dir() else 'no such file'}; give the JSON file "
            "trainer.evaluate wrote (its output=...)"
        )
    try:
        entries = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(
            f"input={path}: not JSON ({e}); give the JSON file trainer.evaluate wrote (its output=...), "
            "or run trainer.evaluate again to write it"
        ) from e
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"input={path}: expected the non-empty JSON list that trainer.evaluate writes")
    for e in entries:
        if not isinstance(e, dict):
            raise ConfigError(
                f"input={path}: an entry is a JSON {type(e).__name__}, not an object; expected the JSON list "
                "of objects that trainer.evaluate writes"
            )
        missing = [k for k in REQUIRED if k not in e]
        if missing:
            raise ConfigError(
                f"input={path}: entry {e.get('name', '?')} lacks {', '.join(missing)}; rerun trainer.evaluate"
            )
        if e.get("latency_pending"):
            raise ConfigError(
                f"input={path}: entry {e.get('name', '?')} was measured but not yet timed (latency_pending: "
                "trainer.evaluate with latency.interleave=true stopped before its timing); run the same "
                "trainer.evaluate command again with resume=true, which times only what is missing"
            )
    return entries


def find_entry(entries: list[dict[str, Any]], key: str, *, option: str) -> dict[str, Any]:
    """The entry with that name (or path); `option` names the setting in the error."""
    for e in entries:
        if key in (e["name"], e.get("path")):
            return e
    raise ConfigError(
        f"{option}={key}: no entry has that name or path ({', '.join(e['name'] for e in entries)})"
    )


def pick_baseline(entries: list[dict[str, Any]], baseline: str | None) -> dict[str, Any]:
    return entries[0] if baseline is None else find_entry(entries, baseline, option="baseline")


def pick_bases(
    entries: list[dict[str, Any]], base: dict[str, Any], compare: dict[str, str]
) -> list[dict[str, Any]]:
    """Each entry's reference for its ratio columns: the one `compare` names for it, else `base`."""
    chosen = {id(find_entry(entries, k, option="compare")): v for k, v in compare.items()}
    return [
        find_entry(entries, chosen[id(e)], option=f"compare.{e['name']}") if id(e) in chosen else base
        for e in entries
    ]


def markdown_table(entries: list[dict[str, Any]], bases: list[dict[str, Any]]) -> str:
    head = (
        "| model | scheme | compared with | perplexity | vs base | params | non-zero | size (MB) | size vs base "
        "| prefill (ms) | speed-up | decode (tok/s) | decode vs base |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = []
    for e, base in zip(entries, bases, strict=True):
        rows.append(
            f"| {e['name']} | {e.get('scheme', '')} | {base['name']} | {e['perplexity']:.3f} "
            f"| {100 * (e['perplexity'] / base['perplexity'] - 1):+.2f}% | {e['params'] / 1e6:.2f}M "
            f"| {e['nonzero_params'] / max(e['params'], 1):.1%} | {e['size_bytes'] / 1e6:.2f} "
            f"| {e['size_bytes'] / base['size_bytes']:.2f}x | {e['prefill_ms']:.1f} "
            f"| {base['prefill_ms'] / e['prefill_ms']:.2f}x | {e['decode_tokens_per_s']:.1f} "
            f"| {e['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |"
        )
    return head + "\n".join(rows) + "\n"


def task_metric(scores: dict[str, Any]) -> str | None:
    """The accuracy a task reports: acc_norm where lm-eval gives it (length-normalised, what papers quote for
    hellaswag, arc and openbookqa), else acc; None for a task with neither."""
    return next((m for m in ("acc_norm", "acc") if isinstance(scores.get(m), (int, float))), None)


def mean_accuracy(entry: dict[str, Any], tasks: list[str]) -> tuple[float, float] | None:
    """(mean accuracy over `tasks`, its standard error from the tasks' own), or None if a task is missing."""
    values = []
    for task in tasks:
        scores = entry.get("tasks", {}).get(task, {})
        metric = task_metric(scores)
        if metric is None:
            return None
        values.append((scores[metric], scores.get(f"{metric}_stderr") or 0.0))
    n = len(values)
    return sum(v for v, _ in values) / n, sum(e * e for _, e in values) ** 0.5 / n


def accuracy_section(entries: list[dict[str, Any]], bases: list[dict[str, Any]]) -> str:
    """Each lm-eval task's accuracy ± standard error per model, the mean, and the mean's difference to the
    entry's baseline (± the two standard errors combined, as if independent). Empty without tasks."""
    tasks = sorted({t for e in entries for t, scores in e.get("tasks", {}).items() if task_metric(scores)})
    if not tasks:
        return ""
    metrics = {t: next(task_metric(e["tasks"][t]) for e in entries if t in e.get("tasks", {})) for t in tasks}
    head = (
        "| model | compared with | "
        + " | ".join(f"{t} ({metrics[t]})" for t in tasks)
        + " | mean | vs base |\n| --- | --- | "
        + " | ".join("---:" for _ in tasks)
        + " | ---: | ---: |\n"
    )
    rows = []
    for e, base in zip(entries, bases, strict=True):
        cells = []
        for t in tasks:
            scores = e.get("tasks", {}).get(t, {})
            m = task_metric(scores)
            err = scores.get(f"{m}_stderr") if m else None
            cells.append("" if m is None else f"{scores[m]:.3f}" + (f" ± {err:.3f}" if err else ""))
        mean, mean_base = mean_accuracy(e, tasks), mean_accuracy(base, tasks)
        if mean is None:
            rows.append(f"| {e['name']} | {base['name']} | " + " | ".join(cells) + " | | |")
            continue
        delta = ""
        if mean_base is not None and base is not e:
            delta = f"{100 * (mean[0] - mean_base[0]):+.1f} ± {100 * (mean[1] ** 2 + mean_base[1] ** 2) ** 0.5:.1f} pts"
        rows.append(
            f"| {e['name']} | {base['name']} | "
            + " | ".join(cells)
            + f" | {mean[0]:.3f} ± {mean[1]:.3f} | {delta} |"
        )
    examples = sorted(
        {e["tasks"][t].get("examples") for e in entries for t in tasks if t in e.get("tasks", {})} - {None}
    )
    versions = sorted({e["lm_eval"]["version"] for e in entries if "lm_eval" in e})
    return (
        f"\nDownstream accuracy (lm-evaluation-harness {', '.join(versions) or '?'}; examples per task: "
        f"{', '.join(map(str, examples)) or '?'}); ± is the standard error lm-eval reports:\n\n"
        + head
        + "\n".join(rows)
        + "\n"
    )


def runtimes_section(entries: list[dict[str, Any]]) -> str:
    """What computed the numbers of the exports (entries with a `runtime`): another loader than ours."""
    lines = [f"- {e['name']}: {e['runtime']}" for e in entries if e.get("runtime")]
    return (
        "\nExports, measured after reloading through their format's own reader:\n\n" + "\n".join(lines) + "\n"
        if lines
        else ""
    )


@dataclass
class TargetResult:
    label: str
    model: str
    against: str
    metric: str
    ratio: float
    max_ratio: float | None
    min_ratio: float | None
    # How far the ratio is beyond the violated limit, relative to that limit (0 when met).
    missed_by: float

    @property
    def met(self) -> bool:
        return self.missed_by == 0

    @property
    def limit(self) -> str:
        if self.max_ratio is not None and self.min_ratio is not None:
            return f"{self.min_ratio:g} to {self.max_ratio:g}"
        return f"<= {self.max_ratio:g}" if self.max_ratio is not None else f">= {self.min_ratio:g}"

    @property
    def verdict(self) -> str:
        return "met" if self.met else f"missed by {100 * self.missed_by:.1f}%"


def as_target(target: Any, index: int) -> TargetConfig:
    """A TargetConfig from the config's node, a dict or a TargetConfig; a required key left out fails."""
    if isinstance(target, DictConfig):
        target = OmegaConf.to_container(target, resolve=True)
    if isinstance(target, TargetConfig):
        target = {f.name: getattr(target, f.name) for f in fields(TargetConfig)}
    known = {f.name for f in fields(TargetConfig)}
    unknown = sorted(set(target) - known)
    if unknown:
        raise ConfigError(
            f"targets[{index}]: unknown key {', '.join(unknown)} (keys: {', '.join(sorted(known))})"
        )
    t = TargetConfig(**target)
    for key in ("model", "against"):
        if not isinstance(getattr(t, key), str) or getattr(t, key) in ("", "???"):
            raise ConfigError(f"targets[{index}].{key} is required: the name of an entry")
    if t.max_ratio is None and t.min_ratio is None:
        raise ConfigError(f"targets[{index}] ({t.label or t.model}): set max_ratio, min_ratio or both")
    if t.max_ratio is not None and t.min_ratio is not None and t.min_ratio > t.max_ratio:
        raise ConfigError(f"targets[{index}]: min_ratio={t.min_ratio} > max_ratio={t.max_ratio}")
    return t


def check_targets(entries: list[dict[str, Any]], targets: list[Any]) -> list[TargetResult]:
    """Each target's ratio entry[metric] / against[metric] from evaluate's numbers, against its limits."""
    results = []
    for i, target in enumerate(targets):
        t = as_target(target, i)
        model = find_entry(entries, t.model, option=f"targets[{i}].model")
        against = find_entry(entries, t.against, option=f"targets[{i}].against")
        numeric = sorted(
            k for k, v in model.items() if isinstance(v, int | float) and not isinstance(v, bool)
        )
        if t.metric not in numeric or not isinstance(against.get(t.metric), int | float):
            raise ConfigError(
                f"targets[{i}].metric={t.metric}: not a number of both entries ({', '.join(numeric)})"
            )
        if against[t.metric] == 0:
            raise ConfigError(f"targets[{i}]: {t.against}'s {t.metric} is 0, so the ratio is undefined")
        ratio = model[t.metric] / against[t.metric]
        missed_by = 0.0
        if t.max_ratio is not None and ratio > t.max_ratio:
            missed_by = (ratio - t.max_ratio) / t.max_ratio
        elif t.min_ratio is not None and ratio < t.min_ratio:
            missed_by = (t.min_ratio - ratio) / t.min_ratio
        results.append(
            TargetResult(
                label=t.label,
                model=model["name"],
                against=against["name"],
                metric=t.metric,
                ratio=ratio,
                max_ratio=t.max_ratio,
                min_ratio=t.min_ratio,
                missed_by=missed_by,
            )
        )
    return results


def targets_section(results: list[TargetResult]) -> str:
    head = (
        "## Targets\n\nratio = model's metric / against's metric.\n\n"
        "| target | model | against | metric | ratio | limit | result |\n"
        "| --- | --- | --- | --- | ---: | --- | --- |\n"
    )
    rows = [
        f"| {r.label} | {r.model} | {r.against} | {r.metric} | {r.ratio:.3f} | {r.limit} | {r.verdict} |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better on each), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], float("inf")
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def label_groups(xs: dict[int, float], ys: dict[int, float], *, log_y: bool) -> list[list[int]]:
    """The points (keys of xs) grouped so that each group gets one label: a point joins the first group
    whose first point lies within 4% of the panel of it in x and y, so numbers of points that sit on one
    another are written once, side by side ("2,11,17-20"), instead of over each other or stacked off the
    panel."""
    import math

    def spread(values: list[float]) -> tuple[float, float]:
        return min(values), (max(values) - min(values)) or 1.0

    ty = {i: math.log(v) if log_y and v > 0 else v for i, v in ys.items()}
    (x0, dx), (y0, dy) = spread(list(xs.values())), spread(list(ty.values()))
    groups: list[tuple[float, float, list[int]]] = []  # (x, y) of the group's first point, in panel fractions
    for i in xs:
        x, y = (xs[i] - x0) / dx, (ty[i] - y0) / dy
        group = next((g for gx, gy, g in groups if abs(x - gx) < 0.04 and abs(y - gy) < 0.04), None)
        if group is None:
            groups.append((x, y, [i]))
        else:
            group.append(i)
    return [g for _, _, g in groups]


def number_label(numbers: list[int]) -> str:
    """1-based point numbers as a short label: runs of consecutive numbers as ranges ("2,11,17-20")."""
    numbers, runs = sorted(numbers), []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(f"{a}" if a == b else f"{a},{b}" if b == a + 1 else f"{a}-{b}" for a, b in runs)


def place_labels(
    ax: Any,
    labels: list[tuple[float, float, str]],
    points: list[tuple[float, float]],
    *,
    marker_points: float,
) -> list[Any]:
    """Write each (x, y, text) beside its point: at the first of right, left, above, below and the diagonals
    where it covers no marker (of radius marker_points), no label written before, and stays in the panel;
    where no place is free, where it covers least. Call once the figure's layout is final."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    radius = marker_points * ax.figure.dpi / 72
    taken = [
        Bbox.from_extents(px - radius, py - radius, px + radius, py + radius)
        for px, py in ax.transData.transform(points)
    ]
    pad = 5  # points between a marker's centre and its label
    places = [
        ((pad, 0), "left", "center"),
        ((-pad, 0), "right", "center"),
        ((0, pad), "center", "bottom"),
        ((0, -pad), "center", "top"),
        ((pad, pad), "left", "bottom"),
        ((-pad, pad), "right", "bottom"),
        ((pad, -pad), "left", "top"),
        ((-pad, -pad), "right", "top"),
    ]

    def covered(box: Bbox) -> float:
        inside = Bbox.intersection(box, frame)
        outside = box.width * box.height - (inside.width * inside.height if inside else 0.0)
        overlaps = (Bbox.intersection(box, other) for other in taken)
        return outside + sum(o.width * o.height for o in overlaps if o is not None)

    written = []
    for x, y, text in labels:
        best = None
        for offset, ha, va in places:
            label = ax.annotate(
                text,
                (x, y),
                textcoords="offset points",
                xytext=offset,
                ha=ha,
                va=va,
                fontsize=7,
                zorder=4,
                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},  # over lines
            )
            cost = covered(label.get_window_extent(renderer))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, label)
            else:
                label.remove()
            if cost == 0:
                break
        taken.append(best[1].get_window_extent(renderer))
        written.append(best[1])
    return written


def write_chart(
    entries: list[dict[str, Any]], out: Path, *, chart: str, bases: list[dict[str, Any]] | None = None
) -> None:
    """Perplexity (log axis: one diverged model cannot squeeze the rest into a line) against each x, every
    model a numbered point listed in the legend (labels never overlap), the Pareto front joined, and each
    baseline's perplexity a dashed reference line; with lm-eval tasks, a panel of mean accuracy against size."""
    matplotlib = require("matplotlib", extra="dev")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    bases = bases or [entries[0]] * len(entries)
    tasks = sorted({t for e in entries for t, scores in e.get("tasks", {}).items() if task_metric(scores)})
    accuracy = [mean_accuracy(e, tasks) if tasks else None for e in entries]
    axes_keys = ["size_bytes", "prefill_ms"] if chart == "both" else [chart]
    panels = [*((k, "perplexity") for k in axes_keys)]
    if any(a is not None for a in accuracy):
        panels.append(("size_bytes", "accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    reference = {id(b): b for b in bases}.values()  # each baseline once
    numbers = []  # per panel: the axes, its (x, y, text) labels, and every point, written once the layout is set
    for ax, (key, y_key) in zip(axes[0], panels, strict=True):
        scale = 1e6 if key == "size_bytes" else 1.0
        shown = [i for i, e in enumerate(entries) if y_key == "perplexity" or accuracy[i] is not None]
        xs = {i: entries[i][key] / scale for i in shown}
        ys = {i: entries[i]["perplexity"] if y_key == "perplexity" else accuracy[i][0] for i in shown}
        for i in shown:
            color = colors[i % len(colors)]
            ax.scatter(xs[i], ys[i], s=60, color=color, zorder=3, label=f"{i + 1}  {entries[i]['name']}")
            if y_key == "accuracy" and accuracy[i][1]:
                ax.errorbar(xs[i], ys[i], yerr=accuracy[i][1], color=color, alpha=0.5, zorder=2)
        groups = label_groups(xs, ys, log_y=y_key == "perplexity")
        numbers.append((ax, [(xs[g[0]], ys[g[0]], number_label([i + 1 for i in g])) for g in groups], xs, ys))
        sign = 1 if y_key == "perplexity" else -1  # lower perplexity, higher accuracy is better
        front = [shown[j] for j in pareto_front([(xs[i], sign * ys[i]) for i in shown])]
        ax.plot(
            [xs[i] for i in front],
            [ys[i] for i in front],
            color="0.4",
            lw=1,
            zorder=1,
            drawstyle="steps-post",
            label="Pareto front (nothing both smaller/faster and better)",
        )
        for b in reference:
            value = b["perplexity"] if y_key == "perplexity" else (mean_accuracy(b, tasks) or (None,))[0]
            if value is not None:
                color = colors[entries.index(b) % len(colors)]
                ax.axhline(value, ls="--", lw=0.9, color=color, zorder=0, label=f"{b['name']} (baseline)")
        if y_key == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel(AXIS_LABELS[key])
        ax.set_ylabel(
            "perplexity (log scale)" if y_key == "perplexity" else f"mean accuracy over {len(tasks)} task(s)"
        )
        ax.grid(alpha=0.3, which="both")
        ax.margins(x=0.06, y=0.08)
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_inches = 0.17 * -(-len(labels) // 4) + 0.1  # below the panels, which keep their 4.2 inches
    fig.set_size_inches(fig.get_figwidth(), 4.2 + legend_inches)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    title = "perplexity against " + " and ".join(AXIS_LABELS[k] for k in axes_keys)
    fig.suptitle(title + (", and accuracy against size" if len(panels) > len(axes_keys) else ""))
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    for ax, panel_labels, xs, ys in numbers:
        place_labels(ax, panel_labels, [(xs[i], ys[i]) for i in xs], marker_points=60**0.5 / 2)
    fig.savefig(out, dpi=120)
    plt.close(fig)


class Report(NamedTuple):
    path: Path  # report.md
    targets: list[TargetResult]


def write_report(
    input_path: Path,
    output_dir: Path,
    *,
    baseline: str | None = None,
    chart: str = "both",
    compare: dict[str, str] | None = None,
    targets: list[Any] = (),
) -> Report:
    if chart not in CHARTS:
        raise ConfigError(f"chart={chart}: choose one of {', '.join(CHARTS)}")
    check_output_dir("output_dir", output_dir)
    entries = load_entries(input_path)
    base = pick_baseline(entries, baseline)
    bases = pick_bases(entries, base, dict(compare or {}))
    results = check_targets(entries, list(targets))  # every check before anything is written
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_chart(entries, output_dir / "report.png", chart=chart, bases=bases)
    first = entries[0]
    others = " unless the `compared with` column names another" if compare else ""
    setting = (
        f"Perplexity over {first.get('eval_tokens', '?')} eval tokens; latency at batch "
        f"{first.get('latency_batch_size', '?')}, prefill of {first.get('prefill_len', '?')} tokens, "
        f"{first.get('decode_tokens', '?')} decoded tokens, on {first.get('device', '?')} "
        f"({first.get('threads', '?')} threads), {first.get('latency_statistic', 'median')} of the repeats"
        f"{', the models timed in turns' if first.get('latency_interleaved') else ''}. "
        f"Ratios against `{base['name']}`{others}; "
        "speed-up = base time / time."
    )
    text = (
        f"# Compression report\n\nFrom `{input_path}` (written by `trainer.evaluate`).\n\n{setting}\n\n"
        + markdown_table(entries, bases)
        + accuracy_section(entries, bases)
        + runtimes_section(entries)
        + (f"\n{targets_section(results)}" if results else "")
        + "\n![perplexity against size and latency](report.png)\n"
    )
    (output_dir / "report.md").write_text(text)
    return Report(output_dir / "report.md", results)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="report")
def main(cfg: DictConfig) -> None:
    report = write_report(
        Path(cfg.input),
        Path(cfg.output_dir),
        baseline=cfg.baseline,
        chart=cfg.chart,
        compare=OmegaConf.to_container(cfg.compare, resolve=True),
        targets=list(cfg.targets),
    )
    for r in report.targets:
        print(
            f"target {r.label or r.model}: {r.metric} {r.model} / {r.against} = {r.ratio:.3f} "
            f"(limit {r.limit}): {r.verdict}",
            flush=True,
        )
    print(f"wrote {report.path} and {report.path.with_suffix('.png')}")


if __name__ == "__main__":
    run(main)
