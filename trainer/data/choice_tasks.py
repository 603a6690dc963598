"""Multiple-choice tasks made here, for lm-evaluation-harness, since no task data can be downloaded:
`python -m trainer.data.choice_tasks OUTPUT.jsonl` writes `pydoc_endings`, the data of lm_eval_tasks/.

`pydoc_endings`: a sentence of CPython's pydoc topics (real English text every CPython ships) cut after about
half its words; the choices are its own ending and the endings of three other sentences of alike length, in a
random order. A model that reads English picks the ending that continues the sentence; chance is 1 in 4.
Deterministic: the same rows on every machine, so that accuracies compare across runs and with lm-eval's own
command line.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from trainer.data.instructions import _paragraphs

NUM_CHOICES = 4


def _sentences() -> list[str]:
    """Prose sentences of 12-40 words from every pydoc topic, in topic order, each once."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for key in sorted(topics):
        for paragraph in _paragraphs(topics[key]):
            for s in paragraph:
                words = s.split()
                code_like = sum(any(c in w for c in "()[]{}=*`:_<>") for w in words) > len(words) // 5
                table = "|" in s or "+--" in s
                if 12 <= len(words) <= 40 and not code_like and not table and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def pydoc_endings(*, num: int = 400, seed: int = 0) -> list[dict]:
    """Rows {"context", "choices", "label"}: the first `num` sentences in a seeded order, each cut after
    about 55% of its words, with three distractor endings of other sentences within two words of its length."""
    rng = random.Random(seed)
    sentences = _sentences()
    rng.shuffle(sentences)
    cut = [
        (s.split()[: round(0.55 * len(s.split()))], s.split()[round(0.55 * len(s.split())) :])
        for s in sentences
    ]
    by_length: dict[int, list[int]] = {}
    for i, (_, ending) in enumerate(cut):
        by_length.setdefault(len(ending), []).append(i)
    rows = []
    for i, (head, ending) in enumerate(cut):
        if len(rows) == num:
            break
        pool = sorted(
            j for n in range(len(ending) - 2, len(ending) + 3) for j in by_length.get(n, []) if j != i
        )
        others = {" ".join(cut[j][1]) for j in pool} - {" ".join(ending)}
        if len(others) < NUM_CHOICES - 1:
            continue
        choices = [" ".join(ending), *rng.sample(sorted(others), NUM_CHOICES - 1)]
        rng.shuffle(choices)
        rows.append({"context": " ".join(head), "choices": choices, "label": choices.index(" ".join(ending))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m trainer.data.choice_tasks OUTPUT.jsonl", file=sys.stderr)
        return 2
    rows = pydoc_endings()
    write_jsonl(Path(argv[0]), rows)
    print(f"wrote {len(rows)} rows to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
