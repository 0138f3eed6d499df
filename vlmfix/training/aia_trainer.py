"""Fine-tune a VLM with next-token loss plus the AIA loss, with accelerate (one CPU, one GPU, many nodes).

    python -m vlmfix.training.aia_trainer --config conf/train/aia.yaml max_steps=200
    accelerate launch -m vlmfix.training.aia_trainer --config conf/train/aia.yaml model=/path/llava-1.5-7b-hf

Each step runs one training forward inside `vlmfix.apply(model)` with the AIA observer. The loss is
L_NTP + lambda * L_AIA on ordinary SFT batches (answer tokens labelled, -100 elsewhere). A batch
without images or answers adds no AIA term. Trainable sets:
- "full": everything but the vision tower.
- "language_model": the decoder only.
- "qk": the decoder's q/k projections.
- "lora": LoRA adapters through peft, on q_proj/k_proj by default.
- a list of regular expressions over parameter names.

The first step with an AIA term checks that some trainable parameter receives gradient from that term.
If none does, for instance when only the last layer's MLP is trained, the trainer raises
`AIAGradientError`.

Checkpoints hold no pickles. `output_dir/checkpoint-NNNNNNN/` has `trainable.safetensors` (the
trainable parameters), `optimizer.safetensors` (the optimizer's tensors) and `trainer_state.json`
(step, lambda, scheduler, the optimizer's other state, config), written last. A run restarted with the
same `output_dir` resumes from the newest complete checkpoint. The data order is a function of
(seed, epoch), so a resumed run sees the same batches as an uninterrupted one. At the end,
`output_dir/final/` holds the model (LoRA merged) and processor, loadable with `from_pretrained`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmfix.adapters import get_adapter
from vlmfix.decoding.session import apply
from vlmfix.errors import CheckpointError, VlmfixError
from vlmfix.training.aia import IGNORE_INDEX, AIALoss, resolve_targets, unwrap_model

TRAINABLE_MODES = ("full", "language_model", "qk", "lora")
STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


class AIAGradientError(VlmfixError, RuntimeError):
    """No trainable parameter receives gradient from the AIA term."""


# ---------------------------------------------------------------------------------------------- data
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
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be None or >= 1, got {max_length}.")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
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


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class AIATrainConfig:
    """Settings of an AIA fine-tuning run (the fields of `conf/train/aia.yaml`).

    Model and data:
        model: model directory for `from_pretrained`; "toy" or None: the toy (`vlmfix.toy.build_toy`).
        data: JSON Lines / JSON file or COCO-layout directory; None: the toy's COCO data.
        image_root: base of relative image paths (default: the data file's directory).
        toy_fast: use the fast toy build when model is "toy" (data None then means the toy's COCO data).
        coco_split, questions_per_image, max_rows: COCO-directory rows (see `coco_rows`) and a row cap.
        attn_implementation: the backend vlmfix wraps ("sdpa", "flash_attention_2", "eager").
        dtype: weights dtype at load ("float32", "bfloat16", "float16").
    What trains:
        trainable: "full" | "language_model" | "qk" | "lora" | regular expressions on parameter names.
        lora_targets, lora_r, lora_alpha, lora_dropout: LoRA on these decoder projections (needs peft).
    AIA (see `vlmfix.training.aia.AIALoss`):
        targets: a stage preset name or [[stop_layer, T, delta], ...]; lambda_: the weight (10, the
        official code's understanding value); lambda_auto_ratio: if set, lambda is fixed once, before
        training, from `lambda_auto_batches` batches so that lambda * L_AIA = L_NTP / ratio (the paper's
        ablation reads 50); normalize, answer_rows, aia_rows.
    Optimisation (the official Janus-Pro recipe as defaults):
        max_steps, batch_size (per process), grad_accum, learning_rate, min_learning_rate (cosine end),
        warmup_epochs, betas, eps, weight_decay (none on biases and norms), max_grad_norm, max_length,
        mixed_precision ("no" | "bf16" | "fp16"), seed, cpu.
    Output:
        output_dir, save_every (steps), keep_checkpoints, resume (from the newest checkpoint), log_every.
    """

    model: str | None = None
    data: str | None = None
    image_root: str | None = None
    toy_fast: bool = False
    coco_split: str = "train"
    questions_per_image: int = 1
    max_rows: int | None = None
    attn_implementation: str | None = "sdpa"
    dtype: str = "float32"
    trainable: str | tuple[str, ...] = "full"
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj")
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    targets: str | tuple[tuple[float | None, float, float], ...] = "r4"
    lambda_: float = 10.0
    lambda_auto_ratio: float | None = None
    lambda_auto_batches: int = 8
    normalize: str = "all"
    answer_rows: str = "all_turns"
    aia_rows: int | None = 256
    max_steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 2e-5
    min_learning_rate: float = 1e-6
    warmup_epochs: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.05
    max_grad_norm: float | None = 1.0
    max_length: int | None = 3000
    mixed_precision: str = "no"
    seed: int = 1024
    cpu: bool = False
    output_dir: str = "runs/aia"
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        conv = object.__setattr__
        if not isinstance(self.trainable, str):
            conv(self, "trainable", tuple(str(p) for p in self.trainable))
        elif self.trainable not in TRAINABLE_MODES:
            raise ValueError(
                f"trainable must be one of {TRAINABLE_MODES} or a list of regular expressions, "
                f"got {self.trainable!r}."
            )
        if not isinstance(self.targets, str):
            conv(self, "targets", tuple(tuple(stage) for stage in self.targets))
        conv(self, "lora_targets", tuple(self.lora_targets))
        conv(self, "betas", tuple(float(b) for b in self.betas))
        positive = (
            "max_steps",
            "batch_size",
            "grad_accum",
            "save_every",
            "log_every",
            "lambda_auto_batches",
            "lora_r",
            "keep_checkpoints",
            "questions_per_image",
        )
        for name in positive:
            value = getattr(self, name)
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (0 if name == "questions_per_image" else 1)
            ):
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if not 0 < self.learning_rate or not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(
                f"need 0 <= min_learning_rate <= learning_rate and learning_rate > 0, got "
                f"{self.min_learning_rate} and {self.learning_rate}."
            )
        if self.lambda_auto_ratio is not None and not self.lambda_auto_ratio > 0:
            raise ValueError(
                f"lambda_auto_ratio must be None or > 0, got {self.lambda_auto_ratio}; the paper's "
                "ablation reads 50 (lambda * L_AIA = L_NTP / 50)."
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}.")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}.")
        self.aia_loss()  # validates targets, lambda_, normalize, answer_rows, aia_rows

    def aia_loss(self, lambda_: float | None = None) -> AIALoss:
        targets = self.targets if isinstance(self.targets, str) else [tuple(s) for s in self.targets]
        return AIALoss(
            targets=targets,
            lambda_=self.lambda_ if lambda_ is None else lambda_,
            normalize=self.normalize,
            answer_rows=self.answer_rows,
            aia_rows=self.aia_rows,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AIATrainConfig:
        """Build from a mapping (a YAML file's contents); `_target_` is ignored, unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k != "_target_"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown AIA training settings {unknown}. Known: {', '.join(sorted(names))}")
        return cls(**values)


@dataclass
class TrainResult:
    """What a run did: steps, the lambda used, per-step logs and where the model went."""

    output_dir: Path
    steps: int
    lambda_: float
    targets: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    final_dir: Path | None = None
    resumed_from: int | None = None


# ------------------------------------------------------------------------------------------ trainable sets
def set_trainable(model: nn.Module, config: AIATrainConfig) -> nn.Module:
    """Freeze / unfreeze per `config.trainable`; returns the model to train (a peft model for "lora")."""
    adapter = get_adapter(unwrap_model(model))
    if config.trainable == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as error:
            raise ImportError(
                "trainable='lora' needs peft: pip install peft (or train 'qk' / 'full')."
            ) from error
        pattern = r".*language_model.*\.(" + "|".join(re.escape(t) for t in config.lora_targets) + r")$"
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=pattern,
        )
        model = get_peft_model(model, lora)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"lora_targets={list(config.lora_targets)} match no decoder module; use names such "
                "as 'q_proj', 'k_proj'."
            )
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if config.trainable == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        for p in adapter.vision_tower.parameters():
            p.requires_grad_(False)
    elif config.trainable == "language_model":
        for p in adapter.language_model.parameters():
            p.requires_grad_(True)
    elif config.trainable == "qk":
        for layer in range(adapter.num_layers):
            for proj in (adapter.attn(layer).q_proj, adapter.attn(layer).k_proj):
                for p in proj.parameters():
                    p.requires_grad_(True)
    else:
        patterns = [re.compile(p) for p in config.trainable]
        for name, p in model.named_parameters():
            if any(rx.search(name) for rx in patterns):
                p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"trainable={config.trainable!r} selects no parameter of {type(model).__name__}; check "
            "the patterns against model.named_parameters()."
        )
    return model


def warn_without_direct_path(model: nn.Module) -> None:
    """Decision D6: warn when no decoder q_proj / k_proj parameter trains (AIA's direct path is missing)."""
    adapter = get_adapter(unwrap_model(model))
    direct = any(
        p.requires_grad
        for layer in range(adapter.num_layers)
        for proj in (adapter.attn(layer).q_proj, adapter.attn(layer).k_proj)
        for p in proj.parameters()
    )
    if not direct:
        warnings.warn(
            "no decoder q_proj / k_proj parameter is trainable: the AIA loss reaches the model only "
            "indirectly "
            "(through earlier layers' hidden states). Include q_proj and k_proj (e.g. LoRA targets).",
            stacklevel=3,
        )


def check_aia_gradient(aia_term: Tensor, params: list[nn.Parameter], trainable: Any) -> None:
    """Raise `AIAGradientError` when no parameter in `params` gets a non-zero gradient from `aia_term`."""
    grads = (
        torch.autograd.grad(aia_term, params, retain_graph=True, allow_unused=True)
        if aia_term.requires_grad
        else ()
    )
    if not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
        raise AIAGradientError(
            f"no trainable parameter receives gradient from the AIA term (trainable={trainable!r}). The AIA "
            "loss acts only through attention probabilities: through q_proj / k_proj of every decoder layer "
            "and the modules before them; the last layer's v_proj, o_proj and MLP (and lm_head) get none. "
            "Train q_proj / "
            "k_proj (trainable='qk' or LoRA on them) or earlier layers."
        )


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases and norms (1-D parameters)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if p.dim() < 2 or name.endswith(".bias") or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float):
    """lr multiplier: linear warmup, then cosine from 1 to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------------------------------------- checkpoints
def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
) -> Path:
    """Write `directory` atomically (a temp dir renamed; trainer_state.json written last inside it)."""
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    opt_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in opt_state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt_state["param_groups"]
    ]
    full_state = {
        **state,
        "optimizer": {"param_groups": groups, "scalars": scalars},
        "scheduler": scheduler.state_dict(),
        "parameters": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad},
    }
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1, default=str), encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in `output_dir` (one with a trainer_state.json), or None."""
    found = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if path.is_dir() and suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def load_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore trainable weights, optimizer and scheduler from `directory`; returns the trainer state."""
    from safetensors.torch import load_file

    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(directory / "trainable.safetensors"))
        opt_tensors = load_file(str(directory / "optimizer.safetensors"))
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {directory} is unreadable ({error}); delete it to start over."
        ) from error
    params = dict(model.named_parameters())
    expected = {n: list(p.shape) for n, p in params.items() if p.requires_grad}
    stored = {n: list(t.shape) for n, t in weights.items()}
    if stored != expected:
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        shapes = sorted(n for n in set(stored) & set(expected) if stored[n] != expected[n])
        raise CheckpointError(
            f"checkpoint {directory} does not fit this model and trainable set: missing {missing[:3]}, "
            f"unexpected {extra[:3]}, shape mismatch {shapes[:3]}. Resume with the same model and "
            f"`trainable`, or use a new "
            f"output_dir."
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    per_param: dict[int, dict[str, Any]] = {}
    for key, tensor in opt_tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = tensor
    for key, value in state["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    groups = [
        {k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
        for g in state["optimizer"]["param_groups"]
    ]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    return state


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    found = sorted(
        p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    )
    for path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the loop
def batch_indices(step: int, rows: int, global_batch: int, seed: int) -> list[int]:
    """Row indices of global `step`: a (seed, epoch)-seeded permutation cut into batches (drop the rest)."""
    per_epoch = max(1, rows // global_batch)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    chunk = order[position * global_batch : (position + 1) * global_batch]
    return chunk if chunk else order[:global_batch]


def _load_model(config: AIATrainConfig) -> tuple[nn.Module, Any, str | None]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir, data_dir = config.model, None
    if model_dir in (None, "toy"):
        from vlmfix.toy import build_toy

        paths = build_toy(fast=config.toy_fast)
        model_dir, data_dir = str(paths.model_dir), str(paths.data_dir)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, config.dtype)}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs)
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor, data_dir


def _checkpointing(model: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the first is the newer name
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def _forward(
    model: nn.Module, base: nn.Module, aia: AIALoss, batch: dict[str, Any], generator: torch.Generator
) -> tuple[Tensor, Tensor, Any]:
    """One training forward: (NTP loss, unweighted AIA loss, record); the session lives for this call only."""
    inputs = {k: v for k, v in batch.items() if k != "aia_mask"}
    with (
        apply(base) as session,
        aia.observe(session, sample_mask=batch.get("aia_mask"), generator=generator) as rec,
    ):
        out = model(**inputs, use_cache=False)
    return out.loss, aia.loss(rec), rec


def train(
    config: AIATrainConfig,
    *,
    model: nn.Module | None = None,
    processor: Any | None = None,
    rows: Sequence[SFTExample] | None = None,
) -> TrainResult:
    """Run AIA fine-tuning per `config`; `model`, `processor`, `rows` override what the config would load.

    A passed-in model is trained in place (for trainable="lora", its LoRA weights are merged into it at the
    end). Returns a `TrainResult`; the model and processor are saved to `output_dir/final`.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    set_seed(config.seed)
    data_dir = None
    if model is None or processor is None:
        model, processor, data_dir = _load_model(config)
    base = unwrap_model(model)
    if _checkpointing(base):
        raise ValueError(
            "AIA training does not support gradient checkpointing (its recomputation skips the AIA "
            "observer); call model.gradient_checkpointing_disable()."
        )
    if rows is None:
        source = config.data or data_dir
        if source is None:
            raise ValueError(
                "no training data: set `data` to a .jsonl / .json file or a COCO-layout directory."
            )
        rows = load_rows(
            source,
            image_root=config.image_root,
            split=config.coco_split,
            questions_per_image=config.questions_per_image,
            seed=config.seed,
            limit=config.max_rows,
        )
    rows = list(rows)
    collate = SFTCollator(processor, max_length=config.max_length)
    num_layers = get_adapter(base).num_layers
    targets = resolve_targets(config.aia_loss().targets, num_layers)

    model = set_trainable(model, config)
    base = unwrap_model(model)
    warn_without_direct_path(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=config.betas,
        eps=config.eps,
    )
    global_batch = config.batch_size * accelerator.num_processes
    steps_per_epoch = max(1, len(rows) // global_batch) / config.grad_accum
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(warmup, config.max_steps, config.min_learning_rate / config.learning_rate)
    )
    output_dir = Path(config.output_dir).expanduser()
    start_step, lambda_, resumed = 0, config.lambda_, None
    checkpoint = latest_checkpoint(output_dir) if config.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        start_step, lambda_, resumed = int(state["step"]), float(state["lambda_"]), int(state["step"])
        accelerator.print(f"resumed from {checkpoint} (step {start_step})")
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    micro_batch = functools.partial(_micro_batch, rows, collate, config=config, accelerator=accelerator)

    if config.lambda_auto_ratio is not None and resumed is None:
        lambda_ = _auto_lambda(model, base, config, micro_batch, device)
        accelerator.print(
            f"lambda set to {lambda_:.4g} (lambda * L_AIA = L_NTP / {config.lambda_auto_ratio})"
        )
    aia = config.aia_loss(lambda_)
    run_state = {"config": config.as_dict(), "targets": targets.as_dict(), "lambda_": lambda_}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.json").write_text(
            json.dumps(run_state, indent=1, default=str), encoding="utf-8"
        )

    history: list[dict[str, float]] = []
    checked = lambda_ == 0
    model.train()
    started = time.perf_counter()
    for step in range(start_step, config.max_steps):
        totals = {"loss": 0.0, "ntp": 0.0, "aia": 0.0}
        for micro in range(config.grad_accum):
            index = step * config.grad_accum + micro
            batch = _to_device(micro_batch(index), device)
            sync = micro == config.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                generator = torch.Generator().manual_seed(config.seed * 7919 + index)
                ntp, aia_loss, record = _forward(model, base, aia, batch, generator)
                if not checked and bool(record.sample_mask.any()):
                    check_aia_gradient(lambda_ * aia_loss, params, config.trainable)
                    checked = True
                loss = (ntp + lambda_ * aia_loss) / config.grad_accum
                accelerator.backward(loss)
            totals["loss"] += loss.item()
            totals["ntp"] += ntp.item() / config.grad_accum
            totals["aia"] += aia_loss.item() / config.grad_accum
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        entry = {"step": done, **totals, "lr": scheduler.get_last_lr()[0]}
        history.append(entry)
        if done % config.log_every == 0 or done == config.max_steps:
            accelerator.print(
                f"step {done}/{config.max_steps}  loss {entry['loss']:.4f}  ntp {entry['ntp']:.4f}  "
                f"aia {entry['aia']:.5f}  lr {entry['lr']:.3g}  {time.perf_counter() - started:.0f}s"
            )
            if accelerator.is_main_process:
                with (output_dir / "log.jsonl").open("a", encoding="utf-8") as log:
                    log.write(json.dumps(entry) + "\n")
        if done % config.save_every == 0 or done == config.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(
                    output_dir / f"{CHECKPOINT_PREFIX}{done:07d}",
                    accelerator.unwrap_model(model),
                    getattr(optimizer, "optimizer", optimizer),
                    scheduler,
                    {"step": done, "lambda_": lambda_, "targets": targets.as_dict()},
                )
                _prune_checkpoints(output_dir, config.keep_checkpoints)
    model.eval()
    final_dir = _save_final(accelerator, model, processor, output_dir, config)
    return TrainResult(
        output_dir=output_dir,
        steps=config.max_steps,
        lambda_=lambda_,
        targets=targets.as_dict(),
        history=history,
        final_dir=final_dir,
        resumed_from=resumed,
    )


def _micro_batch(
    rows: Sequence[SFTExample], collate: SFTCollator, index: int, config: AIATrainConfig, accelerator: Any
) -> dict[str, Tensor]:
    """This process's share of global micro-batch `index`."""
    chosen = batch_indices(index, len(rows), config.batch_size * accelerator.num_processes, config.seed)
    start = accelerator.process_index * config.batch_size
    mine = chosen[start : start + config.batch_size] or chosen[: config.batch_size]
    return collate([rows[i] for i in mine])


@torch.no_grad()
def _auto_lambda(
    model: nn.Module, base: nn.Module, config: AIATrainConfig, micro_batch: Any, device: torch.device
) -> float:
    """lambda with lambda * mean L_AIA = mean L_NTP / ratio over the first `lambda_auto_batches` batches."""
    aia = config.aia_loss()
    ntp_sum = aia_sum = 0.0
    for index in range(config.lambda_auto_batches):
        ntp, aia_loss, _ = _forward(
            model, base, aia, _to_device(micro_batch(index), device), torch.Generator().manual_seed(index)
        )
        ntp_sum, aia_sum = ntp_sum + float(ntp), aia_sum + float(aia_loss)
    if aia_sum <= 0:
        raise ValueError(
            "lambda_auto_ratio: the AIA loss is 0 on the calibration batches (no images / answers, or "
            "intensities already on target); set lambda_ directly."
        )
    return ntp_sum / (config.lambda_auto_ratio * aia_sum)


def _save_final(
    accelerator: Any, model: nn.Module, processor: Any, output_dir: Path, config: AIATrainConfig
) -> Path | None:
    accelerator.wait_for_everyone()
    final = unwrap_model(accelerator.unwrap_model(model))
    inner = accelerator.unwrap_model(model)
    if hasattr(inner, "merge_and_unload"):  # peft: fold LoRA into the base weights
        final = inner.merge_and_unload()
    if not accelerator.is_main_process:
        return None
    final_dir = output_dir / "final"
    final.save_pretrained(final_dir)
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(final_dir)
    return final_dir


# ---------------------------------------------------------------------------------------------- CLI
def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def config_from_args(argv: Sequence[str] | None = None) -> AIATrainConfig:
    """`--config FILE` (YAML; `_target_` ignored) then `key=value` overrides (values parsed as YAML)."""
    import yaml

    parser = argparse.ArgumentParser(
        prog="python -m vlmfix.training.aia_trainer",
        description="Fine-tune a VLM with the AIA loss (accelerate; resumable).",
    )
    parser.add_argument("--config", help="YAML file with AIATrainConfig fields (e.g. conf/train/aia.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. max_steps=200 trainable=lora")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        values.update(loaded)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} must be key=value")
        values[key.strip()] = _parse_value(value)
    return AIATrainConfig.from_mapping(values)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    config = config_from_args(argv)
    result = train(config)
    if result.final_dir is not None:  # the main process
        print(f"done: {result.steps} steps, lambda {result.lambda_:.4g}, model in {result.final_dir}")
    return result


if __name__ == "__main__":
    main()
