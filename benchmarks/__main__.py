"""`python -m benchmarks [overrides]`.

With no arguments: the default sweep (`experiment=toy_sweep`): the toy model, CHAIR and POPE, greedy
and every method. DCD joins it once its projectors are trained (`python -m vlmfix.training.dcd
--config conf/train/dcd.yaml learning_rate=1e-3 gradient_accumulation_steps=1 epochs=2`, or point
VLMFIX_DCD_CHECKPOINTS at them); until then it is left out of the sweep with a note.
"""

import os
import sys
from pathlib import Path

from benchmarks.app import main

SWEPT_METHODS = ("greedy", "vhr", "var", "gift", "dual_stream", "pai", "vcd", "dcd")


def default_overrides() -> list[str]:
    checkpoints = Path(os.environ.get("VLMFIX_DCD_CHECKPOINTS", "outputs/dcd/toy"))
    methods = list(SWEPT_METHODS)
    if not (checkpoints / "negative.safetensors").exists():
        methods.remove("dcd")
        print(f"[benchmarks] DCD left out of the default sweep: no trained projectors in {checkpoints} "
              "(train them with: python -m vlmfix.training.dcd --config conf/train/dcd.yaml).", flush=True)
    return ["experiment=toy_sweep", f"hydra.sweeper.params.method='{','.join(methods)}'"]


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv.extend(default_overrides())
    main()
