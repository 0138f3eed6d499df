"""Measure the toy VLM's "must show" figures on its validation split, with plain greedy `generate`.

    python -m benchmarks.toy_check [--out DIR] [--fast] [--seed N] [--batch-size 32]

(Run it as a module: run by path, `benchmarks/` lands on sys.path and `benchmarks/kernels.py` shadows
the `kernels` package that transformers probes at import.)

Builds the toy (or reuses a cached build with the same settings), then on the val split:

(a) broken-pair images: share of greedy captions naming the absent partner (target >= 25%);
(b) recall of present objects in the captions (target >= 70%), with CHAIR_s / CHAIR_i for context;
(c) yes/no accuracy with random negatives (target >= 75%) and with co-occurrence (adversarial)
    negatives (should be clearly lower), plus the accuracy on the absent partners alone.

Generation is batched with left padding. Mentions are matched with `vlmfix.toy.find_mentions`
(category names and their CHAIR synonyms).
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmfix.toy import CAPTION_PROMPT, PARTNER, build_toy, find_mentions, question

TARGETS = {"partner_naming": 0.25, "recall": 0.70, "yes_no_random": 0.75}


@dataclass(frozen=True)
class ValImage:
    image_id: int
    path: Path
    objects: tuple[str, ...]  # category names, in annotation order

    @property
    def lone_members(self) -> list[str]:
        """Pair members present without their partner."""
        return [name for name in self.objects if name in PARTNER and PARTNER[name] not in self.objects]


def load_val(data_dir: Path) -> list[ValImage]:
    coco = COCO(str(data_dir / "annotations" / "instances_val.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    images = []
    for image_id in sorted(coco.getImgIds()):
        annotations = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"])
        objects = tuple(dict.fromkeys(names[a["category_id"]] for a in annotations))
        file_name = coco.loadImgs([image_id])[0]["file_name"]
        images.append(ValImage(image_id, data_dir / "images" / "val" / file_name, objects))
    return images


@torch.inference_mode()
def greedy_answers(model, processor, images: list[ValImage], texts: list[str], *, max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """Greedy answers to `texts[i]` about `images[i]`, batched with left padding."""
    answers = []
    for start in range(0, len(texts), batch_size):
        chunk_images = images[start : start + batch_size]
        chunk_texts = texts[start : start + batch_size]
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                add_generation_prompt=True,
            )
            for text in chunk_texts
        ]
        pictures = [Image.open(image.path).convert("RGB") for image in chunk_images]
        batch = processor(images=pictures, text=prompts, padding=True, return_tensors="pt")
        output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
        new_tokens = output[:, batch["input_ids"].shape[1] :]  # [batch, new_len]
        answers += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def caption_metrics(images: list[ValImage], captions: list[str]) -> dict[str, float]:
    """Partner naming on broken-pair images, recall, CHAIR_s and CHAIR_i of `captions`."""
    named = broken = recalled = present = hallucinated_captions = hallucinated = mentions = 0
    for image, caption in zip(images, captions):
        found = find_mentions(caption)
        truth = set(image.objects)
        recalled += len(set(found) & truth)
        present += len(truth)
        wrong = [m for m in found if m not in truth]
        hallucinated += len(wrong)
        mentions += len(found)
        hallucinated_captions += bool(wrong)
        if image.lone_members:
            broken += 1
            named += any(PARTNER[lone] in found for lone in image.lone_members)
    return {
        "partner_naming": named / max(broken, 1),
        "recall": recalled / max(present, 1),
        "chair_s": hallucinated_captions / max(len(captions), 1),
        "chair_i": hallucinated / max(mentions, 1),
        "broken_images": broken,
    }


def pope_questions(images: list[ValImage], mode: str, seed: int = 0) -> list[tuple[int, str, bool]]:
    """(image index, category, label) rows, POPE style: up to 3 positives per image, each followed by one
    negative; `random` draws it uniformly, `adversarial` takes the absent category that co-occurs most
    with that positive in the val annotations, `partner` asks only the absent partners of lone members."""
    all_names = sorted({name for image in images for name in image.objects})
    cooc: dict[str, Counter] = {name: Counter() for name in all_names}
    for image in images:
        for a in image.objects:
            cooc[a].update(b for b in image.objects if b != a)
    rng = random.Random(seed)
    rows = []
    for index, image in enumerate(images):
        if mode == "partner":
            rows += [(index, PARTNER[lone], False) for lone in image.lone_members]
            continue
        asked = set(image.objects)
        for positive in image.objects[:3]:
            rows.append((index, positive, True))
            if mode == "random":
                pool = [name for name in all_names if name not in asked]
                negative = pool[rng.randrange(len(pool))]
            else:
                ranked = sorted((n for n in all_names if n not in asked), key=lambda n: (-cooc[positive][n], n))
                negative = ranked[0]
            asked.add(negative)
            rows.append((index, negative, False))
    return rows


def parse_yes(answer: str) -> bool:
    """POPE's official parser: text before the first '.', commas removed; no iff a token is No/not/no."""
    tokens = answer.strip().split(".")[0].replace(",", "").split(" ")
    return not any(token in ("No", "not", "no") for token in tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="toy directory (default: the cache directory)")
    parser.add_argument("--fast", action="store_true", help="check the fast build instead of the full one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    start = time.perf_counter()
    paths = build_toy(args.out, fast=args.fast, seed=args.seed)
    built = time.perf_counter()
    processor = AutoProcessor.from_pretrained(paths.model_dir)
    model = AutoModelForImageTextToText.from_pretrained(paths.model_dir).eval()
    images = load_val(paths.data_dir)

    captions = greedy_answers(model, processor, images, [CAPTION_PROMPT] * len(images), max_new_tokens=40,
                              batch_size=args.batch_size)
    results = caption_metrics(images, captions)
    for mode in ("random", "adversarial", "partner"):
        rows = pope_questions(images, mode, seed=args.seed)
        answers = greedy_answers(model, processor, [images[i] for i, _, _ in rows],
                                 [question(name) for _, name, _ in rows], max_new_tokens=3,
                                 batch_size=args.batch_size)
        correct = sum(parse_yes(answer) == label for answer, (_, _, label) in zip(answers, rows))
        results[f"yes_no_{mode}"] = correct / max(len(rows), 1)
        results[f"yes_ratio_{mode}"] = sum(map(parse_yes, answers)) / max(len(answers), 1)
    done = time.perf_counter()

    print(f"toy: {paths.root} (settings {paths.settings_hash[:12]}), {len(images)} val images, "
          f"{results['broken_images']} with a broken pair")
    print(f"build/reuse {built - start:.1f}s, measure {done - built:.1f}s")
    print(f"{'figure':<40}{'value':>8}{'target':>10}")
    figures = [
        ("(a) broken pairs: captions naming partner", "partner_naming", ">= 25%"),
        ("(b) recall of present objects", "recall", ">= 70%"),
        ("    CHAIR_s (all val captions)", "chair_s", ""),
        ("    CHAIR_i (all val captions)", "chair_i", ""),
        ("(c) yes/no accuracy, random negatives", "yes_no_random", ">= 75%"),
        ("    yes/no accuracy, adversarial", "yes_no_adversarial", "< random"),
        ("    yes/no accuracy, absent partners only", "yes_no_partner", ""),
        ("    yes ratio, random / adversarial", None, ""),
    ]
    for label, key, target in figures:
        if key is None:
            value = f"{results['yes_ratio_random']:.0%}/{results['yes_ratio_adversarial']:.0%}"
        else:
            value = f"{results[key]:.1%}"
        print(f"{label:<40}{value:>8}{target:>10}")
    for index in range(min(5, len(images))):
        print(f"  e.g. {images[index].objects} -> {captions[index]!r}")
    met = (results["partner_naming"] >= TARGETS["partner_naming"] and results["recall"] >= TARGETS["recall"]
           and results["yes_no_random"] >= TARGETS["yes_no_random"]
           and results["yes_no_adversarial"] < results["yes_no_random"])
    print("all targets met" if met else "TARGETS NOT MET")


if __name__ == "__main__":
    main()
