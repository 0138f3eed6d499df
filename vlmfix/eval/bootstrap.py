"""Percentile bootstrap intervals over units (images), and paired differences between two runs on the same units.

A building block of issue 16's item 9 (intervals on every metric; a method's paired difference to greedy): the
benchmarks' per-image records and their wiring into result.json, the tables and the plots are not done yet.

The unit is what is resampled: an image (with all its mentions, questions or captions), never a mention, so the
interval reflects how much the figure moves with the choice of images. Resampling is seeded: the same units,
statistic, seed and count give the same interval.

```python
per_image = [PopeCounts(...), ...]                       # one record per image
stat = lambda units: {"f1": f1_of(sum(units, PopeCounts()))}
bootstrap_interval(per_image, stat, seed=0)["f1"]          # Interval(low=..., high=..., ...)
paired_difference(greedy_by_image, method_by_image, stat)  # {"f1": Difference(value, low, high)}
```
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from vlmfix.eval.errors import EvalInputError

U = TypeVar("U")
Statistic = Callable[[Sequence[Any]], Mapping[str, float]]


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval: `level` of the resampled statistics lie in [low, high]."""

    low: float
    high: float
    level: float
    n_resamples: int
    seed: int


@dataclass(frozen=True)
class Difference:
    """`value` = statistic(b) - statistic(a) on the same units, with its bootstrap interval."""

    value: float
    low: float
    high: float
    level: float
    n_resamples: int
    seed: int


def _check(n_units: int, n_resamples: int, level: float) -> None:
    if n_units < 1:
        raise EvalInputError("the bootstrap needs at least one unit (image); none were given.")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise EvalInputError(f"`n_resamples` must be an int >= 1, got {n_resamples!r}.")
    if not (isinstance(level, float) and 0 < level < 1):
        raise EvalInputError(f"`level` must be a float in (0, 1), e.g. 0.95, got {level!r}.")


def resamples(n_units: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n_units] unit indices drawn with replacement (numpy's default generator, seeded)."""
    return np.random.default_rng(seed).integers(0, n_units, size=(n_resamples, n_units))


def _bounds(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_interval(units: Sequence[U], statistic: Statistic, *, n_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict[str, Interval]:
    """The interval of each metric `statistic` returns, resampling `units` with replacement."""
    units = list(units)
    _check(len(units), n_resamples, level)
    draws: dict[str, list[float]] = {}
    for row in resamples(len(units), n_resamples, seed):
        for name, value in statistic([units[i] for i in row]).items():
            draws.setdefault(name, []).append(float(value))
    return {name: Interval(*_bounds(np.asarray(values), level), level, n_resamples, seed)
            for name, values in draws.items()}


def paired_difference(a: Mapping[Hashable, U], b: Mapping[Hashable, U], statistic: Statistic, *,
                      n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Difference]:
    """statistic(b) - statistic(a) per metric, both runs resampled with the same draws of their shared units.

    Raises:
        EvalInputError: the runs do not cover the same units (a paired difference needs the same images).
    """
    if set(a) != set(b):
        only = sorted(map(str, set(a) ^ set(b)))[:5]
        raise EvalInputError(f"a paired difference needs both runs on the same images; {len(set(a) ^ set(b))} "
                             f"differ (e.g. {only}). Compare runs with the same image list.")
    keys = sorted(a, key=str)
    _check(len(keys), n_resamples, level)
    first, second = [a[k] for k in keys], [b[k] for k in keys]

    def delta(rows: Sequence[int]) -> dict[str, float]:
        base, other = statistic([first[i] for i in rows]), statistic([second[i] for i in rows])
        return {name: float(other[name]) - float(base[name]) for name in base}

    value = delta(range(len(keys)))
    draws: dict[str, list[float]] = {name: [] for name in value}
    for row in resamples(len(keys), n_resamples, seed):
        for name, d in delta(row).items():
            draws[name].append(d)
    return {name: Difference(value[name], *_bounds(np.asarray(draws[name]), level), level, n_resamples, seed)
            for name in value}
