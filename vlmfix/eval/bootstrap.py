"""Percentile bootstrap intervals over units (images), and paired differences between two runs on the same units.

The unit is what is resampled: an image with all its mentions, questions or captions (an MME image pair, a
HallusionBench question set), never a mention, so an interval shows how much a figure moves with the choice of
images. A benchmark's per-unit counts (`UnitTable`, built from its scorer's per-item output by
`vlmfix.eval.unit_counts`) are summed over each resample and its metrics computed from the sums, all resamples at
once (`[n_resamples, n_units] @ [n_units, columns]`): 1000 resamples of 500 images take milliseconds.

Resampling is seeded: `numpy.random.default_rng(seed).integers(0, n, size=(n_resamples, n))` draws the units of
every resample; with strata (MME's subtasks) the same generator draws each stratum's units in turn, strata in
name order, so each stratum keeps its size. A paired difference resamples both runs with the same draws of their
shared units; a run against itself differs by exactly 0 with interval [0, 0].

```python
table = chair_units(report)                                   # one row per image
bootstrap_intervals(table, n_resamples=1000, seed=0)         # {"CHAIRi": Interval(low, high, ...), ...}
paired_differences(greedy_table, method_table)                # {"CHAIRi": Difference(value, low, high, ...)}
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmfix.eval.errors import EvalInputError
from vlmfix.registry import Registry

# summed columns, each [n_resamples] -> metrics, each [n_resamples] (NaN where a metric is undefined)
Statistic = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
STATISTICS: Registry[Statistic] = Registry("bootstrap statistic")


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval: `level` of the resampled statistics lie in [low, high]."""

    low: float
    high: float
    level: float
    n_resamples: int
    seed: int

    def to_json(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}


@dataclass(frozen=True)
class Difference:
    """`value` = statistic(b) - statistic(a) on the same units, with its bootstrap interval."""

    value: float
    low: float
    high: float
    level: float
    n_resamples: int
    seed: int

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class UnitTable:
    """Per-unit counts of one scored run: `columns[name][i]` is unit i's count, `keys[i]` its id (an image),
    `strata[i]` the stratum resampled on its own (None: one pool). `statistic` names the function of
    `STATISTICS` that turns summed columns into the run's metrics; `unit` says what a unit is."""

    statistic: str
    unit: str
    keys: tuple[str, ...]
    columns: Mapping[str, np.ndarray]
    strata: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.keys:
            raise EvalInputError("the bootstrap needs at least one unit (image); none were given.")
        if len(set(self.keys)) != len(self.keys):
            raise EvalInputError(f"unit keys must be distinct ({self.unit}); a repeated one would be counted twice.")
        for name, values in self.columns.items():
            if np.shape(values) != (len(self.keys),):
                raise EvalInputError(f"column {name!r} has shape {np.shape(values)}, expected ({len(self.keys)},).")
        if self.strata is not None and len(self.strata) != len(self.keys):
            raise EvalInputError(f"{len(self.strata)} strata for {len(self.keys)} units; give one per unit.")

    def point(self) -> dict[str, float | None]:
        """The metrics of the run itself (every unit once)."""
        sums = {name: np.asarray([np.sum(values)], dtype=float) for name, values in self.columns.items()}
        return {name: _number(values[0]) for name, values in statistic(self.statistic)(sums).items()}

    def reordered(self, keys: Sequence[str]) -> UnitTable:
        """The same table with its units in the order of `keys` (the same set)."""
        index = {key: i for i, key in enumerate(self.keys)}
        order = np.asarray([index[key] for key in keys], dtype=int)
        strata = tuple(self.strata[i] for i in order) if self.strata is not None else None
        return UnitTable(self.statistic, self.unit, tuple(keys), {k: np.asarray(v)[order] for k, v in
                                                                  self.columns.items()}, strata)

    def to_json(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "unit": self.unit, "keys": list(self.keys),
                "strata": list(self.strata) if self.strata is not None else None,
                "columns": {name: _plain_numbers(values) for name, values in self.columns.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UnitTable:
        strata = data.get("strata")
        return cls(str(data["statistic"]), str(data["unit"]), tuple(map(str, data["keys"])),
                   {name: np.asarray(values, dtype=float) for name, values in data["columns"].items()},
                   tuple(map(str, strata)) if strata is not None else None)


def statistic(name: str) -> Statistic:
    """The registered statistic `name` (the benchmarks' own register when `vlmfix.eval.unit_counts` is imported)."""
    import vlmfix.eval.unit_counts  # noqa: F401  (registers chair, pope, mme, hallusion, amber)

    return STATISTICS.get(name)


def check_settings(n_resamples: int, level: float, seed: int = 0) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise EvalInputError(f"`n_resamples` must be an int >= 1, got {n_resamples!r}.")
    if not (isinstance(level, float) and 0 < level < 1):
        raise EvalInputError(f"`level` must be a float in (0, 1), e.g. 0.95, got {level!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EvalInputError(f"`seed` must be an int >= 0, got {seed!r}.")


def resample_counts(n_units: int, n_resamples: int, seed: int, strata: Sequence[str] | None = None) -> np.ndarray:
    """[n_resamples, n_units]: how often each unit is drawn in each resample (each row sums to n_units)."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n_units)] if strata is None else [
        np.flatnonzero(np.asarray(strata) == name) for name in sorted(set(strata))]
    flat = np.zeros(n_resamples * n_units, dtype=np.int64)
    offsets = n_units * np.arange(n_resamples)[:, None]  # [R, 1]: row r's cells start at r * n_units
    for members in groups:
        draws = rng.integers(0, len(members), size=(n_resamples, len(members)))  # [R, n_stratum] positions
        flat += np.bincount((offsets + members[draws]).ravel(), minlength=flat.size)
    return flat.reshape(n_resamples, n_units)


def _metric_draws(table: UnitTable, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric of each resample ([n_resamples] per metric)."""
    sums = {name: counts @ np.asarray(values, dtype=float) for name, values in table.columns.items()}
    return statistic(table.statistic)(sums)


def _bounds(values: np.ndarray, level: float) -> tuple[float, float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_intervals(table: UnitTable, *, n_resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, Interval]:
    """The percentile interval of each metric, resampling the table's units with replacement. A metric
    undefined in the run itself (a zero denominator) gets none; resamples where it is undefined are left out."""
    check_settings(n_resamples, level, seed)
    point = table.point()
    draws = _metric_draws(table, resample_counts(len(table.keys), n_resamples, seed, table.strata))
    out = {}
    for name, values in draws.items():
        bounds = _bounds(values, level) if point[name] is not None else None
        if bounds is not None:
            out[name] = Interval(*bounds, level, n_resamples, seed)
    return out


def paired_differences(a: UnitTable, b: UnitTable, *, n_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict[str, Difference]:
    """metric(b) - metric(a) per metric, both runs resampled with the same draws of their shared units.

    Raises:
        EvalInputError: the runs were scored by different statistics, or do not cover the same units (a paired
            difference needs the same images).
    """
    check_settings(n_resamples, level, seed)
    if a.statistic != b.statistic:
        raise EvalInputError(f"a paired difference needs two runs of one benchmark kind, got {a.statistic!r} and "
                             f"{b.statistic!r}.")
    if set(a.keys) != set(b.keys):
        differ = set(a.keys) ^ set(b.keys)
        raise EvalInputError(f"a paired difference needs both runs on the same images; {len(differ)} differ (e.g. "
                             f"{sorted(differ)[:5]}). Compare runs with the same image list.")
    keys = sorted(a.keys)
    a, b = a.reordered(keys), b.reordered(keys)
    if a.strata != b.strata:
        raise EvalInputError("the two runs put the same units in different strata; compare runs of one benchmark.")
    point_a, point_b = a.point(), b.point()
    counts = resample_counts(len(keys), n_resamples, seed, a.strata)
    draws_a, draws_b = _metric_draws(a, counts), _metric_draws(b, counts)
    out = {}
    for name in draws_a:
        first, second = point_a[name], point_b[name]
        if first is None or second is None:
            continue
        bounds = _bounds(draws_b[name] - draws_a[name], level)
        if bounds is not None:
            out[name] = Difference(second - first, *bounds, level, n_resamples, seed)
    return out


def _plain_numbers(values: np.ndarray) -> list[Any]:
    """A column as JSON numbers: ints when every count is whole."""
    values = np.asarray(values)
    return values.astype(np.int64).tolist() if np.array_equal(values, np.round(values)) else values.tolist()


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


# ------------------------------------------------------------------ metric helpers for statistics
def ratio(numerator: np.ndarray, denominator: np.ndarray, empty: float = np.nan) -> np.ndarray:
    """numerator / denominator elementwise; `empty` where the denominator is 0 (NaN: undefined)."""
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, empty, numerator / safe)


def f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """2PR / (P + R), 0 where P + R is 0, NaN where either is NaN."""
    total = precision + recall
    return np.where(total == 0, 0.0, 2 * precision * recall / np.where(total == 0, 1.0, total))
