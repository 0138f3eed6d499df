"""Texts of the toy: reference captions, prompts, yes/no questions and the DCD preference pairs.

Captions name every object of a scene once, in a canonical order (by COCO id, pair members adjacent:
"a dog with a frisbee"), which is what gives the decoder its co-occurrence prior. Templates,
joiners and CHAIR synonyms vary between the captions of an image. No caption uses a word that CHAIR maps to an object
other than the one meant (no colour words such as "orange", no "table" or "people").
"""

from __future__ import annotations

import numpy as np

from .categories import CATEGORIES, CATEGORY_BY_NAME, PAIRS, PARTNER

CAPTION_PROMPT = "Describe this image."
# Prompts of the CHAIR presets too, so the benchmark app's default prompts are in-vocabulary.
CAPTION_PROMPTS = (
    CAPTION_PROMPT,
    "Please describe this image in detail.",
    "Please help me describe the image in detail.",
    "Describe the image.",
)
CAPTION_PROMPT_WEIGHTS = (0.55, 0.2, 0.15, 0.1)
QUESTION_TEMPLATE = "Is there {article} {name} in the image?"
# POPE's prompt suffixes (LLaVA-1.5 and VCD presets) are trained too.
QUESTION_SUFFIXES = ("", "\nAnswer the question using a single word or phrase.",
                     " Please answer this question with one word.")
QUESTION_SUFFIX_WEIGHTS = (0.5, 0.3, 0.2)
YES, NO = "Yes", "No"
CAPTION_TEMPLATES = (
    "{Objects}.",
    "There is {objects} in the image.",
    "The image shows {objects}.",
    "In this picture we can see {objects}.",
    "A picture of {objects}.",
    "This photo contains {objects}.",
)
CAPTIONS_PER_IMAGE = 5  # each with a different template
SYNONYM_RATE = 0.2  # share of mentions that use a CHAIR synonym instead of the category name
PAIR_JOINERS = ("with", "and")
_PAIR_POSITION = {name: position for pair in PAIRS for position, name in enumerate(pair)}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def question(name: str) -> str:
    """The POPE question about category `name` ("Is there an umbrella in the image?")."""
    return QUESTION_TEMPLATE.format(article=article(name), name=name)


def _group_units(names: list[str]) -> list[list[str]]:
    """Split `names` into units: a pair whose members are both present, or a single object."""
    units: list[list[str]] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        partner = PARTNER.get(name)
        unit = [name, partner] if partner in names else [name]
        seen.update(unit)
        units.append(unit)
    return units


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _render(template: str, units: list[list[str]], joiner: str) -> str:
    """Fill `template` with `units` (each a list of surface words, pair members joined by `joiner`)."""
    phrases = [f" {joiner} ".join(f"{article(word)} {word}" for word in unit) for unit in units]
    objects = _join(phrases)
    return template.format(objects=objects, Objects=objects[0].upper() + objects[1:])


def _surface(name: str, rng: np.random.Generator) -> str:
    synonyms = CATEGORY_BY_NAME[name].synonyms
    if synonyms and rng.random() < SYNONYM_RATE:
        return synonyms[int(rng.integers(len(synonyms)))]
    return name


def _canonical_units(names: list[str]) -> list[list[str]]:
    """Units of `names` in the canonical caption order: by COCO id of the unit's first member, pair
    members in `PAIRS` order. A fixed order makes captions easy to learn and the pairs adjacent."""
    units = _group_units(sorted(names, key=lambda name: CATEGORY_BY_NAME[name].id))
    return [sorted(unit, key=_PAIR_POSITION.__getitem__) if len(unit) == 2 else unit for unit in units]


def reference_captions(names: list[str], rng: np.random.Generator) -> list[str]:
    """`CAPTIONS_PER_IMAGE` captions naming each of `names` once, each with its own template."""
    units = _canonical_units(names)
    templates = rng.permutation(len(CAPTION_TEMPLATES))[:CAPTIONS_PER_IMAGE]
    captions = []
    for template in templates:
        joiner = PAIR_JOINERS[int(rng.integers(len(PAIR_JOINERS)))]
        words = [[_surface(name, rng) for name in unit] for unit in units]
        captions.append(_render(CAPTION_TEMPLATES[int(template)], words, joiner))
    return captions


def preference_pair(names: list[str], rng: np.random.Generator) -> tuple[str, str]:
    """(chosen, rejected) captions of a scene holding `names`, with the same template and joiner.

    The rejected caption adds the absent partner of a lone pair member when the scene has one
    (the co-occurrence hallucination), else it swaps one object for an absent category.
    """
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    joiner = PAIR_JOINERS[int(rng.integers(len(PAIR_JOINERS)))]
    lone = [name for name in names if name in PARTNER and PARTNER[name] not in names]
    if lone:
        wrong = [*names, PARTNER[lone[int(rng.integers(len(lone)))]]]
    else:
        absent = [c.name for c in CATEGORIES if c.name not in names]
        wrong = list(names)
        wrong[int(rng.integers(len(wrong)))] = absent[int(rng.integers(len(absent)))]
    chosen = _render(template, _canonical_units(names), joiner)
    return chosen, _render(template, _canonical_units(wrong), joiner)


def text_corpus() -> list[str]:
    """Every fixed text of the toy (templates, prompts, all names and synonyms), for the vocabulary."""
    words = [w for c in CATEGORIES for w in (c.name, *c.synonyms)]
    fixed = [*CAPTION_PROMPTS, *QUESTION_SUFFIXES, YES, NO, "USER: ASSISTANT:", "A An an a , and", *PAIR_JOINERS]
    templates = [t.format(objects="", Objects="") for t in CAPTION_TEMPLATES]
    return [*fixed, *templates, *words, *(question(w) for w in words)]
