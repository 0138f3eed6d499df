"""Host-side cost of the grouped kernel's key groups per edited layer and decode step: derived from the
edits at every step (a `torch.unique` per row) against the session's `KeyGroupCache` (derived once per
prompt, extended by one key per step). Runs on the CPU; on a GPU the derived path also synchronises.

    python -m benchmarks.key_groups [--batch 8] [--prompt 640] [--steps 50]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from vlmfix.decoding.edits import Edit, FusionReweight, KeyBias, Transfer
from vlmfix.decoding.grouped import KeyGroupCache, compute_key_groups

HEADS = 32


def composed_edits(batch: int, prompt: int) -> list[Edit]:
    """PAI + VAR + GIFT-shaped edits over a LLaVA-1.5-like prompt (576 image tokens from position 5)."""
    image = torch.zeros(batch, prompt, dtype=torch.bool)
    image[:, 5 : 5 + 576] = True
    sink = torch.zeros(batch, prompt, dtype=torch.bool)
    sink[:, [5, 40, 300]] = True
    instruction = torch.zeros(batch, prompt, dtype=torch.bool)
    instruction[:, 5 + 576 + 4 : prompt - 5] = True
    return [
        KeyBias(abs_gain=image[:, None].float() * 0.3, rows="last"),
        Transfer(source=sink, receivers=image & ~sink, gate_keys=image, fraction=0.5),
        FusionReweight(image=image, multiplier=torch.where(image, 1.5, 1.0), query=instruction),
    ]


def ms_per_call(derive: Callable[[int, torch.Tensor], object], prompt: int, batch: int, steps: int) -> float:
    start = time.perf_counter()
    for step in range(steps):
        kv_len = prompt + 1 + step
        derive(kv_len, torch.ones(batch, kv_len, dtype=torch.bool))
    return (time.perf_counter() - start) / steps * 1e3


def main(argv: Sequence[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=640)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    edits = composed_edits(args.batch, args.prompt)
    cache = KeyGroupCache()
    derived = ms_per_call(lambda kv, valid: compute_key_groups(edits, args.batch, HEADS, kv, valid),
                          args.prompt, args.batch, args.steps)
    cached = ms_per_call(lambda kv, valid: cache.get(edits, args.batch, HEADS, kv, valid),
                         args.prompt, args.batch, args.steps)
    print(f"key groups per edited layer and step (batch {args.batch}, prompt {args.prompt}, PAI+VAR+GIFT edits): "
          f"derived {derived:.3f} ms, cached {cached:.3f} ms, {derived / cached:.1f}x")
    return derived, cached


if __name__ == "__main__":
    main()
