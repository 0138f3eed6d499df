"""Train DCD's positive and negative projectors from preference data (chosen / rejected responses).

    python -m vlmfix.training.dcd                                   # the full toy build, both projectors
    python -m vlmfix.training.dcd model=/path/llava-1.5-7b-hf data=/path/RLAIF-V-Dataset \\
        output_dir=outputs/dcd/llava7b mixed_precision=bf16
    python -m vlmfix.training.dcd --config conf/train/dcd.yaml learning_rate=1e-4 projectors=[neg]
    accelerate launch -m vlmfix.training.dcd --config conf/train/dcd.yaml model=... data=...

Preference data: JSON Lines, JSON, Parquet, a saved dataset or a dataset folder, in vlmfix's
image/prompt/chosen/rejected layout or with RLAIF-V's or VLFeedback's fields (`vlmfix.training.dcd_data`).
Outputs: `positive.safetensors` / `negative.safetensors` in `output_dir` (see
`vlmfix.methods.dcd.save_projector`), for `vlmfix.DCD(checkpoints=output_dir)`; a killed run started again
resumes (`vlmfix.training.dcd_loop`). The pieces: data in `dcd_data`, settings in `dcd_config`, the loop and
its checkpoints in `dcd_loop`; this module is the command and re-exports them.

Spec: /shared/specs/dcd.md §3 (steps 1-3 and the Decisions D1-D3, D9); the loss and the optimiser
settings are vlmfix's reconstruction ([R]), not published by the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlmfix.methods.dcd import Side
from vlmfix.training.config import parse_cli, run_cli
from vlmfix.training.dcd_config import DCDTrainConfig
from vlmfix.training.dcd_data import (
    Example,
    PreferenceData,
    PreferenceDataError,
    ResponseEncoder,
    load_preferences,
)
from vlmfix.training.dcd_loop import (
    BatchOrder,
    ProjectorRun,
    projector_only,
    response_nll,
    train_dcd,
    train_projector,
)


def parse_config(argv: Sequence[str] | None) -> DCDTrainConfig:
    """`[--config file.yaml] key=value ...` -> DCDTrainConfig (ConfigError on an unknown or bad setting)."""
    return parse_cli(DCDTrainConfig, argv, prog="python -m vlmfix.training.dcd",
                     description="Train DCD's positive and negative projectors (accelerate; resumable).")


def main(argv: Sequence[str] | None = None) -> dict[Side, Path]:
    return train_dcd(parse_config(argv))


__all__ = [
    "BatchOrder",
    "DCDTrainConfig",
    "Example",
    "PreferenceData",
    "PreferenceDataError",
    "ProjectorRun",
    "ResponseEncoder",
    "load_preferences",
    "main",
    "parse_config",
    "projector_only",
    "response_nll",
    "train_dcd",
    "train_projector",
]

if __name__ == "__main__":
    run_cli(main)
