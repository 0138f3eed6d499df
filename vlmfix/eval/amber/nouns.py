"""AMBER's noun extraction (spec A4, `amber.normalizer`): response text -> noun lemmas, before the V filter.

* `nltk` (default, exact): `nltk.word_tokenize` on the text as is (no lower-casing), `nltk.pos_tag`, keep
  tags starting with "NN", `WordNetLemmatizer().lemmatize` (noun POS), as AMBER `inference.py` 32-37. Needs
  `pip install nltk` and the data punkt_tab, averaged_perceptron_tagger_eng, wordnet (never downloaded).
* `simple` (no data; not comparable to the official numbers): CHAIR's Treebank-style tokenizer, no
  lower-casing; an inflected word maps to its base form when that base is in V (regular plural rules and
  a short irregular list); no POS tagger, so the words of `NON_NOUN_READINGS` (common as verbs or
  adjectives) count only right after a determiner, possessive or number.

Both also locate each noun (`located`): the character span `(start, end)` of the token it came from in the
text as given (None where the tokenizer rewrote the token beyond finding), which the results browser marks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vlmfix.eval.chair.normalize import require_nltk
from vlmfix.eval.chair.tokenize import token_spans, tokenize
from vlmfix.eval.errors import NormalizerUnavailableError
from vlmfix.registry import Registry

SIMPLE_VERSION = "amber-simple-1"
NON_NOUN_READINGS = frozenset({
    "can", "hot", "watch", "leave", "sound", "support", "switch", "drink", "skate", "spray", "file", "note",
    "ring", "stage", "string", "track", "pack", "pad", "board", "bill",
})
DETERMINERS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "some", "any", "each", "every", "another", "no",
    "my", "your", "his", "her", "its", "our", "their", "'s", "'", "one", "two", "three", "four", "five",
    "six", "seven", "eight", "nine", "ten", "several", "many", "few",
})
IRREGULAR_PLURALS = {"men": "man", "women": "woman", "people": "person", "children": "child", "mice": "mouse",
                     "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "ox"}


class AmberNormalizer(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def comparable_to_official(self) -> bool: ...

    @property
    def version(self) -> str: ...

    @property
    def nltk_version(self) -> str | None: ...

    def __call__(self, text: str, vocabulary: frozenset[str]) -> list[str]: ...


Span = tuple[int, int] | None  # a noun's characters in the response text (None: not found as written)


def located_nouns(normalizer: AmberNormalizer, text: str, vocabulary: frozenset[str]) -> list[tuple[str, Span]]:
    """The normalizer's nouns with their spans (`located`); a normalizer without `located` gives None spans."""
    locate = getattr(normalizer, "located", None)
    if locate is None:
        return [(noun, None) for noun in normalizer(text, vocabulary)]
    return list(locate(text, vocabulary))


NORMALIZERS: Registry[Callable[..., AmberNormalizer]] = Registry("AMBER normalizer (amber.normalizer)")


@NORMALIZERS.register("simple")
@dataclass(frozen=True)
class SimpleNouns:
    """Dependency-free noun extraction (see the module docstring).

    >>> SimpleNouns()("Two dogs and a Cat can watch the TV.", frozenset({"dog", "cat", "TV", "watch", "can"}))
    ['dog', 'TV']
    """

    lower: bool = False  # `quirks: fixed` lower-cases the text (and V)
    name: str = field(default="simple", init=False)

    @property
    def comparable_to_official(self) -> bool:
        return False

    @property
    def version(self) -> str:
        return SIMPLE_VERSION

    @property
    def nltk_version(self) -> str | None:
        return None

    def __call__(self, text: str, vocabulary: frozenset[str]) -> list[str]:
        return [noun for noun, _ in self.located(text, vocabulary)]

    def located(self, text: str, vocabulary: frozenset[str]) -> list[tuple[str, Span]]:
        """The nouns of `__call__`, each with the span of its token in `text`.

        >>> SimpleNouns().located("Two dogs.", frozenset({"dog"}))
        [('dog', (4, 8))]
        """
        tokens = tokenize(text.lower() if self.lower else text)
        spans: list[Span] | None = None
        nouns = []
        for index, token in enumerate(tokens):
            base = base_form(token, vocabulary)
            if base is None:
                continue
            if base in NON_NOUN_READINGS and not _after_determiner(tokens, index):
                continue
            spans = spans or token_spans(text, [t.lower() for t in tokens])
            nouns.append((base, spans[index]))
        return nouns


def base_form(token: str, vocabulary: frozenset[str]) -> str | None:
    """`token` if it is in V, else the first base form in V by the plural rules, else None.

    >>> base_form("puppies", frozenset({"puppy"})), base_form("knives", frozenset({"knife"}))
    ('puppy', 'knife')
    """
    if token in vocabulary:
        return token
    candidates = [IRREGULAR_PLURALS.get(token, "")]
    if token.endswith("ies"):
        candidates.append(token[:-3] + "y")
    if token.endswith("ves"):
        candidates += [token[:-3] + "f", token[:-3] + "fe"]
    if token.endswith("es"):
        candidates.append(token[:-2])
    if token.endswith("s") and not token.endswith("ss"):
        candidates.append(token[:-1])
    return next((c for c in candidates if c and c in vocabulary), None)


def _after_determiner(tokens: list[str], index: int) -> bool:
    if index == 0:
        return False
    previous = tokens[index - 1].lower()
    return previous in DETERMINERS or previous.replace(".", "", 1).isdigit()


@NORMALIZERS.register("nltk")
class NltkNouns:
    """The official extraction with NLTK (see the module docstring); probes NLTK and its data when built."""

    name = "nltk"

    def __init__(self, lower: bool = False) -> None:
        try:
            self._nltk = require_nltk()
        except NormalizerUnavailableError as err:
            raise NormalizerUnavailableError(
                str(err).replace("chair.normalizer='opera_nltk'", "amber.normalizer='nltk'").replace(
                    "chair.normalizer=simple", "amber.normalizer=simple").replace("OPERA", "official AMBER")
            ) from None
        from nltk.stem import WordNetLemmatizer

        self._lemmatizer: Any = WordNetLemmatizer()
        self.lower = lower

    @property
    def comparable_to_official(self) -> bool:
        return True

    @property
    def version(self) -> str:
        return f"nltk-{self._nltk.__version__}"

    @property
    def nltk_version(self) -> str | None:
        return str(self._nltk.__version__)

    def __call__(self, text: str, vocabulary: frozenset[str]) -> list[str]:
        return [noun for noun, _ in self.located(text, vocabulary)]

    def located(self, text: str, vocabulary: frozenset[str]) -> list[tuple[str, Span]]:
        """The nouns of `__call__`, each with the span of its token in `text` (NLTK's `` and '' are a quote)."""
        tokens = self._nltk.word_tokenize(text)
        tagged = self._nltk.pos_tag(tokens)
        kept = [index for index, (_, tag) in enumerate(tagged) if tag.startswith("NN")]
        spans = token_spans(text, [token.lower() for token in tokens]) if kept else []
        nouns = [str(self._lemmatizer.lemmatize(tagged[index][0])) for index in kept]
        if self.lower:
            nouns = [noun.lower() for noun in nouns]
        return [(noun, spans[index]) for noun, index in zip(nouns, kept)]


def make_normalizer(name: str = "nltk", lower: bool = False) -> AmberNormalizer:
    """The AMBER normalizer `name` (`nltk` or `simple`); `lower` is `quirks: fixed`."""
    return NORMALIZERS.get(name)(lower=lower)


def in_vocabulary(nouns: Iterable[str], vocabulary: frozenset[str]) -> list[str]:
    """The nouns that are words of V, repeats kept (inference.py 94)."""
    return [noun for noun in nouns if noun in vocabulary]
