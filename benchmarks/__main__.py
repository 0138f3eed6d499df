"""`python -m benchmarks [overrides]`.

With no arguments: the default sweep (`experiment=toy_sweep`): the toy model, CHAIR, POPE and the toy's
miniatures of AMBER, MME and HallusionBench, greedy (also at DoLa's repetition penalty) and every method that
can run on it. DCD needs projectors trained on the toy's preference data: unless
VLMFIX_DCD_CHECKPOINTS points at trained ones, they are trained once (one epoch over the toy's 5000 pairs, both
sides at once: about 2 minutes on 2 CPU cores) and kept with the toy build, under `<toy cache>/dcd/<key>` (key:
the toy settings hash and the DCD training settings), so a later run, from any working directory, reuses them; a
toy rebuilt with other settings removes them with the old build. VAR needs the
model's sink dimensions; the toy has none (its first token's largest |x_d| / rms(x) is about 2, far below
any sink threshold: `python -m vlmfix.methods.sink_dims --model toy`), so VAR, which refuses such a model
rather than edit nothing, is left out of the default sweep while the toy preset gives no `var_sink_dims`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

from benchmarks.app import CONFIG_DIR, main

SWEPT_METHODS = ("greedy", "vhr", "var", "gift", "dual_stream", "pai", "vcd", "dcd", "m3id", "icd", "sid", "avisc",
                 "dola", "opera",
                 "greedy_penalty")  # greedy at DoLa's repetition penalty 1.2 (dola.md D5)
# the toy learns in minutes with a larger step than conf/train/dcd.yaml's (real-model) default
TOY_DCD_RECIPE = ["learning_rate=1e-3", "gradient_accumulation_steps=1", "epochs=1"]


def toy_dcd_arguments() -> list[str]:
    """The trainer's command line for the toy's projectors (without output_dir)."""
    return ["--config", str(Path(CONFIG_DIR) / "train" / "dcd.yaml"), *TOY_DCD_RECIPE]


def toy_dcd_dir() -> Path:
    """Where the default sweep keeps the toy's DCD projectors: beside the toy build (`<toy cache>/dcd/<key>`),
    keyed by the toy settings hash and the training settings that change the projectors."""
    from vlmfix.eval._io import sha256_text
    from vlmfix.toy import FULL, default_root
    from vlmfix.training.dcd import parse_config

    training = parse_config(toy_dcd_arguments()).fingerprint()  # output_dir, threads, logging left out
    key = sha256_text(json.dumps({"toy_settings_hash": FULL.hash(), "training": training}, sort_keys=True))
    return default_root(fast=False) / "dcd" / key[:16]


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
    """Train the toy's DCD projectors into `toy_dcd_dir()` unless current ones are there (or the user points
    VLMFIX_DCD_CHECKPOINTS at theirs), and point VLMFIX_DCD_CHECKPOINTS (read by conf/method/dcd.yaml) at
    them; returns whether DCD can join the sweep."""
    from vlmfix.toy import FULL, build_toy

    given = os.environ.get("VLMFIX_DCD_CHECKPOINTS")
    if given:
        if trained_for_toy(Path(given), FULL.hash()):
            return True
        print(f"[benchmarks] DCD left out of the default sweep: VLMFIX_DCD_CHECKPOINTS={given} holds no pair of "
              "projectors trained on this toy build (unset it to have them trained here).", flush=True)
        return False

    build_toy()  # first, so that the projectors' folder sits in a complete build (a fresh clone builds it here)
    directory = toy_dcd_dir()
    if trained_for_toy(directory, FULL.hash()):
        print(f"[benchmarks] DCD's projectors for this toy build: {directory} (cached)", flush=True)
    else:
        print(f"[benchmarks] training DCD's projectors on the toy's preference data into {directory} (once per toy "
              "build)", flush=True)
        train_both_sides(directory)
    os.environ["VLMFIX_DCD_CHECKPOINTS"] = str(directory)
    return True


def train_both_sides(directory: Path) -> None:
    """Train the positive projector here and the negative one in a second process at the same time.

    Each side is its own seeded run from the toy's projector on one torch thread (conf/train/dcd.yaml), so the
    two processes use two cores and write what one process training them in turn would.
    """
    from vlmfix.training.dcd import main as train_dcd

    arguments = [*toy_dcd_arguments(), f"output_dir={directory}"]
    directory.mkdir(parents=True, exist_ok=True)
    log_file = directory / "train-neg.log"
    print(f"[benchmarks] the negative projector trains in a second process (log: {log_file})", flush=True)
    with log_file.open("w") as log:
        negative = subprocess.Popen([sys.executable, "-m", "vlmfix.training.dcd", *arguments, "projectors=[neg]"],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            train_dcd([*arguments, "projectors=[pos]"])
        except BaseException:
            negative.terminate()
            negative.wait()
            raise
        status = negative.wait()
    if status != 0:
        raise RuntimeError(f"training DCD's negative projector failed (exit status {status}); its log: {log_file}. "
                           "Rerun `python -m benchmarks` (training resumes), or train it alone: python -m "
                           f"vlmfix.training.dcd {' '.join(arguments)} projectors=[neg]")


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
