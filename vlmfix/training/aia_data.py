"""AIA training data: conversations with images (`SFTExample`), read from JSON / JSON Lines records or a
COCO-layout directory, and the collator that turns them into labelled model batches (`SFTCollator`)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmfix.training.aia import IGNORE_INDEX
from vlmfix.training.config import optional
from vlmfix.validation import number


@dataclass(frozen=True)
class SFTExample:
    """One training conversation in the Hugging Face chat format, and its images in order of use.

    `messages` alternate {"role": "user" | "assistant", "content": [{"type": "image"} | {"type": "text",
    "text": ...}, ...]}; each {"type": "image"} item takes the next entry of `images` (paths or PIL images).
    """

    messages: tuple[dict[str, Any], ...]
    images: tuple[Any, ...] = ()


def _content(text: str, images: int) -> list[dict[str, Any]]:
    return [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]


def example_from_record(record: Mapping[str, Any], index: int, image_root: Path | None = None) -> SFTExample:
    """An `SFTExample` from one JSON record in any of three formats (errors name the record).

    - {"image", "question", "answer"}
    - LLaVA: {"image", "conversations": [{"from": "human" | "gpt", "value": "<image>\\n..."}, ...]}
    - {"images" | "image", "messages": [{"role", "content": str | [items]}, ...]}
    """
    raw_images = record.get("images", record.get("image"))
    images = [] if raw_images is None else list(raw_images) if isinstance(raw_images, list) else [raw_images]
    images = [str(image_root / p) if image_root is not None and isinstance(p, str) else p for p in images]
    if "messages" in record:
        messages = []
        for message in record["messages"]:
            content = message.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            messages.append({"role": message.get("role"), "content": list(content or [])})
    elif "conversations" in record:
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
        messages = []
        for turn in record["conversations"]:
            value = str(turn.get("value", ""))
            count = value.count("<image>")
            text = value.replace("<image>\n", "").replace("<image>", "").strip()
            messages.append(
                {"role": roles.get(turn.get("from"), turn.get("from")), "content": _content(text, count)}
            )
        if images and not any(item["type"] == "image" for m in messages for item in m["content"]):
            messages[0]["content"] = _content(messages[0]["content"][-1]["text"], len(images))
    elif "question" in record and "answer" in record:
        messages = [
            {"role": "user", "content": _content(str(record["question"]), len(images))},
            {"role": "assistant", "content": _content(str(record["answer"]), 0)},
        ]
    else:
        raise ValueError(
            f"record {index} has none of the supported layouts: give 'question' and 'answer', LLaVA "
            f"'conversations', or chat 'messages' (keys found: {sorted(record)})."
        )
    _check_example(messages, images, index)
    return SFTExample(tuple(messages), tuple(images))


def _check_example(messages: list[dict[str, Any]], images: list[Any], index: int) -> None:
    bad_roles = sorted({str(m.get("role")) for m in messages} - {"user", "assistant", "system"})
    if bad_roles:
        raise ValueError(f"record {index} has unknown roles {bad_roles}; use 'user' and 'assistant'.")
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers or not any(item.get("text", "").strip() for m in answers for item in m["content"]):
        raise ValueError(
            f"record {index} has no assistant answer; every training row needs one to supervise."
        )
    slots = sum(item.get("type") == "image" for m in messages for item in m["content"])
    if slots != len(images):
        raise ValueError(
            f"record {index} has {slots} image placeholders but {len(images)} images; give one image per "
            f"<image> / {{'type': 'image'}} item."
        )


def load_rows(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    split: str = "train",
    questions_per_image: int = 1,
    seed: int = 0,
    limit: int | None = None,
) -> list[SFTExample]:
    """Training rows from a JSON Lines / JSON file, or from a COCO-layout directory (see `coco_rows`).

    Relative image paths resolve against `image_root` (default: the file's directory).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return coco_rows(path, split=split, questions_per_image=questions_per_image, seed=seed, limit=limit)
    if not path.is_file():
        raise FileNotFoundError(
            f"data={str(path)!r} does not exist; give a .jsonl / .json file or a COCO data dir."
        )
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of records (or use JSON Lines, .jsonl).")
    rows = [example_from_record(record, i, root) for i, record in enumerate(records[:limit])]
    if not rows:
        raise ValueError(f"{path} holds no records.")
    return rows


def coco_rows(
    data_dir: str | Path,
    *,
    split: str = "train",
    questions_per_image: int = 1,
    seed: int = 0,
    limit: int | None = None,
) -> list[SFTExample]:
    """Rows from a COCO-layout directory (the toy's `data_dir` is one).

    Per image: a caption row ("Describe this image." -> its first caption) and `questions_per_image`
    yes/no rows ("Is there a {name} in the image?"), alternately about a present and an absent category.
    Reads `annotations/captions_{split}.json`, `annotations/instances_{split}.json` and
    `images/{split}/`.
    """
    root = Path(data_dir).expanduser()
    captions_file = root / "annotations" / f"captions_{split}.json"
    instances_file = root / "annotations" / f"instances_{split}.json"
    if not captions_file.is_file():
        raise FileNotFoundError(f"{captions_file} not found: data_dir must be a COCO-layout directory.")
    captions = json.loads(captions_file.read_text(encoding="utf-8"))
    instances = json.loads(instances_file.read_text(encoding="utf-8")) if instances_file.is_file() else None
    first_caption: dict[int, str] = {}
    for ann in captions["annotations"]:
        first_caption.setdefault(ann["image_id"], ann["caption"].strip())
    present: dict[int, set[str]] = {}
    names: list[str] = []
    if instances is not None:
        by_id = {c["id"]: c["name"] for c in instances["categories"]}
        names = sorted(by_id.values())
        for ann in instances["annotations"]:
            present.setdefault(ann["image_id"], set()).add(by_id[ann["category_id"]])
    rng = random.Random(seed)
    rows = []
    for image in sorted(captions["images"], key=lambda im: im["id"])[:limit]:
        file = str(root / "images" / split / image["file_name"])
        if image["id"] in first_caption:
            rows.append(_qa("Describe this image.", first_caption[image["id"]], file))
        inside = sorted(present.get(image["id"], ()))
        outside = [n for n in names if n not in inside]
        for k in range(questions_per_image if names else 0):
            pool, answer = (inside, "Yes") if k % 2 == 0 and inside else (outside, "No")
            if pool:
                name = rng.choice(pool)
                article = "an" if name[0] in "aeiou" else "a"
                rows.append(_qa(f"Is there {article} {name} in the image?", answer, file))
    if not rows:
        raise ValueError(f"{root} gave no rows for split {split!r}.")
    return rows


def _qa(question: str, answer: str, image: Any) -> SFTExample:
    return SFTExample(
        (
            {"role": "user", "content": _content(question, 1)},
            {"role": "assistant", "content": _content(answer, 0)},
        ),
        (image,),
    )


def _open_image(image: Any) -> Any:
    if isinstance(image, str | Path):
        from PIL import Image

        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image


class SFTCollator:
    """Rows -> a model batch: the processor's inputs plus `labels` (answer tokens) and `aia_mask`.

    The chat template renders each conversation; the assistant turns' characters (answer and
    end-of-turn token) become the labelled tokens, found through the tokenizer's offsets and mapped
    onto the processor's ids (whose image placeholders are expanded). Rows longer than `max_length` are
    cut at the end and get `aia_mask` False (the AIA term skips them); a cut through image tokens is an
    error.
    """

    sequence_keys = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")

    def __init__(self, processor: Any, max_length: int | None = None) -> None:
        self.max_length = optional(number, max_length, "max_length", low=1, integer=True,
                                   meaning="the longest row in tokens; longer rows are cut and skip the AIA term")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        token = getattr(processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(token) if token else None

    def render(self, example: SFTExample) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character spans of its assistant turns."""
        template = self.processor.apply_chat_template
        messages = list(example.messages)
        text = template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = template(messages[: i + 1], tokenize=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    "this processor's chat template renders an assistant turn differently from its "
                    "generation prompt, so answer tokens cannot be located; build labelled batches yourself "
                    "and use vlmfix.training.aia.AIALoss directly."
                )
            spans.append((len(before), len(through)))
        return text, spans

    def __call__(self, rows: Sequence[SFTExample]) -> dict[str, Tensor]:
        rendered = [self.render(row) for row in rows]
        texts = [text for text, _ in rendered]
        images = [_open_image(image) for row in rows for image in row.images]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        encoded = dict(self.processor(**kwargs))
        keys = [k for k in self.sequence_keys if k in encoded]
        per_row: list[dict[str, list[int]]] = []
        aia_mask = []
        for b, (text, spans) in enumerate(rendered):
            valid = encoded["attention_mask"][b].bool()
            fields = {k: encoded[k][b][valid].tolist() for k in keys}
            fields["labels"] = self._labels(fields["input_ids"], text, spans, b)
            length = len(fields["input_ids"])
            keep = length if self.max_length is None else min(length, self.max_length)
            if (
                keep < length
                and self.image_token_id is not None
                and self.image_token_id in fields["input_ids"][keep:]
            ):
                raise ValueError(
                    f"row {b}: max_length={self.max_length} cuts through its image tokens (the row has "
                    f"{length} tokens); raise max_length or shorten the text before the image."
                )
            fields = {k: v[:keep] for k, v in fields.items()}
            per_row.append(fields)
            aia_mask.append(keep == length)
        batch = self._pad(per_row, [*keys, "labels"])
        for k, v in encoded.items():
            if k not in batch:
                batch[k] = v
        batch["aia_mask"] = torch.tensor(aia_mask)
        return batch

    def _labels(self, expanded: list[int], text: str, spans: list[tuple[int, int]], row: int) -> list[int]:
        """Labels over the processor's ids: tokens whose characters lie in an assistant span."""
        encoding = self.tokenizer(text, return_offsets_mapping=True)
        plain, offsets = encoding["input_ids"], encoding["offset_mapping"]
        image = self.image_token_id
        labels = [IGNORE_INDEX] * len(expanded)
        i = j = 0
        while i < len(plain):
            if image is not None and plain[i] == image:  # a run of placeholders <-> a run of image tokens
                while i < len(plain) and plain[i] == image:
                    i += 1
                while j < len(expanded) and expanded[j] == image:
                    j += 1
                continue
            if j >= len(expanded) or expanded[j] != plain[i]:
                raise ValueError(
                    f"row {row}: the processor's token ids differ from the tokenizer's at token {i}; "
                    "cannot place the labels. Build labelled batches yourself and use AIALoss directly."
                )
            start, end = offsets[i]
            if end > start and any(s <= start < e for s, e in spans):
                labels[j] = expanded[j]
            i += 1
            j += 1
        return labels

    def _pad(self, rows: list[dict[str, list[int]]], keys: list[str]) -> dict[str, Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        values = {"input_ids": pad_id, "labels": IGNORE_INDEX}
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        batch = {}
        for key in keys:
            out = torch.full((len(rows), width), values.get(key, 0), dtype=torch.long)
            for b, row in enumerate(rows):
                seq = torch.tensor(row[key], dtype=torch.long)
                if left:
                    out[b, width - len(seq) :] = seq
                else:
                    out[b, : len(seq)] = seq
            batch[key] = out
        return batch


def iter_batches(
    rows: Sequence[SFTExample], collate: SFTCollator, batch_size: int
) -> Iterator[dict[str, Tensor]]:
    """Consecutive batches of `rows` (e.g. for `measure_intensity`)."""
    for start in range(0, len(rows), batch_size):
        yield collate(rows[start : start + batch_size])
