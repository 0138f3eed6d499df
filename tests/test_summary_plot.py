"""The multirun summary plot: one colour per method in every panel, a legend instead of point labels, axes fitted
to the values, and each run's bootstrap interval drawn as its error bar (read back from the figure)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from benchmarks.summary_plot import figure, plot

F1 = {("greedy", "pope_random"): 0.781, ("greedy", "pope_adversarial"): 0.742,
      ("vcd", "pope_random"): 0.795, ("vcd", "pope_adversarial"): 0.760,
      ("pai", "pope_random"): 0.788, ("pai", "pope_adversarial"): 0.751}
CHAIR = {"greedy": (0.12, 0.70), "vcd": (0.10, 0.69), "pai": (0.09, 0.66)}  # CHAIR_i, recall


def result(method: str, benchmark: str, kind: str, metrics: dict, intervals: dict | None = None) -> dict:
    return {"model": "toy", "method": method, "benchmark": benchmark, "kind": kind, "metrics": metrics,
            "intervals": intervals or {}, "fingerprint": {"method": {"name": method, "params": {}}}}


def sweep() -> list[dict]:
    runs = [result(m, "chair", "chair", {"CHAIRi": c, "Recall": r},
                   {"CHAIRi": {"low": c - 0.02, "high": c + 0.03}, "Recall": {"low": r - 0.04, "high": r + 0.01}})
            for m, (c, r) in CHAIR.items()]
    runs += [result(m, b, "pope", {"f1": v}, {"f1": {"low": v - 0.01, "high": v + 0.02}} if m != "pai" else None)
             for (m, b), v in F1.items()]
    return runs


def bars(ax) -> dict[str, list]:
    """Per legend label, each error bar's segments (x bars first when both are drawn)."""
    found: dict[str, list] = {}
    for container in ax.containers:
        _, _, collections = container.lines
        found.setdefault(container.get_label(), []).append([c.get_segments()[0].tolist() for c in collections])
    return found


def flat(segment: list) -> list[float]:
    return [value for point in segment for value in point]


def test_each_method_has_one_colour_in_every_panel_and_its_intervals_as_error_bars():
    fig = figure(sweep())
    try:
        chair_ax, pope_ax = fig.axes
        colours = {}
        for ax in (chair_ax, pope_ax):
            for container in ax.containers:
                colour = tuple(container.lines[0].get_color())
                assert colours.setdefault(container.get_label(), colour) == colour
        assert len(set(colours.values())) == 3 and set(colours) == set(CHAIR)
        assert not chair_ax.texts and not pope_ax.texts  # no labels at the points: the legend names them
        assert [t.get_text() for t in fig.legends[0].get_texts()] == list(CHAIR)
        chair_bars = bars(chair_ax)
        for method, (c, r) in CHAIR.items():
            (x_bar, y_bar), = chair_bars[method]
            assert flat(x_bar) == pytest.approx([r - 0.04, c, r + 0.01, c])
            assert flat(y_bar) == pytest.approx([r, c - 0.02, r, c + 0.03])
        pope_bars = bars(pope_ax)
        benchmarks = [t.get_text() for t in pope_ax.get_xticklabels()]
        assert benchmarks == ["pope_random", "pope_adversarial"]
        for method in ("greedy", "vcd"):
            for (segments,), benchmark in zip(pope_bars[method], benchmarks):
                v = F1[(method, benchmark)]
                assert [p[1] for p in segments] == pytest.approx([v - 0.01, v + 0.02])
        assert all(p[0][1] == p[1][1] for (p,) in pope_bars["pai"])  # no interval recorded: no bar
        low, high = pope_ax.get_ylim()
        assert 0.7 < low < min(F1.values()) - 0.01 and max(F1.values()) + 0.02 < high < 0.85  # fitted, not from 0
    finally:
        plt.close(fig)


def test_nothing_to_draw_gives_no_file(tmp_path):
    speed_only = [result("greedy", "chair", "chair", {"CHAIRi": None, "Recall": None})]
    assert plot(speed_only, tmp_path / "summary.png") is None and not (tmp_path / "summary.png").exists()
    assert plot(sweep(), tmp_path / "summary.png") == tmp_path / "summary.png"
