"""Bootstrap intervals of the nested breakdowns (AMBER per dimension and attribute type, MME per subtask,
HallusionBench per category, subcategory, easy/hard, image/text-only): on the run itself the statistic gives back
each scorer's nested figure exactly, and each interval equals a plain-numpy reference that resamples the same units
with the same seeded draws and recomputes the figure from the items of the drawn units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.uncertainty import interval_block, metric_value
from vlmfix.eval import amber, hallusion, mme
from vlmfix.eval.bootstrap import UnitTable, bootstrap_intervals, statistic
from vlmfix.eval.unit_counts import amber_units, hallusion_units, mme_units
from vlmfix.eval.yesno import NO, UNKNOWN, YES

from .test_mme import write_flat

R, SEED, LEVEL = 300, 7, 0.9


def nested(point: dict) -> dict:
    return {name: value for name, value in point.items() if "." in name}


def quantiles(values: list[float]) -> tuple[float, float]:
    """The percentile interval of the finite values (plain numpy)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    low, high = np.quantile(finite, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(low), float(high)


def share(hits: int, total: int, empty: float = 0.0) -> float:
    return hits / total if total else empty


def no_positive_f1(pairs: list[tuple[str, str]]) -> float:
    """AMBER's F1 with "No" positive over (truth, prediction) pairs, 0 for an empty denominator."""
    hit = sum(t == NO and p == NO for t, p in pairs)
    precision, recall = share(hit, sum(p == NO for _, p in pairs)), share(hit, sum(t == NO for t, _ in pairs))
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# ------------------------------------------------------------------ MME: per subtask, resampled within subtasks
@pytest.fixture
def mme_run(tmp_path: Path):
    write_flat(tmp_path, "existence", tuple("abcdefg"))
    write_flat(tmp_path, "count", tuple("hijk"))
    questions = mme.load_mme_folder(tmp_path, subtasks=["existence", "count"])
    rng = np.random.default_rng(2)
    answers = {q.key: ["Yes", "No", "Not sure"][rng.integers(0, 3)] for q in questions}
    return questions, mme.score_mme(questions, answers)


def test_mme_breakdown_gives_back_the_scorer(mme_run) -> None:
    questions, scores = mme_run
    point = nested(mme_units(questions, scores).point())
    metrics = {"mme": scores.to_json()}
    for subtask in ("existence", "count"):
        for name in ("acc", "acc_plus", "score", "other_rate", "unknown_rate", "yes_ratio"):
            assert f"mme.subtasks.{subtask}.{name}" in point
    assert {name: metric_value(metrics, name) for name in point} == pytest.approx(point)


def test_mme_subtask_interval_matches_a_numpy_reference(mme_run) -> None:
    questions, scores = mme_run
    table = mme_units(questions, scores)
    got = bootstrap_intervals(table, n_resamples=R, seed=SEED, level=LEVEL)
    # reference: one generator; count's images drawn first, then existence's (name order), each within its subtask
    images = {t: sorted({q.image for q in questions if q.subtask == t},
                        key=lambda image: table.keys.index(f"{t}/{image}")) for t in ("count", "existence")}
    rng = np.random.default_rng(SEED)
    draws = {t: rng.integers(0, len(images[t]), size=(R, len(images[t]))) for t in sorted(images)}
    for t in ("count", "existence"):
        accs, pluses = [], []
        for r in range(R):
            drawn = [images[t][i] for i in draws[t][r]]
            pairs = [[q for q in questions if q.subtask == t and q.image == image] for image in drawn]
            right = [[scores.predictions[q.key] == q.answer for q in pair] for pair in pairs]
            accs.append(share(sum(map(sum, right)), sum(map(len, right))))
            pluses.append(share(sum(map(all, right)), len(right)))
        assert (got[f"mme.subtasks.{t}.acc"].low, got[f"mme.subtasks.{t}.acc"].high) == pytest.approx(quantiles(accs))
        scores_100 = [100 * a + 100 * p for a, p in zip(accs, pluses)]
        interval = got[f"mme.subtasks.{t}.score"]
        assert (interval.low, interval.high) == pytest.approx(quantiles(scores_100))


# ------------------------------------------------------------------ HallusionBench: per category etc., unit = set
def hallusion_rows() -> list[dict]:
    """Eight question sets over two categories and three subcategories, original and edited figures, text-only
    questions in VS."""
    rows = []
    for s, (category, sub) in enumerate([("VD", "illusion"), ("VD", "illusion"), ("VD", "math"), ("VD", "math"),
                                         ("VS", "chart"), ("VS", "chart"), ("VS", "table"), ("VS", "table")]):
        for figure in ("0", "1", "2"):
            no_image = category == "VS" and figure == "0"
            for q in ("0", "1"):
                rows.append({"category": category, "subcategory": sub, "set_id": str(s), "figure_id": figure,
                             "question_id": q, "visual_input": "0" if no_image else ("2" if figure == "2" else "1"),
                             "sample_note": "", "question": f"Q {s} {figure} {q}?", "gt_answer_details": "",
                             "gt_answer": str((s + int(figure) + int(q)) % 2),
                             "filename": None if no_image else f"./{category}/{sub}/{s}_{figure}.png"})
    return rows


@pytest.fixture
def hallusion_run(tmp_path: Path):
    (tmp_path / "HallusionBench.json").write_text(json.dumps(hallusion_rows()))
    questions = hallusion.load_hallusion(tmp_path)
    rng = np.random.default_rng(4)
    answers = {q.key: ["Yes", "No", "I cannot tell."][rng.integers(0, 3)] for q in questions}
    del answers[questions[5].key]  # one missing answer: wrong in its figure and group, out of aAcc
    return questions, hallusion.score_hallusion(questions, answers)


def test_hallusion_breakdown_gives_back_the_scorer(hallusion_run) -> None:
    questions, scores = hallusion_run
    point = nested(hallusion_units(questions, scores).point())
    metrics = {"hallusion": scores.to_json()}
    expected = {f"hallusion.{name}" for name in ("aAcc", "fAcc", "qAcc", "easy_aAcc", "hard_aAcc", "image_aAcc",
                                                 "text_only_aAcc", "unknown_rate", "yes_ratio")}
    expected |= {f"hallusion.by_category.{c}.{m}" for c in ("VD", "VS") for m in ("aAcc", "unknown_rate")}
    expected |= {f"hallusion.by_subcategory.{s}" for s in ("VD_illusion", "VD_math", "VS_chart", "VS_table")}
    assert set(point) == expected
    assert {name: metric_value(metrics, name) for name in point} == pytest.approx(point)


def test_hallusion_breakdown_interval_matches_a_numpy_reference(hallusion_run) -> None:
    questions, scores = hallusion_run
    table = hallusion_units(questions, scores)
    got = bootstrap_intervals(table, n_resamples=R, seed=SEED, level=LEVEL)
    sets = [[q for q in questions if f"{q.category}_{q.subcategory}_{q.set_id}" == key] for key in table.keys]
    draws = np.random.default_rng(SEED).integers(0, len(sets), size=(R, len(sets)))
    vd, chart, hard = [], [], []
    for row in draws:
        drawn = [sets[i] for i in row]
        answered = [q for members in drawn for q in members if q.key in scores.predictions]
        in_vd = [q for q in answered if q.category == "VD"]
        vd.append(share(sum(scores.correct[q.key] for q in in_vd), len(in_vd), np.nan))  # absent: undefined
        in_chart = [q for q in answered if q.subcategory == "chart"]
        chart.append(share(sum(scores.correct[q.key] for q in in_chart), len(in_chart), np.nan))
        groups = []  # hard groups of each drawn set (a set drawn twice counts twice)
        for members in drawn:
            keys = sorted({q.group_key for q in members if q.visual_input == "2"})
            groups += [all(scores.correct[q.key] for q in members if q.group_key == k and q.visual_input == "2")
                       for k in keys]
        hard.append(share(sum(groups), len(groups)))
    for name, values in (("hallusion.by_category.VD.aAcc", vd), ("hallusion.by_subcategory.VS_chart", chart),
                         ("hallusion.hard_aAcc", hard)):
        assert (got[name].low, got[name].high) == pytest.approx(quantiles(values)), name


# ------------------------------------------------------------------ AMBER: per dimension, unit = image
TYPES = ["discriminative-hallucination", "discriminative-attribute-state", "discriminative-attribute-number",
         "discriminative-attribute-action", "discriminative-relation", "relation"]


@pytest.fixture
def amber_run(tmp_path: Path):
    """Ten images, each described once and asked one question of every type."""
    rng = np.random.default_rng(5)
    annotations, generative, discriminative, images = [], [], [], {}
    for image in range(1, 11):
        annotations.append({"id": len(annotations) + 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]})
        generative.append({"id": len(annotations), "image": f"AMBER_{image}.jpg", "query": "Describe this image."})
        images[len(annotations)] = f"AMBER_{image}.jpg"
    for image in range(1, 11):
        for kind in TYPES:
            truth = "no" if kind in ("discriminative-hallucination", "relation") else ["yes", "no"][rng.integers(0, 2)]
            annotations.append({"id": len(annotations) + 1, "type": kind, "truth": truth})
            discriminative.append({"id": len(annotations), "image": f"AMBER_{image}.jpg", "query": "Is it?"})
            images[len(annotations)] = f"AMBER_{image}.jpg"
    (tmp_path / "data" / "query").mkdir(parents=True)
    (tmp_path / "data" / "annotations.json").write_text(json.dumps(annotations))
    (tmp_path / "data" / "relation.json").write_text(json.dumps({"dog": [], "cat": []}))
    (tmp_path / "data" / "safe_words.txt").write_text("")
    (tmp_path / "data" / "query" / "query_generative.json").write_text(json.dumps(generative))
    (tmp_path / "data" / "query" / "query_discriminative.json").write_text(json.dumps(discriminative))
    data = amber.load_amber(tmp_path)
    descriptions = {q["id"]: ["A dog.", "A dog and a cat.", "A cat."][rng.integers(0, 3)] for q in generative}
    replies = {q["id"]: ["Yes", "No", "Maybe"][rng.integers(0, 3)] for q in discriminative}
    gen = amber.score_generative(descriptions, data, amber.SimpleNouns(), amber.NoSimilarity())
    disc = amber.score_discriminative(replies, data)
    return data, images, gen, disc


def test_amber_breakdown_gives_back_the_scorer(amber_run) -> None:
    data, images, gen, disc = amber_run
    point = nested(amber_units(data, images, gen, disc).point())
    metrics = {"generative": gen.to_json(), "discriminative": disc.to_json()}
    groups = ("overall", "existence", "attribute", "relation", "state", "number", "action")
    expected = {f"discriminative.{g}.{m}" for g in groups for m in ("accuracy", "precision", "recall", "f1")}
    expected |= {"discriminative.unknown_rate", "discriminative.yes_ratio"}
    expected |= {f"generative.{m}" for m in ("chair", "cover", "hal", "cog")}
    assert set(point) == expected
    assert {name: metric_value(metrics, name) for name in point} == pytest.approx(point)


def test_amber_dimension_interval_matches_a_numpy_reference(amber_run) -> None:
    data, images, gen, disc = amber_run
    table = amber_units(data, images, gen, disc)
    got = bootstrap_intervals(table, n_resamples=R, seed=SEED, level=LEVEL)
    by_image = {key: [i for i, image in images.items() if image == key and i in disc.predictions]
                for key in table.keys}
    draws = np.random.default_rng(SEED).integers(0, len(table.keys), size=(R, len(table.keys)))
    types = {"existence": TYPES[:1], "attribute": TYPES[1:4], "relation": TYPES[4:]}
    for dimension, kinds in types.items():
        f1s, accuracies = [], []
        for row in draws:
            entries = [i for k in row for i in by_image[table.keys[k]] if data.entry(i).type in kinds]
            pairs = [(data.entry(i).truth, disc.predictions[i]) for i in entries]
            f1s.append(no_positive_f1(pairs))
            accuracies.append(share(sum(t == p and p in (YES, NO) for t, p in pairs), len(pairs)))
        name = f"discriminative.{dimension}"
        assert (got[f"{name}.f1"].low, got[f"{name}.f1"].high) == pytest.approx(quantiles(f1s)), dimension
        assert (got[f"{name}.accuracy"].low, got[f"{name}.accuracy"].high) == pytest.approx(quantiles(accuracies))
    assert UNKNOWN in disc.predictions.values()  # "Maybe": wrong, and not an answered No


def test_result_json_intervals_name_nested_figures_by_path(amber_run) -> None:
    data, images, gen, disc = amber_run
    metrics = {"f1": disc.f1, "discriminative": disc.to_json(), "generative": gen.to_json(), "similarity": "none"}
    block = interval_block(amber_units(data, images, gen, disc), metrics, {"n_resamples": 50, "seed": 0, "level": 0.95})
    wanted = {"f1", "discriminative.existence.f1", "discriminative.state.recall", "generative.chair"}
    assert wanted <= set(block["intervals"])
    assert "CHAIR" not in block["intervals"]  # not among these metrics
    old = UnitTable.from_json({**block["units"], "columns": {k: v for k, v in block["units"]["columns"].items()
                                                             if not k.startswith("d.")}})
    assert not any(name.startswith("discriminative.existence") for name in old.point())  # older units: flat only


# ------------------------------------------------------------------ overall figures: computed once, shared
def resampled_sums(table: UnitTable, n: int = 40) -> dict[str, np.ndarray]:
    """The summed columns of `n` seeded resamples ([n] per column), as the bootstrap feeds a statistic."""
    draws = np.random.default_rng(SEED).integers(0, len(table.keys), size=(n, len(table.keys)))
    counts = np.stack([np.bincount(row, minlength=len(table.keys)) for row in draws])  # [n, units]
    return {name: counts @ np.asarray(values, dtype=float) for name, values in table.columns.items()}


def test_amber_overall_figures_are_computed_once(amber_run) -> None:
    data, images, gen, disc = amber_run
    table = amber_units(data, images, gen, disc)
    sums = resampled_sums(table)
    out = statistic("amber")(sums)
    for name in ("accuracy", "precision", "recall", "f1"):
        assert out[f"discriminative.overall.{name}"] is out[name], name  # the flat array itself, not a recount
    # and the shared figures are the "No"-positive ones of the summed overall counters (plain numpy, per resample)
    for r in range(len(sums["d_n"])):
        hit, said_no, truth_no = sums["d_no_hit"][r], sums["d_answered_no"][r], sums["d_truth_no"][r]
        precision, recall = share(hit, said_no), share(hit, truth_no)
        reference_f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert (out["accuracy"][r], out["precision"][r], out["recall"][r], out["f1"][r]) == pytest.approx(
            (share(sums["d_correct"][r], sums["d_n"][r]), precision, recall, reference_f1))
    assert out["amber_score"] == pytest.approx((1 - out["CHAIR"] + out["f1"]) / 2)


def test_mme_subtask_scores_are_computed_once(mme_run) -> None:
    questions, scores = mme_run
    sums = resampled_sums(mme_units(questions, scores))
    out = statistic("mme")(sums)
    for subtask in ("existence", "count"):
        assert out[f"mme.subtasks.{subtask}.score"] is out[f"{subtask} score"], subtask
        acc = [share(c, n) for c, n in zip(sums[f"{subtask}.correct"], sums[f"{subtask}.asked"])]
        acc_plus = [share(b, n) for b, n in zip(sums[f"{subtask}.both"], sums[f"{subtask}.images"])]
        assert out[f"{subtask} score"] == pytest.approx([100 * a + 100 * p for a, p in zip(acc, acc_plus)])
        assert out[f"mme.subtasks.{subtask}.acc"] == pytest.approx(acc)
    assert out["total"] == pytest.approx(out["existence score"] + out["count score"])
