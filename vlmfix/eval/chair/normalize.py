"""CHAIR normalizers: caption -> lower-cased, tokenized, normalized tokens (step 2 of mention extraction).

* `simple` (default): dependency-free Treebank-style tokenizer plus the noun inflection table; no POS
  tagging, no downloaded data. Not byte-comparable with OPERA (`comparable_to_opera` is False): the reference
  also lemmatizes verbs (skiing -> skis, skateboarding -> skateboard, bowling -> bowl, seated -> chair, ...)
  and depends on the tagger, so its numbers differ slightly.
* `opera_nltk`: the reference's step exactly: `nltk.word_tokenize`, `nltk.pos_tag`, Penn tag -> WordNet POS
  (J adj, V verb, N noun, R adv, else noun), `WordNetLemmatizer().lemmatize`. Needs `pip install nltk` and
  its data; a missing piece raises `NormalizerUnavailableError` with the install command. vlmfix never
  downloads NLTK data and never falls back from one normalizer to the other.

Pick one by name with `get_normalizer(name, quirks)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vlmfix.eval.chair.inflections import fixed_overrides, inflection_table, table_version
from vlmfix.eval.chair.tokenize import tokenize
from vlmfix.eval.chair.vocabulary import check_quirks
from vlmfix.eval.errors import NormalizerUnavailableError
from vlmfix.registry import Registry

NLTK_DOWNLOAD = "python -m nltk.downloader"
# (package, nltk.data path) on NLTK >= 3.9 and before (nltk/nltk#3394 renamed the tokenizer and tagger data).
NLTK_RESOURCES = (
    ("punkt_tab", "tokenizers/punkt_tab"),
    ("averaged_perceptron_tagger_eng", "taggers/averaged_perceptron_tagger_eng"),
    ("wordnet", "corpora/wordnet"),
)
NLTK_RESOURCES_BEFORE_3_9 = (
    ("punkt", "tokenizers/punkt"),
    ("averaged_perceptron_tagger", "taggers/averaged_perceptron_tagger"),
    ("wordnet", "corpora/wordnet"),
)


class Normalizer(Protocol):
    """Caption -> normalized tokens. `version` is recorded in results; `quirks` must match the vocabulary."""

    @property
    def name(self) -> str: ...

    @property
    def quirks(self) -> str: ...

    @property
    def comparable_to_opera(self) -> bool: ...

    @property
    def version(self) -> str: ...

    @property
    def nltk_version(self) -> str | None: ...

    def tokenize(self, caption: str) -> list[str]:
        """The tokens of `caption.lower()`, before normalization (their spans: `tokenize.token_spans`)."""
        ...

    def normalize(self, tokens: list[str]) -> list[str]:
        """`tokenize`'s tokens -> normalized tokens, one for one."""
        ...

    def __call__(self, caption: str) -> list[str]:
        """`normalize(tokenize(caption))`."""
        ...


NORMALIZERS: Registry[Callable[..., Normalizer]] = Registry("CHAIR normalizer (chair.normalizer)")


@NORMALIZERS.register("simple")
@dataclass(frozen=True)
class SimpleNormalizer:
    """Dependency-free normalizer: Treebank-style tokens, then inflected nouns -> base form by table lookup.

    Args:
        quirks: `reference` (table pairs WordNet 3.0 agrees with, so "men", "vases", "smartphones" stay as
            they are) or `fixed` (all rule pairs: men -> man, vases -> vase, smartphones -> smartphone).

    >>> SimpleNormalizer()("Two dogs' bowls.")
    ['two', 'dog', "'", 'bowl', '.']
    """

    quirks: str = "reference"
    name: str = field(default="simple", init=False)
    comparable_to_opera: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        check_quirks(self.quirks)

    @property
    def version(self) -> str:
        return f"simple@{table_version()}"

    @property
    def nltk_version(self) -> str | None:
        return None

    def tokenize(self, caption: str) -> list[str]:
        return tokenize(caption.lower())

    def normalize(self, tokens: list[str]) -> list[str]:
        table = inflection_table(self.quirks)
        return [table.get(token, token) for token in tokens]

    def __call__(self, caption: str) -> list[str]:
        return self.normalize(self.tokenize(caption))


@NORMALIZERS.register("opera_nltk")
class OperaNltkNormalizer:
    """The reference normalizer (OPERA / PAI / lmms-eval `chair.py`): NLTK tokenize, POS-tag, lemmatize.

    Args:
        quirks: `reference` reproduces the reference exactly (comparable with published numbers);
            `fixed` then replaces the lemmatizer's known misses (men, vases, plurals absent from WordNet 3.0)
            from the inflection table's `fixed_only` pairs, keyed by the original token.

    Raises:
        NormalizerUnavailableError: nltk or one of its data packages is not installed (checked here, before
            any caption is read).
    """

    name = "opera_nltk"

    def __init__(self, quirks: str = "reference") -> None:
        self.quirks = check_quirks(quirks)
        self.comparable_to_opera = quirks == "reference"
        self._nltk = require_nltk()
        from nltk.stem import WordNetLemmatizer

        self._lemmatizer = WordNetLemmatizer()
        self._overrides: Mapping[str, str] = fixed_overrides() if quirks == "fixed" else {}

    @property
    def version(self) -> str:
        return f"opera_nltk@nltk-{self._nltk.__version__}"

    @property
    def nltk_version(self) -> str | None:
        return str(self._nltk.__version__)

    def tokenize(self, caption: str) -> list[str]:
        return list(self._nltk.word_tokenize(caption.lower()))

    def normalize(self, tokens: list[str]) -> list[str]:
        lemmas = []
        for token, tag in self._nltk.pos_tag(tokens):
            lemma = self._lemmatizer.lemmatize(token, pos=penn_to_wordnet(tag))
            lemmas.append(self._overrides.get(token, lemma))
        return lemmas

    def __call__(self, caption: str) -> list[str]:
        return self.normalize(self.tokenize(caption))


def penn_to_wordnet(tag: str) -> str:
    """Penn Treebank tag -> WordNet POS letter, as the reference maps it (anything else is a noun)."""
    return {"J": "a", "V": "v", "N": "n", "R": "r"}.get(tag[:1], "n")


def get_normalizer(name: str = "simple", quirks: str = "reference") -> Normalizer:
    """Build the normalizer registered under `name` (`simple` or `opera_nltk`) for a quirk mode."""
    return NORMALIZERS.get(name)(quirks=quirks)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def nltk_resources(version: str) -> Sequence[tuple[str, str]]:
    """The (package, data path) pairs the reference pipeline needs on this NLTK version."""
    return NLTK_RESOURCES if _version_tuple(version) >= (3, 9) else NLTK_RESOURCES_BEFORE_3_9


def require_nltk() -> Any:
    """Import nltk and probe its data with `nltk.data.find`; raise one clear error naming what is missing."""
    alternative = (
        "or set chair.normalizer=simple, which needs no download (its numbers are not OPERA-comparable)"
    )
    try:
        import nltk
    except ImportError as err:
        raise NormalizerUnavailableError(
            "chair.normalizer='opera_nltk' needs the optional package nltk, which is not installed. "
            "Install it with `pip install nltk` (or `pip install vlmfix[chair-nltk]`), then its data with "
            f"`{NLTK_DOWNLOAD} {' '.join(name for name, _ in NLTK_RESOURCES)}`; {alternative}."
        ) from err
    resources = nltk_resources(nltk.__version__)
    missing = [name for name, path in resources if not _nltk_has(nltk, path)]
    if missing:
        names = " ".join(name for name, _ in resources)
        raise NormalizerUnavailableError(
            f"chair.normalizer='opera_nltk' needs NLTK data that is not installed: {', '.join(missing)} "
            f"(NLTK {nltk.__version__}). Install it with `{NLTK_DOWNLOAD} {names}`; for a custom folder add "
            "`-d DIR` and set `NLTK_DATA=DIR` when running vlmfix. NLTK releases before 3.9 name the "
            "packages `punkt averaged_perceptron_tagger wordnet`. vlmfix never downloads data itself; "
            f"{alternative}."
        )
    return nltk


def _nltk_has(nltk: Any, path: str) -> bool:
    for candidate in (path, f"{path}.zip"):
        try:
            nltk.data.find(candidate)
            return True
        except LookupError:
            continue
    return False
