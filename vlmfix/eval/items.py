"""Which questions a run asks and with what prompt, for the benchmarks read from a local release (AMBER, the MME
hallucination subset, HallusionBench): one implementation for the benchmark app (`benchmarks/release_kinds.py`)
and the lmms-eval tasks (`vlmfix.integrations.lmms_benchmarks`), so both send a model the same items.

Each builder applies the app's `limit` rule (the first N images of AMBER by image id, of each MME subtask in
file order, the first N HallusionBench question sets so figures and groups stay whole) and returns
`PromptedItem`s: the benchmark's own row, its image (None: a text-only question) and the prompt as asked.

```python
chosen = amber_items(data, ("generative", "discriminative"), limit=10, prompt_suffix=" Answer yes or no.")
[(item.key, item.prompt) for item in chosen.items["generative"]]
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from vlmfix.eval import amber, hallusion, mme
from vlmfix.validation import optional_number

Row = TypeVar("Row")
AMBER_PARTS = ("generative", "discriminative")


@dataclass(frozen=True)
class PromptedItem(Generic[Row]):
    """One question as asked: `row` is the benchmark's own (an `AmberQuery`, `MmeQuestion`, `HallusionQuestion`),
    `key` its id in predictions, `image_path` None for a text-only question."""

    row: Row
    key: int
    image_path: Path | None
    prompt: str


def first(keys: Sequence[Row], limit: int | None) -> list[Row]:
    """The first `limit` keys (all of them when None): the `limit` rule of every builder here."""
    optional_number(limit, "limit", low=1, integer=True, meaning="the cap on images (or figure sets)")
    return list(keys) if limit is None else list(keys)[:limit]


# ------------------------------------------------------------------ AMBER
@dataclass(frozen=True)
class AmberItems:
    """AMBER's items per part, the images kept and whether they are a subset of the release's images."""

    items: dict[str, list[PromptedItem[amber.AmberQuery]]]  # part -> items
    n_images: int
    subset: bool


def amber_items(data: amber.AmberData, parts: Sequence[str], limit: int | None = None,
                prompt_suffix: str = "") -> AmberItems:
    """Each part's queries on the first `limit` image ids (ids of the generative query file, sorted): the
    generative prompt is the query file's, the discriminative one the query + `prompt_suffix`."""
    generative = data.queries("generative")
    images = sorted({amber.image_number(q.image) for q in generative})
    kept = set(first(images, limit))
    items: dict[str, list[PromptedItem[amber.AmberQuery]]] = {}
    for part in parts:
        if part not in AMBER_PARTS:
            raise ValueError(f"AMBER part must be one of {', '.join(AMBER_PARTS)}, got {part!r}.")
        queries = generative if part == "generative" else data.queries("discriminative")
        suffix = "" if part == "generative" else prompt_suffix
        items[part] = [PromptedItem(q, q.id, data.image_path(q), q.query + suffix) for q in queries
                       if amber.image_number(q.image) in kept]
    return AmberItems(items, n_images=len(kept), subset=len(kept) < len(images))


# ------------------------------------------------------------------ MME
def mme_items(questions: Sequence[mme.MmeQuestion], limit: int | None = None, prompt: str = "official",
              prompt_suffix: str = "") -> list[PromptedItem[mme.MmeQuestion]]:
    """The questions of the first `limit` images of each subtask (file order), asked as `mme.prompt_text` words
    them (`official`: verbatim; `lmms`: the yes/no request replaced by `prompt_suffix`)."""
    kept: set[tuple[str, str]] = set()
    for subtask in dict.fromkeys(q.subtask for q in questions):
        images = list(dict.fromkeys(q.image for q in questions if q.subtask == subtask))
        kept |= {(subtask, image) for image in first(images, limit)}
    return [PromptedItem(q, q.key, q.image_path, mme.prompt_text(q.question, prompt, prompt_suffix))
            for q in questions if (q.subtask, q.image) in kept]


# ------------------------------------------------------------------ HallusionBench
def hallusion_items(
    questions: Sequence[hallusion.HallusionQuestion], include_text_only: bool = True, limit: int | None = None,
    prompt_suffix: str = "",
) -> list[PromptedItem[hallusion.HallusionQuestion]]:
    """The questions of the first `limit` question sets (category, subcategory, set_id), text-only ones unless
    `include_text_only` is False; each asked as its question + `prompt_suffix`."""
    asked = [q for q in questions if include_text_only or q.image_path is not None]
    sets = list(dict.fromkeys((q.category, q.subcategory, q.set_id) for q in asked))
    kept = set(first(sets, limit))  # whole sets, so figures and question groups stay whole
    return [PromptedItem(q, q.key, q.image_path, q.question + prompt_suffix) for q in asked
            if (q.category, q.subcategory, q.set_id) in kept]
