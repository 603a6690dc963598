"""Loaders of this directory's local tasks: their rows are JSON lines beside this file, which
`python -m trainer.data.choice_tasks` writes (no download)."""

import json
from pathlib import Path

import datasets


def load_pydoc_endings(**_: object) -> datasets.DatasetDict:
    lines = Path(__file__).with_name("pydoc_endings.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
