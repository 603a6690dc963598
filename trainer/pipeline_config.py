"""trainer.pipeline's schemas (conf/pipeline.yaml, conf/chain/*.yaml). Beside the command, as each command's
schema is, in a module that imports only the standard library, Hydra and trainer.choices: registering them
imports none of the stages' commands or schemas (each stage registers its own).

Every default lives in the YAML, which sets every key (tests/test_config.py checks both); a stage, an item of
a chain's mapping, takes its defaults from StageConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import Choice

# The commands a stage can run.
StageModule = Choice(
    "StageModule", "trainer.train trainer.quantize trainer.export trainer.evaluate trainer.report"
)
# fork (each stage forked from this process, imports done once; subprocesses where a GPU is visible),
# subprocess (python -m) or torchrun.
Launcher = Choice("Launcher", "fork subprocess torchrun")


@dataclass
class StageConfig:
    module: StageModule = StageModule["trainer.train"]
    # Its Hydra overrides; `${run_dir}` is the pipeline's run directory (stage outputs are read from there).
    args: list[str] = field(default_factory=list)
    # One line on what the stage is for, printed when it runs.
    about: str = ""
    # The recipes (chain.recipes) the stage belongs to; null: every recipe. E.g. GGUF exports need a tokenizer
    # GGUF can describe, which the tiny recipe's word-level one is not.
    recipes: list[str] | None = None


@dataclass
class ChainConfig:
    # Names the chain (and its default run directory).
    name: str = MISSING
    # The folder of conf/experiment/ whose recipes the stages use (`+experiment=${chain.recipes}/...`).
    recipes: str = MISSING
    # Stages in the order they run; each is one ordinary command that can also be run alone.
    stages: dict[str, StageConfig] = MISSING
    # Files printed at the end (the report).
    outputs: list[str] = MISSING


@dataclass
class PipelineConfig:
    chain: ChainConfig = MISSING
    # Where every stage writes (one directory per stage); running again skips the finished stages.
    run_dir: str = MISSING
    # Run only these stages (null: all, in order).
    only: list[str] | None = MISSING
    launcher: Launcher = MISSING
    # torchrun: ranks per trainer.train stage.
    nproc_per_node: int = MISSING
    # Appended to every trainer.train stage's overrides (e.g. [train.device=cuda, precision=bf16]).
    train_args: list[str] = MISSING
    # Appended to every trainer.evaluate stage's overrides (e.g. lm-eval tasks: [tasks=[arc_easy]]).
    evaluate_args: list[str] = MISSING
    # Print the commands without running them.
    dry_run: bool = MISSING


def register_pipeline_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema_pipeline", node=PipelineConfig)
    cs.store(group="chain", name="schema", node=ChainConfig)
