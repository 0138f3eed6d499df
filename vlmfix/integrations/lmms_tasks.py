"""lmms-eval task folders scored by vlmfix's own scorers, with vlmfix's protocol fingerprint in the results (no
lmms-eval import: each task's `utils.py` imports this).

`write_task(out, content, name=..., max_new_tokens=...)` writes `out/<name>/`:

```
<name>.yaml        the task: local JSON Lines docs (absolute path), generate_until with `until: []`, the metrics
docs.jsonl         one doc per question: key, image (absolute path, or null for a text-only question), prompt, target
vlmfix_task.json   what the scorer reads back: benchmark, settings (parser, ...), question fields, fingerprint parts
utils.py           binds this task's functions: doc_to_visual, doc_to_text, process_results, one aggregate_<metric>
                   per metric, each made by `LmmsTask.aggregator(metric)` (lmms-eval imports them by name)
```

so `lmms-eval --include_path out --tasks <name>` scores a run with the `vlmfix.eval` scorer of the benchmark
(POPE, AMBER generative / discriminative, MME hallucination subset, HallusionBench; `lmms_benchmarks`) and
lmms-eval's numbers equal the benchmark app's on the same answers. lmms-eval YAML values are not
environment-expanded, hence absolute paths, written at run time.

Every task also has two metrics `vlmfix_fingerprint` (the protocol fingerprint, as the app's result.json holds
it: model, methods and their parameters, decoding, prompt, chat template, execution, library versions, the
benchmark's section: parser, data hashes, AMBER's normalizer and similarity backend, ...) and
`vlmfix_fingerprint_sha256` (its hash), plus an `lmms_eval` section (task YAML, task file and docs sha256). The
model half comes from the `vlmfix` lmms-eval model (`VlmfixLMM` records itself here when built, and each task's
generation kwargs when it answers); a task run by another lmms-eval model says `model: unknown`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmfix.eval import amber, hallusion, mme, pope
from vlmfix.eval._io import atomic_write_text, sha256_file
from vlmfix.eval.fingerprint import DEFAULT_LIBRARIES, Decoding, Execution, fingerprint_hash, protocol_fingerprint
from vlmfix.integrations.lmms_benchmarks import (
    POPE_METRICS,
    SCORERS,
    Scored,
    TaskContent,
    amber_content,
    check_images,
    hallusion_content,
    mme_content,
    pope_content,
)
from vlmfix.validation import choice, number, text

TASK_FORMAT = 1
DOCS_FILE = "docs.jsonl"
TASK_FILE = "vlmfix_task.json"
FINGERPRINT = "vlmfix_fingerprint"
FINGERPRINT_SHA256 = "vlmfix_fingerprint_sha256"
PREFIXES = {"pope": "pope", "amber_generative": "amber", "amber_discriminative": "amber", "mme": "mme",
            "hallusion": "hallusion"}
UNKNOWN = "unknown (not run by the vlmfix lmms-eval model)"
LIBRARIES = (*DEFAULT_LIBRARIES, "lmms_eval")
METRICS = POPE_METRICS  # kept for callers


# ------------------------------------------------------------------ writing a task folder
def write_task(out: str | Path, content: TaskContent, *, name: str, max_new_tokens: int) -> Path:
    """Write the task `name` (YAML, docs, task file, utils.py) under `out/name`; return the YAML's path. Every
    image must exist (checked here, before lmms-eval loads anything)."""
    text(name, "name", meaning="the lmms-eval task name")
    number(max_new_tokens, "max_new_tokens", low=1, integer=True, meaning="the task's generation budget")
    if not content.docs:
        raise ValueError(f"task {name!r} has no questions; pass a non-empty question list (or a larger limit).")
    check_images(content, name)
    folder = Path(out).expanduser().resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    metrics = metric_names(content.benchmark, content.metrics)
    atomic_write_text(folder / DOCS_FILE, "".join(json.dumps(doc) + "\n" for doc in content.docs))
    spec = {**asdict(content), "format": TASK_FORMAT, "name": name, "max_new_tokens": max_new_tokens,
            "metrics": list(metrics)}  # lmms-eval's metric names
    del spec["docs"]  # in docs.jsonl
    atomic_write_text(folder / TASK_FILE, json.dumps(spec, indent=1) + "\n")
    atomic_write_text(folder / "utils.py", utils_source(metrics))
    yaml_path = folder / f"{name}.yaml"
    atomic_write_text(yaml_path, task_yaml(name, folder / DOCS_FILE, max_new_tokens, metrics, content.benchmark))
    return yaml_path


def metric_names(benchmark: str, metrics: Sequence[str]) -> tuple[str, ...]:
    """lmms-eval's metric names of a task: `<prefix>_<metric>`, then the two fingerprint metrics."""
    return (*(f"{PREFIXES[benchmark]}_{m}" for m in metrics), FINGERPRINT, FINGERPRINT_SHA256)


def utils_source(metrics: Sequence[str]) -> str:
    """The task's utils.py: module-level names lmms-eval's `!function utils.<name>` tags import."""
    lines = ['"""Written by `python -m vlmfix.integrations.lmms_eval write-tasks`: this task\'s functions."""',
             "from pathlib import Path", "", "from vlmfix.integrations.lmms_tasks import load_task", "",
             f"TASK = load_task(Path(__file__).with_name({TASK_FILE!r}))",
             "doc_to_visual = TASK.doc_to_visual", "doc_to_text = TASK.doc_to_text",
             "process_results = TASK.process_results"]
    lines += [f"aggregate_{metric} = TASK.aggregator({metric!r})" for metric in metrics]
    return "\n".join(lines) + "\n"


def task_yaml(name: str, docs: Path, max_new_tokens: int, metrics: Sequence[str], benchmark: str) -> str:
    """The task YAML (lmms-eval's `!function` tags name functions of the folder's utils.py)."""
    lower_is_better = ("unknown_rate", "yes_ratio", "CHAIR", "Hal", "Cog")  # AMBER: Cog counts hallu objects named
    entries = []
    for metric in metrics:
        if metric in (FINGERPRINT, FINGERPRINT_SHA256):
            better = "null"
        else:
            better = "false" if metric.endswith(lower_is_better) else "true"
        entries.append(f"  - metric: {metric}\n    aggregation: !function utils.aggregate_{metric}\n"
                       f"    higher_is_better: {better}\n")
    return (
        f"# Written by python -m vlmfix.integrations.lmms_eval write-tasks; scored by vlmfix.eval ({benchmark}).\n"
        f"task: {json.dumps(name)}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(docs))}\n"
        f"test_split: test\n"
        f"output_type: generate_until\n"
        f"doc_to_visual: !function utils.doc_to_visual\n"
        f"doc_to_text: !function utils.doc_to_text\n"
        f"doc_to_target: target\n"
        f"generation_kwargs:\n  until: []\n  max_new_tokens: {max_new_tokens}\n  temperature: 0\n"
        f"  num_beams: 1\n  do_sample: false\n"
        f"process_results: !function utils.process_results\n"
        f"metric_list:\n{''.join(entries)}"
        f"metadata:\n  version: 0.0\n  vlmfix_benchmark: {benchmark}\n"
    )


# ------------------------------------------------------------------ what the vlmfix model records of a run
@dataclass(frozen=True)
class ModelRecord:
    """The model half of the fingerprint, as the app's runner records it."""

    model_id: str
    model_revision: str | None
    method: str
    method_params: dict[str, Any]
    chat_template: str | None
    execution: Execution | None
    seed: int = 0


@dataclass
class RunRecord:
    """The vlmfix model built last in this process, and the generate keywords it used per task."""

    model: ModelRecord | None = None
    decoding: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record_model(self, model: ModelRecord) -> None:
        self.model = model
        self.decoding.clear()

    def record_decoding(self, task: str, kwargs: dict[str, Any]) -> None:
        self.decoding[task] = dict(kwargs)


RUN = RunRecord()


def decoding_of(kwargs: dict[str, Any], seed: int) -> Decoding:
    """`generate` keywords as the fingerprint's `Decoding` (the app's `decoding_of` rule)."""
    beams = int(kwargs.get("num_beams", 1))
    sample = bool(kwargs.get("do_sample", False))
    return Decoding(max_new_tokens=int(kwargs["max_new_tokens"]),
                    mode="beam" if beams > 1 else ("sample" if sample else "greedy"), num_beams=beams,
                    temperature=float(kwargs["temperature"]) if sample else None,
                    top_p=float(kwargs["top_p"]) if sample else None, seed=seed,
                    repetition_penalty=float(kwargs.get("repetition_penalty", 1.0)),
                    top_k=int(kwargs["top_k"]) if sample and "top_k" in kwargs else None)


# ------------------------------------------------------------------ a written task, loaded (what utils.py binds)
class LmmsTask:
    """A written task folder: lmms-eval's doc functions, `process_results`, and `aggregator(metric)`, the factory of
    its aggregation functions. Each aggregation scores the task's rows with the benchmark's vlmfix scorer (once per
    set of answers; the metrics share it) and returns one figure."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        spec = json.loads(self.path.read_text(encoding="utf-8"))
        if spec.get("format") != TASK_FORMAT:
            raise ValueError(f"{self.path} is not a format-{TASK_FORMAT} vlmfix task file; write the task again with "
                             "`python -m vlmfix.integrations.lmms_eval write-tasks`.")
        self.name: str = spec["name"]
        self.benchmark: str = spec["benchmark"]
        self.section: str = spec["section"]
        self.prompt: str = spec["prompt"]
        self.max_new_tokens: int = spec["max_new_tokens"]
        self.settings: dict[str, Any] = spec["settings"]
        self.protocol: dict[str, Any] = spec["protocol"]
        self.questions: list[dict[str, Any]] = spec["questions"]
        self.metrics: tuple[str, ...] = tuple(spec["metrics"])
        self._scored: tuple[tuple[tuple[int, str], ...], Scored] | None = None

    # lmms-eval's doc functions
    def doc_to_visual(self, doc: dict[str, Any]) -> list[Any]:
        if doc["image"] is None:
            return []  # a text-only question: the vlmfix model decodes it without methods
        from PIL import Image

        return [Image.open(doc["image"]).convert("RGB")]

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return str(doc["prompt"])

    def process_results(self, doc: dict[str, Any], results: Sequence[str]) -> dict[str, dict[str, Any]]:
        """One row per metric (lmms-eval aggregates per metric): the doc's key and its raw answer."""
        row = {"task": self.name, "key": int(doc["key"]), "answer": str(results[0])}
        return {metric: row for metric in self.metrics}

    def aggregator(self, metric: str) -> Callable[[Sequence[dict[str, Any]]], Any]:
        """The aggregation function of `metric` (named `aggregate_<metric>`, as utils.py binds it)."""
        choice(metric, "metric", self.metrics, meaning=f"a metric of task {self.name!r}")

        def aggregate(rows: Sequence[dict[str, Any]]) -> Any:
            return self.value(metric, rows)

        aggregate.__name__ = aggregate.__qualname__ = f"aggregate_{metric}"
        aggregate.__doc__ = f"Task {self.name!r}: {metric}, from vlmfix's {self.benchmark} scorer."
        return aggregate

    # scoring
    def value(self, metric: str, rows: Sequence[dict[str, Any]]) -> Any:
        scored = self.score(rows)
        if metric in (FINGERPRINT, FINGERPRINT_SHA256):
            fingerprint = self.fingerprint(scored)
            return fingerprint if metric == FINGERPRINT else fingerprint_hash(fingerprint)
        return scored.metrics[metric.removeprefix(PREFIXES[self.benchmark] + "_")]

    def score(self, rows: Sequence[dict[str, Any]]) -> Scored:
        """The benchmark's scorer on the rows' answers (key -> raw text), cached for the same answers."""
        foreign = sorted({str(row.get("task")) for row in rows} - {self.name})
        if foreign:
            raise ValueError(f"task {self.name!r} was given rows of task(s) {foreign}; score each task's rows apart.")
        answers = {int(row["key"]): str(row["answer"]) for row in rows}
        key = tuple(sorted(answers.items()))
        if self._scored is None or self._scored[0] != key:
            scorer = SCORERS[self.benchmark]
            self._scored = (key, scorer(self.settings, self.questions, answers, self.protocol))
        return self._scored[1]

    def fingerprint(self, scored: Scored) -> dict[str, Any]:
        """vlmfix's protocol fingerprint of this task's run (`protocol_fingerprint`, as the app's result.json
        holds it) plus the `lmms_eval` section."""
        model = RUN.model
        kwargs = RUN.decoding.get(self.name) or {"max_new_tokens": self.max_new_tokens, "num_beams": 1,
                                                  "do_sample": False}
        fingerprint = protocol_fingerprint(
            model_id=model.model_id if model else UNKNOWN, model_revision=model.model_revision if model else None,
            method=model.method if model else UNKNOWN, method_params=model.method_params if model else {},
            decoding=decoding_of(kwargs, model.seed if model else 0), prompt=self.prompt,
            chat_template=model.chat_template if model else None, execution=model.execution if model else None,
            libraries=LIBRARIES, **{self.section: scored.protocol})
        folder = self.path.parent
        fingerprint["lmms_eval"] = {"task": self.name, "task_yaml_sha256": sha256_file(folder / f"{self.name}.yaml"),
                                    "task_file_sha256": sha256_file(self.path),
                                    "docs_sha256": sha256_file(folder / DOCS_FILE)}
        return fingerprint


def load_task(path: str | Path) -> LmmsTask:
    """The task of a `vlmfix_task.json` (one object per file version: lmms-eval runs utils.py once per tag)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _load_task(str(resolved), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _load_task(path: str, mtime_ns: int, size: int) -> LmmsTask:
    return LmmsTask(path)


# ------------------------------------------------------------------ the task writers
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
    question_file: pope.QuestionFile | None = None,
) -> Path:
    """Write the POPE task `name` (prompt = question + `prompt_suffix`, image = `images / question.image`, as
    the benchmark app builds them); `question_file`: the loaded file, for the fingerprint's hashes."""
    if question_file is not None:
        content = pope_content(questions, images, split=split, parser=parser, prompt_suffix=prompt_suffix,
                               source="file", sha256=question_file.sha256, versions=question_file.versions,
                               dataset=question_file.dataset, content_sha256=question_file.content_sha256)
    else:
        digest = pope.questions_sha256(questions)
        content = pope_content(questions, images, split=split, parser=parser, prompt_suffix=prompt_suffix,
                               source="built", sha256=digest, content_sha256=digest)
    return write_task(out, content, name=name, max_new_tokens=max_new_tokens)


def write_amber_tasks(out: str | Path, data: amber.AmberData, *, name: str,
                      parts: Sequence[str] = ("generative", "discriminative"), max_new_tokens_generative: int = 512,
                      max_new_tokens: int = 128, **options: Any) -> list[Path]:
    """Write one task per AMBER part, `<name>_generative` and `<name>_discriminative` (options: those of
    `lmms_benchmarks.amber_content`: parser, normalizer, similarity, spacy_model, table, threshold, quirks,
    prompt_suffix, limit, source). The AMBER score, (1 - CHAIR + F1) / 2, combines the two tasks' figures."""
    budgets = {"generative": max_new_tokens_generative, "discriminative": max_new_tokens}
    return [write_task(out, amber_content(data, part, max_new_tokens=budgets[part], **options),
                       name=f"{name}_{part}", max_new_tokens=budgets[part]) for part in parts]


def write_mme_task(out: str | Path, questions: Sequence[mme.MmeQuestion], *, name: str, max_new_tokens: int = 128,
                   **options: Any) -> Path:
    """Write the MME hallucination-subset task (options: parser, prompt, prompt_suffix, limit, source)."""
    return write_task(out, mme_content(questions, **options), name=name, max_new_tokens=max_new_tokens)


def write_hallusion_task(out: str | Path, questions: Sequence[hallusion.HallusionQuestion],
                         hashes: dict[str, str | None], *, name: str, max_new_tokens: int = 128,
                         **options: Any) -> Path:
    """Write the HallusionBench task (options: parser, unknown_no_visual, include_text_only, prompt_suffix,
    limit); `hashes`: `hallusion.file_hashes(...)` plus the source."""
    return write_task(out, hallusion_content(questions, hashes, **options), name=name, max_new_tokens=max_new_tokens)


# ------------------------------------------------------------------ the toy's data
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


def toy_miniatures(fast: bool, cache_dir: str | Path) -> Path:
    """The toy's AMBER / MME / HallusionBench miniatures (`vlmfix.toy.bench`, as the app writes them)."""
    from vlmfix.toy import build_toy
    from vlmfix.toy.bench import write_miniatures

    return write_miniatures(build_toy(fast=fast, progress=False).data_dir, Path(cache_dir).expanduser())


__all__ = ["LmmsTask", "load_task", "write_amber_tasks", "write_hallusion_task", "write_mme_task", "write_pope_task",
           "write_task"]
