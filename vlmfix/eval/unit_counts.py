"""Each benchmark's per-unit counts, from its scorer's per-item output, and its metrics from summed counts.

A `UnitTable` row is one resampling unit with every count the benchmark's corpus metrics sum; the statistic
registered under the benchmark's name turns summed counts (one per resample) back into the metrics, by the same
formulas as the scorer (the same zero-denominator rules: POPE, AMBER, MME and HallusionBench give 0, CHAIR
undefined). On the run itself (every unit once) a statistic gives exactly the scorer's figures.

Units:

* CHAIR and AMBER: an image (its caption; for AMBER also its yes/no questions).
* POPE: an image with all its questions.
* MME: an image with its two questions (acc+ pairs them), resampled within its subtask (the total sums per-subtask
  scores, so each subtask keeps its image count).
* HallusionBench: a question set (category, subcategory, set_id): the smallest unit that holds whole figures (fAcc)
  and whole question groups (qAcc), the same one `limit` keeps whole.

Nested breakdowns are resampled with the same units and draws: a statistic also returns them under the dotted path
of the figure in the run's metrics (`discriminative.existence.f1` for AMBER's existence F1, `mme.subtasks.count.acc`,
`hallusion.by_category.VD.aAcc`, `hallusion.easy_aAcc`). A group the scorer leaves out when it has no answered
question (HallusionBench's categories and subcategories) is undefined (NaN) in a resample that draws none of its
units; every other figure keeps the scorer's zero rule. AMBER's `as_printed` block (the script's rounding and 0.001
seeds) gets no interval. Units recorded before a breakdown's columns existed give only the flat metrics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np

from vlmfix.eval.amber.data import AmberData
from vlmfix.eval.amber.discriminative import TYPE_GROUPS, DiscriminativeScores
from vlmfix.eval.amber.generative import GenerativeScores
from vlmfix.eval.bootstrap import STATISTICS, UnitTable, f1, ratio
from vlmfix.eval.chair.score import ChairReport
from vlmfix.eval.hallusion import HallusionQuestion, HallusionScores
from vlmfix.eval.mme import MmeQuestion, MmeScores, check_pairs
from vlmfix.eval.pope.questions import PopeQuestion
from vlmfix.eval.pope.score import PopeScores, count_outcomes
from vlmfix.eval.yesno import NO, UNKNOWN, YES

Sums = Mapping[str, np.ndarray]


def _table(statistic: str, unit: str, rows: Mapping[str, Mapping[str, float]],
           strata: Sequence[str] | None = None) -> UnitTable:
    names = list(dict.fromkeys(name for row in rows.values() for name in row))
    columns = {name: np.asarray([row.get(name, 0) for row in rows.values()], dtype=float) for name in names}
    return UnitTable(statistic, unit, tuple(map(str, rows)), columns, tuple(strata) if strata is not None else None)


# ------------------------------------------------------------------ CHAIR
def chair_units(report: ChairReport) -> UnitTable:
    """One row per image: its caption's counts (`CaptionScore.counts`)."""
    return _table("chair", "image", {str(s.image_id): s.counts() for s in report.sentences})


@STATISTICS.register("chair")
def chair_metrics(s: Sums) -> dict[str, np.ndarray]:
    """`corpus_metrics` from summed caption counts; NaN where the scorer says None."""
    precision, recall = ratio(s["found"], s["unique"]), ratio(s["found"], s["gt"])
    return {"CHAIRs": ratio(s["hallucinating"], s["captions"]), "CHAIRi": ratio(s["hallucinated"], s["mentions"]),
            "Recall": recall, "Precision": precision, "F1": f1(precision, recall),
            "Len": ratio(s["words"], s["captions"]), "mean_words": ratio(s["whitespace_words"], s["captions"]),
            "repeated_sentence_rate": ratio(s["repeated_sentences"], s["sentences"])}


# ------------------------------------------------------------------ POPE
def pope_units(questions: Sequence[PopeQuestion], scores: PopeScores) -> UnitTable:
    """One row per image: the confusion counts (`count_outcomes`) of its answered questions."""
    by_image: dict[str, list[PopeQuestion]] = defaultdict(list)
    for q in questions:
        by_image[q.image].append(q)
    rows = {}
    for image, members in by_image.items():
        answered = [q for q in members if q.question_id in scores.predictions]
        counts = count_outcomes([q.label for q in answered], [scores.predictions[q.question_id] for q in answered])
        rows[image] = asdict(counts)
    return _table("pope", "image (all its questions)", rows)


@STATISTICS.register("pope")
def pope_metrics(s: Sums) -> dict[str, np.ndarray]:
    """`metrics_from_counts` from summed confusion counts (0 for a zero denominator, as the scorer)."""
    n = s["tp"] + s["fp"] + s["tn"] + s["fn"]
    precision, recall = ratio(s["tp"], s["tp"] + s["fp"], 0.0), ratio(s["tp"], s["tp"] + s["fn"], 0.0)
    return {"accuracy": ratio(s["tp"] + s["tn"], n, 0.0), "precision": precision, "recall": recall,
            "f1": f1(precision, recall), "yes_ratio": ratio(s["predicted_yes"], n, 0.0),
            "unknown_rate": ratio(s["unknown"], n, 0.0)}


# ------------------------------------------------------------------ MME
def mme_units(questions: Sequence[MmeQuestion], scores: MmeScores) -> UnitTable:
    """One row per image pair (subtask/image), stratified by subtask: its answered and correct questions, whether
    both are correct, its unknown and yes answers (also per subtask, for the breakdown)."""
    rows, strata = {}, []
    for (subtask, image), pair in check_pairs(questions).items():
        answered = [q for q in pair if q.key in scores.predictions]
        correct = [q for q in answered if scores.predictions[q.key] == q.answer]
        unknown = sum(scores.predictions[q.key] == UNKNOWN for q in answered)
        yes = sum(scores.predictions[q.key] == YES for q in answered)
        rows[f"{subtask}/{image}"] = {
            f"{subtask}.images": 1, f"{subtask}.asked": len(answered), f"{subtask}.correct": len(correct),
            f"{subtask}.both": int(len(correct) == len(pair)), f"{subtask}.unknown": unknown, f"{subtask}.yes": yes,
            "asked": len(answered), "unknown": unknown, "yes": yes}
        strata.append(subtask)
    return _table("mme", "image pair (within its subtask)", rows, strata)


@STATISTICS.register("mme")
def mme_metrics(s: Sums) -> dict[str, np.ndarray]:
    """Per subtask score = 100 acc + 100 acc+, the total, and the answer rates (`score_mme`); each subtask's acc
    and acc+ are computed once, for the flat score and the `mme.subtasks.*` breakdown alike."""
    subtasks = sorted(name.removesuffix(".images") for name in s if name.endswith(".images"))
    accs = {t: (ratio(s[f"{t}.correct"], s[f"{t}.asked"], 0.0), ratio(s[f"{t}.both"], s[f"{t}.images"], 0.0))
            for t in subtasks}  # subtask -> (acc, acc+), each [n_resamples]
    scores = {f"{t} score": 100 * acc + 100 * acc_plus for t, (acc, acc_plus) in accs.items()}
    out = {"total": sum(scores.values(), np.zeros_like(s["asked"])), **scores,
           "unknown_rate": ratio(s["unknown"], s["asked"], 0.0), "yes_ratio": ratio(s["yes"], s["asked"], 0.0)}
    return {**out, **_mme_breakdown(s, accs, out)}


def _mme_breakdown(s: Sums, accs: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`mme.*` as `MmeScores.to_json` nests it: per subtask acc, acc_plus, score (the flat figures, not computed
    again), other_rate, yes_ratio."""
    out = {f"mme.{name}": flat[name] for name in ("total", "unknown_rate", "yes_ratio")}
    for t, (acc, acc_plus) in accs.items():
        if f"{t}.unknown" not in s:  # units recorded before the per-subtask answer counts
            continue
        other = ratio(s[f"{t}.unknown"], s[f"{t}.asked"], 0.0)
        out.update({f"mme.subtasks.{t}.acc": acc, f"mme.subtasks.{t}.acc_plus": acc_plus,
                    f"mme.subtasks.{t}.score": flat[f"{t} score"], f"mme.subtasks.{t}.other_rate": other,
                    f"mme.subtasks.{t}.unknown_rate": other,
                    f"mme.subtasks.{t}.yes_ratio": ratio(s[f"{t}.yes"], s[f"{t}.asked"], 0.0)})
    return out


# ------------------------------------------------------------------ HallusionBench
def hallusion_units(questions: Sequence[HallusionQuestion], scores: HallusionScores) -> UnitTable:
    """One row per question set: answered / correct questions, figures and question groups (all, easy, hard)
    with how many are wholly correct (`scores.correct`), and its unknown and yes answers."""
    by_set: dict[str, list[HallusionQuestion]] = defaultdict(list)
    for q in questions:
        by_set[f"{q.category}_{q.subcategory}_{q.set_id}"].append(q)
    rows = {}
    for key, members in by_set.items():
        answered = [q for q in members if q.key in scores.predictions]
        row = {"answered": len(answered), "correct": sum(scores.correct[q.key] for q in answered),
               "unknown": sum(scores.predictions[q.key] == UNKNOWN for q in answered),
               "yes": sum(scores.predictions[q.key] == YES for q in answered)}
        for name, kept, group in (("figures", [q for q in members if not q.no_visual], "figure_key"),
                                  ("groups", members, "group_key"),
                                  ("easy_groups", [q for q in members if q.visual_input != "2"], "group_key"),
                                  ("hard_groups", [q for q in members if q.visual_input == "2"], "group_key")):
            wholly: dict[str, bool] = {}
            for q in kept:
                wholly[getattr(q, group)] = wholly.get(getattr(q, group), True) and scores.correct[q.key]
            row[name], row[f"{name}_correct"] = len(wholly), sum(wholly.values())
        first = members[0]  # a set lies in one category and subcategory
        for name, kept in (("image", [q for q in answered if q.image_path is not None]),
                           ("text", [q for q in answered if q.image_path is None]),
                           (f"cat.{first.category}", answered),
                           (f"sub.{first.category}_{first.subcategory}", answered)):
            row[f"{name}.answered"] = len(kept)
            row[f"{name}.correct"] = sum(scores.correct[q.key] for q in kept)
            row[f"{name}.unknown"] = sum(scores.predictions[q.key] == UNKNOWN for q in kept)
        rows[key] = row
    return _table("hallusion", "question set (category, subcategory, set_id)", rows)


@STATISTICS.register("hallusion")
def hallusion_metrics(s: Sums) -> dict[str, np.ndarray]:
    """aAcc, fAcc, qAcc and the answer rates (`score_hallusion`)."""
    out = {"aAcc": ratio(s["correct"], s["answered"], 0.0), "fAcc": ratio(s["figures_correct"], s["figures"], 0.0),
           "qAcc": ratio(s["groups_correct"], s["groups"], 0.0),
           "unknown_rate": ratio(s["unknown"], s["answered"], 0.0), "yes_ratio": ratio(s["yes"], s["answered"], 0.0)}
    return {**out, **_hallusion_breakdown(s, out)}


def _hallusion_breakdown(s: Sums, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`hallusion.*` as `HallusionScores.to_json` nests it: easy / hard aAcc (per question group), image and
    text-only aAcc, per category aAcc and unknown rate, per subcategory aAcc (NaN where a resample has none)."""
    out = {f"hallusion.{name}": values for name, values in flat.items()}
    if "easy_groups" not in s:  # units recorded before the breakdown columns
        return out
    out.update({"hallusion.easy_aAcc": ratio(s["easy_groups_correct"], s["easy_groups"], 0.0),
                "hallusion.hard_aAcc": ratio(s["hard_groups_correct"], s["hard_groups"], 0.0),
                "hallusion.image_aAcc": ratio(s["image.correct"], s["image.answered"], 0.0),
                "hallusion.text_only_aAcc": ratio(s["text.correct"], s["text.answered"], 0.0)})
    for column in s:
        if column.startswith("cat.") and column.endswith(".answered"):
            c = column.removeprefix("cat.").removesuffix(".answered")
            out[f"hallusion.by_category.{c}.aAcc"] = ratio(s[f"cat.{c}.correct"], s[column])
            out[f"hallusion.by_category.{c}.unknown_rate"] = ratio(s[f"cat.{c}.unknown"], s[column])
        elif column.startswith("sub.") and column.endswith(".answered"):
            name = column.removeprefix("sub.").removesuffix(".answered")
            out[f"hallusion.by_subcategory.{name}"] = ratio(s[f"sub.{name}.correct"], s[column])
    return out


# ------------------------------------------------------------------ AMBER
def amber_units(data: AmberData, images: Mapping[int, str], generative: GenerativeScores | None,
                discriminative: DiscriminativeScores | None) -> UnitTable:
    """One row per image: its description's outcome counts (`GenerativeScores.outcomes`) and its yes/no
    answers' counters (`DiscriminativeScores.predictions`, "No" positive). `images`: AMBER id -> image name of
    every query the run asked (images without an answer stay in, with zero counts)."""
    rows: dict[str, dict[str, float]] = {image: {} for image in dict.fromkeys(images.values())}

    def add(image: str, **counts: float) -> None:
        for name, value in counts.items():
            rows[image][name] = rows[image].get(name, 0) + value

    for o in generative.outcomes if generative is not None else ():
        add(images[o.id], responses=1, nouns=len(o.nouns), hallucinated=sum(o.hallucinated),
            clean=int(not any(o.hallucinated)), truth=len(o.truth_credited), covered=sum(o.truth_credited),
            hallu=len(o.hallu_credited), cognized=sum(o.hallu_credited))
    for entry_id, prediction in (discriminative.predictions if discriminative is not None else {}).items():
        entry = data.entry(entry_id)
        truth, group = entry.truth, TYPE_GROUPS.get(entry.type, "relation")
        counters = {"n": 1, "correct": int(prediction == truth and prediction in (YES, NO)),
                    "truth_no": int(truth == NO), "answered_no": int(prediction == NO),
                    "no_hit": int(prediction == NO and truth == NO)}
        add(images[entry_id], **{f"d_{name}": value for name, value in counters.items()},
            d_unknown=int(prediction == UNKNOWN), d_yes=int(prediction == YES))
        add(images[entry_id], **{f"d.{group}.{name}": value for name, value in counters.items()})
    return _table("amber", "image (its description and yes/no questions)", rows)


@STATISTICS.register("amber")
def amber_metrics(s: Sums) -> dict[str, np.ndarray]:
    """CHAIR, Cover, Hal, Cog; overall accuracy, P, R, F1 ("No" positive) and answer rates; the AMBER score. The
    overall yes/no figures are computed once, for the flat metrics and `discriminative.overall.*` alike."""
    out: dict[str, np.ndarray] = {}
    if "responses" in s:
        out.update(CHAIR=ratio(s["hallucinated"], s["nouns"], 0.0), Cover=ratio(s["covered"], s["truth"], 0.0),
                   Hal=ratio(s["responses"] - s["clean"], s["responses"], 0.0),
                   Cog=ratio(s["cognized"], s["hallu"], 0.0))
    overall = None
    if "d_n" in s:
        overall = _no_positive({c: s[f"d_{c}"] for c in AMBER_COUNTERS})
        out.update(overall, unknown_rate=ratio(s["d_unknown"], s["d_n"], 0.0),
                   yes_ratio=ratio(s["d_yes"], s["d_n"], 0.0))
    if "CHAIR" in out and "f1" in out:
        out["amber_score"] = (1 - out["CHAIR"] + out["f1"]) / 2
    return {**out, **_amber_breakdown(s, out, overall)}


AMBER_TYPE_GROUPS = ("existence", "relation", "state", "number", "action")  # the scorer's per-type counters
AMBER_COUNTERS = ("n", "correct", "truth_no", "answered_no", "no_hit")


def _no_positive(c: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """accuracy, precision, recall, F1 with "No" positive from one group's summed counters (0 for an empty
    denominator, as the scorer)."""
    precision, recall = ratio(c["no_hit"], c["answered_no"], 0.0), ratio(c["no_hit"], c["truth_no"], 0.0)
    return {"accuracy": ratio(c["correct"], c["n"], 0.0), "precision": precision, "recall": recall,
            "f1": f1(precision, recall)}


def _amber_breakdown(s: Sums, flat: Mapping[str, np.ndarray],
                     overall: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """`generative.*` and `discriminative.*` as the scorers' `to_json` nest them: per dimension (existence,
    attribute = state + number + action, relation) and per attribute type, accuracy, P, R, F1 with "No" positive;
    `overall` is the flat figures' own block, not computed again."""
    out = {f"generative.{name.lower()}": flat[name] for name in ("CHAIR", "Cover", "Hal", "Cog") if name in flat}
    if overall is None:
        return out
    out.update({"discriminative.unknown_rate": flat["unknown_rate"], "discriminative.yes_ratio": flat["yes_ratio"]})
    if not any(name.startswith("d.") for name in s):  # units recorded before the per-type counters
        return out
    zeros = np.zeros_like(s["d_n"])
    counts = {group: {c: s.get(f"d.{group}.{c}", zeros) for c in AMBER_COUNTERS} for group in AMBER_TYPE_GROUPS}
    counts["attribute"] = {c: sum((counts[t][c] for t in ("state", "number", "action")), zeros)
                           for c in AMBER_COUNTERS}
    figures = {**{group: _no_positive(c) for group, c in counts.items()}, "overall": overall}
    for group, block in figures.items():
        out.update({f"discriminative.{group}.{name}": value for name, value in block.items()})
    return out
