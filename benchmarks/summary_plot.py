"""The multirun summary plot: one colour per method in every panel, a legend instead of labels at the points
(so no two labels overlap), axes fitted to the values (not bars from zero, which hide the differences), and
each run's bootstrap interval as an error bar where its result.json records one (`intervals`).

Panels: CHAIR_i against object recall (one point per run), then one panel per other kind of benchmark with its
headline metric per benchmark (POPE F1 per split, AMBER score, MME total, HallusionBench qAcc, speed ratio).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import summary

HEADLINE = {  # kind -> (metric, axis label)
    "pope": ("f1", "F1"),
    "amber": ("amber_score", "AMBER score"),
    "mme": ("total", "MME total"),
    "hallusion": ("qAcc", "qAcc"),
    "speed": ("ratio_to_greedy", "time per token / greedy's"),
}


def run_name(result: Mapping[str, Any], label: str, models: int) -> str:
    return f"{label} ({result['model']})" if models > 1 else label


def interval(result: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """The run's (low, high) interval of `metric`, or None when it records none."""
    bounds = (result.get("intervals") or {}).get(metric)
    if not isinstance(bounds, Mapping) or bounds.get("low") is None or bounds.get("high") is None:
        return None
    return float(bounds["low"]), float(bounds["high"])


def errors(value: float, bounds: tuple[float, float] | None) -> list[list[float]]:
    """matplotlib's [[below], [above]] error lengths (0 without an interval)."""
    if bounds is None:
        return [[0.0], [0.0]]
    return [[max(0.0, value - bounds[0])], [max(0.0, bounds[1] - value)]]


def fitted_limits(values: Sequence[float], margin: float = 0.12) -> tuple[float, float]:
    """Axis limits around the values (their intervals included), with a margin: the differences fill the axis."""
    low, high = min(values), max(values)
    span = high - low or max(abs(high) * 0.05, 0.01)
    return low - margin * span, high + margin * span


def figure(results: Sequence[dict[str, Any]]) -> Any | None:
    """The summary figure of these runs (a matplotlib Figure), or None when nothing can be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = len({r["model"] for r in results})
    names = [run_name(r, label, models) for r, label in zip(results, summary.row_labels(results))]
    chair_runs = [(r, n) for r, n in zip(results, names) if r["kind"] == "chair"
                  and r["metrics"].get("CHAIRi") is not None and r["metrics"].get("Recall") is not None]
    kinds = [k for k in HEADLINE if any(r["kind"] == k and r["metrics"].get(HEADLINE[k][0]) is not None
                                        for r in results)]
    panels = int(bool(chair_runs)) + len(kinds)
    if not panels:
        return None
    palette = plt.get_cmap("tab10" if len(set(names)) <= 10 else "tab20")
    colours = {name: palette(i % palette.N) for i, name in enumerate(dict.fromkeys(names))}
    fig, grid = plt.subplots(1, panels, figsize=(4.6 * panels + 1.6, 4.0), squeeze=False, layout="constrained")
    axes = list(grid[0])
    if chair_runs:
        ax = axes.pop(0)
        xs, ys = [], []
        for r, name in chair_runs:
            x, y = r["metrics"]["Recall"], r["metrics"]["CHAIRi"]
            bx, by = interval(r, "Recall"), interval(r, "CHAIRi")
            ax.errorbar([x], [y], xerr=errors(x, bx), yerr=errors(y, by), fmt="o", color=colours[name],
                        capsize=3, label=name)
            xs += [x, *(bx or ())]
            ys += [y, *(by or ())]
        ax.set_xlim(fitted_limits(xs))
        ax.set_ylim(fitted_limits(ys))
        ax.set(xlabel="object recall", ylabel="CHAIR_i (lower is better)", title="CHAIR")
    for kind, ax in zip(kinds, axes):
        metric, label = HEADLINE[kind]
        runs = [(r, n) for r, n in zip(results, names) if r["kind"] == kind and r["metrics"].get(metric) is not None]
        benchmarks = list(dict.fromkeys(r["benchmark"] for r, _ in runs))
        shown = list(dict.fromkeys(n for _, n in runs))
        width = 0.7 / max(1, len(shown))
        values = []
        for r, name in runs:
            x = benchmarks.index(r["benchmark"]) + (shown.index(name) - (len(shown) - 1) / 2) * width
            y, bounds = float(r["metrics"][metric]), interval(r, metric)
            ax.errorbar([x], [y], yerr=errors(y, bounds), fmt="o", color=colours[name], capsize=3, label=name)
            values += [y, *(bounds or ())]
        ax.set_xticks(range(len(benchmarks)), benchmarks, rotation=15 if len(benchmarks) > 2 else 0)
        ax.set_xlim(-0.5, len(benchmarks) - 0.5)
        ax.set_ylim(fitted_limits(values))
        ax.set(ylabel=label, title=kind.upper() if kind in ("pope", "mme") else kind.capitalize())
        ax.grid(axis="y", alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8, title="method")
    return fig


def plot(results: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Write the summary figure to `path` (PNG/SVG by its suffix); None when there is nothing to draw."""
    fig = figure(results)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
