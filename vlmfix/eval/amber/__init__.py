"""AMBER (Wang et al., arXiv 2311.07397): generative CHAIR / Cover / Hal / Cog and discriminative existence /
attribute / relation ("No" positive), scored as the official `inference.py` does, with the protocol explicit.

```python
from vlmfix.eval import amber
data = amber.load_amber("/data/AMBER")
similarity = amber.make_similarity("official")          # spaCy lg, else the shipped table, else an error
gen = amber.score_generative(descriptions, data, amber.make_normalizer("nltk"), similarity)
dis = amber.score_discriminative(answers, data, parser="amber_exact")
amber.amber_score(gen, dis)                              # (1 - CHAIR + F1) / 2
```
"""

from vlmfix.eval.amber.data import (
    ATTRIBUTE_TYPES,
    EXISTENCE,
    GENERATIVE,
    QUERY_SETS,
    RELATION_TYPES,
    SOURCE,
    AmberData,
    AmberEntry,
    AmberQuery,
    association_from_json,
    entries_from_json,
    image_number,
    load_amber,
)
from vlmfix.eval.amber.discriminative import (
    DIMENSIONS,
    Counts,
    DiscriminativeScores,
    amber_score,
    missing_dimensions,
    score_discriminative,
)
from vlmfix.eval.amber.generative import (
    QUIRK_MODES,
    GenerativeScores,
    ResponseOutcome,
    response_mentions,
    response_nouns,
    score_generative,
    score_response,
)
from vlmfix.eval.amber.nouns import NORMALIZERS, NltkNouns, SimpleNouns, make_normalizer
from vlmfix.eval.amber.scored import amber_scored, write_amber_scored
from vlmfix.eval.amber.similarity import (
    BACKENDS,
    NoSimilarity,
    SimilarityUnavailableError,
    SpacySimilarity,
    TableSimilarity,
    make_similarity,
    read_table,
    write_table,
)

__all__ = [
    "ATTRIBUTE_TYPES",
    "BACKENDS",
    "DIMENSIONS",
    "EXISTENCE",
    "GENERATIVE",
    "NORMALIZERS",
    "QUERY_SETS",
    "QUIRK_MODES",
    "RELATION_TYPES",
    "SOURCE",
    "AmberData",
    "AmberEntry",
    "AmberQuery",
    "Counts",
    "DiscriminativeScores",
    "GenerativeScores",
    "NltkNouns",
    "NoSimilarity",
    "ResponseOutcome",
    "SimilarityUnavailableError",
    "SimpleNouns",
    "SpacySimilarity",
    "TableSimilarity",
    "amber_score",
    "amber_scored",
    "association_from_json",
    "entries_from_json",
    "image_number",
    "load_amber",
    "make_normalizer",
    "make_similarity",
    "missing_dimensions",
    "read_table",
    "response_mentions",
    "response_nouns",
    "score_discriminative",
    "score_generative",
    "score_response",
    "write_amber_scored",
    "write_table",
]
