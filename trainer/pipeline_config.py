"""trainer.pipeline's schemas (conf/pipeline.yaml, conf/chain/*.yaml). Beside the command, as each command's
schema is, in a module that imports only the standard library, Hydra and trainer.choices: registering them
imports none of the stages' commands or schemas (each stage registers its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import Choice

# The commands a stage can run.
StageModule = Choice("StageModule", "trainer.train trainer.quantize trainer.evaluate trainer.report")
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


@dataclass
class ChainConfig:
    # Names the chain (and its default run directory).
    name: str = MISSING
    # The folder of conf/experiment/ whose recipes the stages use (`+experiment=${chain.recipes}/...`).
    recipes: str = ""
    # Stages in the order they run; each is one ordinary command that can also be run alone.
    stages: dict[str, StageConfig] = field(default_factory=dict)
    # Files printed at the end (the report).
    outputs: list[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    chain: ChainConfig = MISSING
    # Where every stage writes (one directory per stage); running again skips the finished stages.
    run_dir: str = "outputs/pipeline/${chain.name}"
    # Run only these stages (null: all, in order).
    only: list[str] | None = None
    launcher: Launcher = Launcher.fork
    # torchrun: ranks per trainer.train stage.
    nproc_per_node: int = 1
    # Appended to every trainer.train stage's overrides (e.g. [train.device=cuda, precision=bf16]).
    train_args: list[str] = field(default_factory=list)
    # Print the commands without running them.
    dry_run: bool = False


def register_pipeline_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema_pipeline", node=PipelineConfig)
    cs.store(group="chain", name="schema", node=ChainConfig)
