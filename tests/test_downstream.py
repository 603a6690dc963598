"""Downstream accuracy through lm-evaluation-harness: `trainer.evaluate tasks=[...]` against lm-eval's own
command line on the same directory, the local task's data, and bad input.

The task is lm_eval_tasks/pydoc_endings (made here from pydoc topics: no download); the model a tiny Llama on
SmolLM2's tokenizer, saved as transformers saves it, so that lm-eval's command line loads it by itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import ROOT, subprocess_env, tiny_llama
from trainer.data.choice_tasks import NUM_CHOICES, pydoc_endings
from trainer.errors import ConfigError, InputNotFoundError, MissingPackageError
from trainer.train import CONF_DIR

TASKS = ROOT / "lm_eval_tasks"
LATENCY = ["latency.prefill_len=8", "latency.decode_tokens=2", "latency.repeats=1", "latency.warmup=0"]
LIMIT = 24  # examples of the task: enough that a chance-level model gets some right and some wrong


def evaluate_config(model: Path, output: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(
            "evaluate",
            overrides=[
                f"models=[{model}]",
                f"output={output}",
                "data=pydoc",
                "data.seq_len=32",
                "eval_batches=1",
                *LATENCY,
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def hf_dir(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_hf")
    tiny_llama(49152).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir)).save_pretrained(str(out))
    return out


def test_the_local_task_is_the_generators_output_four_distinct_endings_the_answer_anywhere():
    lines = (TASKS / "pydoc_endings.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows == pydoc_endings()  # the committed rows are what `python -m trainer.data.choice_tasks` writes
    assert len(rows) == 400
    for row in rows:
        assert len(set(row["choices"])) == NUM_CHOICES and row["context"]
    labels = [row["label"] for row in rows]
    assert all(labels.count(k) > len(rows) / NUM_CHOICES / 2 for k in range(NUM_CHOICES))  # no favoured slot


def test_evaluate_tasks_give_the_accuracy_lm_evals_own_command_line_gives_on_the_same_directory(
    hf_dir, tmp_path, capfd
):
    from trainer.evaluate import evaluate_models

    cfg = evaluate_config(
        hf_dir,
        tmp_path / "ours.json",
        "tasks=[pydoc_endings]",
        f"lm_eval.include_path={TASKS}",
        f"lm_eval.limit={LIMIT}",
    )
    [entry] = evaluate_models(cfg)
    printed = capfd.readouterr()
    # Off a terminal: lm-eval's per-model INFO lines, its warnings about being handed a model object, and its
    # loglikelihood progress bar are not printed; our line with the accuracy is.
    for noise in ("Setting random seed", "is not of type `str`", "Custom kwargs", "Running loglikelihood"):
        assert noise not in printed.out + printed.err
    assert "pydoc_endings acc_norm" in printed.out
    ours = entry["tasks"]["pydoc_endings"]
    assert ours["examples"] == LIMIT and entry["lm_eval"]["version"]
    assert json.loads((tmp_path / "ours.json").read_text())[0]["tasks"] == entry["tasks"]

    cli = [
        *(sys.executable, "-m", "lm_eval", "run", "--model", "hf"),
        *("--model_args", f"pretrained={hf_dir},dtype=float32"),
        *("--tasks", "pydoc_endings", "--include_path", str(TASKS), "--limit", str(LIMIT)),
        *("--batch_size", "8", "--seed", "1234", "--device", "cpu", "--output_path", str(tmp_path / "cli")),
    ]
    proc = subprocess.run(cli, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [results_file] = (tmp_path / "cli").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]["pydoc_endings"]
    for metric in ("acc", "acc_norm"):
        assert ours[metric] == pytest.approx(theirs[f"{metric},none"], abs=1e-12)
        assert ours[f"{metric}_stderr"] == pytest.approx(theirs[f"{metric}_stderr,none"], abs=1e-12)
    assert 0 < ours["acc"] * LIMIT < LIMIT  # a count of right answers that can disagree either way


def test_bad_task_options_are_refused_before_any_model_loads(hf_dir, tmp_path, monkeypatch):
    import trainer.evaluate as evaluate

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the task options were checked")

    monkeypatch.setattr(evaluate, "load_any", no_load)
    empty = tmp_path / "no_tasks"
    empty.mkdir()
    (empty / "notes.yaml").write_text("title: not a task\n")
    cases = [
        (
            ["tasks=[pydoc_ending]", f"lm_eval.include_path={TASKS}"],
            ConfigError,
            "did you mean pydoc_endings",
        ),
        (["tasks=[pydoc_endings]", f"lm_eval.include_path={empty}"], ConfigError, "holds no lm-eval task"),
        (
            ["tasks=[pydoc_endings]", f"lm_eval.include_path={tmp_path / 'none'}"],
            InputNotFoundError,
            "no such",
        ),
        (
            ["tasks=[pydoc_endings]", f"lm_eval.include_path={TASKS}", "lm_eval.limit=0"],
            ConfigError,
            "limit=0",
        ),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            evaluate.evaluate_models(evaluate_config(hf_dir, tmp_path / "out.json", *overrides))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    with pytest.raises(MissingPackageError, match=r"\[eval\]"):
        evaluate.evaluate_models(evaluate_config(hf_dir, tmp_path / "out.json", "tasks=[pydoc_endings]"))


def test_the_report_puts_each_tasks_accuracy_the_mean_and_its_difference_to_the_baseline_beside_perplexity(
    tmp_path,
):
    from trainer.report import pareto_front, write_report

    def entry(name: str, ppl: float, size: float, accs: dict[str, tuple[float, float]]) -> dict:
        tasks = {t: {"acc": a, "acc_stderr": e, "examples": 100} for t, (a, e) in accs.items()}
        return {
            **dict(name=name, perplexity=ppl, params=10, nonzero_params=10, size_bytes=size),
            **dict(prefill_ms=1.0, decode_tokens_per_s=1.0, tasks=tasks, lm_eval={"version": "0.4.13"}),
        }

    entries = [
        entry("dense", 20.0, 4e6, {"a": (0.60, 0.03), "b": (0.40, 0.04)}),
        entry("pruned", 1200.0, 2e6, {"a": (0.50, 0.03), "b": (0.30, 0.04)}),
    ]
    (tmp_path / "in.json").write_text(json.dumps(entries))
    text = write_report(tmp_path / "in.json", tmp_path / "out").path.read_text()
    # mean 0.40, standard error sqrt(0.03^2 + 0.04^2) / 2 = 0.025; against dense: -10.0 points, ± sqrt(2) x 2.5
    assert "| pruned | dense | 0.500 ± 0.030 | 0.300 ± 0.040 | 0.400 ± 0.025 | -10.0 ± 3.5 pts |" in text
    assert "| dense | dense | 0.600 ± 0.030 | 0.400 ± 0.040 | 0.500 ± 0.025 |  |" in text
    assert (tmp_path / "out" / "report.png").stat().st_size > 0
    # (size, perplexity): the smallest, then each one better than all smaller ones
    assert pareto_front([(4, 20), (2, 1200), (3, 30), (4, 10), (5, 15)]) == [1, 2, 3]


def test_the_charts_point_numbers_cover_no_point_no_other_number_and_stay_in_the_panel():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    from trainer.report import label_groups, number_label, place_labels

    # the chain's shape: a column of models at one size, some on top of each other, and a far outlier
    xs = dict(enumerate([537.0] * 9 + [220.0, 220.0, 221.0, 150.0]))
    ys = dict(enumerate([0.80, 0.74, 0.70, 0.69, 0.68, 0.65, 0.60, 0.47, 0.41, 0.80, 0.80, 0.79, 0.29]))
    groups = label_groups(xs, ys, log_y=False)
    assert [number_label([i + 1 for i in g]) for g in groups] == [
        "1",
        "2",
        "3-5",
        "6",
        "7",
        "8",
        "9",
        "10-12",
        "13",
    ]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter(list(xs.values()), list(ys.values()), s=60)
    fig.tight_layout()
    labels = [(xs[g[0]], ys[g[0]], number_label([i + 1 for i in g])) for g in groups]
    written = place_labels(
        ax, labels, list(zip(xs.values(), ys.values(), strict=True)), marker_points=60**0.5 / 2
    )
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in written]
    radius = 60**0.5 / 2 * fig.dpi / 72
    markers = [
        Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)
        for x, y in ax.transData.transform(list(zip(xs.values(), ys.values(), strict=True)))
    ]
    frame = ax.get_window_extent(renderer)
    for k, box in enumerate(boxes):
        assert frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1), labels[k]
        assert not any(box.overlaps(other) for other in boxes[:k] + boxes[k + 1 :]), labels[k]
        assert not any(box.overlaps(m) for m in markers), labels[k]
    plt.close(fig)
