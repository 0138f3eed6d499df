"""Caption -> object mentions (spec A2): normalize, merge bigrams, toilet rule, keep vocabulary words."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vlmfix.eval.chair.normalize import Normalizer, get_normalizer
from vlmfix.eval.chair.tokenize import token_spans
from vlmfix.eval.chair.vocabulary import ChairVocabulary, load_vocabulary
from vlmfix.eval.errors import EvalInputError


@dataclass(frozen=True)
class CaptionMentions:
    """What one caption mentions.

    Args:
        words: the merged token list (punctuation included; `Len` counts these).
        surface: the vocabulary entry of each mention, in caption order.
        nodes: the node word of each mention: the mention list M_c (ordered, repeats kept).
        token_idxs: for each mention, the index of its first source token in the pre-merge token list.
        spans: for each mention, its character span `(start, end)` in the caption (a merged bigram spans both
            words; None where the tokenizer rewrote the text beyond finding).
    """

    words: tuple[str, ...]
    surface: tuple[str, ...]
    nodes: tuple[str, ...]
    token_idxs: tuple[int, ...]
    spans: tuple[tuple[int, int] | None, ...] = ()


@dataclass(frozen=True)
class MentionExtractor:
    """Vocabulary + normalizer: turns captions into `CaptionMentions`. Both must use the same quirk mode.

    >>> extract = make_extractor()
    >>> extract("A teddy bear on the seat of the toilet.").nodes
    ('teddy bear', 'toilet')
    """

    vocabulary: ChairVocabulary
    normalizer: Normalizer

    def __post_init__(self) -> None:
        if self.vocabulary.quirks != self.normalizer.quirks:
            raise EvalInputError(
                f"vocabulary quirks {self.vocabulary.quirks!r} and normalizer quirks "
                f"{self.normalizer.quirks!r} differ; build both with the same `quirks` (make_extractor does)."
            )

    @property
    def comparable_to_opera(self) -> bool:
        """True only for `opera_nltk` with `reference` quirks: numbers byte-comparable to OPERA's scorer."""
        return bool(self.normalizer.comparable_to_opera) and self.vocabulary.quirks == "reference"

    def __call__(self, caption: str) -> CaptionMentions:
        raw = self.normalizer.tokenize(caption)  # once: NLTK's tokenizer is the slow step
        tokens = self.normalizer.normalize(raw)
        words, starts = merge_double_words(tokens, self.vocabulary.double_words)
        kept: Sequence[int] = range(len(words))
        if all(word in words for word in self.vocabulary.toilet_trigger):
            kept = [i for i in kept if words[i] != self.vocabulary.toilet_drop]
        synonyms = self.vocabulary.synonyms
        hits = [i for i in kept if words[i] in synonyms]
        spans = token_spans(caption, raw) if hits else []
        ends = [*starts[1:], len(tokens)]  # merged word i covers source tokens starts[i] .. ends[i] - 1
        return CaptionMentions(
            words=tuple(words),
            surface=tuple(words[i] for i in hits),
            nodes=tuple(synonyms[words[i]] for i in hits),
            token_idxs=tuple(starts[i] for i in hits),
            spans=tuple(_joined(spans[starts[i]], spans[ends[i] - 1]) for i in hits),
        )


def _joined(first: tuple[int, int] | None, last: tuple[int, int] | None) -> tuple[int, int] | None:
    return (first[0], last[1]) if first is not None and last is not None else None


def merge_double_words(tokens: Sequence[str], double_words: Mapping[str, str]) -> tuple[list[str], list[int]]:
    """One greedy left-to-right bigram pass; each merged token keeps the index of its first source token.

    >>> merge_double_words(["a", "hot", "dog", "and", "a", "dog"], {"hot dog": "hot dog"})
    (['a', 'hot dog', 'and', 'a', 'dog'], [0, 1, 3, 4, 5])
    """
    words: list[str] = []
    starts: list[int] = []
    i = 0
    while i < len(tokens):
        pair = f"{tokens[i]} {tokens[i + 1]}" if i + 1 < len(tokens) else None
        starts.append(i)
        if pair is not None and pair in double_words:
            words.append(double_words[pair])
            i += 2
        else:
            words.append(tokens[i])
            i += 1
    return words, starts


def make_extractor(
    normalizer: str = "simple", quirks: str = "reference", extra: Mapping[str, Sequence[str]] | None = None
) -> MentionExtractor:
    """The extractor for `chair.normalizer`, `chair.quirks` and `chair.vocabulary.extra`."""
    return MentionExtractor(load_vocabulary(quirks, extra), get_normalizer(normalizer, quirks))
