"""Settings of a DCD projector training run (`DCDTrainConfig`, the keys of conf/train/dcd.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from vlmfix.methods.dcd import SIDES, Side
from vlmfix.methods.dcd_lora import LoraSpec
from vlmfix.training.config import TrainConfig, optional
from vlmfix.training.loop import DEFAULT_THREADS, THREADS_MEANING
from vlmfix.validation import boolean, choice, number, sequence, text

REDUCTIONS = ("sequence", "token")
TRAINABLE = ("projector", "projector+lora_neg")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class DCDTrainConfig(TrainConfig):
    """Settings of one DCD training run (defaults: the spec's reconstruction for LLaVA-1.5-7B, [R]).

    Args:
        model: a model directory or a cached hub id; "toy" / "toy_fast" build or reuse the full / fast toy
            (the benchmark app's default model is the full toy).
        data: the preference data (a .jsonl / .json / .parquet file, a saved dataset or a dataset folder;
            see `vlmfix.training.dcd_data`); None with a toy model uses the toy's preference file.
        data_split: the split of a saved `DatasetDict` or a dataset folder.
        image_root: where relative image paths start (default: the data's directory).
        output_dir: where `positive.safetensors` / `negative.safetensors` and the resumable checkpoints go.
        projectors: which projectors to train: ("pos", "neg"), ("neg",) for Neg-only, ...
        trainable: "projector" (D2), or "projector+lora_neg", the spec's fallback when the two projectors'
            logits stay too close: the negative side also trains LoRA adapters on the language model
            (`lora_rank`, `lora_alpha`, `lora_targets`), applied to the negative rows only at decoding.
        init_from: None starts both from the model's projector P0 (D3), or a DCD checkpoint file.
        learning_rate, weight_decay: AdamW settings; cosine schedule with `warmup_ratio` of the steps.
        epochs, max_steps: passes over the data; max_steps (optimiser steps) caps them when set.
        batch_size: rows per device and micro-step; gradient_accumulation_steps micro-steps per optimiser
            step (global batch = batch_size x accumulation x processes; the spec's 128).
        loss_reduction: "sequence" (mean per response, then over responses; D9) or "token".
        mixed_precision: accelerate's "no", "bf16" or "fp16".
        max_rows: use only the first rows of the data (quick looks).
        seed: data order and initialisation seed.
        threads: torch's CPU thread count for the run (restored after); 1 by default, the fastest for the toy
            and for small models on a shared CPU; None keeps torch's default (one per core).
        save_every: optimiser steps between resumable checkpoints; keep_checkpoints: how many are kept.
        resume: continue from the newest checkpoint and keep a finished projector whose file was written with
            these settings; a checkpoint written with other settings is refused, naming them. False starts
            over (deleting the run's checkpoints).
        log_every: optimiser steps between loss updates of the progress bar.
    """

    WHAT = "DCD training"
    RESUME_NEUTRAL = TrainConfig.RESUME_NEUTRAL | {"projectors"}  # each projector is its own run
    RENAMED = {"streams": "projectors"}

    model: str = "toy"
    data: str | None = None
    data_split: str = "train"
    image_root: str | None = None
    output_dir: str = "outputs/dcd/toy"
    projectors: tuple[Side, ...] = SIDES
    trainable: str = "projector"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    init_from: str | None = None
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 16
    loss_reduction: str = "sequence"
    mixed_precision: str = "no"
    max_rows: int | None = None
    seed: int = 0
    threads: int | None = DEFAULT_THREADS
    save_every: int = 100
    keep_checkpoints: int = 1
    resume: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        s = self._set
        s("model", text(self.model, "model", meaning="a model directory, a cached hub id, or toy / toy_fast"))
        for name in ("data", "image_root", "init_from"):
            s(name, optional(text, getattr(self, name), name))
        s("data_split", text(self.data_split, "data_split"))
        s("output_dir", text(self.output_dir, "output_dir"))
        s("projectors", sequence(self.projectors, "projectors", lambda v, n: choice(v, n, SIDES), min_length=1,
                                 unique=True, what="sides ('pos', 'neg')", meaning="which projectors to train"))
        s("trainable", choice(self.trainable, "trainable", TRAINABLE))
        s("lora_rank", number(self.lora_rank, "lora_rank", low=1, integer=True))
        s("lora_alpha", number(self.lora_alpha, "lora_alpha", low=0, low_open=True))
        s("lora_targets", sequence(self.lora_targets, "lora_targets", text, min_length=1,
                                   what="names of the language model's linear layers"))
        if self.trainable == "projector+lora_neg" and "neg" not in self.projectors:
            raise ValueError("trainable='projector+lora_neg' trains adapters for the negative projector's rows: "
                             "include 'neg' in `projectors`.")
        s("learning_rate", number(self.learning_rate, "learning_rate", low=0, low_open=True))
        s("weight_decay", number(self.weight_decay, "weight_decay", low=0))
        s("warmup_ratio", number(self.warmup_ratio, "warmup_ratio", low=0, high=1, high_open=True,
                                 meaning="the share of optimiser steps spent warming up"))
        s("epochs", number(self.epochs, "epochs", low=1, integer=True, meaning="the number of passes over the data"))
        for name in ("max_steps", "max_rows"):
            s(name, optional(number, getattr(self, name), name, low=1, integer=True))
        for name in ("batch_size", "gradient_accumulation_steps", "save_every", "keep_checkpoints", "log_every"):
            s(name, number(getattr(self, name), name, low=1, integer=True))
        s("loss_reduction", choice(self.loss_reduction, "loss_reduction", REDUCTIONS))
        s("mixed_precision", choice(self.mixed_precision, "mixed_precision", PRECISIONS))
        s("seed", number(self.seed, "seed", low=0, integer=True))
        s("threads", optional(number, self.threads, "threads", low=1, integer=True, meaning=THREADS_MEANING))
        s("resume", boolean(self.resume, "resume"))

    @property
    def lora_spec(self) -> LoraSpec:
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets)
