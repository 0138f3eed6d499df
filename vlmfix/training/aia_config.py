"""Settings of an AIA fine-tuning run (`AIATrainConfig`, the keys of conf/train/aia.yaml)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vlmfix.training.aia import AIALoss, AnswerRows, Normalize
from vlmfix.training.config import TrainConfig, optional
from vlmfix.training.loop import DEFAULT_THREADS, THREADS_MEANING
from vlmfix.validation import boolean, choice, number, sequence, text

TRAINABLE_MODES = ("full", "language_model", "qk", "lora")
PRECISIONS = ("no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")


def _pattern(value: Any, name: str) -> str:
    """A regular expression over parameter names."""
    value = text(value, name, meaning="a regular expression over parameter names")
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"`{name}` must be a regular expression, got {value!r} ({error}).") from None
    return value


def _stage(value: Any, name: str) -> tuple[Any, ...]:
    """[stop_layer, T, delta] as a tuple (`StageTable` checks the numbers)."""
    return sequence(value, name, lambda item, _: item, length=3, what="values [stop_layer, T, delta]")


@dataclass(frozen=True)
class AIATrainConfig(TrainConfig):
    """Settings of an AIA fine-tuning run (the fields of `conf/train/aia.yaml`).

    Model and data:
        model: model directory for `from_pretrained` or a cached hub id; "toy" or None: the toy
            (`vlmfix.toy.build_toy`).
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
        mixed_precision ("no" | "bf16" | "fp16"), seed, cpu, threads (torch CPU threads; 1 by default).
    Output:
        output_dir, save_every (steps), keep_checkpoints, resume (from the newest checkpoint, which must have
        the same settings; false starts over and deletes the old checkpoints), log_every.
    """

    WHAT = "AIA training"

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
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    targets: str | tuple[tuple[float | None, float, float], ...] = "r4"
    lambda_: float = 10.0
    lambda_auto_ratio: float | None = None
    lambda_auto_batches: int = 8
    normalize: Normalize = "all"
    answer_rows: AnswerRows = "all_turns"
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
    threads: int | None = DEFAULT_THREADS
    output_dir: str = "runs/aia"
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        s = self._set
        for name in ("model", "data", "image_root", "attn_implementation"):
            s(name, optional(text, getattr(self, name), name))
        s("toy_fast", boolean(self.toy_fast, "toy_fast"))
        s("coco_split", text(self.coco_split, "coco_split"))
        s("questions_per_image", number(self.questions_per_image, "questions_per_image", low=0, integer=True))
        s("max_rows", optional(number, self.max_rows, "max_rows", low=1, integer=True))
        s("dtype", choice(self.dtype, "dtype", DTYPES, meaning="the weights' dtype at load"))
        if isinstance(self.trainable, str):  # a mode by name, else a list of patterns
            s("trainable", choice(self.trainable, "trainable", TRAINABLE_MODES,
                                  meaning="Or give a list of regular expressions over parameter names"))
        else:
            s("trainable", sequence(self.trainable, "trainable", _pattern, min_length=1,
                                    what="regular expressions"))
        s("lora_targets", sequence(self.lora_targets, "lora_targets", text, min_length=1, what="module names"))
        s("lora_r", number(self.lora_r, "lora_r", low=1, integer=True))
        s("lora_alpha", number(self.lora_alpha, "lora_alpha", low=0, low_open=True))
        s("lora_dropout", number(self.lora_dropout, "lora_dropout", low=0, high=1, high_open=True))
        if not isinstance(self.targets, str):  # a preset by name, else a table of stages
            s("targets", sequence(self.targets, "targets", _stage, min_length=1, what="[stop_layer, T, delta] stages"))
        s("lambda_auto_ratio", optional(number, self.lambda_auto_ratio, "lambda_auto_ratio", low=0, low_open=True,
                                        meaning="Set so that lambda * L_AIA = L_NTP / ratio; the paper's ablation "
                                                "reads 50"))
        s("lambda_auto_batches", number(self.lambda_auto_batches, "lambda_auto_batches", low=1, integer=True))
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "keep_checkpoints", "log_every"):
            s(name, number(getattr(self, name), name, low=1, integer=True))
        s("learning_rate", number(self.learning_rate, "learning_rate", low=0, low_open=True))
        s("min_learning_rate", number(self.min_learning_rate, "min_learning_rate", low=0, high=self.learning_rate,
                                      meaning="where the cosine schedule ends, at most learning_rate"))
        s("warmup_epochs", number(self.warmup_epochs, "warmup_epochs", low=0))
        s("betas", sequence(self.betas, "betas", lambda v, n: number(v, n, low=0, high=1, high_open=True),
                            length=2, what="numbers in [0, 1)"))
        s("eps", number(self.eps, "eps", low=0, low_open=True))
        s("weight_decay", number(self.weight_decay, "weight_decay", low=0))
        s("max_grad_norm", optional(number, self.max_grad_norm, "max_grad_norm", low=0, low_open=True))
        s("max_length", optional(number, self.max_length, "max_length", low=1, integer=True))
        s("mixed_precision", choice(self.mixed_precision, "mixed_precision", PRECISIONS))
        s("seed", number(self.seed, "seed", low=0, integer=True))
        s("cpu", boolean(self.cpu, "cpu"))
        s("threads", optional(number, self.threads, "threads", low=1, integer=True, meaning=THREADS_MEANING))
        s("output_dir", text(self.output_dir, "output_dir"))
        s("resume", boolean(self.resume, "resume"))
        self.aia_loss()  # checks targets, lambda_, normalize, answer_rows, aia_rows

    def aia_loss(self, lambda_: float | None = None) -> AIALoss:
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return AIALoss(
            targets=targets,
            lambda_=self.lambda_ if lambda_ is None else lambda_,
            normalize=self.normalize,
            answer_rows=self.answer_rows,
            aia_rows=self.aia_rows,
        )
