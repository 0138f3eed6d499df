"""Maintainer script: re-derive the noun inflection table from WordNet 3.0 (needs nltk + its `wordnet` data).

`python -m vlmfix.eval.chair.build_inflections [OUT.json]` rewrites
`vlmfix/eval/data/chair_noun_inflections.json` (or OUT.json). It never downloads anything; users never run it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from vlmfix.eval.chair.inflections import INFLECTIONS_FILE, base_words, derive_table
from vlmfix.eval.chair.vocabulary import _raw_vocabulary


def _wordnet_noun_lemmatizer() -> tuple[Callable[[str], str], str]:
    import nltk
    from nltk.stem import WordNetLemmatizer

    lemmatizer = WordNetLemmatizer()
    return (lambda form: lemmatizer.lemmatize(form, pos="n")), nltk.__version__


def build_table_document(version: str = "1") -> dict:
    """The JSON document of the table, derived with the installed NLTK + WordNet (maintainers only)."""
    raw = _raw_vocabulary()
    entries = [entry for line in raw["synonyms"] for entry in line]
    lemmatize, nltk_version = _wordnet_noun_lemmatizer()
    table = derive_table(base_words(entries, raw["double_words"]), lemmatize)
    return {
        "format": "vlmfix.chair.noun_inflections",
        "version": version,
        "derived_with": f"WordNet 3.0 noun lemmatizer of NLTK {nltk_version} (WordNetLemmatizer, pos='n')",
        "description": "Inflected form -> base form for the CHAIR 'simple' normalizer. 'forms': pairs "
        "WordNet agrees with (both quirk modes). 'fixed_only': rule pairs WordNet does not reproduce "
        "(quirks='fixed').",
        **table,
    }


def main(argv: list[str] | None = None) -> int:
    """Rewrite the shipped table from WordNet (needs nltk and its `wordnet` data; downloads nothing)."""
    argv = sys.argv[1:] if argv is None else argv
    target = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "data" / INFLECTIONS_FILE
    try:
        document = build_table_document()
    except (ImportError, LookupError) as err:
        print(
            "needs nltk and its WordNet data (`pip install nltk`, `python -m nltk.downloader wordnet`): "
            f"{err}"
        )
        return 1
    target.write_text(
        json.dumps(document, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8"
    )
    print(
        f"wrote {len(document['forms'])} forms and {len(document['fixed_only'])} fixed-only forms to {target}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
