"""Multirun summary: one table of every run's metrics (markdown + CSV), a plot, printed at the end.

A job that fails in a multirun leaves `failure.json` in its job dir (`write_failure`, called by the app)
instead of stopping the sweep; the summary lists the failed jobs (overrides and the error's first line)
under "Failed jobs", and the multirun then exits with an error naming them.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from benchmarks import summary_plot
from vlmfix.eval._io import atomic_write_text

log = logging.getLogger("benchmarks")

CHAIR_COLUMNS = ("CHAIRs", "CHAIRi", "Recall", "Len", "repeated_sentence_rate")
POPE_COLUMNS = ("f1", "accuracy", "yes_ratio")
MINIATURE_MARK = "†"
MINIATURE_NOTE = (f"{MINIATURE_MARK} the toy's miniature of the benchmark (vlmfix.toy.bench), not its release. The toy "
                  "never learned the words of MME's count / position / color questions or AMBER's attribute and "
                  "relation questions (two, left, contact, colour names): those numbers check the pipeline and the "
                  "scoring, not hallucination.\n")
RELEASE_COLUMNS = {  # per kind: the columns of a benchmark read from its upstream release
    "amber": ("CHAIR", "Cover", "Hal", "Cog", "f1", "amber_score"),
    "mme": ("total", "existence score", "count score", "position score", "color score"),
    "hallusion": ("aAcc", "fAcc", "qAcc", "unknown_rate"),
}


FAILURE_FILE = "failure.json"


class FailedJobsError(SystemExit):
    """Some jobs of a multirun failed (the summary of the others was written): ends the process with this message
    and exit status 1. A `SystemExit`, because Hydra turns an ordinary exception from a callback into a warning."""


def _job_files(sweep_dir: Path, name: str) -> list[Path]:
    return sorted(sweep_dir.glob(f"*/{name}"), key=lambda p: (len(p.parent.name), p.parent.name))


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's result.json under a Hydra sweep dir, in job order."""
    return [json.loads(p.read_text()) for p in _job_files(sweep_dir, "result.json")]


def first_line(error: BaseException) -> str:
    """`ValueError: the first line of the message`."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def write_failure(job_dir: Path, job: int, overrides: Sequence[str], error: BaseException) -> Path:
    """Record a failed job for the summary: its number, overrides and the error's first line."""
    record = {"job": job, "overrides": list(overrides), "error": first_line(error)}
    return atomic_write_text(job_dir / FAILURE_FILE, json.dumps(record, indent=2) + "\n")


def collect_failures(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every failed job's record (`write_failure`) under a sweep dir, in job order."""
    return [json.loads(p.read_text()) for p in _job_files(sweep_dir, FAILURE_FILE)]


def failed_jobs_markdown(failures: Sequence[dict[str, Any]]) -> str:
    """The "Failed jobs" section: one line per job, with its overrides and the error's first line."""
    lines = ["## Failed jobs", ""]
    lines += [f"- job {f['job']} (`{' '.join(f['overrides'])}`): {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


def setting(result: dict[str, Any]) -> dict[str, Any]:
    """The run's method parameters and decoding choices, flattened (`alpha`, or `vhr.alpha` when several
    methods are composed; `decoding.mode`, ...); the per-benchmark token budget is left out."""
    fingerprint = result.get("fingerprint") or {}
    params = (fingerprint.get("method") or {}).get("params") or {}
    flat: dict[str, Any] = {}
    for method, values in params.items():
        for key, value in (values or {}).items():
            flat[key if len(params) == 1 else f"{method}.{key}"] = json.dumps(value, sort_keys=True)
    for key, value in (fingerprint.get("decoding") or {}).items():
        if key != "max_new_tokens":
            flat[f"decoding.{key}"] = json.dumps(value, sort_keys=True)
    return flat


def row_labels(results: Sequence[dict[str, Any]]) -> list[str]:
    """Each run's method label, followed by the settings that differ between runs of the same model and
    method (a sweep over `method.alpha` gives one row per alpha), e.g. `dcd (alpha=2.0, variant=neg_only)`.
    A setting some runs do not record (speed runs have no decoding block) does not split rows, and one that
    follows from a setting already shown is left out (DCD's `negative` file from its `checkpoints` dir)."""
    settings = [setting(r) for r in results]
    peers: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result, flat in zip(results, settings):
        peers.setdefault((result["model"], result["method"]), []).append(flat)
    varying = {group: _distinguishing(group_settings) for group, group_settings in peers.items()}
    labels = []
    for result, flat in zip(results, settings):
        keys = varying[(result["model"], result["method"])]
        shown = ", ".join(f"{k}={json.loads(flat[k])}" for k in keys if k in flat)
        labels.append(f"{result['method']} ({shown})" if shown else result["method"])
    return labels


def _distinguishing(settings: Sequence[dict[str, Any]]) -> list[str]:
    """Keys whose values differ between `settings`, in name order, minus those a kept key determines."""
    kept: list[str] = []
    for key in sorted({k for s in settings for k in s}):
        having = [s for s in settings if key in s]
        if len({s[key] for s in having}) > 1 and not any(_determines(other, key, having) for other in kept):
            kept.append(key)
    return kept


def _determines(other: str, key: str, settings: Sequence[dict[str, Any]]) -> bool:
    """Whether each value of `other` comes with one value of `key` across `settings`."""
    pairs = {(s.get(other), s[key]) for s in settings}
    return len(pairs) == len({o for o, _ in pairs})


def table(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Rows per (model, method and its varying settings); columns CHAIR metrics, then POPE metrics per
    split, then speed."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    columns: list[str] = []

    def put(key: tuple[str, str], column: str, value: Any) -> None:
        if column not in columns:
            columns.append(column)
        rows.setdefault(key, {})[column] = value

    for result, label in zip(results, row_labels(results)):
        key = (result["model"], label)
        metrics = result["metrics"]
        if result["kind"] == "chair":
            for name in CHAIR_COLUMNS:
                put(key, f"chair {name}", metrics.get(name))
        elif result["kind"] == "pope":
            for name in POPE_COLUMNS:
                put(key, f"{result['benchmark']} {name}", metrics.get(name))
        elif result["kind"] in RELEASE_COLUMNS:
            mark = MINIATURE_MARK if metrics.get("data_source") == "toy_miniature" else ""
            for name in RELEASE_COLUMNS[result["kind"]]:
                if name in metrics:
                    put(key, f"{result['benchmark']}{mark} {name}", metrics.get(name))
        elif result["kind"] == "speed":
            put(key, "speed ratio", metrics.get("ratio_to_greedy"))
            put(key, "speed wall ratio", metrics.get("wall_ratio_to_greedy"))
    header = ["model", "method", *columns]
    body = [[model, method, *(values.get(c) for c in columns)] for (model, method), values in rows.items()]
    return header, body


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def markdown(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """CHAIR_i against recall per method, and POPE F1 per split and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = [{**r, "method": label} for r, label in zip(results, row_labels(results))]
    chair_runs = [r for r in labelled if r["kind"] == "chair" and r["metrics"].get("CHAIRi") is not None]
    pope_runs = [r for r in labelled if r["kind"] == "pope"]
    if not chair_runs and not pope_runs:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in chair_runs:
        left.scatter(r["metrics"]["Recall"], r["metrics"]["CHAIRi"])
        left.annotate(f"{r['method']} ({r['model']})", (r["metrics"]["Recall"], r["metrics"]["CHAIRi"]),
                      fontsize=8, xytext=(3, 3), textcoords="offset points")
    left.set(xlabel="object recall", ylabel="CHAIR_i (lower is better)", title="CHAIR")
    splits = sorted({r["benchmark"] for r in pope_runs})
    methods = sorted({r["method"] for r in pope_runs})
    width = 0.8 / max(1, len(methods))
    for m, method in enumerate(methods):
        f1 = [next((r["metrics"]["f1"] for r in pope_runs if r["method"] == method and r["benchmark"] == s), 0.0)
              for s in splits]
        right.bar([i + m * width for i in range(len(splits))], f1, width, label=method)
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(splits))], splits)
    right.set(ylabel="F1", title="POPE", ylim=(0, 1))
    if methods:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(sweep_dir: Path) -> str | None:
    """Write summary.md (the table, then the failed jobs), summary.csv and summary.png (finished jobs only);
    return the markdown, or None when the sweep dir holds no job at all."""
    results, failures = collect(sweep_dir), collect_failures(sweep_dir)
    if not results and not failures:
        return None
    sections = []
    if results:
        header, body = table(results)
        sections.append(markdown(header, body))
        if any(MINIATURE_MARK in column for column in header):
            sections.append(MINIATURE_NOTE)
        with (sweep_dir / "summary.csv").open("w", newline="") as f:
            csv.writer(f).writerows([header, *body])
        summary_plot.plot(results, sweep_dir / "summary.png")
    else:
        sections.append("No job finished.\n")
    if failures:
        sections.append(failed_jobs_markdown(failures))
    text = "\n".join(sections)
    (sweep_dir / "summary.md").write_text(text)
    return text


class SummaryCallback(Callback):
    """At the end of a multirun, write summary.md / summary.csv / summary.png and print the table; when jobs
    failed (the app records them, see `write_failure`), list them too and fail the multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        text = write_summary(sweep_dir)
        if text:
            print(f"\n{text}\nSummary written to {sweep_dir}/summary.{{md,csv,png}}", flush=True)
        failures = collect_failures(sweep_dir)
        if failures:
            total = len(failures) + len(collect(sweep_dir))
            listed = "; ".join(f"job {f['job']}: {f['error']}" for f in failures)
            raise FailedJobsError(f"{len(failures)} of {total} jobs failed (see {sweep_dir}/summary.md): {listed}")


SUMMARY_CALLBACK = f"{SummaryCallback.__module__}.{SummaryCallback.__qualname__}"
