"""The app's bootstrap intervals (issue 16 item 9): the `bootstrap.*` settings and the block a result.json gets.

Each scored run's result.json holds, beside `metrics`:

* `intervals`: metric -> {"low", "high"}, the percentile interval of every numeric metric the benchmark's
  statistic covers (`vlmfix.eval.unit_counts`), nested breakdowns under their dotted path (`mme.subtasks.count.acc`);
* `bootstrap`: how they were computed: the unit resampled, the unit count, `n_resamples`, `seed`, `level`;
* `units`: the per-unit counts they came from (`UnitTable.to_json`), which the multirun summary pairs with
  greedy's on the same images.

The settings change scoring, not predictions, so they are not in the fingerprint (like the summary's layout);
the result records them beside the intervals, and a rerun with other settings rewrites them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from vlmfix.eval.bootstrap import UnitTable, bootstrap_intervals
from vlmfix.validation import number

DEFAULTS = {"n_resamples": 1000, "seed": 0, "level": 0.95}


def bootstrap_settings(cfg: DictConfig) -> dict[str, Any]:
    """`bootstrap.n_resamples`, `bootstrap.seed` and `bootstrap.level`, checked (defaults where absent)."""
    node = cfg.get("bootstrap") or {}
    unknown = sorted(set(node) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"`bootstrap.{unknown[0]}` is not a bootstrap setting; it knows {', '.join(DEFAULTS)}. "
                         "Remove the override.")
    settings = {key: node.get(key, default) for key, default in DEFAULTS.items()}
    return {
        "n_resamples": number(settings["n_resamples"], "bootstrap.n_resamples", low=1, integer=True,
                              meaning="the resamples of each interval; set bootstrap.n_resamples=<int>, e.g. 1000"),
        "seed": number(settings["seed"], "bootstrap.seed", low=0, integer=True,
                       meaning="the resampling seed; set bootstrap.seed=<int>"),
        "level": float(number(settings["level"], "bootstrap.level", low=0, high=1, low_open=True, high_open=True,
                              meaning="the interval's coverage; set bootstrap.level=0.95")),
    }


def interval_block(units: UnitTable, metrics: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """`intervals`, `bootstrap` and `units` for a result.json; only metrics with a numeric value get an interval.
    A nested figure (AMBER's per dimension, MME's per subtask, HallusionBench's per category) is named by its
    dotted path in `metrics`, e.g. `discriminative.existence.f1`."""
    intervals = bootstrap_intervals(units, **settings)
    shown = {name: interval.to_json() for name, interval in intervals.items()
             if isinstance(metric_value(metrics, name), (int, float))
             and not isinstance(metric_value(metrics, name), bool)}
    return {"intervals": shown,
            "bootstrap": {"method": "percentile", "unit": units.unit, "n_units": len(units.keys), **settings},
            "units": units.to_json()}


def metric_value(metrics: Mapping[str, Any], name: str) -> Any:
    """`metrics[name]`, or the value at the dotted path `name` in the nested metrics (None when absent)."""
    if name in metrics:
        return metrics[name]
    node: Any = metrics
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
