"""Informative ("content") words of an instruction, mapped to its tokens by character offsets.

Taggers: spaCy's part-of-speech tags when spaCy and its English model are installed (nouns, proper
nouns, verbs, adjectives, adverbs, numbers), otherwise a dependency-free rule: every word that is not
a closed-class function word (articles, pronouns, prepositions, conjunctions, auxiliaries,
wh-words). Token character ranges come from incremental decoding of the prompt's own token ids.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

CONTENT_POS = frozenset({"NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM"})
SPACY_MODEL = "en_core_web_sm"
SPACY_INSTALL = f"pip install spacy && python -m spacy download {SPACY_MODEL}"

# Closed-class English words (written for vlmfix). Adverbs and numerals stay content words, as in POS.
FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every either neither no another such
    i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
    it its itself we us our ours ourselves they them their theirs themselves there
    someone somebody something anyone anybody anything everyone everybody everything nobody nothing
    about above across after against along among around at before behind below beneath beside
    besides between beyond by despite down during except for from in inside into like near of off
    on onto out outside over past per since than through throughout till to toward towards under
    underneath until up upon via with within without
    and or but nor so yet if because although though while whereas whether unless as
    am is are was were be been being do does did doing have has had having
    can could may might must shall should will would
    s re ve d ll t n't not cannot isn aren wasn weren don doesn didn couldn won wouldn shouldn haven hasn hadn
    what when where which who whom whose why how
    please yes ok okay
    """.split()
)

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")

# A content-word extractor: query text -> [(char_start, char_end)] of the informative words.
Extractor = Callable[[str], Sequence[tuple[int, int]]]


def rule_content_words(text: str) -> list[tuple[int, int]]:
    """Character ranges of the words of `text` that are not function words."""
    spans = []
    for match in _WORD.finditer(text):
        word = match.group().lower().replace("’", "'")
        parts = [p for p in word.split("'") if p]
        if parts and parts[0] not in FUNCTION_WORDS:
            spans.append(match.span())
    return spans


@functools.lru_cache(maxsize=1)
def _spacy_pipeline() -> Any:
    try:
        import spacy
    except ImportError as err:
        raise ImportError(
            f"GIFT's content_words='spacy' needs spaCy and its English model {SPACY_MODEL}; install both "
            f"with `{SPACY_INSTALL}` (vlmfix never downloads models itself), or use content_words='rule'."
        ) from err
    try:
        return spacy.load(SPACY_MODEL, disable=["parser", "ner"])
    except OSError as err:
        raise ImportError(
            f"spaCy is installed but its English model {SPACY_MODEL} is not; install it with "
            f"`python -m spacy download {SPACY_MODEL}` (spaCy itself: `pip install spacy`), or use "
            f"content_words='rule'."
        ) from err


def spacy_available() -> bool:
    try:
        _spacy_pipeline()
    except ImportError:
        return False
    return True


def spacy_content_words(text: str) -> list[tuple[int, int]]:
    """Character ranges of the words spaCy tags NOUN, PROPN, VERB, ADJ, ADV or NUM."""
    return [(t.idx, t.idx + len(t.text)) for t in _spacy_pipeline()(text) if t.pos_ in CONTENT_POS]


def token_char_ranges(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of `ids` and each token's [start, end) character range in it (incremental decoding)."""

    def decode(part: Sequence[int]) -> str:
        return tokenizer.decode(list(part), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text = decode(ids)
    ranges, previous = [], 0
    for k in range(1, len(ids) + 1):
        prefix = decode(ids[:k])
        if not text.startswith(prefix):  # a partial multi-byte character: count the common prefix only
            prefix = prefix[: next((i for i, (a, b) in enumerate(zip(prefix, text)) if a != b), len(prefix))]
        end = max(previous, min(len(prefix), len(text)))
        ranges.append((previous, end))
        previous = end
    return text, ranges


def overlapping_tokens(ranges: Sequence[tuple[int, int]], words: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the tokens whose character range overlaps any word range."""
    return [i for i, (s, e) in enumerate(ranges) if any(s < we and ws < e for ws, we in words)]
