"""The CHAIR object vocabulary: node words, synonyms, the double-word table and the toilet rule.

The data lives in `vlmfix/eval/data/chair_coco_vocabulary.json`, with the reference's synonym entries stored
verbatim (defects included). `quirks` decides how they are read:

* `reference` (default): entries as stored, so " motor bike", " cheesecake" (leading space) and "iPhone"
  (capital, captions are lower-cased) never match, as in the scorer behind published numbers.
* `fixed`: entries stripped and lower-cased, so they map to motorcycle, cake and cell phone.

Polysemous mappings are kept in both modes, and they do create false hallucinations: person <- man, pitcher,
player, rider; dining table <- table, desk; chair <- seat, stool; sports ball <- ball; tie <- bow; bowl <-
container; laptop <- computer, notebook; tv <- monitor; cell phone <- phone; donut <- bagel; cake <- pancake;
sheep <- goat, ram; cow <- bull, buffalo; bear <- panda; car <- van, cab; airplane <- jet; orange (the
colour) is the fruit; "remote" the adjective is the remote control.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from types import MappingProxyType

from vlmfix.eval._io import sha256_json
from vlmfix.eval.errors import EvalInputError

QUIRK_MODES = ("reference", "fixed")
VOCABULARY_FILE = "chair_coco_vocabulary.json"


def check_quirks(quirks: str) -> str:
    if quirks not in QUIRK_MODES:
        raise EvalInputError(
            f"`quirks` must be one of {', '.join(QUIRK_MODES)}, got {quirks!r}; 'reference' reproduces "
            "published CHAIR numbers, 'fixed' repairs the reference's vocabulary and lemmatizer defects."
        )
    return quirks


@dataclass(frozen=True)
class ChairVocabulary:
    """The active CHAIR vocabulary (after the quirk mode and any user extras are applied).

    Args:
        version: version of the shipped data file.
        quirks: `reference` or `fixed`.
        node_words: the object classes, in COCO category-id order, extras last.
        synonyms: entry (one or two words) -> node word.
        double_words: "first second" -> the single token the pair is merged into (one greedy bigram pass).
        toilet_trigger: words that must all be present for the toilet rule to fire.
        toilet_drop: the word the toilet rule then drops ("seat").
        sha256: content hash of all of the above (recorded in the run fingerprint).
    """

    version: str
    quirks: str
    node_words: tuple[str, ...]
    synonyms: Mapping[str, str]
    double_words: Mapping[str, str]
    toilet_trigger: tuple[str, ...]
    toilet_drop: str
    sha256: str

    def node_of(self, entry: str) -> str | None:
        """The node word an entry maps to, or None when it is not in the vocabulary."""
        return self.synonyms.get(entry)


@lru_cache(maxsize=1)
def _raw_vocabulary() -> dict:
    text = (
        resources.files("vlmfix.eval").joinpath("data").joinpath(VOCABULARY_FILE).read_text(encoding="utf-8")
    )
    return json.loads(text)


def load_vocabulary(
    quirks: str = "reference", extra: Mapping[str, Sequence[str]] | None = None
) -> ChairVocabulary:
    """Load the COCO CHAIR vocabulary.

    Args:
        quirks: `reference` (entries verbatim) or `fixed` (entries stripped and lower-cased).
        extra: user-added nodes and synonyms, `{node word: [synonym, ...]}` (`chair.vocabulary.extra`), for
            datasets whose category names are not COCO node words. Entries must be lower-case and of one or
            two words; a two-word entry also gets an identity double-word entry so that it can match.

    >>> vocab = load_vocabulary()
    >>> vocab.node_of("puppy"), vocab.node_of("iPhone"), load_vocabulary("fixed").node_of("iphone")
    ('dog', 'cell phone', 'cell phone')
    """
    check_quirks(quirks)
    raw = _raw_vocabulary()
    node_words = list(raw["node_words"])
    synonyms: dict[str, str] = {}
    for line in raw["synonyms"]:
        node = line[0]
        for entry in line:
            key = " ".join(entry.lower().split()) if quirks == "fixed" else entry
            synonyms[key] = node
    double_words = dict(raw["double_words"])
    for node, entries in (extra or {}).items():
        _add_extra(node, entries, node_words, synonyms, double_words)
    rule = raw["toilet_rule"]
    body = {
        "version": raw["version"],
        "quirks": quirks,
        "node_words": node_words,
        "synonyms": synonyms,
        "double_words": double_words,
        "toilet_rule": rule,
    }
    return ChairVocabulary(
        version=raw["version"],
        quirks=quirks,
        node_words=tuple(node_words),
        synonyms=MappingProxyType(synonyms),
        double_words=MappingProxyType(double_words),
        toilet_trigger=tuple(rule["when_all_present"]),
        toilet_drop=rule["drop"],
        sha256=sha256_json(body),
    )


def _add_extra(
    node: str,
    entries: Sequence[str],
    node_words: list[str],
    synonyms: dict[str, str],
    double_words: dict[str, str],
) -> None:
    if isinstance(entries, str):
        raise EvalInputError(
            f"`extra[{node!r}]` must be a list of synonyms, got the string {entries!r}; write [{entries!r}]."
        )
    for entry in (node, *entries):
        words = entry.split(" ")
        if entry != entry.lower() or not entry or len(words) > 2 or "" in words:
            raise EvalInputError(
                f"vocabulary extra entry {entry!r} (node {node!r}) must be one or two lower-case words "
                "separated by one space, because captions are lower-cased and merged by bigrams only."
            )
        if entry in synonyms and synonyms[entry] != node and entry != node:
            raise EvalInputError(
                f"vocabulary extra entry {entry!r} is already a synonym of {synonyms[entry]!r}, not "
                f"{node!r}; remove it from `extra` or put it under that node."
            )
    if node in synonyms and synonyms[node] != node:
        raise EvalInputError(
            f"vocabulary extra node {node!r} is already a synonym of {synonyms[node]!r}; add synonyms under "
            f"{synonyms[node]!r} instead."
        )
    if node not in node_words:
        node_words.append(node)
    for entry in (node, *entries):
        synonyms[entry] = node
        if " " in entry:
            double_words.setdefault(entry, entry)
