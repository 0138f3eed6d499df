"""Multirun summary: one table of every run's metrics (markdown + CSV), a plot, printed at the end.

Each metric shows its bootstrap interval over images (`value [low, high]`; `<column> low` / `high` in the CSV;
error bars in the plot), from the `intervals` of its result.json. Each method's run is paired with the greedy
run of the same model and benchmark on the same images: the section "Paired difference to greedy" (and the CSV's
`<column> diff to greedy` columns) gives method - greedy with its interval, resampling the same images for both.

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
from vlmfix.eval.bootstrap import Difference, UnitTable, paired_differences

log = logging.getLogger("benchmarks")

CHAIR_COLUMNS = ("CHAIRs", "CHAIRi", "Recall", "Len", "repeated_sentence_rate")
POPE_COLUMNS = ("f1", "accuracy", "yes_ratio")
MINIATURE_MARK = "†"
MINIATURE_NOTE = (f"{MINIATURE_MARK} the toy's miniature of the benchmark (vlmfix.toy.bench), not its release. The toy "
                  "never learned the words of MME's count / position / color questions or AMBER's attribute and "
                  "relation questions (two, left, contact, colour names): those numbers check the pipeline and the "
                  "scoring, not hallucination.\n")
INTERVAL_NOTE = ("`value [low, high]`: the percentile bootstrap interval over images (`bootstrap.level`, 95% by "
                 "default), resampling images with all their mentions or questions; each result.json's `bootstrap` "
                 "block says how.\n")
GREEDY = "greedy"
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


def metric_columns(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(table column, metric name) of each metric a run shows: CHAIR metrics, POPE metrics per split, a release
    benchmark's columns (marked when it ran on the toy's miniature), the speed ratios."""
    kind, metrics, benchmark = result["kind"], result["metrics"], result["benchmark"]
    if kind == "chair":
        return [(f"chair {name}", name) for name in CHAIR_COLUMNS]
    if kind == "pope":
        return [(f"{benchmark} {name}", name) for name in POPE_COLUMNS]
    if kind in RELEASE_COLUMNS:
        mark = MINIATURE_MARK if metrics.get("data_source") == "toy_miniature" else ""
        return [(f"{benchmark}{mark} {name}", name) for name in RELEASE_COLUMNS[kind] if name in metrics]
    if kind == "speed":
        return [("speed ratio", "ratio_to_greedy"), ("speed wall ratio", "wall_ratio_to_greedy")]
    return []


Bounds = tuple[float, float]


def _grid(cells: Sequence[tuple[tuple[str, str], str, Any]]) -> tuple[list[str], list[tuple[str, str]],
                                                                     dict[tuple[str, str], dict[str, Any]]]:
    """Columns in first-seen order, row keys in first-seen order, and row -> column -> cell."""
    columns: list[str] = []
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for key, column, cell in cells:
        if column not in columns:
            columns.append(column)
        rows.setdefault(key, {})[column] = cell
    return columns, list(rows), rows


def full_table(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]], list[list[Bounds | None]]]:
    """`table`, plus each cell's 95% bootstrap interval over images (None where the run recorded none)."""
    cells = []
    for result, label in zip(results, row_labels(results)):
        intervals = result.get("intervals") or {}
        for column, name in metric_columns(result):
            bounds = intervals.get(name)
            cells.append(((result["model"], label), column,
                          (result["metrics"].get(name), (bounds["low"], bounds["high"]) if bounds else None)))
    columns, keys, rows = _grid(cells)
    header = ["model", "method", *columns]
    body = [[*key, *(rows[key].get(c, (None, None))[0] for c in columns)] for key in keys]
    bounds = [[None, None, *(rows[key].get(c, (None, None))[1] for c in columns)] for key in keys]
    return header, body, bounds


def table(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Rows per (model, method and its varying settings); columns CHAIR metrics, then POPE metrics per
    split, then the release benchmarks' and speed."""
    header, body, _ = full_table(results)
    return header, body


def limits_note(results: Sequence[dict[str, Any]]) -> str:
    """The `limit` each benchmark ran with (images; HallusionBench: figure sets), '' when no run records one."""
    limits: dict[str, set[str]] = {}
    for result in results:
        if "limit" in result:
            value = "all" if result["limit"] is None else str(result["limit"])
            limits.setdefault(result["benchmark"], set()).add(value)
    if not limits:
        return ""
    listed = "; ".join(f"{benchmark} {' / '.join(sorted(values))}" for benchmark, values in limits.items())
    return f"limit (images per benchmark; HallusionBench: figure sets): {listed}\n"


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def _with_bounds(value: Any, bounds: Bounds | None) -> str:
    return f"{fmt(value)} [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds is not None else fmt(value)


def markdown(header: Sequence[str], body: Sequence[Sequence[Any]],
             bounds: Sequence[Sequence[Bounds | None]] | None = None) -> str:
    """A markdown table; with `bounds`, a cell that has an interval reads `value [low, high]`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(body):
        cells = [_with_bounds(v, bounds[i][j] if bounds is not None else None) for j, v in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(header: Sequence[str], body: Sequence[Sequence[Any]], bounds: Sequence[Sequence[Bounds | None]],
             differences: dict[tuple[str, str], dict[str, Difference]] | None = None) -> list[list[Any]]:
    """summary.csv: each metric column followed by `<column> low` / `<column> high` when some run has an interval;
    then, per metric with a paired difference, `<column> diff to greedy`, `... low`, `... high`."""
    with_bounds = {j for row in bounds for j, b in enumerate(row) if b is not None}
    diff_columns = [c for c in header if differences and any(c in d for d in differences.values())]
    out_header: list[Any] = []
    for j, name in enumerate(header):
        out_header += [name, f"{name} low", f"{name} high"] if j in with_bounds else [name]
    for name in diff_columns:
        out_header += [f"{name} diff to greedy", f"{name} diff low", f"{name} diff high"]
    rows: list[list[Any]] = [out_header]
    for i, row in enumerate(body):
        out: list[Any] = []
        for j, value in enumerate(row):
            b = bounds[i][j]
            out += [value, *(b if b is not None else (None, None))] if j in with_bounds else [value]
        mine = (differences or {}).get((row[0], row[1]), {})
        for name in diff_columns:
            d = mine.get(name)
            out += [d.value, d.low, d.high] if d is not None else [None, None, None]
        rows.append(out)
    return rows


# ------------------------------------------------------------------ paired differences to greedy
def _greedy_for(result: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The greedy run of the same model and benchmark on the same units (the same decoding first)."""
    keys = set(result["units"]["keys"])
    peers = [r for r in results if r is not result and r["method"] == GREEDY and r.get("units")
             and (r["model"], r["benchmark"]) == (result["model"], result["benchmark"])
             and set(r["units"]["keys"]) == keys]
    decoding = (result.get("fingerprint") or {}).get("decoding")
    peers.sort(key=lambda r: (r.get("fingerprint") or {}).get("decoding") != decoding)
    return peers[0] if peers else None


def paired_to_greedy(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Difference]]:
    """(model, row label) -> table column -> the run's paired difference to greedy on the same images (method
    minus greedy, resampling images with the run's own bootstrap settings)."""
    out: dict[tuple[str, str], dict[str, Difference]] = {}
    for result, label in zip(results, row_labels(results)):
        if result["method"] == GREEDY or not result.get("units"):
            continue
        greedy = _greedy_for(result, results)
        if greedy is None:
            continue
        settings = {k: result["bootstrap"][k] for k in ("n_resamples", "seed", "level")}
        differences = paired_differences(UnitTable.from_json(greedy["units"]), UnitTable.from_json(result["units"]),
                                         **settings)
        for column, name in metric_columns(result):
            if name in differences and name in (result.get("intervals") or {}):
                out.setdefault((result["model"], label), {})[column] = differences[name]
    return out


def differences_markdown(differences: dict[tuple[str, str], dict[str, Difference]]) -> str:
    """The "Paired difference to greedy" section: method - greedy on the same images with its interval; `*`
    marks an interval that excludes 0 (a change larger than the choice of images explains)."""
    columns, keys, rows = _grid([(key, column, d) for key, by_column in differences.items()
                                 for column, d in by_column.items()])
    level = next(d.level for by_column in differences.values() for d in by_column.values())
    lines = ["## Paired difference to greedy", "",
             f"Method minus greedy on the same images (same model and benchmark), with its {100 * level:g}% "
             "bootstrap interval over images; * marks an interval that excludes 0.", "",
             "| " + " | ".join(["model", "method", *columns]) + " |", "|" + "---|" * (len(columns) + 2)]
    for key in keys:
        cells = []
        for column in columns:
            d = rows[key].get(column)
            star = "*" if d is not None and (d.low > 0 or d.high < 0) else ""
            cells.append(f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]{star}" if d is not None else "")
        lines.append("| " + " | ".join([*key, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path) -> str | None:
    """Write summary.md (the table, then the failed jobs), summary.csv and summary.png (finished jobs only);
    return the markdown, or None when the sweep dir holds no job at all."""
    results, failures = collect(sweep_dir), collect_failures(sweep_dir)
    if not results and not failures:
        return None
    sections = []
    if results:
        header, body, bounds = full_table(results)
        sections.append(markdown(header, body, bounds))
        if any(bounds_ is not None for row in bounds for bounds_ in row):
            sections.append(INTERVAL_NOTE)
        if any(MINIATURE_MARK in column for column in header):
            sections.append(MINIATURE_NOTE)
        if limits_note(results):
            sections.append(limits_note(results))
        differences = paired_to_greedy(results)
        if differences:
            sections.append(differences_markdown(differences))
        with (sweep_dir / "summary.csv").open("w", newline="") as f:
            csv.writer(f).writerows(csv_rows(header, body, bounds, differences))
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
