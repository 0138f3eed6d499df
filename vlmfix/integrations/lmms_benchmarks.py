"""What each lmms-eval task written by vlmfix holds and how it is scored: POPE, AMBER (generative and
discriminative), the MME hallucination subset and HallusionBench. No lmms-eval import.

A *builder* turns a benchmark's loaded data into a `TaskContent`: the docs lmms-eval iterates (key, image,
prompt, target), the question fields the scorer needs, the settings (parser, ...), the fingerprint prompt and
the benchmark's fingerprint section, built by the same `vlmfix.eval.*_protocol` functions as the benchmark
app's runner. A *scorer* turns a task's settings, questions and the answers lmms-eval collected
(key -> raw text) into the task's metrics (with the names the app's result.json uses) and its fingerprint
section as scored (AMBER's similarity backend and data hashes are the ones of the scoring process).
Items, prompts and the `limit` rule come from `vlmfix.eval.items`, which the app's `benchmarks/release_kinds.py`
calls too, so both ask the same questions and the numbers are equal.
lmms-eval's own `--limit` answers the first docs only: POPE and AMBER score the answered questions, MME and
HallusionBench count the unanswered ones wrong (pairs and groups need every member); cap a task with
`write-tasks --limit` (the app's rule) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfix.eval import amber, hallusion, mme, pope
from vlmfix.eval.fingerprint import amber_protocol, hallusion_protocol, mme_protocol, pope_protocol
from vlmfix.eval.items import AMBER_PARTS, amber_items, hallusion_items, mme_items
from vlmfix.eval.yesno import PARSERS as YESNO_PARSERS
from vlmfix.validation import choice, number, text


@dataclass(frozen=True)
class TaskContent:
    """One task's content, as written to its folder.

    Args:
        benchmark: pope, amber_generative, amber_discriminative, mme or hallusion (a key of `SCORERS`).
        section: the fingerprint section it fills (pope, amber, mme, hallusion).
        docs: lmms-eval's documents, {key, image (absolute path or None), prompt, target}.
        questions: the question fields the scorer reads back (plain JSON).
        settings: the scoring settings (parser, ...; plain JSON).
        prompt: the fingerprint's prompt (as the app records it).
        protocol: the fingerprint section at write time.
        metrics: the task's metric names, without lmms-eval's prefix.
    """

    benchmark: str
    section: str
    docs: list[dict[str, Any]]
    questions: list[dict[str, Any]]
    settings: dict[str, Any]
    prompt: str
    protocol: dict[str, Any]
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class Scored:
    metrics: dict[str, Any]
    protocol: dict[str, Any] = field(default_factory=dict)


def _image(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def check_images(content: TaskContent, name: str) -> None:
    missing = [doc["image"] for doc in content.docs if doc["image"] is not None and not Path(doc["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of task {name!r} are missing, e.g. {missing[0]!r}; point the "
                                "task at the folder that holds the benchmark's images.")


# ------------------------------------------------------------------ POPE
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unknown_rate")


def pope_content(questions: Sequence[pope.PopeQuestion], images: str | Path, *, split: str | None, parser: str,
                 prompt_suffix: str, source: str = "file", sha256: str = "", versions: Sequence[str] = (),
                 dataset: str | None = None, content_sha256: str | None = None) -> TaskContent:
    """A POPE task: each doc's prompt is the question + `prompt_suffix`, its image `images / question.image`."""
    choice(parser, "parser", pope.PARSERS.names(), meaning="the yes/no answer parser")
    text(prompt_suffix, "prompt_suffix", allow_empty=True)
    image_dir = Path(images).expanduser().resolve()
    docs = [{"key": q.question_id, "image": str(image_dir / q.image), "prompt": q.text + prompt_suffix,
             "target": q.label} for q in questions]
    rows = [{"question_id": q.question_id, "image": q.image, "text": q.text, "label": q.label, "object": q.object}
            for q in questions]
    split_name = split or "file"
    protocol = pope_protocol(source, list(versions), {split_name: sha256}, parser, dataset,
                             {split_name: content_sha256} if content_sha256 else None)
    return TaskContent("pope", "pope", docs, rows, {"parser": parser, "split": split}, "{question}" + prompt_suffix,
                       protocol, POPE_METRICS)


def score_pope_task(settings: Mapping[str, Any], questions: Sequence[Mapping[str, Any]],
                    answers: Mapping[int, str], protocol: Mapping[str, Any]) -> Scored:
    """`score_pope` on the answered questions (lmms-eval's --limit answers the first docs only)."""
    asked = [pope.PopeQuestion(q["question_id"], q["image"], q["text"], q["label"], object=q.get("object"))
             for q in questions if q["question_id"] in answers]
    scores = pope.score_pope(asked, answers, parser=settings["parser"], split=settings["split"])
    return Scored({m: getattr(scores, m) for m in POPE_METRICS}, dict(protocol))


# ------------------------------------------------------------------ AMBER
AMBER_GENERATIVE_METRICS = ("CHAIR", "Cover", "Hal", "Cog")
AMBER_DISCRIMINATIVE_METRICS = ("accuracy", "precision", "recall", "f1", "existence_f1", "attribute_f1",
                                "relation_f1", "unknown_rate", "yes_ratio")


def amber_content(data: amber.AmberData, part: str, *, parser: str = "amber_exact", normalizer: str = "nltk",
                  similarity: str = "official", spacy_model: str | None = None, table: str | None = None,
                  threshold: float = 0.8, quirks: str = "reference", prompt_suffix: str = "",
                  limit: int | None = None, max_new_tokens: int = 512, source: str = "folder") -> TaskContent:
    """One AMBER part (`generative` or `discriminative`) as a task, its items from `vlmfix.eval.items.amber_items`
    as the app's (the query file's prompt; the discriminative one + `prompt_suffix`; `limit`: the first N image
    ids). The normalizer and similarity backend are built now, so a missing NLTK data set or spaCy model fails here."""
    choice(part, "part", AMBER_PARTS)
    choice(parser, "parser", YESNO_PARSERS.names(), meaning="the yes/no parser (amber_exact is AMBER's own)")
    choice(quirks, "quirks", amber.QUIRK_MODES)
    number(threshold, "threshold", low=0, high=1, low_open=True, meaning="the similarity threshold (0.8 is AMBER's)")
    text(prompt_suffix, "prompt_suffix", allow_empty=True)
    settings = {"root": str(Path(data.root or ".").resolve()), "part": part, "parser": parser, "normalizer": normalizer,
                "similarity": similarity, "spacy_model": spacy_model, "table": table, "threshold": float(threshold),
                "quirks": quirks, "prompt_suffix": prompt_suffix, "max_new_tokens": max_new_tokens, "source": source,
                "sha256": dict(sorted(data.sha256.items()))}
    made_normalizer, made_similarity = _amber_scorers(settings, data)
    chosen = amber_items(data, [part], limit, prompt_suffix)
    docs = [{"key": item.key, "image": _image(item.image_path), "prompt": item.prompt,
             "target": "" if part == "generative" else str(data.entry(item.key).truth)} for item in chosen.items[part]]
    settings.update(n_images=chosen.n_images, subset=chosen.subset)
    protocol = _amber_section(settings, data, made_normalizer, made_similarity)
    metrics = AMBER_GENERATIVE_METRICS if part == "generative" else AMBER_DISCRIMINATIVE_METRICS
    rows = [{"id": item.key, "image": item.row.image} for item in chosen.items[part]]
    return TaskContent(f"amber_{part}", "amber", docs, rows, settings, "query file", protocol, metrics)


def _amber_scorers(settings: Mapping[str, Any], data: amber.AmberData) -> tuple[Any, Any]:
    normalizer = amber.make_normalizer(settings["normalizer"], lower=settings["quirks"] == "fixed")
    similarity = amber.make_similarity(settings["similarity"], spacy_model=settings["spacy_model"],
                                       table=settings["table"], threshold=settings["threshold"],
                                       vocabulary_sha256=data.vocabulary_sha256)
    return normalizer, similarity


def _amber_section(settings: Mapping[str, Any], data: amber.AmberData, normalizer: Any,
                   similarity: Any) -> dict[str, Any]:
    """The app's AMBER fingerprint fields (`run_amber`), for one part."""
    part = settings["part"]
    fields = amber_protocol(data, parts=[part], parser=settings["parser"], normalizer=normalizer,
                            similarity=similarity, threshold=settings["threshold"], quirks=settings["quirks"],
                            n_images=settings["n_images"], subset=settings["subset"])
    fields["max_new_tokens"] = {part: settings["max_new_tokens"]}
    fields["source"] = settings["source"]
    fields["prompt_suffix"] = settings["prompt_suffix"]
    return fields


def score_amber_task(settings: Mapping[str, Any], questions: Sequence[Mapping[str, Any]],
                     answers: Mapping[int, str], protocol: Mapping[str, Any]) -> Scored:
    """AMBER's scorer on the answers, with the data, normalizer and similarity backend of this process (the
    fingerprint records them); data whose files changed since the task was written is refused."""
    data = amber.load_amber(settings["root"])
    if dict(sorted(data.sha256.items())) != settings["sha256"]:
        raise ValueError(f"the AMBER files under {settings['root']!r} changed since this task was written (their "
                         "sha256 differ); write the task again with write-tasks.")
    normalizer, similarity = _amber_scorers(settings, data)
    section = _amber_section(settings, data, normalizer, similarity)
    if settings["part"] == "generative":
        gen = amber.score_generative(dict(answers), data, normalizer, similarity, settings["threshold"],
                                     settings["quirks"])
        metrics: dict[str, Any] = {"CHAIR": gen.chair, "Cover": gen.cover, "Hal": gen.hal, "Cog": gen.cog}
    else:
        dis = amber.score_discriminative(dict(answers), data, settings["parser"])
        overall = dis.groups["overall"]
        metrics = {"accuracy": overall["accuracy"], "precision": overall["precision"], "recall": overall["recall"],
                   "f1": overall["f1"], **{f"{d}_f1": dis.groups[d]["f1"] for d in amber.DIMENSIONS},
                   "unknown_rate": dis.unknown_rate, "yes_ratio": dis.yes_ratio}
    return Scored(metrics, section)


# ------------------------------------------------------------------ MME
MME_SUMMARY = ("total", "unknown_rate", "yes_ratio")
MME_PER_SUBTASK = ("acc", "acc_plus", "score")


def mme_content(questions: Sequence[mme.MmeQuestion], *, parser: str = "mme_official", prompt: str = "official",
                prompt_suffix: str = "", limit: int | None = None, source: str = "folder") -> TaskContent:
    """The MME subset as a task, its items from `vlmfix.eval.items.mme_items` as the app's (`limit`: the first N
    images of each subtask; prompt `official` verbatim or `lmms` with `prompt_suffix`)."""
    choice(parser, "parser", YESNO_PARSERS.names(), meaning="the yes/no parser (mme_official is MME's own)")
    choice(prompt, "prompt", ("official", "lmms"), meaning="official (verbatim) or lmms (lmms-eval's suffix swap)")
    text(prompt_suffix, "prompt_suffix", allow_empty=True)
    items = mme_items(questions, limit, prompt, prompt_suffix)
    docs = [{"key": item.key, "image": _image(item.image_path), "prompt": item.prompt, "target": item.row.answer}
            for item in items]
    chosen = [item.row for item in items]
    rows = [{"key": q.key, "subtask": q.subtask, "image": q.image, "question": q.question, "answer": q.answer}
            for q in chosen]
    subtasks = list(dict.fromkeys(q.subtask for q in chosen))
    metrics = MME_SUMMARY + tuple(f"{s}_{m}" for s in subtasks for m in MME_PER_SUBTASK)
    fingerprint_prompt = "{question}" if prompt == "official" else f"lmms:{prompt_suffix}"
    return TaskContent("mme", "mme", docs, rows, {"parser": parser, "prompt": prompt}, fingerprint_prompt,
                       mme_protocol(source, mme.content_sha256(chosen), parser, prompt), metrics)


def score_mme_task(settings: Mapping[str, Any], questions: Sequence[Mapping[str, Any]],
                   answers: Mapping[int, str], protocol: Mapping[str, Any]) -> Scored:
    asked = [mme.MmeQuestion(q["key"], q["subtask"], q["image"], q["question"], q["answer"]) for q in questions]
    scores = mme.score_mme(asked, answers, settings["parser"])
    metrics: dict[str, Any] = {"total": scores.total, "unknown_rate": scores.unknown_rate,
                               "yes_ratio": scores.yes_ratio}
    for name, sub in scores.subtasks.items():
        metrics.update({f"{name}_acc": sub.acc, f"{name}_acc_plus": sub.acc_plus, f"{name}_score": sub.score})
    return Scored(metrics, dict(protocol))


# ------------------------------------------------------------------ HallusionBench
HALLUSION_METRICS = ("aAcc", "fAcc", "qAcc", "easy_aAcc", "hard_aAcc", "unknown_rate", "yes_ratio")


def hallusion_content(questions: Sequence[hallusion.HallusionQuestion], hashes: Mapping[str, str | None], *,
                      parser: str = "vlmevalkit_yorn", unknown_no_visual: str = "correct",
                      include_text_only: bool = True, prompt_suffix: str = "",
                      limit: int | None = None) -> TaskContent:
    """HallusionBench as a task, its items from `vlmfix.eval.items.hallusion_items` as the app's (`limit`: the first
    N figure sets, so figures and groups stay whole); text-only questions become docs without an image, which the vlmfix
    model decodes without methods."""
    choice(parser, "parser", YESNO_PARSERS.names(), meaning="the yes/no rule standing in for the GPT judge")
    choice(unknown_no_visual, "unknown_no_visual", hallusion.UNKNOWN_NO_VISUAL)
    text(prompt_suffix, "prompt_suffix", allow_empty=True)
    items = hallusion_items(questions, include_text_only, limit, prompt_suffix)
    docs = [{"key": item.key, "image": _image(item.image_path), "prompt": item.prompt, "target": item.row.gt_answer}
            for item in items]
    chosen = [item.row for item in items]
    rows = [{"key": q.key, **{name: getattr(q, name) for name in hallusion.FIELDS},
             "has_image": q.image_path is not None} for q in chosen]
    settings = {"parser": parser, "unknown_no_visual": unknown_no_visual}
    protocol = hallusion_protocol(hashes, parser, unknown_no_visual, include_text_only)
    return TaskContent("hallusion", "hallusion", docs, rows, settings, "{question}" + prompt_suffix, protocol,
                       HALLUSION_METRICS)


def score_hallusion_task(settings: Mapping[str, Any], questions: Sequence[Mapping[str, Any]],
                         answers: Mapping[int, str], protocol: Mapping[str, Any]) -> Scored:
    asked = [hallusion.HallusionQuestion(q["key"], **{name: q[name] for name in hallusion.FIELDS},
                                         image_path=Path("image") if q["has_image"] else None) for q in questions]
    scores = hallusion.score_hallusion(asked, answers, settings["parser"], settings["unknown_no_visual"])
    metrics = {"aAcc": scores.aacc, "fAcc": scores.facc, "qAcc": scores.qacc, "easy_aAcc": scores.easy_aacc,
               "hard_aAcc": scores.hard_aacc, "unknown_rate": scores.unknown_rate, "yes_ratio": scores.yes_ratio}
    return Scored(metrics, dict(protocol))


Scorer = Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]], Mapping[int, str], Mapping[str, Any]], Scored]
SCORERS: dict[str, Scorer] = {
    "pope": score_pope_task,
    "amber_generative": score_amber_task,
    "amber_discriminative": score_amber_task,
    "mme": score_mme_task,
    "hallusion": score_hallusion_task,
}
