"""Resumable training checkpoints shared by the trainers: safetensors for tensors, JSON for the rest, no pickles.

A checkpoint is a directory `<output_dir>/<prefix><step:07d>/` holding `.safetensors` files (weights,
optimiser tensors, random generator states) and `trainer_state.json` (step, data position, scheduler,
the optimiser's other state, the run's settings). It is written into `<name>.tmp/`, every file flushed to
disk, the state file last, then renamed into place in one step: a run killed at any moment leaves the
previous checkpoints whole, and the next run ignores and clears the half-written `.tmp`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from vlmfix.errors import CheckpointError

STATE_FILE = "trainer_state.json"
TMP_SUFFIX = ".tmp"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(output_dir: Path, prefix: str, step: int) -> Path:
    return Path(output_dir) / f"{prefix}{step:07d}"


def write_checkpoint(directory: Path, files: Mapping[str, Mapping[str, Tensor]], state: Mapping[str, Any]) -> Path:
    """Write `files` ({file name: tensors}) and `state` (JSON) as the checkpoint `directory`, atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in files.items():
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / name))
        _fsync(tmp / name)
    with (tmp / STATE_FILE).open("w", encoding="utf-8") as handle:  # last: marks the checkpoint complete
        json.dump(dict(state), handle, indent=1, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(tmp)
    old = directory.with_name(directory.name + ".old")
    if directory.exists():  # the same step saved again: keep the old one until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def read_checkpoint(directory: Path, names: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """(state, {file name: tensors}) of a checkpoint; CheckpointError when a file is missing or unreadable."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        files = {name: load_file(str(directory / name)) for name in names}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {directory} is unreadable ({error}); delete it (the run then resumes "
                              "from an older checkpoint or starts over).") from error
    return state, files


def complete_checkpoints(output_dir: Path, prefix: str) -> list[tuple[int, Path]]:
    """(step, directory) of the complete checkpoints `<prefix><digits>` in `output_dir`, oldest first."""
    found = []
    for path in Path(output_dir).glob(f"{prefix}*"):
        suffix = path.name[len(prefix):]
        if path.is_dir() and suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path, prefix: str) -> Path | None:
    found = complete_checkpoints(output_dir, prefix)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: Path, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any half-written ones."""
    for _, path in complete_checkpoints(output_dir, prefix)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(output_dir).glob(f"{prefix}*{TMP_SUFFIX}"):
        shutil.rmtree(path, ignore_errors=True)


def remove_checkpoints(output_dir: Path, prefix: str) -> None:
    """Delete every checkpoint `<prefix>...` in `output_dir`, complete or not."""
    for path in Path(output_dir).glob(f"{prefix}*"):
        if path.is_dir() and path.name[len(prefix):].split(".")[0].isdigit():
            shutil.rmtree(path, ignore_errors=True)


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` for a temporary file next to `path`, flush it, then rename it over `path`: a kill
    leaves either the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)
    return path


# ---------------------------------------------------------------------------------------------- optimiser
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimiser's state as (tensors keyed "<param index>.<name>", JSON for groups and scalar state)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor],
                         saved: Mapping[str, Any], source: Path) -> None:
    """Restore `optimizer_state`'s output into `optimizer` (an optimiser over the same parameters)."""
    per_param: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *saved["scalars"].items()]:
        index, name = flat.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    current = optimizer.param_groups
    if len(current) != len(saved["param_groups"]):
        raise CheckpointError(f"checkpoint {source} has {len(saved['param_groups'])} parameter groups, this run "
                              f"{len(current)}; resume with the same trainable parameters or start over "
                              "(resume=false).")
    groups = [{k: (tuple(v) if isinstance(now.get(k), tuple) else v) for k, v in group.items()}
              for group, now in zip(saved["param_groups"], current)]
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"the optimiser state in {source} does not fit this run ({error}); resume with the same "
                              "trainable parameters or start over (resume=false).") from error


# ---------------------------------------------------------------------------------------------- random generators
def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The torch (CPU and initialised CUDA), Python and NumPy generator states as (tensors, JSON)."""
    # the legacy tuple (the default; numpy's stub types the no-argument call as the dict form)
    numpy_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(numpy_state[1].astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "numpy": [numpy_state[0], *numpy_state[2:]]}
    return tensors, state


def restore_rng(tensors: Mapping[str, Tensor], state: Mapping[str, Any]) -> None:
    """Set the generators back to a `rng_state()` (CUDA ones when this process has as many devices)."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, *rest = state["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), *rest))
