"""Bootstrap intervals over images and paired differences: against a plain-numpy reference written here (the same
seeded draws, each resample's units picked by index), the properties that must hold (the point estimate inside,
narrower with more images, a run against itself differs by exactly 0), each benchmark's per-unit counts giving
back its scorer's figures, and the summary's interval cells and paired-difference section."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from benchmarks.summary import write_summary
from vlmfix.eval import amber, chair, hallusion, mme, pope
from vlmfix.eval.bootstrap import UnitTable, bootstrap_intervals, paired_differences, resample_counts
from vlmfix.eval.errors import EvalInputError
from vlmfix.eval.unit_counts import amber_units, chair_units, hallusion_units, mme_units, pope_units

from .test_amber import R1, R2, write_amber
from .test_hallusion import answers as hallusion_answers
from .test_hallusion import write_bench
from .test_mme import write_flat

COUNTS = ("tp", "fp", "tn", "fn", "unknown", "predicted_yes")


def pope_table(n: int, seed: int = 0) -> UnitTable:
    """Random per-image POPE counts: 3 questions an image."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        labels, answers = rng.integers(0, 2, 3), rng.integers(0, 3, 3)  # answers: 0 no, 1 yes, 2 unknown
        rows.append({"tp": np.sum((labels == 1) & (answers == 1)), "fn": np.sum((labels == 1) & (answers != 1)),
                     "tn": np.sum((labels == 0) & (answers == 0)), "fp": np.sum((labels == 0) & (answers != 0)),
                     "unknown": np.sum(answers == 2), "predicted_yes": np.sum(answers == 1)})
    return UnitTable("pope", "image", tuple(f"img{i}" for i in range(n)),
                     {c: np.array([r[c] for r in rows], dtype=float) for c in COUNTS})


def reference_f1(counts: dict[str, np.ndarray]) -> np.ndarray:
    """POPE F1 from summed counts (plain numpy, yes positive, 0 for a zero denominator)."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    return np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)


def test_interval_matches_a_numpy_reference() -> None:
    table = pope_table(40)
    got = bootstrap_intervals(table, n_resamples=500, seed=3, level=0.9)["f1"]
    # reference: numpy default_rng(3).integers draws 500 x 40 image indices; each resample sums its images' counts
    draws = np.random.default_rng(3).integers(0, 40, size=(500, 40))
    resampled = {c: table.columns[c][draws].sum(axis=1) for c in COUNTS}
    low, high = np.quantile(reference_f1(resampled), [0.05, 0.95])
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
    point = reference_f1({c: table.columns[c].sum(keepdims=True) for c in COUNTS})[0]
    assert table.point()["f1"] == pytest.approx(point) and got.low <= point <= got.high


def test_strata_are_resampled_apart_in_name_order() -> None:
    strata = ("b", "a", "b", "a", "a")
    counts = resample_counts(5, 200, seed=7, strata=strata)
    rng = np.random.default_rng(7)  # stratum "a" (units 1, 3, 4) first, then "b" (units 0, 2)
    a, b = np.array([1, 3, 4]), np.array([0, 2])
    drawn_a, drawn_b = a[rng.integers(0, 3, size=(200, 3))], b[rng.integers(0, 2, size=(200, 2))]
    expected = np.stack([np.bincount(np.concatenate([ra, rb]), minlength=5) for ra, rb in zip(drawn_a, drawn_b)])
    assert (counts == expected).all()
    assert (counts[:, [1, 3, 4]].sum(1) == 3).all() and (counts[:, [0, 2]].sum(1) == 2).all()


def test_properties() -> None:
    small = pope_table(30, seed=1)
    four_times = UnitTable("pope", "image", tuple(f"{k}-{i}" for i in range(4) for k in small.keys),
                           {c: np.tile(v, 4) for c, v in small.columns.items()})
    assert four_times.point() == pytest.approx(small.point())
    narrow, wide = bootstrap_intervals(four_times), bootstrap_intervals(small)
    for name, interval in wide.items():
        assert interval.low <= small.point()[name] <= interval.high, name
        assert narrow[name].high - narrow[name].low < interval.high - interval.low, name
    constant = UnitTable("pope", "image", ("a", "b", "c"), {c: np.ones(3) for c in COUNTS})
    assert {(i.low, i.high) for i in bootstrap_intervals(constant, n_resamples=50).values()} == {
        (v, v) for v in constant.point().values() if v is not None}
    assert bootstrap_intervals(small, seed=1) == bootstrap_intervals(small, seed=1)
    assert bootstrap_intervals(small, seed=1) != bootstrap_intervals(small, seed=2)


def test_paired_difference() -> None:
    greedy = pope_table(50, seed=4)
    same = paired_differences(greedy, greedy.reordered(tuple(reversed(greedy.keys))))
    assert {(d.value, d.low, d.high) for d in same.values()} == {(0.0, 0.0, 0.0)}
    # a method answering every question right: accuracy 1 on every image, a difference well above 0
    perfect = {"tp": greedy.columns["tp"] + greedy.columns["fn"], "tn": greedy.columns["tn"] + greedy.columns["fp"]}
    perfect.update(fp=0 * perfect["tp"], fn=0 * perfect["tp"], unknown=0 * perfect["tp"],
                   predicted_yes=perfect["tp"])
    better = UnitTable("pope", "image", greedy.keys, perfect)
    d = paired_differences(greedy, better, n_resamples=300)["accuracy"]
    assert d.value == pytest.approx(1 - greedy.point()["accuracy"]) and d.low > 0
    # reference for the paired draws: the same image indices for both runs
    draws = np.random.default_rng(0).integers(0, 50, size=(300, 50))
    keys = sorted(greedy.keys)
    order = [greedy.keys.index(k) for k in keys]

    def accuracy(table: UnitTable) -> np.ndarray:
        cols = {c: table.columns[c][order][draws].sum(1) for c in COUNTS}
        return (cols["tp"] + cols["tn"]) / (cols["tp"] + cols["tn"] + cols["fp"] + cols["fn"])

    low, high = np.quantile(accuracy(better) - accuracy(greedy), [0.025, 0.975])
    assert (d.low, d.high) == pytest.approx((low, high))
    other = UnitTable("pope", "image", (*greedy.keys[:-1], "elsewhere"), dict(greedy.columns))
    with pytest.raises(EvalInputError, match="needs both runs on the same images; 2 differ"):
        paired_differences(greedy, other)


def test_bad_arguments() -> None:
    with pytest.raises(EvalInputError, match="at least one unit"):
        UnitTable("pope", "image", (), {})
    with pytest.raises(EvalInputError, match="`n_resamples` must be an int >= 1, got 0"):
        bootstrap_intervals(pope_table(3), n_resamples=0)
    with pytest.raises(EvalInputError, match=r"`level` must be a float in \(0, 1\)"):
        bootstrap_intervals(pope_table(3), level=95)
    with pytest.raises(EvalInputError, match="keys must be distinct"):
        UnitTable("pope", "image", ("a", "a"), {"tp": np.ones(2)})


# ------------------------------------------------------------------ each benchmark's units give its scorer's figures
WORDS = ["dog", "cat", "a", "car", "and", "the", "person", "bicycle", "on", "table.", "A dog.", "pizza"]


def flat(point: dict) -> dict:
    """The top-level metrics of a statistic's output (nested breakdowns have dotted names)."""
    return {name: value for name, value in point.items() if "." not in name}


def test_chair_units_give_the_scorer_figures() -> None:
    rng = np.random.default_rng(0)
    captions = [chair.Caption(i, " ".join(rng.choice(WORDS, size=rng.integers(0, 9)))) for i in range(25)]
    truth = {i: list(rng.choice(["dog", "cat", "car", "person"], size=rng.integers(0, 3), replace=False))
             for i in range(25)}
    report = chair.score_chair(captions, truth, chair.make_extractor())
    table = chair_units(report)
    point, overall = table.point(), asdict(report.overall)
    assert point == pytest.approx({name: overall[name] for name in point})
    assert table.keys == tuple(str(i) for i in range(25))
    assert bootstrap_intervals(table)["CHAIRi"].low <= report.overall.CHAIRi <= bootstrap_intervals(table)[
        "CHAIRi"].high


def test_pope_units_group_questions_by_image() -> None:
    rng = np.random.default_rng(1)
    questions = [pope.PopeQuestion(i, f"img{i // 3}.jpg", f"Is there a thing {i}?", ["yes", "no"][i % 2])
                 for i in range(60)]
    texts = ["Yes", "No", "maybe", "yes, there is"]
    answers = {q.question_id: texts[rng.integers(0, 4)] for q in questions[:-2]}  # a partial run
    with pytest.warns(UserWarning, match="2 of 60 questions have no answer"):
        scores = pope.score_pope(questions, answers, parser="exact")
    table = pope_units(questions, scores)
    assert len(table.keys) == 20 and table.columns["tp"].sum() == scores.counts.tp
    point = table.point()
    assert point == pytest.approx({k: getattr(scores, k) for k in point})


def test_mme_units_are_image_pairs_within_subtasks(tmp_path: Path) -> None:
    write_flat(tmp_path, "existence", tuple("abcde"))
    write_flat(tmp_path, "count", tuple("fgh"))
    questions = mme.load_mme_folder(tmp_path, subtasks=["existence", "count"])
    rng = np.random.default_rng(2)
    answers = {q.key: ["Yes", "No", "Not sure"][rng.integers(0, 3)] for q in questions}
    scores = mme.score_mme(questions, answers)
    table = mme_units(questions, scores)
    assert len(table.keys) == 8 and table.strata is not None and sorted(set(table.strata)) == ["count", "existence"]
    point = table.point()
    assert point["total"] == pytest.approx(scores.total)
    assert point["existence score"] == pytest.approx(scores.subtasks["existence"].score)
    assert point["unknown_rate"] == pytest.approx(scores.unknown_rate)
    counts = resample_counts(8, 100, 0, table.strata)
    assert (counts[:, [i for i, s in enumerate(table.strata) if s == "count"]].sum(1) == 3).all()


def test_hallusion_units_are_question_sets(tmp_path: Path) -> None:
    questions = hallusion.load_hallusion(write_bench(tmp_path))
    scores = hallusion.score_hallusion(questions, hallusion_answers())
    table = hallusion_units(questions, scores)
    assert table.keys == ("VD_illusion_0", "VS_chart_0")
    point = flat(table.point())  # the nested breakdowns: tests/test_bootstrap_breakdowns.py
    assert point == pytest.approx({"aAcc": scores.aacc, "fAcc": scores.facc, "qAcc": scores.qacc,
                                   "unknown_rate": scores.unknown_rate, "yes_ratio": scores.yes_ratio})


def test_amber_units_join_descriptions_and_questions_by_image(tmp_path: Path) -> None:
    data = amber.load_amber(write_amber(tmp_path))
    generative = amber.score_generative({1: R1, 2: R2}, data, amber.SimpleNouns(), amber.NoSimilarity())
    replies = ["No", "Yes", "Yes", "No", "No", "yes", "Yes", "No."]
    discriminative = amber.score_discriminative({4 + i: r for i, r in enumerate(replies)}, data)
    images = {1: "AMBER_1.jpg", 2: "AMBER_2.jpg", **{4 + i: f"AMBER_{1 + i % 2}.jpg" for i in range(8)}}
    table = amber_units(data, images, generative, discriminative)
    assert table.keys == ("AMBER_1.jpg", "AMBER_2.jpg")
    point = flat(table.point())
    overall = discriminative.groups["overall"]
    assert point == pytest.approx({"CHAIR": generative.chair, "Cover": generative.cover, "Hal": generative.hal,
                                   "Cog": generative.cog, "accuracy": overall["accuracy"],
                                   "precision": overall["precision"], "recall": overall["recall"], "f1": overall["f1"],
                                   "unknown_rate": discriminative.unknown_rate, "yes_ratio": discriminative.yes_ratio,
                                   "amber_score": amber.amber_score(generative, discriminative)})


# ------------------------------------------------------------------ the summary
def result(method: str, table: UnitTable, n_resamples: int = 200) -> dict:
    intervals = {k: v.to_json() for k, v in bootstrap_intervals(table, n_resamples=n_resamples).items()}
    return {"model": "toy", "method": method, "kind": "pope", "benchmark": "pope_random",
            "metrics": {k: v for k, v in table.point().items()}, "intervals": intervals,
            "bootstrap": {"method": "percentile", "unit": "image", "n_units": len(table.keys),
                          "n_resamples": n_resamples, "seed": 0, "level": 0.95},
            "fingerprint": {"method": {"name": method, "params": {}}}, "units": table.to_json()}


def test_summary_shows_intervals_and_paired_differences(tmp_path: Path) -> None:
    greedy = pope_table(40, seed=5)
    flipped = dict(greedy.columns, predicted_yes=greedy.columns["predicted_yes"] + greedy.columns["fn"],
                   tp=greedy.columns["tp"] + greedy.columns["fn"], fn=0 * greedy.columns["fn"])
    runs = [result("greedy", greedy), result("vcd", UnitTable("pope", "image", greedy.keys, flipped))]
    for job, run in enumerate(runs):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "result.json").write_text(json.dumps(run))
    text = write_summary(tmp_path)
    assert text is not None
    f1 = runs[0]["metrics"]["f1"]
    low, high = runs[0]["intervals"]["f1"]["low"], runs[0]["intervals"]["f1"]["high"]
    assert f"| toy | greedy | {f1:.3f} [{low:.3f}, {high:.3f}] |" in text
    section = text[text.index("## Paired difference to greedy"):]
    d = paired_differences(greedy, UnitTable.from_json(runs[1]["units"]), n_resamples=200)["f1"]
    assert d.low > 0  # every missed yes is now found: F1 rises on every resample
    assert f"| toy | vcd | {d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]* |" in section
    assert "| toy | greedy |" not in section
    rows = list(csv.reader((tmp_path / "summary.csv").open()))
    header = rows[0]
    assert header[header.index("pope_random f1") + 1:header.index("pope_random f1") + 3] == [
        "pope_random f1 low", "pope_random f1 high"]
    vcd = dict(zip(header, rows[2]))
    assert float(vcd["pope_random f1 diff to greedy"]) == pytest.approx(d.value)
    assert (float(vcd["pope_random f1 diff low"]), float(vcd["pope_random f1 diff high"])) == pytest.approx(
        (d.low, d.high))
    assert dict(zip(header, rows[1]))["pope_random f1 diff to greedy"] == ""


def test_bootstrap_settings_are_checked_before_loading(tmp_path: Path) -> None:
    from benchmarks.app import check_settings
    from benchmarks.uncertainty import interval_block

    from .test_app import composed

    base = ("model=toy_fast", f"results_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"`bootstrap.n_resamples` must be an int >= 1.*got 0"):
        check_settings(composed(*base, "bootstrap.n_resamples=0"))
    with pytest.raises(ValueError, match=r"`bootstrap.level` must be a finite number in \(0, 1\).*got 95"):
        check_settings(composed(*base, "bootstrap.level=95"))
    with pytest.raises(ValueError, match=r"`bootstrap.resamples` is not a bootstrap setting; it knows n_resamples"):
        check_settings(composed(*base, "+bootstrap.resamples=10"))
    # a metric the run leaves undefined (None) or does not report gets no interval
    table = pope_table(10)
    metrics = {**table.point(), "precision": None}
    metrics.pop("recall")
    block = interval_block(table, metrics, {"n_resamples": 100, "seed": 3, "level": 0.9})
    assert set(block["intervals"]) == {"accuracy", "f1", "yes_ratio", "unknown_rate"}
    assert block["bootstrap"] == {"method": "percentile", "unit": "image", "n_units": 10, "n_resamples": 100,
                                  "seed": 3, "level": 0.9}
    assert UnitTable.from_json(json.loads(json.dumps(block["units"]))).point() == table.point()
