"""CHAIR metrics (spec A6) and the per-caption output `chair_scored.json` (spec A9). Pure functions.

With C the captions, M_c a caption's mention list, U_c = set(M_c) and G_c its ground-truth set:

* CHAIR_s = |{c : some m in M_c is not in G_c}| / |C| (captions without mentions stay in the denominator);
* CHAIR_i = sum_c |{m in M_c : m not in G_c}| / sum_c |M_c| (mention level: repeats count each time);
* Recall = sum_c |U_c & G_c| / sum_c |G_c|; Precision = sum_c |U_c & G_c| / sum_c |U_c|; F1 = 2PR / (P + R);
* Len = mean number of merged tokens per caption, punctuation included (the mean caption length).

Inputs are checked before any caption is scored: one caption per image id (a repeated id would count its
objects twice, so it raises), ids normalised to int (`"42"` is 42), captions must be strings, the ground
truth must use node words of the extractor's vocabulary (and, when built from COCO files, the extractor's
quirks and normalizer). Undefined ratios (no mentions, no ground truth) are None with a warning, never 0.
Reports also carry `mean_words` (whitespace words, independent of the normalizer) and the repeated-sentence
rate: the share of sentences that repeat an earlier sentence of the same caption (a symptom of degenerate
decoding).
Values are fractions; tables show them x 100 with one decimal, as OPERA prints.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from vlmfix import validation
from vlmfix.eval._io import PathLike, as_id, atomic_write_text, int_keyed, read_records, shown
from vlmfix.eval.chair.ground_truth import ON_MISSING, GroundTruth, cache_key, extractor_header
from vlmfix.eval.chair.mentions import CaptionMentions, MentionExtractor
from vlmfix.eval.chair.vocabulary import ChairVocabulary
from vlmfix.eval.errors import EvalInputError, checked

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Caption:
    """One generated caption: the row layout of OPERA's released logs and of vlmfix's CHAIR predictions.

    Args:
        image_id: the COCO image id; normalised to int ("42" and 42.0 become 42, other values raise, naming
            their type), so a caption finds its ground truth whichever way the id was written.
        caption: the generated text. Must be a string: None (a failed generation) raises, as the reference
            scorer fails on it; pass "" to score an empty caption (no mentions, kept in the CHAIR_s denominator).
    """

    image_id: int
    caption: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_id", as_id(self.image_id, "image_id"))
        if not isinstance(self.caption, str):
            raise EvalInputError(
                f"caption of image_id {self.image_id} must be a string, got {shown(self.caption)}; regenerate "
                "it, or pass '' to score an empty caption (no mentions)."
            )


def read_captions(
    path: PathLike, image_id_key: str = "image_id", caption_key: str = "caption"
) -> list[Caption]:
    """Read generated captions from JSON Lines or a JSON array of objects (content-sniffed, UTF-8).

    An empty file, a record without the two keys, a bad id or a caption that is not a string (JSON null)
    raises, naming the file and the record.
    """
    captions = []
    for number, row in enumerate(read_records(path, "caption"), start=1):
        if not isinstance(row, dict) or image_id_key not in row or caption_key not in row:
            raise EvalInputError(
                f"caption file {str(path)!r}, record {number}, needs the keys {image_id_key!r} and "
                f"{caption_key!r}; set image_id_key / caption_key to the keys your file uses."
            )
        try:
            captions.append(Caption(row[image_id_key], row[caption_key]))
        except EvalInputError as err:
            raise EvalInputError(f"caption file {str(path)!r}, record {number}: {err}") from None
    return captions


@dataclass(frozen=True)
class ChairMetrics:
    """Corpus-level CHAIR numbers (fractions; None where a denominator is zero)."""

    CHAIRs: float
    CHAIRi: float | None
    Recall: float | None
    Precision: float | None
    F1: float | None
    Len: float
    n_captions: int
    n_mentions: int
    n_hallucinated: int
    mean_words: float
    repeated_sentence_rate: float | None


@dataclass(frozen=True)
class CaptionScore:
    """One caption's CHAIR details."""

    image_id: int
    caption: str
    mentions: CaptionMentions
    gt: frozenset[str]
    hallucinated: tuple[tuple[str, str], ...]  # (surface, node) of each hallucinated mention
    hallucination_idxs: tuple[int, ...]  # pre-merge token index of each hallucinated mention
    hallucinated_mentions: tuple[int, ...] = ()  # index in `mentions` of each hallucinated mention

    def metrics(self) -> dict[str, float | int | None]:
        """Per-caption metrics: CHAIRs (0/1), CHAIRi, Recall, Precision, F1, Len (None where undefined)."""
        found = set(self.mentions.nodes) & self.gt
        unique = set(self.mentions.nodes)
        chair_i = _ratio(len(self.hallucinated), len(self.mentions.nodes))
        recall = _ratio(len(found), len(self.gt))
        precision = _ratio(len(found), len(unique))
        return {
            "CHAIRs": int(bool(self.hallucinated)),
            "CHAIRi": chair_i,
            "Recall": recall,
            "Precision": precision,
            "F1": _f1(precision, recall),
            "Len": len(self.mentions.words),
        }

    def counts(self) -> dict[str, int]:
        """The caption's counts that the corpus metrics sum (`corpus_metrics`): what a bootstrap over images
        resamples (`vlmfix.eval.unit_counts`)."""
        unique = set(self.mentions.nodes)
        repeated, sentences = _repeated_sentences([self.caption])
        return {
            "captions": 1,
            "hallucinating": int(bool(self.hallucinated)),
            "hallucinated": len(self.hallucinated),
            "mentions": len(self.mentions.nodes),
            "found": len(unique & self.gt),
            "gt": len(self.gt),
            "unique": len(unique),
            "words": len(self.mentions.words),
            "whitespace_words": len(self.caption.split()),
            "repeated_sentences": repeated,
            "sentences": sentences,
        }

    def mention_records(self) -> list[dict[str, Any]]:
        """Each mention in caption order: the vocabulary entry that matched (`surface`), its object (`node`),
        whether it is hallucinated, and its character span `start`/`end` in the caption (None if not found)."""
        bad = set(self.hallucinated_mentions)
        spans = self.mentions.spans or (None,) * len(self.mentions.nodes)
        return [
            {"surface": surface, "node": node, "hallucinated": i in bad,
             "start": span[0] if span else None, "end": span[1] if span else None}
            for i, (surface, node, span) in enumerate(zip(self.mentions.surface, self.mentions.nodes, spans))
        ]

    def to_json(self) -> dict[str, Any]:
        """The OPERA `sentences` entry, plus Precision, F1, a real per-caption Len and the mentions with their
        character spans (`mention_records`)."""
        return {
            "image_id": self.image_id,
            "caption": self.caption,
            "mscoco_hallucinated_words": [list(pair) for pair in self.hallucinated],
            "mscoco_gt_words": sorted(self.gt),
            "mscoco_generated_words": list(self.mentions.nodes),
            "hallucination_idxs": list(self.hallucination_idxs),
            "mentions": self.mention_records(),
            "words": list(self.mentions.words),
            "metrics": self.metrics(),
        }


@dataclass(frozen=True)
class ChairReport:
    """Per-caption details (input order) and the corpus metrics."""

    sentences: tuple[CaptionScore, ...]
    overall: ChairMetrics

    def to_json(self, fingerprint: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The `chair_scored.json` document: `sentences`, `overall_metrics`, `fingerprint`."""
        return {
            "sentences": [sentence.to_json() for sentence in self.sentences],
            "overall_metrics": asdict(self.overall),
            "fingerprint": dict(fingerprint) if fingerprint is not None else None,
        }


def score_caption(caption: Caption, gt: frozenset[str], extractor: MentionExtractor) -> CaptionScore:
    """Extract one caption's mentions and mark those not in `gt`."""
    mentions = extractor(caption.caption)
    bad = [i for i, node in enumerate(mentions.nodes) if node not in gt]
    return CaptionScore(
        image_id=caption.image_id,
        caption=caption.caption,
        mentions=mentions,
        gt=gt,
        hallucinated=tuple((mentions.surface[i], mentions.nodes[i]) for i in bad),
        hallucination_idxs=tuple(mentions.token_idxs[i] for i in bad),
        hallucinated_mentions=tuple(bad),
    )


def score_chair(
    captions: Iterable[Caption],
    ground_truth: GroundTruth | Mapping[int, Iterable[str]],
    extractor: MentionExtractor,
    on_missing_gt: str = "error",
) -> ChairReport:
    """Score captions against ground truth.

    Args:
        captions: generated captions (a list of `Caption`, e.g. from `read_captions`), one per image id.
        ground_truth: a `GroundTruth`, or a plain `{image_id: node words}` mapping (ids as ints or digit
            strings; values lists of node words).
        extractor: vocabulary + normalizer (`make_extractor(...)`), the one the ground truth was built with.
        on_missing_gt: `error` (default) raises on an image id without ground truth; `empty` scores it against
            the empty set, as the reference does silently.

    Raises:
        EvalInputError: before any caption is scored, when the captions are not a non-empty list of `Caption`
            with distinct image ids (the reference would count a repeated id twice), when the ground truth
            holds words that are not node words of `extractor` or was built with another extractor, or when
            an image id has no ground truth (`on_missing_gt='error'`; `MissingGroundTruthError`).

    >>> from vlmfix.eval.chair import make_extractor
    >>> report = score_chair([Caption(1, "a dog and a cat")], {1: ["dog"]}, make_extractor())
    >>> report.overall.CHAIRs, report.overall.CHAIRi
    (1.0, 0.5)
    """
    on_missing_gt = checked(
        validation.choice,
        on_missing_gt,
        "on_missing_gt",
        options=ON_MISSING,
        meaning="With 'error' an image id without ground truth raises; with 'empty' it is scored against no "
        "objects (what the reference does silently)",
    )
    if not isinstance(extractor, MentionExtractor):
        raise EvalInputError(
            f"`extractor` must be a chair.MentionExtractor, got a {type(extractor).__name__}; build it with "
            "chair.make_extractor(normalizer, quirks)."
        )
    captions = _caption_list(captions)
    _check_one_caption_per_image(captions)
    ground_truth = _checked_ground_truth(ground_truth, extractor)
    # Look every id up first, so a missing one fails before any caption is scored.
    gts = [ground_truth.for_image(caption.image_id, on_missing_gt) for caption in captions]
    sentences = tuple(score_caption(caption, gt, extractor) for caption, gt in zip(captions, gts))
    return ChairReport(sentences, corpus_metrics(sentences))


def corpus_metrics(sentences: Sequence[CaptionScore]) -> ChairMetrics:
    """Micro-averaged CHAIR metrics over scored captions: the sums of each caption's `counts()`."""
    total: Counter[str] = Counter()
    for s in sentences:
        total.update(s.counts())
    chair_i = _ratio(total["hallucinated"], total["mentions"])
    if chair_i is None:
        warnings.warn(
            "No caption mentions a CHAIR object: CHAIR_i and Precision are undefined (None).", stacklevel=3
        )
    recall = _ratio(total["found"], total["gt"])
    if recall is None:
        warnings.warn("No image has ground-truth objects: Recall is undefined (None).", stacklevel=3)
    precision = _ratio(total["found"], total["unique"])
    n = len(sentences)
    return ChairMetrics(
        CHAIRs=total["hallucinating"] / n,
        CHAIRi=chair_i,
        Recall=recall,
        Precision=precision,
        F1=_f1(precision, recall),
        Len=total["words"] / n,
        n_captions=n,
        n_mentions=total["mentions"],
        n_hallucinated=total["hallucinated"],
        mean_words=total["whitespace_words"] / n,
        repeated_sentence_rate=_ratio(total["repeated_sentences"], total["sentences"]),
    )


def split_sentences(caption: str) -> list[str]:
    """Sentences of a caption, normalized for comparison: lower-case, single spaces, end punctuation removed.

    >>> split_sentences("A dog.  A dog! Two cats")
    ['a dog', 'a dog', 'two cats']
    """
    parts = (" ".join(part.lower().split()).rstrip(".!?").strip() for part in _SENTENCE_END.split(caption))
    return [part for part in parts if part]


def write_chair_scored(
    path: PathLike, report: ChairReport, fingerprint: Mapping[str, Any] | None = None
) -> None:
    """Write `chair_scored.json` (a superset of the file OPERA's `chair.py --save_path` writes)."""
    atomic_write_text(path, json.dumps(report.to_json(fingerprint), indent=2, ensure_ascii=False) + "\n")


def _repeated_sentences(captions: Iterable[str]) -> tuple[int, int]:
    repeated = total = 0
    for caption in captions:
        seen: set[str] = set()
        for sentence in split_sentences(caption):
            total += 1
            repeated += sentence in seen
            seen.add(sentence)
    return repeated, total


def _caption_list(captions: Any) -> list[Caption]:
    """`captions` as a non-empty list of `Caption`; a string, a mapping or a single Caption is refused."""
    what = "`captions` must be a list of chair.Caption"
    if isinstance(captions, Caption):
        raise EvalInputError(f"{what}, got one Caption; wrap it in a list: [caption].")
    if isinstance(captions, Mapping):
        raise EvalInputError(
            f"{what}, got a {type(captions).__name__}; build [Caption(image_id, caption) for image_id, caption "
            "in mapping.items()]."
        )
    if isinstance(captions, (str, bytes)) or not isinstance(captions, Iterable):
        raise EvalInputError(f"{what}, got {shown(captions)}.")
    captions = list(captions)
    for index, caption in enumerate(captions):
        if not isinstance(caption, Caption):
            raise EvalInputError(
                f"`captions[{index}]` must be a chair.Caption, got a {type(caption).__name__}; read caption "
                "files with chair.read_captions, or build Caption(image_id, caption)."
            )
    if not captions:
        raise EvalInputError("`captions` is empty; CHAIR needs at least one caption to score.")
    return captions


def _check_one_caption_per_image(captions: Sequence[Caption]) -> None:
    counts = Counter(caption.image_id for caption in captions)
    repeated = sorted(image_id for image_id, count in counts.items() if count > 1)
    if repeated:
        raise EvalInputError(
            f"image_id(s) {repeated[:10]} appear more than once in `captions` ({len(repeated)} ids in all); "
            "CHAIR scores one caption per image (a repeated id would count its objects twice). Keep one "
            "caption per image, or score each set of captions (e.g. each sample) separately."
        )


def _checked_ground_truth(ground_truth: Any, extractor: MentionExtractor) -> GroundTruth:
    if isinstance(ground_truth, GroundTruth):
        _check_built_with(ground_truth, extractor)
    elif isinstance(ground_truth, Mapping):
        ground_truth = _plain_ground_truth(ground_truth)
    else:
        raise EvalInputError(
            "`ground_truth` must be a chair.GroundTruth or a mapping image_id -> node words, got "
            f"{shown(ground_truth)}."
        )
    _check_node_words(ground_truth, extractor.vocabulary)
    return ground_truth


def _check_built_with(ground_truth: GroundTruth, extractor: MentionExtractor) -> None:
    """A COCO-built ground truth (its header names a normalizer) must come from the same extractor."""
    if "normalizer" not in ground_truth.header:
        return
    expected = extractor_header(extractor)
    built = {key: ground_truth.header.get(key) for key in expected}
    if built != expected:
        raise EvalInputError(
            f"the ground truth was built with {_protocol(built)}, but the extractor has {_protocol(expected)}; "
            "build the ground truth with the extractor you score with, so that objects from the reference "
            "captions follow the same rules as the generated captions."
        )


def _protocol(header: Mapping[str, Any]) -> str:
    vocabulary = str(header.get("vocabulary_sha256"))[:12]
    return (
        f"quirks {header.get('quirks')!r}, normalizer {header.get('normalizer')!r} (NLTK "
        f"{header.get('nltk_version')}), vocabulary {vocabulary}"
    )


def _check_node_words(ground_truth: GroundTruth, vocabulary: ChairVocabulary) -> None:
    nodes = set(vocabulary.node_words)
    if set().union(*ground_truth.objects.values()) <= nodes:
        return
    for image_id, words in ground_truth.objects.items():
        unknown = sorted(words - nodes, key=str)
        if unknown:
            raise EvalInputError(
                f"ground truth of image_id {image_id}: {unknown} are not node words of the extractor's CHAIR "
                "vocabulary, so no mention could ever match them; use node words (e.g. 'dining table', not "
                "'table') or add them through chair.vocabulary.extra."
            )


def _plain_ground_truth(mapping: Mapping[Any, Iterable[str]]) -> GroundTruth:
    objects: dict[int, frozenset[str]] = {}
    for image_id, words in int_keyed(mapping.items(), "image_id", "`ground_truth`").items():
        if isinstance(words, (str, bytes)) or not isinstance(words, Iterable):
            raise EvalInputError(
                f"ground truth of image_id {image_id} must be a list of node words, got {shown(words)}; e.g. "
                f"{{{image_id}: ['dog', 'dining table']}}."
            )
        objects[image_id] = frozenset(words)
    header = {"format": "in-memory", "objects": {str(k): sorted(v, key=str) for k, v in sorted(objects.items())}}
    return GroundTruth(
        MappingProxyType(objects), MappingProxyType({"format": "in-memory"}), cache_key(header)
    )


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
