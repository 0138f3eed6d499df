"""Build the shipped AMBER similarity table from spaCy `en_core_web_lg` (a maintainer task; needs the model).

    python -m vlmfix.eval.amber.similarity_table --amber /data/AMBER [--out vlmfix/eval/data/] [--floor 0.5]

Writes `amber_similarity_en_core_web_lg-<model version>.json`: every unordered pair of distinct words of V
(relation.json keys and values) whose spaCy similarity is >= the floor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmfix.eval.amber.data import load_amber
from vlmfix.eval.amber.similarity import OFFICIAL_MODEL, TABLE_DIR, SpacySimilarity, write_table


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amber", required=True, help="the AMBER clone (folder holding data/)")
    parser.add_argument("--out", default=str(TABLE_DIR))
    parser.add_argument("--floor", type=float, default=0.5)
    args = parser.parse_args(argv)
    data = load_amber(args.amber)
    spacy = SpacySimilarity(OFFICIAL_MODEL)
    info = spacy.describe()
    header = {key: info[key] for key in ("spacy_version", "model", "model_version", "vectors")}
    path = Path(args.out) / f"amber_similarity_{OFFICIAL_MODEL}-{info['model_version']}.json"
    write_table(path, data.vocabulary, spacy, header, floor=args.floor)
    print(path)
    return path


if __name__ == "__main__":
    main()
