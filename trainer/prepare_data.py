"""Entry point: `python -m trainer.prepare_data data_files=GLOB tokenizer=NAME output_dir=DIR [overrides]`.

Tokenizes a source once into memory-mapped shards (trainer/data/prepare.py), which `data=tokenized
data.path=DIR` trains from.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from trainer.cli import run
from trainer.data.prepare import prepare
from trainer.errors import Interrupted
from trainer.prepare_data_config import register_prepare_data_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_prepare_data_configs()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    try:
        prepare(cfg)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted (Ctrl-C): {cfg.output_dir} keeps the shards written so far; run the same command again "
            "and it continues where it stopped"
        ) from None


if __name__ == "__main__":
    run(main)
