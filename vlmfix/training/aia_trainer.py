"""Fine-tune a VLM with next-token loss plus the AIA loss, with accelerate (one CPU, one GPU, many nodes).

    python -m vlmfix.training.aia_trainer --config conf/train/aia.yaml max_steps=200
    accelerate launch -m vlmfix.training.aia_trainer --config conf/train/aia.yaml model=/path/llava-1.5-7b-hf

The command line: `--config FILE.yaml` then `key=value` settings (`vlmfix.training.config`). The pieces:
data and collator in `aia_data`, settings in `aia_config`, the loop and its checkpoints in `aia_loop`; this
module is the command and re-exports them.
"""

from __future__ import annotations

from collections.abc import Sequence

from vlmfix.training.aia_config import TRAINABLE_MODES, AIATrainConfig
from vlmfix.training.aia_data import (
    SFTCollator,
    SFTExample,
    coco_rows,
    example_from_record,
    iter_batches,
    load_rows,
)
from vlmfix.training.aia_loop import (
    AIAGradientError,
    TrainResult,
    batch_indices,
    check_aia_gradient,
    load_checkpoint,
    parameter_groups,
    save_checkpoint,
    set_trainable,
    train,
    warn_without_direct_path,
)
from vlmfix.training.config import parse_cli, run_cli


def config_from_args(argv: Sequence[str] | None = None) -> AIATrainConfig:
    """`[--config FILE.yaml] key=value ...` -> AIATrainConfig (ConfigError on an unknown or bad setting)."""
    return parse_cli(AIATrainConfig, argv, prog="python -m vlmfix.training.aia_trainer",
                     description="Fine-tune a VLM with the AIA loss (accelerate; resumable).")


def main(argv: Sequence[str] | None = None) -> TrainResult:
    config = config_from_args(argv)
    result = train(config)
    if result.final_dir is not None:  # the main process
        print(f"done: {result.steps} steps, lambda {result.lambda_:.4g}, model in {result.final_dir}")
    return result


__all__ = [
    "AIAGradientError",
    "AIATrainConfig",
    "SFTCollator",
    "SFTExample",
    "TRAINABLE_MODES",
    "TrainResult",
    "batch_indices",
    "check_aia_gradient",
    "coco_rows",
    "config_from_args",
    "example_from_record",
    "iter_batches",
    "load_checkpoint",
    "load_rows",
    "main",
    "parameter_groups",
    "save_checkpoint",
    "set_trainable",
    "train",
    "warn_without_direct_path",
]

if __name__ == "__main__":
    run_cli(main)
