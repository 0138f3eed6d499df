"""lmms-eval task folders scored by vlmfix's own scorers (no lmms-eval import: the task's `utils.py` imports this).

`write_pope_task(out, questions, images, name=...)` writes `out/<name>/`:

```
<name>.yaml   the task: local JSON Lines docs (absolute path), generate_until with `until: []`, vlmfix's metrics
docs.jsonl    one doc per question: question_id, image (absolute path), question (prompt text), label
utils.py      two lines: re-exports this module's doc and metric functions
```

so `lmms-eval --include_path out --tasks <name>` scores a run with `vlmfix.eval.pope.score_pope` (the named
parser; F1 computed as the app computes it) and lmms-eval's numbers equal the app's on the same answers.
lmms-eval YAML values are not environment-expanded, hence absolute paths, written at run time.
`toy_pope_questions` builds the toy's POPE questions exactly as the benchmark app does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmfix.eval import pope
from vlmfix.eval._io import atomic_write_text
from vlmfix.validation import choice, number, text

DOCS_FILE = "docs.jsonl"
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unknown_rate")
UTILS_SOURCE = (
    '"""Written by `python -m vlmfix.integrations.lmms_eval write-tasks`: the task\'s doc and metric functions."""\n'
    "from vlmfix.integrations.lmms_tasks import *  # noqa: F401,F403\n"
)


def write_pope_task(
    out: str | Path,
    questions: Sequence[pope.PopeQuestion],
    images: str | Path,
    *,
    name: str,
    split: str | None = None,
    parser: str = "official",
    prompt_suffix: str = "",
    max_new_tokens: int = 8,
) -> Path:
    """Write the POPE task `name` (its YAML, docs and utils.py) under `out/name`; return the YAML's path.

    Each doc's prompt is the question text + `prompt_suffix`, and its image `images / question.image`, as the
    benchmark app builds them; every image must exist (checked here, before lmms-eval loads anything).
    """
    text(name, "name", meaning="the lmms-eval task name")
    choice(parser, "parser", pope.PARSERS.names(), meaning="the yes/no answer parser")
    text(prompt_suffix, "prompt_suffix", allow_empty=True)
    number(max_new_tokens, "max_new_tokens", low=1, integer=True)
    if not questions:
        raise ValueError(f"task {name!r} has no questions; pass a non-empty question list.")
    image_dir = Path(images).expanduser().resolve()
    docs = [{"question_id": q.question_id, "image": str(image_dir / q.image), "question": q.text + prompt_suffix,
             "label": q.label, "object": q.object, "parser": parser, "split": split} for q in questions]
    missing = [str(image_dir / q.image) for q in questions if not (image_dir / q.image).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of task {name!r} are missing, e.g. {missing[0]!r}; point "
                                "images at the folder that holds the question file's images.")
    folder = Path(out).expanduser().resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / DOCS_FILE, "".join(json.dumps(doc) + "\n" for doc in docs))
    atomic_write_text(folder / "utils.py", UTILS_SOURCE)
    yaml_path = folder / f"{name}.yaml"
    atomic_write_text(yaml_path, pope_task_yaml(name, folder / DOCS_FILE, max_new_tokens))
    return yaml_path


def pope_task_yaml(name: str, docs: Path, max_new_tokens: int) -> str:
    """The task YAML (lmms-eval's `!function` tags name functions of the folder's utils.py)."""
    metrics = "".join(f"  - metric: pope_{m}\n    aggregation: !function utils.aggregate_pope_{m}\n"
                      f"    higher_is_better: {'false' if m in ('unknown_rate', 'yes_ratio') else 'true'}\n"
                      for m in METRICS)
    return (
        f"# Written by python -m vlmfix.integrations.lmms_eval write-tasks; scored by vlmfix.eval.pope.\n"
        f"task: {json.dumps(name)}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(docs))}\n"
        f"test_split: test\n"
        f"output_type: generate_until\n"
        f"doc_to_visual: !function utils.pope_doc_to_visual\n"
        f"doc_to_text: !function utils.pope_doc_to_text\n"
        f"doc_to_target: label\n"
        f"generation_kwargs:\n  until: []\n  max_new_tokens: {max_new_tokens}\n  temperature: 0\n"
        f"  num_beams: 1\n  do_sample: false\n"
        f"process_results: !function utils.pope_process_results\n"
        f"metric_list:\n{metrics}"
        f"metadata:\n  version: 0.0\n"
    )


# ------------------------------------------------------------------ the functions the task's utils.py exports
def pope_doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    from PIL import Image

    return [Image.open(doc["image"]).convert("RGB")]


def pope_doc_to_text(doc: dict[str, Any]) -> str:
    return str(doc["question"])


def pope_process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One row per metric: what `score_pope` needs to score the doc again (lmms-eval aggregates per metric)."""
    row = {"question_id": doc["question_id"], "image": doc["image"], "question": doc["question"],
           "label": doc["label"], "answer": results[0], "parser": doc["parser"], "split": doc["split"]}
    return {f"pope_{m}": row for m in METRICS}


def score_rows(rows: Sequence[dict[str, Any]]) -> pope.PopeScores:
    """`score_pope` over the processed rows of one task (one parser and split, as the task's docs hold)."""
    parsers = {row["parser"] for row in rows}
    if len(parsers) != 1:
        raise ValueError(f"a POPE task's rows must share one parser, got {sorted(parsers)}; write one task per parser.")
    questions = [pope.PopeQuestion(row["question_id"], Path(row["image"]).name, row["question"], row["label"])
                 for row in rows]
    answers = {int(row["question_id"]): str(row["answer"]) for row in rows}
    return pope.score_pope(questions, answers, parser=parsers.pop(), split=rows[0]["split"])


def aggregate_pope_accuracy(rows: Sequence[dict[str, Any]]) -> float:
    return score_rows(rows).accuracy


def aggregate_pope_precision(rows: Sequence[dict[str, Any]]) -> float:
    return score_rows(rows).precision


def aggregate_pope_recall(rows: Sequence[dict[str, Any]]) -> float:
    return score_rows(rows).recall


def aggregate_pope_f1(rows: Sequence[dict[str, Any]]) -> float:
    return score_rows(rows).f1


def aggregate_pope_yes_ratio(rows: Sequence[dict[str, Any]]) -> float:
    return score_rows(rows).yes_ratio


def aggregate_pope_unknown_rate(rows: Sequence[dict[str, Any]]) -> float:
    return score_rows(rows).unknown_rate


# ------------------------------------------------------------------ the toy's questions
def toy_pope_questions(fast: bool, split: str, n_images: int, cache_dir: str | Path,
                       seed: int = 0) -> tuple[list[pope.PopeQuestion], Path]:
    """The toy's POPE questions of `split` (built from its val annotations as the app builds them, into
    `cache_dir`) and the folder of their images."""
    from vlmfix.toy import build_toy

    choice(split, "split", pope.SPLITS)
    paths = build_toy(fast=fast, progress=False)
    data = Path(paths.data_dir)
    instances = data / "annotations" / "instances_val.json"
    out = Path(cache_dir).expanduser()
    config = pope.PopeBuildConfig(n_images=n_images, seed=seed)
    pope.build_pope(instances, out, "data", config)
    return pope.read_questions(out / f"data_pope_{split}.jsonl"), data / "images" / "val"


__all__ = [
    "aggregate_pope_accuracy", "aggregate_pope_f1", "aggregate_pope_precision", "aggregate_pope_recall",
    "aggregate_pope_unknown_rate", "aggregate_pope_yes_ratio", "pope_doc_to_text", "pope_doc_to_visual",
    "pope_process_results",
]


# ------------------------------------------------------------------ the command line
def main(argv: Sequence[str] | None = None) -> None:
    """`write-tasks --out DIR (--toy toy_fast | --questions FILE --images DIR) [options]`: write one POPE task."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlmfix.integrations.lmms_eval",
                                     description="Write lmms-eval task folders scored by vlmfix.eval.")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write-tasks", help="write a POPE task (YAML, docs, utils.py) under --out")
    write.add_argument("--out", required=True, help="the folder to pass to lmms-eval's --include_path")
    source = write.add_mutually_exclusive_group(required=True)
    source.add_argument("--toy", choices=("toy", "toy_fast"), help="the toy's POPE questions (built, cached)")
    source.add_argument("--questions", help="a POPE question file (JSON Lines or JSON array)")
    write.add_argument("--images", help="the folder of the question file's images (with --questions)")
    write.add_argument("--name", help="the task name (default: vlmfix_<toy>_pope_<split>, or vlmfix_pope_<split>)")
    write.add_argument("--split", default="random", choices=pope.SPLITS)
    write.add_argument("--n-images", type=int, default=2, help="images of the toy's questions (6 questions each)")
    write.add_argument("--parser", default="official", choices=pope.PARSERS.names())
    write.add_argument("--prompt-suffix", default="")
    write.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    if args.toy is not None:
        questions, images = toy_pope_questions(args.toy == "toy_fast", args.split, args.n_images,
                                               out / ".cache" / f"{args.toy}-{args.n_images}")
        name = args.name or f"vlmfix_{args.toy}_pope_{args.split}"
    else:
        if args.images is None:
            parser.error("--questions needs --images (the folder of its images)")
        questions = list(pope.load_question_file(args.questions, split=args.split).questions)
        images, name = Path(args.images), args.name or f"vlmfix_pope_{args.split}"
    path = write_pope_task(out, questions, images, name=name, split=args.split, parser=args.parser,
                           prompt_suffix=args.prompt_suffix, max_new_tokens=args.max_new_tokens)
    print(f"wrote {path} ({len(questions)} questions); run: lmms-eval --model vlmfix --model_args "
          f"pretrained=...,methods=... --include_path {out} --tasks {name}")


if __name__ == "__main__":
    main()
