"""Train DCD's positive and negative projectors from preference data (chosen / rejected responses).

Each stream is its own run from the model's projector P0 (or `init_from`): the positive projector
minimises the response NLL of the chosen responses, the negative projector that of the rejected ones;
the vision tower and the language model stay frozen and only the projector slot's parameters train.
The same script runs on one CPU, one GPU or many (`accelerate launch -m vlmfix.training.dcd ...`).

    python -m vlmfix.training.dcd                                   # the full toy build, both streams
    python -m vlmfix.training.dcd model=/path/llava-1.5-7b-hf data=/path/prefs.jsonl \\
        output_dir=outputs/dcd/llava7b mixed_precision=bf16
    python -m vlmfix.training.dcd --config conf/train/dcd.yaml learning_rate=1e-4 streams=[neg]

Preference data: JSON Lines, one object per line with `image` (a path, relative to the file's
directory), `prompt`, `chosen` and `rejected` (non-empty strings). Outputs: `positive.safetensors` /
`negative.safetensors` in `output_dir` (see `vlmfix.methods.dcd.save_projector`), for
`vlmfix.DCD(checkpoints=output_dir)`.

Spec: /shared/specs/dcd.md §3 (steps 2-3 and the Decisions D1-D3, D9); the loss and the optimiser
settings are vlmfix's reconstruction ([R]), not published by the paper.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmfix.adapters import get_adapter
from vlmfix.methods.dcd import CHECKPOINT_FILES, SIDES, Side, load_projector, save_projector
from vlmfix.methods.dcd_lora import LoraSpec, NegativeLora

IGNORE = -100
RESPONSE_FIELD: dict[Side, str] = {"pos": "chosen", "neg": "rejected"}
REDUCTIONS = ("sequence", "token")
TRAINABLE = ("projector", "projector+lora_neg")
PRECISIONS = ("no", "bf16", "fp16")


class PreferenceDataError(ValueError):
    """A preference file or one of its rows is malformed; the message names the row."""


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DCDTrainConfig:
    """Settings of one DCD training run (defaults: the spec's reconstruction for LLaVA-1.5-7B, [R]).

    Args:
        model: a model directory (or local hub id); "toy" / "toy_fast" build or reuse the full / fast toy
            (the benchmark app's default model is the full toy).
        data: the preference JSONL; None with a toy model uses the toy's preference file.
        output_dir: where `positive.safetensors` / `negative.safetensors` are written.
        streams: which projectors to train: ("pos", "neg"), ("neg",) for Neg-only, ...
        trainable: "projector" (D2), or "projector+lora_neg", the spec's fallback when the two streams'
            logits stay too close: the negative stream also trains LoRA adapters on the language model
            (`lora_rank`, `lora_alpha`, `lora_targets`), used on its rows only at decoding.
        init_from: None starts both from the model's projector P0 (D3), or a DCD checkpoint file.
        learning_rate, weight_decay: AdamW settings; cosine schedule with `warmup_ratio` of the steps.
        epochs, max_steps: passes over the data; max_steps (optimiser steps) caps them when set.
        batch_size: rows per device and micro-step; gradient_accumulation_steps micro-steps per optimiser
            step (global batch = batch_size x accumulation x processes; the spec's 128).
        loss_reduction: "sequence" (mean per response, then over responses; D9) or "token".
        mixed_precision: accelerate's "no", "bf16" or "fp16".
        max_rows: use only the first rows of the file (quick looks).
        seed: data order and initialisation seed.
    """

    model: str = "toy"
    data: str | None = None
    output_dir: str = "outputs/dcd/toy"
    streams: tuple[str, ...] = SIDES
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
    log_every: int = 10
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes stored in the checkpoints

    def __post_init__(self) -> None:
        object.__setattr__(self, "streams", tuple(self.streams))
        bad = [s for s in self.streams if s not in SIDES]
        if bad or not self.streams:
            raise ValueError(f"`streams` must be a non-empty subset of {SIDES}, got {self.streams!r}.")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"`trainable` must be one of {TRAINABLE}, got {self.trainable!r}.")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.trainable == "projector+lora_neg":
            _ = self.lora_spec  # validates rank, alpha and targets now, not after the model has loaded
            if "neg" not in self.streams:
                raise ValueError("trainable='projector+lora_neg' trains adapters for the negative stream: include "
                                 "'neg' in `streams`.")
        if self.loss_reduction not in REDUCTIONS:
            raise ValueError(f"`loss_reduction` must be 'sequence' or 'token', got {self.loss_reduction!r}.")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"`mixed_precision` must be one of {PRECISIONS}, got {self.mixed_precision!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio!r}.")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {getattr(self, name)!r}.")
        for name in ("max_steps", "max_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be None or an int >= 1, got {value!r}.")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def lora_spec(self) -> LoraSpec:
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets)


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class PreferenceRow:
    """One preference example; `line` is its 1-based line in the file (for error messages)."""

    image: Path
    prompt: str
    chosen: str
    rejected: str
    line: int


def load_preferences(path: str | Path, max_rows: int | None = None) -> list[PreferenceRow]:
    """Read and check a preference JSONL file; a bad row raises `PreferenceDataError` naming its line."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"preference file {path} does not exist; pass data=<preference jsonl>.")
    rows: list[PreferenceRow] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise PreferenceDataError(f"{where}: not valid JSON ({error.msg}).") from error
            if not isinstance(record, dict):
                raise PreferenceDataError(f"{where}: expected a JSON object with image, prompt, chosen and rejected, "
                                          f"got {type(record).__name__}.")
            for key in ("image", "prompt", "chosen", "rejected"):
                value = record.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise PreferenceDataError(f"{where}: {key!r} must be a non-empty string, got {value!r}.")
            image = (path.parent / record["image"]).resolve()
            if not image.is_file():
                raise PreferenceDataError(f"{where}: image {record['image']!r} not found (looked at {image}); image "
                                          "paths are relative to the preference file's directory.")
            rows.append(PreferenceRow(image, record["prompt"], record["chosen"], record["rejected"], line_no))
            if max_rows is not None and len(rows) >= max_rows:
                break
    if not rows:
        raise PreferenceDataError(f"preference file {path} holds no rows.")
    return rows


class ResponseEncoder:
    """Model inputs of (image, prompt, response) rows: the prompt through the processor (image tokens
    expanded), then ' ' + response + eos, with labels on the response tokens only."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def prompt_text(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def encode(self, row: PreferenceRow, response: str) -> dict[str, Tensor]:
        from PIL import Image

        with Image.open(row.image) as image:
            encoded = self.processor(images=[image.convert("RGB")], text=[self.prompt_text(row.prompt)],
                                     return_tensors="pt")
        prompt_ids = encoded["input_ids"][0]
        answer = self.tokenizer(" " + response, add_special_tokens=False)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            answer = [*answer, self.tokenizer.eos_token_id]
        answer_ids = torch.tensor(answer, dtype=prompt_ids.dtype)
        item = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
        item["input_ids"] = torch.cat([prompt_ids, answer_ids])
        item["labels"] = torch.cat([torch.full_like(prompt_ids, IGNORE), answer_ids])
        for key in ("token_type_ids", "mm_token_type_ids"):
            if key in item:  # the response is text
                item[key] = torch.cat([item[key][0], torch.zeros_like(answer_ids, dtype=item[key].dtype)])
        return item

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Right-padded [rows, seq] ids / mask / labels; image tensors concatenated image by image."""
        length = max(len(item["input_ids"]) for item in items)
        batch: dict[str, Tensor] = {}
        for key, fill in (("input_ids", self.pad_token_id), ("labels", IGNORE), ("token_type_ids", 0),
                          ("mm_token_type_ids", 0)):
            if key in items[0]:
                batch[key] = torch.stack([F.pad(item[key], (0, length - len(item[key])), value=fill) for item in items])
        batch["attention_mask"] = torch.stack(
            [F.pad(torch.ones_like(item["input_ids"]), (0, length - len(item["input_ids"]))) for item in items]
        )
        for key in items[0]:
            if key in batch:
                continue
            tensors = [item[key] for item in items]
            if tensors[0].dim() == 5:  # LLaVA-NeXT crops: pad every image to the most crops
                crops = max(t.shape[1] for t in tensors)
                tensors = [F.pad(t, (0, 0, 0, 0, 0, 0, 0, crops - t.shape[1])) for t in tensors]
            batch[key] = torch.cat(tensors)
        return batch


# ---------------------------------------------------------------------------------------------- loss
def response_nll(model: nn.Module, batch: dict[str, Tensor], reduction: str = "sequence") -> Tensor:
    """Negative log-likelihood of the labelled (response) tokens.

    "sequence": each row's mean token NLL, then the mean over rows (the spec's L_pos / L_neg);
    "token": the mean over all labelled tokens of the batch.
    """
    labels = batch["labels"]  # [rows, seq]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()  # [rows, seq, vocab]
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")  # [rows, seq-1]
    weight = (targets != IGNORE).float()
    if reduction == "token":
        return (nll * weight).sum() / weight.sum().clamp(min=1)
    per_row = (nll * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
    return per_row.mean()


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class ProjectorRun:
    """The result of training one stream: the projector's weights (and the negative stream's LoRA adapters
    with trainable="projector+lora_neg") and the loss of every micro-step."""

    stream: Side
    state_dict: dict[str, Tensor]
    losses: list[float]
    steps: int
    lora: NegativeLora | None = None


@contextmanager
def projector_only(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Freeze everything but the projector slot (yields P0's weights); on exit restore the projector's
    weights and every requires_grad flag."""
    projector = get_adapter(model).projector
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    original = {k: v.detach().clone() for k, v in projector.state_dict().items()}
    was_training = model.training
    model.requires_grad_(False)
    projector.requires_grad_(True)
    try:
        yield original
    finally:
        with torch.no_grad():
            projector.load_state_dict(original)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)


def train_projector(
    model: nn.Module,
    processor: Any,
    rows: Sequence[PreferenceRow],
    stream: Side,
    config: DCDTrainConfig,
) -> ProjectorRun:
    """Train the projector of one `stream` ("pos": chosen responses, "neg": rejected ones) from P0 /
    `init_from`. The model comes back unchanged; the trained weights are returned."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    with projector_only(model) as original:
        prepared = accelerator.prepare(model)
        return _train_stream(prepared, model, original, processor, rows, stream, config, accelerator)


def _train_stream(
    prepared: nn.Module,
    model: nn.Module,
    start: dict[str, Tensor],
    processor: Any,
    rows: Sequence[PreferenceRow],
    stream: Side,
    config: DCDTrainConfig,
    accelerator: Any,
) -> ProjectorRun:
    """One stream's optimisation loop on an accelerate-prepared model whose projector is trainable."""
    import datasets
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    if stream not in SIDES:
        raise ValueError(f"`stream` must be 'pos' or 'neg', got {stream!r}.")
    set_seed(config.seed)
    projector = get_adapter(model).projector
    with torch.no_grad():
        projector.load_state_dict(load_projector(config.init_from, model) if config.init_from else start)
    encoder = ResponseEncoder(processor)
    field_name = RESPONSE_FIELD[stream]
    table = datasets.Dataset.from_list([{"row": i} for i in range(len(rows))])
    loader = torch.utils.data.DataLoader(
        table, batch_size=config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(config.seed),
        collate_fn=lambda items: encoder.collate(
            [encoder.encode(rows[i["row"]], getattr(rows[i["row"]], field_name)) for i in items]),
    )
    per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    total = min(per_epoch * config.epochs, config.max_steps or sys.maxsize)
    lora = NegativeLora(model, config.lora_spec) if stream == "neg" and config.trainable == "projector+lora_neg" \
        else None
    trainable = [*projector.parameters(), *(lora.parameters() if lora is not None else ())]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    prepared.eval()  # frozen parts without dropout; the projector trains
    projector.train()
    losses: list[float] = []
    steps = 0
    adapters = lora.attached(lambda: slice(None)) if lora is not None else nullcontext()  # every row: negative
    with adapters:
        while steps < total:
            steps = _epoch(prepared, loader, optimizer, scheduler, accelerator, config, stream, lora, losses, steps,
                           total)
    state = {k: v.detach().to("cpu").clone() for k, v in projector.state_dict().items()}
    return ProjectorRun(stream, state, losses, steps, lora.requires_grad_(False) if lora is not None else None)


def _epoch(prepared: nn.Module, loader: Any, optimizer: Any, scheduler: Any, accelerator: Any,
           config: DCDTrainConfig, stream: Side, lora: NegativeLora | None, losses: list[float], steps: int,
           total: int) -> int:
    """One pass over `loader` (or up to `total` optimiser steps); returns the optimiser steps done so far."""
    for batch in loader:
        with accelerator.accumulate(prepared):
            loss = response_nll(prepared, batch, config.loss_reduction)
            accelerator.backward(loss)
            if lora is not None and accelerator.sync_gradients and accelerator.num_processes > 1:
                for p in lora.parameters():  # outside the prepared (DDP) model: average by hand, on every rank
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)  # a layer off the loss path
                    p.grad = accelerator.reduce(grad, reduction="mean")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(float(loss.detach()))
        if accelerator.sync_gradients:
            steps += 1
            if steps % config.log_every == 0 or steps == total:
                accelerator.print(f"[dcd {stream}] step {steps}/{total} loss {losses[-1]:.4f}")
            if steps >= total:
                break
    return steps


def load_model(config: DCDTrainConfig) -> tuple[nn.Module, Any, Path, dict[str, str]]:
    """(model, processor, preference file, provenance) of a config; "toy" / "toy_fast" build or reuse a toy.

    provenance: the model directory and, for a toy, its settings hash (stored in the checkpoints, so a
    toy rebuilt with other settings can tell its projectors are stale).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    data = config.data
    model_path = config.model
    if config.model in ("toy", "toy_fast"):
        from vlmfix.toy import build_toy

        paths = build_toy(fast=config.model == "toy_fast")
        model_path = str(paths.model_dir)
        data = data or str(paths.preference_file)
    from vlmfix.toy.build import model_settings_hash

    toy_hash = model_settings_hash(model_path)  # any toy model directory, however it was named
    provenance = {"toy_settings_hash": toy_hash} if toy_hash else {}
    if data is None:
        raise PreferenceDataError("data=<preference jsonl> is required unless model is toy or toy_fast.")
    model = AutoModelForImageTextToText.from_pretrained(model_path)
    processor = AutoProcessor.from_pretrained(model_path)
    return model, processor, Path(data), {"model_dir": str(model_path), **provenance}


def train_dcd(config: DCDTrainConfig) -> dict[Side, Path]:
    """Train the configured streams and write their checkpoints; returns {stream: checkpoint path}."""
    from accelerate import Accelerator

    model, processor, data, provenance = load_model(config)
    rows = load_preferences(data, config.max_rows)  # every row is checked before any training
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    written: dict[Side, Path] = {}
    with projector_only(model) as original:
        prepared = accelerator.prepare(model)
        for stream in config.streams:
            run = _train_stream(prepared, model, original, processor, rows, stream, config, accelerator)
            if accelerator.is_main_process:
                training = {**config.as_dict(), **provenance, "data": str(data), "rows": len(rows), "steps": run.steps,
                            "final_loss": run.losses[-1] if run.losses else None}
                path = Path(config.output_dir) / CHECKPOINT_FILES[stream]
                written[stream] = save_projector(path, run.state_dict, model, stream, training, lora=run.lora)
                accelerator.print(f"[dcd {stream}] wrote {written[stream]}")
            accelerator.wait_for_everyone()
    return written


# ---------------------------------------------------------------------------------------------- CLI
def parse_config(argv: Sequence[str]) -> DCDTrainConfig:
    """`[--config file.yaml] key=value ...` (OmegaConf dot-list syntax) -> DCDTrainConfig."""
    from omegaconf import OmegaConf

    args = list(argv)
    merged = OmegaConf.create(DCDTrainConfig().as_dict())
    if args[:1] == ["--config"]:
        if len(args) < 2:
            raise SystemExit("--config needs a YAML file path")
        loaded = OmegaConf.load(args[1])
        loaded = OmegaConf.masked_copy(loaded, [k for k in loaded if k != "_target_"])
        merged = OmegaConf.merge(merged, loaded)
        args = args[2:]
    unknown = [a for a in args if "=" not in a]
    if unknown:
        raise SystemExit(f"arguments must be key=value overrides, got {unknown}; keys: "
                         f"{', '.join(f.name for f in dataclasses.fields(DCDTrainConfig))}")
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(args))
    known = {f.name for f in dataclasses.fields(DCDTrainConfig)}
    values = OmegaConf.to_container(merged, resolve=True)
    extra = sorted(set(values) - known)
    if extra:
        raise SystemExit(f"unknown settings {extra}; keys: {', '.join(sorted(known))}")
    return DCDTrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> dict[Side, Path]:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    return train_dcd(config)


if __name__ == "__main__":
    main()
