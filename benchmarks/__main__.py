"""`python -m benchmarks [overrides]`.

With no arguments: the default sweep (`experiment=toy_sweep`): the toy model, CHAIR and POPE, greedy
and every method that can run on it. DCD needs projectors trained on the toy's preference data: unless
VLMFIX_DCD_CHECKPOINTS points at trained ones, they are trained first (about 3 minutes on 2 CPU cores)
into outputs/dcd/toy, and trained again when the toy was rebuilt with other settings. VAR needs the
model's sink dimensions; the toy has none (its first token's largest |x_d| / rms(x) is about 2, far below
any sink threshold: `python -m vlmfix.methods.sink_dims --model toy`), so VAR, which refuses such a model
rather than edit nothing, is left out of the default sweep while the toy preset gives no `var_sink_dims`.
"""

import json
import os
import sys
from pathlib import Path
from typing import cast

from benchmarks.app import CONFIG_DIR, main

SWEPT_METHODS = ("greedy", "vhr", "var", "gift", "dual_stream", "pai", "vcd", "dcd", "m3id", "icd", "sid", "avisc",
                 "dola", "opera")
DEFAULT_DCD_DIR = Path("outputs/dcd/toy")
# the toy learns in minutes with a larger step than conf/train/dcd.yaml's (real-model) default
TOY_DCD_RECIPE = ["learning_rate=1e-3", "gradient_accumulation_steps=1", "epochs=2"]


def trained_for_toy(checkpoints: Path, toy_hash: str) -> bool:
    """Whether `checkpoints` holds both DCD projectors, trained on the toy with settings hash `toy_hash`."""
    from vlmfix.errors import CheckpointError
    from vlmfix.methods.dcd import CHECKPOINT_FILES, read_metadata

    try:
        metadata = [read_metadata(checkpoints / file) for file in CHECKPOINT_FILES.values()]
    except (CheckpointError, OSError):
        return False
    return all(json.loads(m.get("training", "{}")).get("toy_settings_hash") == toy_hash for m in metadata)


def ensure_dcd_checkpoints() -> bool:
    """Train the toy's DCD projectors into outputs/dcd/toy unless current ones are there (or the user
    points VLMFIX_DCD_CHECKPOINTS at theirs); returns whether DCD can join the sweep."""
    from vlmfix.toy import FULL
    from vlmfix.training.dcd import main as train_dcd

    given = os.environ.get("VLMFIX_DCD_CHECKPOINTS")
    if given:
        if trained_for_toy(Path(given), FULL.hash()):
            return True
        print(f"[benchmarks] DCD left out of the default sweep: VLMFIX_DCD_CHECKPOINTS={given} holds no pair of "
              "projectors trained on this toy build (unset it to have them trained here).", flush=True)
        return False

    if not trained_for_toy(DEFAULT_DCD_DIR, FULL.hash()):
        print(f"[benchmarks] training DCD's projectors on the toy's preference data into {DEFAULT_DCD_DIR}",
              flush=True)
        train_dcd(["--config", str(Path(CONFIG_DIR) / "train" / "dcd.yaml"), *TOY_DCD_RECIPE,
                   f"output_dir={DEFAULT_DCD_DIR}"])
    return True


def toy_has_sink_dims() -> bool:
    """Whether the toy preset names VAR's sink dimensions; says why VAR is left out when it does not."""
    from omegaconf import DictConfig, OmegaConf

    preset = cast(DictConfig, OmegaConf.load(Path(CONFIG_DIR) / "model" / "toy.yaml"))  # a mapping
    if preset.get("var_sink_dims"):
        return True
    print("[benchmarks] VAR left out of the default sweep: the toy has no sink dimensions (calibration finds "
          "none: python -m vlmfix.methods.sink_dims --model toy), and VAR refuses a model without them rather "
          "than edit nothing.", flush=True)
    return False


def default_overrides() -> list[str]:
    methods = [m for m in SWEPT_METHODS if (m != "dcd" or ensure_dcd_checkpoints())
               and (m != "var" or toy_has_sink_dims())]
    return ["experiment=toy_sweep", f"hydra.sweeper.params.method='{','.join(methods)}'"]


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv.extend(default_overrides())
    main()
