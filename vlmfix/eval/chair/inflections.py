"""The noun inflection table of the `simple` normalizer: inflected form -> base form, as versioned JSON data.

Candidates come from rules applied to every single-word vocabulary entry and every word inside a
double-word key: +s; +es after s/x/z/ch/sh; consonant+y -> ies; -man -> -men; f/fe -> ves for a short list
(knife, wolf, calf, leaf, shelf, thief); irregulars (children, mice, oxen, geese, feet, teeth); zero
plurals (sheep, bison, buffalo, cattle), entries that are plurals already and misspellings get none.

`vlmfix/eval/data/chair_noun_inflections.json` holds two maps:

* `forms`: pairs on which WordNet 3.0's noun lemmatizer agrees (used in both quirk modes);
* `fixed_only`: rule pairs WordNet gets "wrong" (men stays men, vases -> vas, plurals absent from
  WordNet stay unchanged); used only with `quirks='fixed'`, and by `opera_nltk` as its fixed-mode override.

The table is precomputed by a maintainer with NLTK + WordNet installed:
`python -m vlmfix.eval.chair.build_inflections` rewrites the JSON file (it never downloads anything).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from importlib import resources
from types import MappingProxyType

INFLECTIONS_FILE = "chair_noun_inflections.json"

ZERO_PLURALS = frozenset({"sheep", "bison", "buffalo", "cattle"})
# The spec's short f/fe -> ves list, plus "thief" (a person synonym; WordNet maps thieves -> thief).
F_TO_VES = MappingProxyType(
    {
        "knife": "knives",
        "wolf": "wolves",
        "calf": "calves",
        "leaf": "leaves",
        "shelf": "shelves",
        "thief": "thieves",
    }
)
IRREGULARS = MappingProxyType(
    {"child": "children", "mouse": "mice", "ox": "oxen", "goose": "geese", "foot": "feet", "tooth": "teeth"}
)
# Irregular heads that also inflect as the last part of a compound ("grandchild" -> "grandchildren").
_COMPOUND_IRREGULARS = ("child", "mouse", "goose", "foot", "tooth")
# Entries that already are plurals, or the reference's deliberate misspellings (matched as written).
NO_INFLECTION = frozenset(
    {
        "children",
        "oxen",
        "people",
        "skis",
        "scissors",
        "mice",
        "geese",  # already plural
        "knive",
        "televison",
        "solider",
        "phon",  # deliberate misspellings
        "hot",
        "potted",
        "sports",
        "glas",  # modifiers and relics inside double-word keys
    }
)
MAN_TAKES_S = frozenset({"doberman"})
_VOWELS = "aeiou"


def plural_candidates(word: str) -> list[tuple[str, str]]:
    """The rule-derived plurals of a base word, as (form, rule name) pairs.

    >>> plural_candidates("puppy"), plural_candidates("policeman"), plural_candidates("sheep")
    ([('puppies', 'y_ies')], [('policemen', 'man_men')], [])
    """
    if word in ZERO_PLURALS or word in NO_INFLECTION or not word.isalpha():
        return []
    if word in IRREGULARS:
        return [(IRREGULARS[word], "irregular")]
    for head in _COMPOUND_IRREGULARS:
        if word.endswith(head) and len(word) > len(head):
            return [(word[: -len(head)] + IRREGULARS[head], "irregular")]
    if word in F_TO_VES:
        return [(F_TO_VES[word], "f_ves")]
    if word.endswith("man") and word not in MAN_TAKES_S:
        return [(word[:-3] + "men", "man_men")]
    if len(word) > 1 and word.endswith("y") and word[-2] not in _VOWELS:
        return [(word[:-1] + "ies", "y_ies")]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return [(word + "es", "es")]
    return [(word + "s", "s")]


def base_words(vocabulary_entries: Iterable[str], double_word_keys: Iterable[str]) -> list[str]:
    """Single-word vocabulary entries plus every word inside a double-word key, stripped and lower-cased."""
    words = {entry.strip().lower() for entry in vocabulary_entries if len(entry.split()) == 1}
    words |= {word for key in double_word_keys for word in key.lower().split()}
    return sorted(words)


def derive_table(words: Iterable[str], lemmatize: Callable[[str], str] | None) -> dict[str, dict[str, str]]:
    """Build `{"forms": {...}, "fixed_only": {...}}` from base words.

    `lemmatize` is WordNet's noun lemmatizer (form -> lemma). A pair goes to `forms` when it returns the base,
    else to `fixed_only`. When two bases yield the same form, the one WordNet agrees with wins, then the
    shorter base, then the alphabetically first. Without a lemmatizer every pair goes to `forms`.
    """
    by_form: dict[str, list[str]] = {}
    for base in words:
        for form, _rule in plural_candidates(base):
            if form != base:
                by_form.setdefault(form, []).append(base)
    forms: dict[str, str] = {}
    fixed_only: dict[str, str] = {}
    for form in sorted(by_form):
        bases = sorted(set(by_form[form]), key=lambda b: (len(b), b))
        lemma = lemmatize(form) if lemmatize is not None else None
        if lemmatize is None:
            forms[form] = bases[0]
        elif lemma in bases:
            forms[form] = lemma
        else:
            fixed_only[form] = bases[0]
    return {"forms": forms, "fixed_only": fixed_only}


@lru_cache(maxsize=1)
def _raw_table() -> dict:
    text = (
        resources.files("vlmfix.eval").joinpath("data").joinpath(INFLECTIONS_FILE).read_text(encoding="utf-8")
    )
    return json.loads(text)


def table_version() -> str:
    return str(_raw_table()["version"])


@lru_cache(maxsize=2)
def inflection_table(quirks: str) -> Mapping[str, str]:
    """Form -> base for a quirk mode: `forms` only for `reference`, `forms` plus `fixed_only` for `fixed`."""
    raw = _raw_table()
    table = dict(raw["forms"])
    if quirks == "fixed":
        table.update(raw["fixed_only"])
    return MappingProxyType(table)


def fixed_overrides() -> Mapping[str, str]:
    """The pairs WordNet disagrees with: `opera_nltk`'s override table under `quirks='fixed'`."""
    return MappingProxyType(dict(_raw_table()["fixed_only"]))
