"""Miniatures of AMBER, MME (hallucination subset) and HallusionBench written from the toy's val split
(hallu_benchmarks.md Part E), each in its benchmark's upstream format, read by the same loaders as the real data.

Input: the toy's COCO-format val split (`annotations/instances_val.json`, `images/val/`), boxes only: no
retraining, no new renders except HallusionBench's edited figures (one box filled with the image's median
colour). Output under `out/`: `amber/` (data/ + image/), `mme/` ({existence,count,position,color}/),
`hallusionbench/` (HallusionBench.json + hallusion_bench/), and `meta.json` (format version, seed, the val
instances' sha256, and the sha256 of every file written). The same input and seed give the same bytes; a
folder whose meta.json has the same key is reused.

Limits: colour and count are fixed per category in the toy, and its tokenizer maps words it never saw (two,
left, contact, colour names) to `<unk>`, so only AMBER's generative and existence questions and HallusionBench's
pair questions exercise the toy's co-occurrence hallucination; the rest tests the pipeline and the scoring.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .categories import CATEGORY_BY_NAME, COLOURS, PAIRS, PARTNER

FORMAT_VERSION = 1
WORD = {"traffic light": "stoplight", "sports ball": "ball", "tennis racket": "racket"}  # AMBER's V: single words
PLURAL = {"person": "people", "knife": "knives", "mouse": "mice", "bus": "buses", "glass": "glasses"}
MME_SUFFIX = " Please answer yes or no."
MME_IMAGES = 30
MIN_CENTRE_GAP = 8  # pixels between box centres for a left/right question
FIELDS = ("category", "subcategory", "visual_input", "set_id", "figure_id", "question_id", "sample_note",
          "question", "gt_answer_details", "gt_answer", "filename")


@dataclass(frozen=True)
class ToyObject:
    name: str
    box: tuple[float, float, float, float]  # COCO (x, y, width, height)

    @property
    def word(self) -> str:
        return WORD.get(self.name, self.name)

    @property
    def centre_x(self) -> float:
        return self.box[0] + self.box[2] / 2


@dataclass(frozen=True)
class ToyScene:
    image_id: int
    file: Path
    objects: tuple[ToyObject, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.objects)

    @property
    def lone(self) -> str | None:
        """The member of a broken pair (present without its partner), if any."""
        return next((n for n in self.names if n in PARTNER and PARTNER[n] not in self.names), None)


def read_scenes(data_dir: Path, split: str = "val") -> list[ToyScene]:
    """The split's images with their objects (annotation order), by image id."""
    document = json.loads((data_dir / "annotations" / f"instances_{split}.json").read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in document["categories"]}
    objects: dict[int, list[ToyObject]] = {}
    for a in document["annotations"]:
        objects.setdefault(a["image_id"], []).append(ToyObject(names[a["category_id"]], tuple(a["bbox"])))
    return [ToyScene(image["id"], data_dir / "images" / split / image["file_name"], tuple(objects.get(image["id"], ())))
            for image in sorted(document["images"], key=lambda i: i["id"])]


def in_contact(a: ToyObject, b: ToyObject) -> bool:
    """Whether two boxes overlap (share a positive area).

    >>> in_contact(ToyObject("dog", (10, 10, 20, 20)), ToyObject("frisbee", (28, 10, 20, 20)))
    True
    """
    ax, ay, aw, ah = a.box
    bx, by, bw, bh = b.box
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def plural(word: str) -> str:
    if word in PLURAL:
        return PLURAL[word]
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def left_question(a: ToyObject, b: ToyObject) -> str:
    return f"Is the {a.word} on the left of the {b.word}?"


def position_pair(scene: ToyScene) -> tuple[ToyObject, ToyObject] | None:
    """The first two objects whose centres are >= MIN_CENTRE_GAP apart, left one first."""
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            if abs(a.centre_x - b.centre_x) >= MIN_CENTRE_GAP:
                return (a, b) if a.centre_x < b.centre_x else (b, a)
    return None


def other_colour(name: str, rng: np.random.Generator) -> str:
    colours = sorted(c for c in COLOURS if c != CATEGORY_BY_NAME[name].glyph.colour)
    return colours[int(rng.integers(len(colours)))]


def absent_names(scene: ToyScene, count: int, rng: np.random.Generator) -> list[str]:
    """The absent partner of a lone pair member first, then absent categories drawn by `rng`, `count` in all."""
    chosen = [PARTNER[scene.lone]] if scene.lone else []
    pool = sorted(n for n in CATEGORY_BY_NAME if n not in scene.names and n not in chosen)
    order = rng.permutation(len(pool))
    chosen += [pool[int(i)] for i in order[: max(0, count - len(chosen))]]
    return chosen[:count]


# ------------------------------------------------------------------ AMBER
def amber_files(scenes: Sequence[ToyScene], seed: int) -> dict[str, Any]:
    """AMBER's data/ files: annotations (ids and types in AMBER's order), relation, safe words, queries."""
    rng = np.random.default_rng([seed, 1])
    relation: dict[str, list[str]] = {}
    for name, category in sorted(CATEGORY_BY_NAME.items()):
        word = WORD.get(name, name)
        extra = [name.split()[-1]] if " " in name else []
        relation[word] = sorted({s for s in (*category.synonyms, *extra) if " " not in s and s != word})
    Row = tuple[dict[str, Any], str, str]  # (annotation entry without id, image, query)
    generative: list[Row] = []
    state: list[Row] = []
    number: list[Row] = []
    existence: list[Row] = []
    contact: list[Row] = []
    apart: list[Row] = []
    for n, scene in enumerate(scenes, start=1):
        if not scene.objects:
            continue
        image = f"AMBER_{n}.png"
        hallu = absent_names(scene, 3, rng)
        generative.append(({"type": "generative", "truth": [o.word for o in scene.objects],
                            "hallu": [WORD.get(h, h) for h in hallu]}, image, "Describe this image."))
        for h in hallu:
            existence.append(({"type": "discriminative-hallucination", "truth": "no"}, image,
                              f"Is there a {WORD.get(h, h)} in this image?"))
        for o in scene.objects:
            colour = CATEGORY_BY_NAME[o.name].glyph.colour
            state.append(({"type": "discriminative-attribute-state", "truth": "yes"}, image,
                          f"Is the {o.word} {colour} in this image?"))
            state.append(({"type": "discriminative-attribute-state", "truth": "no"}, image,
                          f"Is the {o.word} {other_colour(o.name, rng)} in this image?"))
            number.append(({"type": "discriminative-attribute-number", "truth": "yes"}, image,
                           f"Is there one {o.word} in this image?"))
            number.append(({"type": "discriminative-attribute-number", "truth": "no"}, image,
                           f"Are there two {plural(o.word)} in this image?"))
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                touching = in_contact(a, b)
                entry = ({"type": "discriminative-relation", "truth": "yes"} if touching
                         else {"type": "relation", "truth": "no"})
                (contact if touching else apart).append(
                    (entry, image, f"Is there direct contact between the {a.word} and {b.word}?"))
    annotations: list[dict[str, Any]] = []
    queries: dict[str, list[dict[str, Any]]] = {}
    groups: dict[str, list[Row]] = {"generative": generative, "discriminative-attribute": state + number,
              "discriminative-existence": existence, "discriminative-relation": contact + apart}
    for group, rows in groups.items():
        queries[group] = []
        for entry, image, query in rows:
            annotations.append({"id": len(annotations) + 1, **entry})
            queries[group].append({"id": len(annotations), "image": image, "query": query})
    queries["discriminative"] = [q for g in ("discriminative-attribute", "discriminative-existence",
                                             "discriminative-relation") for q in queries[g]]
    queries["all"] = queries["generative"] + queries["discriminative"]
    return {"annotations": annotations, "relation": relation, "queries": queries}


# ------------------------------------------------------------------ MME
MmeRows = dict[str, list[tuple[ToyScene, str, str]]]


def mme_questions(scenes: Sequence[ToyScene], seed: int, limit: int = MME_IMAGES) -> MmeRows:
    """subtask -> [(scene, yes question, no question)] for at most `limit` images each."""
    rng = np.random.default_rng([seed, 2])
    out: MmeRows = {"existence": [], "count": [], "position": [], "color": []}
    for scene in scenes:
        if not scene.objects:
            continue
        first = scene.objects[0]
        absent = absent_names(scene, 1, rng)[0]
        out["existence"].append((scene, f"Is there a {first.word} in this image?",
                                 f"Is there a {WORD.get(absent, absent)} in this image?"))
        out["count"].append((scene, f"Is there one {first.word} in this image?",
                             f"Are there two {plural(first.word)} in this image?"))
        colour = CATEGORY_BY_NAME[first.name].glyph.colour
        out["color"].append((scene, f"Is the {first.word} {colour} in this image?",
                             f"Is the {first.word} {other_colour(first.name, rng)} in this image?"))
        pair = position_pair(scene)
        if pair is not None:
            out["position"].append((scene, left_question(*pair), left_question(pair[1], pair[0])))
    return {subtask: rows[:limit] for subtask, rows in out.items()}


# ------------------------------------------------------------------ HallusionBench
def edited_png(scene: ToyScene, removed: ToyObject) -> bytes:
    """The scene's PNG with `removed`'s box filled with the image's median colour."""
    from PIL import Image

    pixels = np.array(Image.open(scene.file).convert("RGB"))
    median = np.median(pixels.reshape(-1, 3), axis=0).astype(np.uint8)
    x, y, w, h = (int(round(v)) for v in removed.box)
    pixels[y : y + h, x : x + w] = median
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def hallusion_rows(scenes: Sequence[ToyScene], limit: int = MME_IMAGES) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """HallusionBench.json rows and the figures to write (relative path -> source Path or PNG bytes)."""
    rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}

    def add(category: str, sub: str, set_id: int, fig: int, qid: int, vi: str, question: str, gt: str,
            figure: Any) -> None:
        filename = None
        if figure is not None:
            filename = f"./{category}/{sub}/{set_id}_{fig}.png"
            figures[filename[2:]] = figure
        rows.append(dict(zip(FIELDS, (category, sub, vi, str(set_id), str(fig), str(qid), "", question, "", gt,
                                      filename))))

    edits = [s for s in scenes if len(s.objects) >= 2][:limit]
    for set_id, scene in enumerate(edits):
        removed, kept = scene.objects[0], scene.objects[1]
        edited = edited_png(scene, removed)
        for fig, (vi, figure) in enumerate((("1", scene.file), ("2", edited))):
            add("VD", "toy_edit", set_id, fig, 0, vi, f"Is there a {removed.word} in this image?",
                "1" if fig == 0 else "0", figure)
            add("VD", "toy_edit", set_id, fig, 1, vi, f"Is there a {kept.word} in this image?", "1", figure)
    for set_id, (a, b) in enumerate(PAIRS):
        question = f"Is there a {WORD.get(b, b)} with the {WORD.get(a, a)}?"
        add("VS", "toy_pair", set_id, 0, 0, "0", question, "1", None)
        complete = next((s for s in scenes if a in s.names and b in s.names), None)
        broken = next((s for s in scenes if a in s.names and b not in s.names), None)
        if complete is not None:
            add("VS", "toy_pair", set_id, 1, 0, "1", question, "1", complete.file)
        if broken is not None:
            add("VS", "toy_pair", set_id, 2, 0, "2", question, "0", broken.file)
    return rows, figures


# ------------------------------------------------------------------ writing
def _dump(value: Any) -> bytes:
    return (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def miniature_files(data_dir: Path, seed: int = 0) -> dict[str, bytes]:
    """Every file of the three miniatures: relative path -> bytes."""
    scenes = read_scenes(data_dir)
    files: dict[str, bytes] = {}
    amber = amber_files(scenes, seed)
    files["amber/data/annotations.json"] = _dump(amber["annotations"])
    files["amber/data/relation.json"] = _dump(amber["relation"])
    files["amber/data/safe_words.txt"] = b""
    for name, rows in amber["queries"].items():
        files[f"amber/data/query/query_{name}.json"] = _dump(rows)
    for n, scene in enumerate(scenes, start=1):
        if scene.objects:
            files[f"amber/image/AMBER_{n}.png"] = scene.file.read_bytes()
    for subtask, rows in mme_questions(scenes, seed).items():
        for scene, yes, no in rows:
            stem = f"mme/{subtask}/toy_{scene.image_id}"
            files[f"{stem}.png"] = scene.file.read_bytes()
            files[f"{stem}.txt"] = f"{yes}{MME_SUFFIX}\tYes\n{no}{MME_SUFFIX}\tNo\n".encode()
    rows, figures = hallusion_rows(scenes)
    files["hallusionbench/HallusionBench.json"] = _dump(rows)
    for relative, figure in figures.items():
        data = figure if isinstance(figure, bytes) else figure.read_bytes()
        files[f"hallusionbench/hallusion_bench/{relative}"] = data
    return files


def write_miniatures(data_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Write the miniatures of the toy data in `data_dir` under `out` (reused when meta.json matches)."""
    data_dir, out = Path(data_dir), Path(out)
    instances = data_dir / "annotations" / "instances_val.json"
    key = {"format_version": FORMAT_VERSION, "seed": seed,
           "instances_sha256": hashlib.sha256(instances.read_bytes()).hexdigest()}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if all(meta.get(k) == v for k, v in key.items()):
            return out
    files = miniature_files(data_dir, seed)
    for relative, data in sorted(files.items()):
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    meta = {**key, "files": {r: hashlib.sha256(d).hexdigest() for r, d in sorted(files.items())}}
    meta_path.write_bytes(_dump(meta))
    return out
