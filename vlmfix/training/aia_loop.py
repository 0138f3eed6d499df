"""The AIA fine-tuning loop: trainable sets, the AIA-gradient check, resumable checkpoints and `train`.

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

Checkpoints hold no pickles (`vlmfix.training.checkpoints`). `output_dir/checkpoint-NNNNNNN/` has
`trainable.safetensors` (the trainable parameters), `optimizer.safetensors` (the optimizer's tensors),
`rng.safetensors` (the random generators) and `trainer_state.json` (step, lambda, scheduler, the optimizer's
other state, the settings), written atomically. A run restarted with the same `output_dir` and settings
resumes from the newest complete checkpoint; other settings are refused, naming them. The data order is a
function of (seed, epoch), so a resumed run sees the same batches as an uninterrupted one. At the end,
`output_dir/final/` holds the model (LoRA merged) and processor, loadable with `from_pretrained`.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmfix.adapters import get_adapter
from vlmfix.decoding.session import apply
from vlmfix.errors import CheckpointError, VlmfixError
from vlmfix.training.aia import AIALoss, resolve_targets, unwrap_model
from vlmfix.training.aia_config import AIATrainConfig
from vlmfix.training.aia_data import SFTCollator, SFTExample, load_rows
from vlmfix.training.checkpoints import (
    latest_checkpoint,
    load_optimizer_state,
    optimizer_state,
    prune_checkpoints,
    read_checkpoint,
    remove_checkpoints,
    restore_rng,
    rng_state,
    write_checkpoint,
)
from vlmfix.training.config import ConfigError, check_model_source, check_path, check_same_settings
from vlmfix.training.loop import cosine_schedule, progress_bar, torch_threads

CHECKPOINT_PREFIX = "checkpoint-"
WEIGHTS, OPTIMIZER, RNG = "trainable.safetensors", "optimizer.safetensors", "rng.safetensors"


class AIAGradientError(VlmfixError, RuntimeError):
    """No trainable parameter receives gradient from the AIA term."""


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
            lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; any number scales alpha / r
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
            for proj in (adapter.attn(layer).get_submodule("q_proj"), adapter.attn(layer).get_submodule("k_proj")):
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
        for proj in (adapter.attn(layer).get_submodule("q_proj"), adapter.attn(layer).get_submodule("k_proj"))
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
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if p.dim() < 2 or name.endswith(".bias") or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


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
    """Write one resumable checkpoint (atomically; see `vlmfix.training.checkpoints.write_checkpoint`)."""
    opt_tensors, opt_state = optimizer_state(optimizer)
    rng_tensors, rng_json = rng_state()
    full_state = {
        **state,
        "optimizer": opt_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_json,
        "parameters": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad},
    }
    files = {WEIGHTS: trainable_state(model), OPTIMIZER: opt_tensors, RNG: rng_tensors}
    return write_checkpoint(directory, files, full_state)


def load_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: AIATrainConfig,
) -> dict[str, Any]:
    """Restore trainable weights, optimizer, scheduler and random generators from `directory` after checking
    that it was written with the same settings; returns the trainer state."""
    state, files = read_checkpoint(directory, (WEIGHTS, OPTIMIZER, RNG))
    check_same_settings(state.get("config", {}), config.fingerprint(), f"checkpoint {directory}")
    weights = files[WEIGHTS]
    params = dict(model.named_parameters())
    expected = {n: list(p.shape) for n, p in params.items() if p.requires_grad}
    stored = {n: list(t.shape) for n, t in weights.items()}
    if stored != expected:
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        shapes = sorted(n for n in set(stored) & set(expected) if stored[n] != expected[n])
        raise CheckpointError(
            f"checkpoint {directory} does not fit this model and trainable set: missing {missing[:3]}, "
            f"unexpected {extra[:3]}, shape mismatch {shapes[:3]}. Resume with the same model and "
            "`trainable`, or start over (resume=false) or use a new output_dir."
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    load_optimizer_state(optimizer, files[OPTIMIZER], state["optimizer"], directory)
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(files[RNG], state["rng"])
    return state


# ---------------------------------------------------------------------------------------------- the loop
def batch_indices(step: int, rows: int, global_batch: int, seed: int) -> list[int]:
    """Row indices of global `step`: a (seed, epoch)-seeded permutation cut into batches (drop the rest)."""
    per_epoch = max(1, rows // global_batch)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    chunk = order[position * global_batch : (position + 1) * global_batch]
    return chunk if chunk else order[:global_batch]


def _sources(config: AIATrainConfig) -> tuple[str, str | None]:
    """(model directory, default data) of a config, checked before anything loads; builds the toy if asked."""
    if config.data is not None:
        check_path(config.data, "data", "a .jsonl / .json file or a COCO-layout directory")
    if config.model not in (None, "toy"):
        return check_model_source(config.model), None
    from vlmfix.toy import build_toy

    paths = build_toy(fast=config.toy_fast)
    return str(paths.model_dir), str(paths.data_dir)


def _load_model(config: AIATrainConfig, model_dir: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {"dtype": getattr(torch, config.dtype)}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs)
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


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
    end). Returns a `TrainResult`; the model and processor are saved to `output_dir/final`. Runs with
    `config.threads` torch threads, restored after.
    """
    with torch_threads(config.threads):
        return _train(config, model, processor, rows)


def _train(
    config: AIATrainConfig, model: nn.Module | None, processor: Any | None, rows: Sequence[SFTExample] | None
) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    data_dir = None
    if model is None or processor is None:
        model_dir, data_dir = _sources(config)
    if rows is None:
        source = config.data or data_dir
        if source is None:
            raise ConfigError("no training data: set `data` to a .jsonl / .json file or a COCO-layout directory.")
        rows = load_rows(
            source,
            image_root=config.image_root,
            split=config.coco_split,
            questions_per_image=config.questions_per_image,
            seed=config.seed,
            limit=config.max_rows,
        )
    rows = list(rows)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    set_seed(config.seed)
    if model is None or processor is None:
        model, processor = _load_model(config, model_dir)
    base = unwrap_model(model)
    if _checkpointing(base):
        raise ValueError(
            "AIA training does not support gradient checkpointing (its recomputation skips the AIA "
            "observer); call model.gradient_checkpointing_disable()."
        )
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
    scheduler = cosine_schedule(optimizer, warmup, config.max_steps, config.min_learning_rate / config.learning_rate)
    output_dir = Path(config.output_dir).expanduser()
    start_step, lambda_, resumed = 0, config.lambda_, None
    if not config.resume and accelerator.is_main_process:
        remove_checkpoints(output_dir, CHECKPOINT_PREFIX)  # starting over: older checkpoints would be resumed later
    checkpoint = latest_checkpoint(output_dir, CHECKPOINT_PREFIX) if config.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, config)
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
    bar = progress_bar(config.max_steps, start_step, "aia", accelerator.is_main_process)
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
        entry = {"step": done, **totals, "lr": float(scheduler.get_last_lr()[0])}
        history.append(entry)
        bar.update(1)
        if done % config.log_every == 0 or done == config.max_steps:
            bar.set_postfix(loss=f"{entry['loss']:.4f}", ntp=f"{entry['ntp']:.4f}", aia=f"{entry['aia']:.5f}",
                            lr=f"{entry['lr']:.3g}")
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
                    {"step": done, "lambda_": lambda_, "targets": targets.as_dict(), "config": config.fingerprint()},
                )
                prune_checkpoints(output_dir, CHECKPOINT_PREFIX, config.keep_checkpoints)
    bar.close()
    model.eval()
    final_dir = _save_final(accelerator, model, processor, output_dir)
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
    ratio = config.lambda_auto_ratio
    assert ratio is not None  # called only when lambda_auto_ratio is set
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
    return ntp_sum / (ratio * aia_sum)


def _save_final(accelerator: Any, model: nn.Module, processor: Any, output_dir: Path) -> Path | None:
    accelerator.wait_for_everyone()
    final: Any = unwrap_model(accelerator.unwrap_model(model))  # a transformers model (save_pretrained)
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
