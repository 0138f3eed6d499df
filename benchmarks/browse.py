"""The results browser: one self-contained static HTML page of a results dir (no server, no network).

    python -m benchmarks.browse RESULTS_DIR [--out PAGE] [--page-size 50] [--thumbnail 160]

RESULTS_DIR is a multirun sweep dir, one run's Hydra dir or the app's `results_dir`: every `result.json` under
it names a run's directory (`predictions*.jsonl`, `items.jsonl`, the scorer's `*_scored.json`). The page shows
the summary plot and table at the top, then one table per benchmark (AMBER: one per part): per item the image (a
small embedded thumbnail), and each run's output side by side with its metrics (`benchmarks.browse_kinds`).

* CHAIR: the caption with every object mention the scorer counted marked, at the character span the scorer
  recorded (`chair_scored.json`, `mentions`): hallucinated red, in the ground truth green, the vocabulary
  entry that matched and its object as a tooltip; the ground-truth objects under the image.
* AMBER generative: the description with every noun the scorer counted marked at its recorded characters
  (`amber_scored.json`): hallucinated red, credited to the truth green, on AMBER's safe list grey, the rule and
  entry that decided it as a tooltip; the truth and hallu words under the image. AMBER discriminative: per
  question the answer, red when scored wrong.
* POPE: the question, its label and each run's answer as parsed by the run's parser; wrong answers red.
* MME: one row per image pair (its Yes and No questions), each answer red when scored wrong (`mme_scored.json`).
* HallusionBench: one row per question, red when scored wrong, an `unknown` answer (the judge's "unclear")
  marked as such, with whether the scorer counted it correct (`hallusion_scored.json`).

Filters (inline JavaScript): only items where the runs disagree (captions: different sets of mentioned objects;
yes/no: different parsed answers), only items some run got wrong (a hallucinated mention or a wrong answer),
only items where some run hallucinated (a chosen object, or any; for POPE and AMBER's existence questions a
"yes" about an absent object), one subtask or category (MME subtask, HallusionBench category/subcategory, AMBER
question type). Items are paged; thumbnails are stored once per image and only the shown page's images are
drawn. The address can preset the filters: `browse.html#disagree`, `#wrong`, `#object=dog`, `#object=*` (items
with any hallucination), `#group=mme_hallucination/existence`, `#runs=greedy,vcd` (only these runs' columns; a
method name also keeps its labels with settings, `greedy (decoding.repetition_penalty=1.2)`),
`#table=chair` (that table alone, without the summary), combined with `&`.

The app writes the page at the end of every run and multirun (`BrowseCallback`, in conf/config.yaml) as
`browse.html` in the run's or the sweep's dir; the app records each run's items (`write_items`) for it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from benchmarks import summary, summary_plot
from benchmarks.browse_kinds import KINDS, Kind, Run, esc, fmt, read_jsonl
from vlmfix.eval._io import atomic_write_text

log = logging.getLogger("benchmarks")

PAGE_NAME = "browse.html"
ITEMS_FILE = "items.jsonl"
BROWSED_KINDS = tuple(KINDS)
PAGE_SIZE = 50
THUMBNAIL = 128  # pixels, longest side (about 4 KB a photo)
ITEM_COLUMN, RUN_COLUMN = 180, 200  # pixels: the first column's width, a run column's narrowest


# ------------------------------------------------------------------ what the app records
def write_items(out_dir: Path, items: Iterable[Any], extra: Mapping[Any, Mapping[str, Any]] | None = None) -> Path:
    """Record a run's items (key, image file, prompt, plus `extra[key]`, e.g. POPE's label) for the browser."""
    extra = extra or {}
    rows = [{"key": item.key, "image": str(item.image_path) if item.image_path is not None else None,
             "prompt": item.text, **extra.get(item.key, {})} for item in items]
    return atomic_write_text(out_dir / ITEMS_FILE, "".join(json.dumps(row) + "\n" for row in rows))


# ------------------------------------------------------------------ reading runs
def find_results(root: Path) -> list[dict[str, Any]]:
    """Every run's result.json under `root` (a run found twice, in its job dir and its result dir, once)."""
    paths = sorted(root.rglob("result.json"), key=lambda p: [int(s) if s.isdigit() else s
                                                             for s in re.split(r"(\d+)", str(p.relative_to(root)))])
    results, seen = [], set()
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("browse: skipping %s (%s)", path, err)
            continue
        run_dir = run_directory(result, path)
        if run_dir in seen:
            continue
        seen.add(run_dir)
        results.append({**result, "result_dir": str(run_dir)})
    return results


def run_directory(result: Mapping[str, Any], path: Path) -> Path:
    """The run's own directory: the one result.json names, or its own dir when it holds the predictions."""
    if any(path.parent.glob("predictions*.jsonl")):
        return path.parent.resolve()
    return Path(str(result.get("result_dir", path.parent))).resolve()


def load_run(result: dict[str, Any], label: str) -> Run:
    run_dir = Path(result["result_dir"])
    run = Run(result, label, {row["key"]: row for row in read_jsonl(run_dir / ITEMS_FILE)})
    KINDS[result["kind"]].load(run, run_dir)
    return run


# ------------------------------------------------------------------ images
def thumbnail_uri(path: str | None, size: int) -> str | None:
    """A small JPEG of the image as a data: URI, or None when there is no readable image."""
    if not path:
        return None
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=60)
    except OSError as err:
        log.warning("browse: no thumbnail for %s (%s)", path, err)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def png_uri(path: Path) -> str:
    """A PNG as a data: URI, re-encoded without its text chunks (matplotlib writes its web address there)."""
    from PIL import Image

    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Thumbnails:
    """Each image file once: its index in the page's image table."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.index: dict[str, int] = {}
        self.uris: list[str | None] = []

    def __call__(self, path: str | None) -> int | None:
        if not path:
            return None
        if path not in self.index:
            self.index[path] = len(self.uris)
            self.uris.append(thumbnail_uri(path, self.size))
        return self.index[path] if self.uris[self.index[path]] is not None else None


# ------------------------------------------------------------------ HTML pieces
def item_row(kind: Kind, part: str, group_prefix: str, runs: Sequence[Run], key: Any,
             thumbnails: Thumbnails) -> tuple[str, set[str], str | None]:
    """One item's row (the image and what is asked or known of it, then one cell per run), the objects some run
    hallucinated in it and its group (for the group filter)."""
    about = kind.about(part, key, runs)
    image = thumbnails(about.image)
    picture = f'<img data-img="{image}" alt="image {esc(key)}">' if image is not None else '<div class="noimg"></div>'
    cells = [kind.cell(part, run.parts.get(part, {}).get(key)) for run in runs]
    hallucinated = set().union(*(cell.hallucinated for cell in cells))
    disagree = len({cell.signature for cell in cells}) > 1
    wrong = any(cell.wrong for cell in cells)
    group = f"{group_prefix}/{about.group}" if about.group else None
    return (f'<tr class="item" data-key="{esc(key)}" data-disagree="{int(disagree)}" '
            f'data-wrong="{int(wrong)}" data-group="{esc(group or "")}" '
            f'data-hal="{esc(json.dumps(sorted(hallucinated)))}">'
            f'<th class="about">{picture}<div class="key">{esc(key)}</div>{about.html}</th>'
            f'{"".join(cell.html for cell in cells)}</tr>'), hallucinated, group


def table_width(columns: int) -> str:
    """The items table's width: the page's, or wider (scrolled sideways) when each run's column would be narrow."""
    return f"width:max(100%,{ITEM_COLUMN + RUN_COLUMN * columns}px)"


def run_header(kind: Kind, part: str, run: Run, models: int) -> str:
    metrics = run.result.get("metrics", {})
    numbers = " · ".join(f"{name} {fmt(metrics.get(name))}" for name in kind.headline(part) if name in metrics)
    title = f"{run.label} ({run.result['model']})" if models > 1 else run.label
    return (f'<th class="run" data-run="{esc(run.label)}">{esc(title)}<div class="metrics">{esc(numbers)}</div>'
            '</th>')


def sections(benchmark: str, runs: Sequence[Run], thumbnails: Thumbnails) -> list[tuple[str, set[str], set[str]]]:
    """One table per part of the benchmark (AMBER: generative, discriminative; the page script pages it): its
    HTML, the objects hallucinated in it and its item groups. A part no run has output or items for is left out."""
    kind = KINDS[runs[0].result["kind"]]
    models = len({run.result["model"] for run in runs})
    out = []
    for part in kind.parts:
        keys = list(dict.fromkeys(key for run in runs for key in kind.keys(run, part)))
        if not keys:
            continue
        rows = [item_row(kind, part, benchmark, runs, key, thumbnails) for key in keys]
        name = f"{benchmark} {part}".strip()
        anchor = name.replace(" ", "-")
        html = (f'<section class="bench" id="bench-{esc(anchor)}"><h2>{esc(name)} '
                f'<small>{len(keys)} items, one {kind.what} per run</small></h2>'
                f'<div class="pager"></div><table class="items" style="{table_width(len(runs))}"><thead><tr>'
                f'<th class="itemcol">item</th>'
                f'{"".join(run_header(kind, part, run, models) for run in runs)}</tr></thead><tbody>'
                f'{"".join(r for r, _, _ in rows)}</tbody></table><div class="pager"></div></section>')
        out.append((html, set().union(*(h for _, h, _ in rows)), {g for _, _, g in rows if g}))
    return out


def summary_block(results: Sequence[dict[str, Any]], plot: Path | None) -> str:
    header, body = summary.table(results)
    table = "<table class='summary'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in row) + "</tr>" for row in body)
    table += "</table>"
    picture = f'<img class="plot" src="{png_uri(plot)}" alt="summary plot">' if plot is not None else ""
    return f'<section id="summary"><h2>Summary</h2><div class="row">{picture}{table}</div></section>'


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 8px} h2{font-size:17px;margin:18px 0 6px} h2 small{font-weight:normal;color:#666}
#summary .row{display:flex;gap:12px;align-items:flex-start;flex-wrap:wrap}
.plot{width:640px;max-width:100%;height:auto;border:1px solid #ddd} table.summary{font-size:12px}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
table.summary td{font-variant-numeric:tabular-nums}
table.items{table-layout:fixed} th.about{font-weight:normal} th.itemcol{width:180px}
th.run{overflow-wrap:anywhere}
.about img,.noimg{display:block;max-width:170px;min-height:40px;background:#eee}
.key{color:#888;font-size:12px} .gt,.question{font-size:12px} .metrics{color:#666;font-size:12px;margin-top:4px}
span.hal{background:#fdd;color:#b00;border-bottom:2px solid #d33}
span.ok{background:#dfd;color:#060;border-bottom:2px solid #3a3}
span.safe{background:#eee;color:#555;border-bottom:2px solid #aaa}
td.wrong{background:#fee} td.wrong .answer{color:#b00} td.right .answer{color:#060} td.missing{color:#999}
div.ans.wrong .answer{color:#b00;font-weight:bold} div.ans.right .answer{color:#060}
span.unk{background:#ffe9b3;color:#7a4b00;padding:0 3px;border-radius:3px}
#filters{position:sticky;top:0;background:#f7f7f7;padding:6px;border:1px solid #ddd;z-index:1}
.pager{margin:4px 0} .pager button{margin:0 2px}
tr.item.off,section.bench.off,.items .hide,.gone{display:none}
"""

SCRIPT = """
(function(){
const IMAGES = JSON.parse(document.getElementById('images').textContent);
const SIZE = %d;
const onlyDisagree = document.getElementById('disagree');
const onlyObject = document.getElementById('object');
const onlyWrong = document.getElementById('wrong');
const onlyGroup = document.getElementById('group');
const sections = Array.from(document.querySelectorAll('section.bench')).map(s => ({
  el: s, rows: Array.from(s.querySelectorAll('tr.item')), page: 1}));
function keep(row){
  if (onlyDisagree.checked && row.dataset.disagree !== '1') return false;
  if (onlyWrong.checked && row.dataset.wrong !== '1') return false;
  if (onlyGroup.value && row.dataset.group !== onlyGroup.value) return false;
  const object = onlyObject.value;
  const hal = JSON.parse(row.dataset.hal);
  return !object || (object === '*' ? hal.length > 0 : hal.includes(object));
}
function draw(sec){
  const kept = sec.rows.filter(keep);
  const pages = Math.max(1, Math.ceil(kept.length / SIZE));
  sec.page = Math.min(Math.max(1, sec.page), pages);
  const shown = new Set(kept.slice((sec.page - 1) * SIZE, sec.page * SIZE));
  sec.el.classList.toggle('off', kept.length === 0);  // a table the filters empty is left out
  for (const row of sec.rows){
    row.classList.toggle('off', !shown.has(row));
    if (shown.has(row)) for (const img of row.querySelectorAll('img[data-img]'))
      if (!img.src) img.src = IMAGES[+img.dataset.img];
  }
  for (const pager of sec.el.querySelectorAll('.pager')){
    pager.textContent = '';
    const button = (text, page) => { const b = document.createElement('button'); b.textContent = text;
      b.disabled = page < 1 || page > pages || page === sec.page;
      b.onclick = () => { sec.page = page; draw(sec); }; pager.appendChild(b); };
    button('\\u2039 prev', sec.page - 1);
    const where = ` page ${sec.page} of ${pages} (${kept.length} of ${sec.rows.length} items) `;
    pager.appendChild(document.createTextNode(where));
    button('next \\u203a', sec.page + 1);
  }
}
function drawAll(){ for (const sec of sections) draw(sec); }
// only the columns of the runs named (#runs=greedy,vcd: a name keeps its label and the labels "name (settings)");
// a table naming none of them keeps all its columns
function showRuns(wanted){
  const named = label => wanted.some(w => label === w || label.startsWith(w + ' ('));
  for (const sec of sections){
    const heads = Array.from(sec.el.querySelectorAll('th.run'));
    let keep = heads.map(h => named(h.dataset.run));
    if (!keep.some(Boolean)) keep = heads.map(() => true);
    heads.forEach((h, i) => h.classList.toggle('hide', !keep[i]));
    for (const row of sec.rows)
      row.querySelectorAll(':scope > td').forEach((c, i) => c.classList.toggle('hide', !keep[i]));
    const shown = keep.filter(Boolean).length;
    sec.el.querySelector('table.items').style.width = `max(100%%,${%d + %d * shown}px)`;
  }
}
onlyDisagree.onchange = () => { for (const s of sections) s.page = 1; drawAll(); };
onlyObject.onchange = onlyWrong.onchange = onlyGroup.onchange = onlyDisagree.onchange;
// the address can preset the filters: browse.html#disagree, #wrong, #object=dog, #object=* (any hallucination),
// #group=mme_hallucination/existence (combined with &)
const preset = new URLSearchParams(location.hash.slice(1));
if (preset.has('disagree')) onlyDisagree.checked = true;
if (preset.has('wrong')) onlyWrong.checked = true;
if (preset.get('group')) onlyGroup.value = preset.get('group');
if (preset.get('object')) onlyObject.value = preset.get('object');
if (preset.get('runs')) showRuns(preset.get('runs').split(','));
drawAll();
// #table=chair shows that table alone (its section id without "bench-"), without the summary
if (preset.get('table') && document.getElementById('bench-' + preset.get('table'))) {
  document.getElementById('summary').classList.add('gone');
  for (const sec of sections) sec.el.classList.toggle('gone', sec.el.id !== 'bench-' + preset.get('table'));
}
})();
"""


def page(root: Path, results: Sequence[dict[str, Any]], plot: Path | None, page_size: int = PAGE_SIZE,
         thumbnail: int = THUMBNAIL) -> str:
    """The whole page for these runs (results as `find_results` returns them)."""
    labels = summary.row_labels(results) if results else []
    runs_by_benchmark: dict[str, list[Run]] = {}
    for result, label in zip(results, labels):
        if result.get("kind") in BROWSED_KINDS:
            runs_by_benchmark.setdefault(result["benchmark"], []).append(load_run(result, label))
    thumbnails = Thumbnails(thumbnail)
    tables = [table for name, runs in runs_by_benchmark.items()
              for table in sections(name, runs, thumbnails)]
    objects = sorted(set().union(*(hallucinated for _, hallucinated, _ in tables)))
    groups = sorted(set().union(*(group for _, _, group in tables)))
    options = "".join(f'<option value="{esc(o)}">{esc(o)}</option>' for o in objects)
    group_options = "".join(f'<option value="{esc(g)}">{esc(g)}</option>' for g in groups)
    filters = (f'<div id="filters"><label><input type="checkbox" id="disagree"> only items where the runs '
               f'disagree</label> &nbsp; <label><input type="checkbox" id="wrong"> only items some run got wrong '
               f'</label> &nbsp; <label>hallucinations: <select id="object"><option value="">show all '
               f'items</option><option value="*">only items with one</option>{options}</select></label> &nbsp; '
               f'<label>subtask / category: <select id="group"><option value="">all</option>{group_options}'
               f'</select></label> &nbsp; <span class="hal">hallucinated</span> <span class="ok">in the ground '
               f'truth</span> <span class="safe">safe word</span> (hover a word: the entry that matched)</div>')
    top = summary_block(results, plot) if results else "<p>No finished run found.</p>"
    images = json.dumps(thumbnails.uris).replace("</", "<\\/")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>vlmfix results: {esc(root.name)}'
            f'</title><style>{STYLE}</style></head><body><h1>vlmfix results <small>{esc(root)}</small></h1>{top}'
            f'{filters}{"".join(block for block, _, _ in tables)}'
            f'<script type="application/json" id="images">{images}</script>'
            f"<script>{SCRIPT % (page_size, ITEM_COLUMN, RUN_COLUMN)}</script></body></html>")


def write_page(root: Path, out: Path | None = None, page_size: int = PAGE_SIZE, thumbnail: int = THUMBNAIL) -> Path:
    """Write the page for every run under `root` (default `root/browse.html`) and return its path."""
    root = Path(root)
    results = find_results(root)
    plot = root / "summary.png"
    if not plot.exists():
        plot = root / f".{PAGE_NAME}.plot.png"
        try:
            text = page(root, results, drawn_plot(results, plot), page_size, thumbnail)
        finally:
            plot.unlink(missing_ok=True)
    else:
        text = page(root, results, plot, page_size, thumbnail)
    return atomic_write_text(out or root / PAGE_NAME, text)


def drawn_plot(results: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """The multirun summary's plot of these runs at `path` (None, with a warning, when it cannot be drawn)."""
    try:
        return summary_plot.plot(results, path) if results else None
    except Exception as err:  # the plot is one part of the page; the items are still worth showing
        log.warning("browse: no summary plot (%s: %s)", type(err).__name__, err)
        return None


class BrowseCallback(Callback):
    """Write `browse.html` at the end of a run (in its Hydra dir) and of a multirun (in the sweep dir)."""

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(Path(config.hydra.runtime.output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(Path(config.hydra.sweep.dir))

    @staticmethod
    def _write(root: Path) -> None:
        if not any(root.glob("**/result.json")):
            return
        try:
            log.info("Results browser written to %s", write_page(root))
        except Exception as err:  # the page is a view of the results: never fail the run for it
            log.warning("browse: the results page of %s was not written: %s", root, err, exc_info=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.browse", description=__doc__.split("\n")[0])
    parser.add_argument("results_dir", type=Path, help="a multirun sweep dir, a run's dir or the results dir")
    parser.add_argument("--out", type=Path, default=None, help=f"the page (default RESULTS_DIR/{PAGE_NAME})")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE, help="items per page")
    parser.add_argument("--thumbnail", type=int, default=THUMBNAIL, help="thumbnail size in pixels")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"{args.results_dir} is not a directory; pass a multirun sweep dir or the results dir.")
    if args.page_size < 1 or args.thumbnail < 16:
        parser.error("--page-size must be >= 1 and --thumbnail >= 16.")
    print(write_page(args.results_dir, args.out, args.page_size, args.thumbnail))


if __name__ == "__main__":
    main()
