"""POPE (Li et al., EMNLP 2023): yes/no object-existence questions, with explicit parser, version and splits.

```python
from vlmfix.eval import pope
qfile = pope.load_question_file("coco_pope_random.json", split="random")   # version identified by hash
scores = pope.score_pope(qfile.questions, answers, parser="official", split="random")
summary = pope.summarize_pope([scores, ...])                             # mean F1 / accuracy, pooled
pope.build_pope("instances.json", "out/", name="toy", config=pope.PopeBuildConfig(n_images=50))
```
"""

from vlmfix.eval.pope.build import (
    DEFAULT_TEMPLATE,
    POSITIVE_ORDERS,
    ObjectLists,
    PopeBuild,
    PopeBuildConfig,
    build_pope,
    build_split,
    object_lists_from_coco,
    object_statistics,
    question_text,
    ranked,
    select_images,
)
from vlmfix.eval.pope.hf import HFPopeSplit, load_hf_pope
from vlmfix.eval.pope.parsers import NO, PARSERS, UNKNOWN, YES, AnswerParser, get_parser, parse_answer
from vlmfix.eval.pope.questions import (
    CONTENT_PINS,
    DATASETS,
    LABELS,
    PINNED_FILES,
    SPLITS,
    VERSIONS,
    PinnedPopeFile,
    PopeQuestion,
    QuestionFile,
    find_question_file,
    load_question_file,
    questions_sha256,
    read_questions,
    write_questions,
)
from vlmfix.eval.pope.score import (
    PopeCounts,
    PopeScores,
    PopeSummary,
    count_outcomes,
    metrics_from_counts,
    read_answers,
    score_pope,
    summarize_pope,
)

__all__ = [
    "CONTENT_PINS",
    "DATASETS",
    "DEFAULT_TEMPLATE",
    "LABELS",
    "NO",
    "PARSERS",
    "PINNED_FILES",
    "POSITIVE_ORDERS",
    "SPLITS",
    "UNKNOWN",
    "VERSIONS",
    "YES",
    "AnswerParser",
    "HFPopeSplit",
    "ObjectLists",
    "PinnedPopeFile",
    "PopeBuild",
    "PopeBuildConfig",
    "PopeCounts",
    "PopeQuestion",
    "PopeScores",
    "PopeSummary",
    "QuestionFile",
    "build_pope",
    "build_split",
    "count_outcomes",
    "find_question_file",
    "get_parser",
    "load_hf_pope",
    "load_question_file",
    "metrics_from_counts",
    "object_lists_from_coco",
    "object_statistics",
    "parse_answer",
    "question_text",
    "questions_sha256",
    "ranked",
    "read_answers",
    "read_questions",
    "score_pope",
    "select_images",
    "summarize_pope",
    "write_questions",
]
