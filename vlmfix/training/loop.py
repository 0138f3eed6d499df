"""What both trainers' loops share: the thread count, the learning-rate schedule and the progress bar."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

DEFAULT_THREADS = 1
THREADS_MEANING = (
    "torch's CPU thread count for the run, restored after it; 1 (the default) is fastest for the toy and "
    "small models and does not slow down when other work shares the CPU; null keeps torch's default"
)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(threads)` (None: leave it), then restore the old count.

    On a shared CPU torch's default (one thread per core) can run several times slower than one thread:
    its threads wait for cores that other processes hold.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' cosine schedule: the rate rises linearly from 0 over `warmup_steps` optimiser steps,
    then falls along a half cosine to `min_lr_ratio` x the initial rate at `total_steps`."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio)


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over optimiser steps (a resumed run starts at `initial`); set the loss with `set_postfix`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)
