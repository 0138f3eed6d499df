"""Peak memory of one generate call of a speed variant.

What is measured, per device:
- CPU: how far the call raises the process's resident set above where it stood just before the call:
  VmHWM (the peak resident set in /proc/self/status) after the call, with the peak reset to the current
  resident set just before it through /proc/self/clear_refs (Linux >= 4.0), minus VmRSS then. It counts
  everything the call keeps resident at its peak: tensors (KV cache, activations, the prepare passes' and
  the second stream's), Python objects and allocator slack. The child runs with glibc's mmap threshold
  fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so tensors freed by the model build and the warm-up call go back
  to the system instead of being reused unseen, and it is a fresh process, so no variant inherits another's
  allocator state.
- CUDA: `torch.cuda.max_memory_allocated()` during the call minus `torch.cuda.memory_allocated()` before it
  (the tensors the call adds at its peak, whatever the caching allocator keeps), in the timing process.

    python -m benchmarks.speed_memory '<job as JSON>'   # what `benchmarks.speed` runs per CPU variant
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


@dataclass(frozen=True)
class MemoryJob:
    """One variant of one block: what the child process rebuilds and measures."""

    layers: int
    heads: int
    head_dim: int
    device: str
    dtype: str
    batch: int
    new_tokens: int
    specs: tuple[str, ...]  # the block's method specs (the child builds the same variants)
    variant: str  # the label of the variant to measure
    threads: int
    family: str = "llava"
    kv_heads: int | None = None  # None: the family's grouping


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{STATUS} has no {field} line")
    return int(match.group(1)) * 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set (write 5 to /proc/self/clear_refs)."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError as error:
        raise RuntimeError(f"cannot reset the peak resident set through {CLEAR_REFS} ({error}); CPU peak memory "
                           f"needs Linux >= 4.0 with /proc writable") from error


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def peak_growth(call: Callable[[], Any], device: str = "cpu") -> int:
    """Bytes `call()` adds at its peak: resident set on CPU, allocated tensors on CUDA (see the module doc)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _release_free_memory()
    reset_peak_rss()
    before = _status_bytes("VmRSS")
    call()
    return max(0, _status_bytes("VmHWM") - before)


def measure_job(job: MemoryJob) -> int:
    """In the child: build the block's model, inputs and variants, warm the variant up on one prompt, then
    measure one call on the block's batch."""
    from benchmarks.speed import build_variants
    from benchmarks.speed_setup import DTYPES, batch_inputs, speed_model
    from benchmarks.speed_timing import WARM_UP_TOKENS, GenerateFn, TokenClock

    torch.set_num_threads(job.threads)
    dtype = DTYPES[job.dtype]
    tiny = speed_model(job.layers, job.heads, job.head_dim, job.device, dtype, family=job.family,
                       kv_heads=job.kv_heads)
    with tempfile.TemporaryDirectory() as stand_in_dir:

        def variant(batch: int) -> GenerateFn:
            inputs = batch_inputs(tiny, batch, job.device, dtype)
            return build_variants(tiny, inputs, job.specs, stand_in_dir)[job.variant]

        variant(1)(WARM_UP_TOKENS, TokenClock())  # lazy imports, one-time set-up, on one prompt
        fn = variant(job.batch)
        return peak_growth(lambda: fn(job.new_tokens, TokenClock()), job.device)


@dataclass(frozen=True)
class MemoryResult:
    peak_bytes: int | None
    error: str | None = None


def measure_memory(job: MemoryJob, timeout: float = 3600.0) -> MemoryResult:
    """Run `job` in a fresh `python -m benchmarks.speed_memory` process and read its answer."""
    env = {**os.environ, **CHILD_ENV}
    command = [sys.executable, "-m", "benchmarks.speed_memory", json.dumps(asdict(job))]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return MemoryResult(None, f"the memory probe ran past {timeout:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return MemoryResult(None, f"the memory probe failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    answer = json.loads(lines[-1])
    return MemoryResult(answer.get("peak_bytes"), answer.get("error"))


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    raw = json.loads(argv[0])
    job = MemoryJob(**{**raw, "specs": tuple(raw["specs"])})
    try:
        print(json.dumps({"peak_bytes": measure_job(job)}))
    except RuntimeError as error:  # e.g. no /proc/self/clear_refs: say why, the timing rows stand
        print(json.dumps({"peak_bytes": None, "error": str(error)}))


if __name__ == "__main__":
    main()
