"""The DCD projector training loop, its batch order and its resumable checkpoints.

Each projector is its own run from the model's projector P0 (or `init_from`): the positive projector
minimises the response NLL of the chosen responses, the negative projector that of the rejected ones; the
vision tower and the language model stay frozen and only the projector slot's parameters train (and, with
trainable="projector+lora_neg", the negative side's LoRA adapters).

Resuming (`vlmfix.training.checkpoints`): every `save_every` optimiser steps a side writes
`output_dir/checkpoint-<side>-NNNNNNN/` (weights, optimiser, random generators, scheduler, losses, and the
settings, model and data it was trained with), atomically. A run started again with the same settings
continues from the newest one; the batch order is a function of (seed, epoch), so the result equals an
uninterrupted run's. A side whose final file (`positive.safetensors` / `negative.safetensors`, also
written atomically) records the same settings, model and data is not trained again.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmfix.adapters import get_adapter
from vlmfix.errors import CheckpointError
from vlmfix.methods.dcd import CHECKPOINT_FILES, Side, load_projector, read_metadata, save_projector
from vlmfix.methods.dcd_lora import NegativeLora
from vlmfix.training.checkpoints import (
    checkpoint_dir,
    latest_checkpoint,
    load_optimizer_state,
    optimizer_state,
    prune_checkpoints,
    read_checkpoint,
    remove_checkpoints,
    replace_atomically,
    restore_rng,
    rng_state,
    write_checkpoint,
)
from vlmfix.training.config import (
    TOY_MODELS,
    ConfigError,
    check_model_source,
    check_path,
    check_same_settings,
    differing_keys,
)
from vlmfix.training.dcd_config import DCDTrainConfig
from vlmfix.training.dcd_data import (
    IGNORE,
    Example,
    PreferenceData,
    PreferenceDataError,
    ResponseEncoder,
    load_preferences,
)
from vlmfix.training.loop import cosine_schedule, progress_bar, torch_threads

RESPONSE_FIELD: dict[Side, str] = {"pos": "chosen", "neg": "rejected"}
CHECKPOINT_PREFIX: dict[Side, str] = {"pos": "checkpoint-pos-", "neg": "checkpoint-neg-"}
WEIGHTS, OPTIMIZER, RNG = "trainable.safetensors", "optimizer.safetensors", "rng.safetensors"
LORA_KEY = "lora_module."  # the LoRA module's state_dict keys in a resumable checkpoint


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


# ---------------------------------------------------------------------------------------------- batch order
class BatchOrder:
    """Which examples each optimiser step of one process uses.

    Epoch e shuffles the examples as a `DataLoader(shuffle=True)` whose generator is seeded with `seed` does
    in its (e+1)-th pass, and cuts them into batches of `batch_size` (the last one smaller). Batches are dealt
    to the processes in turn (a process short of one takes one from the start, as accelerate's even batches
    do); `accumulation` consecutive micro-batches of a process make one optimiser step, the last step of an
    epoch possibly fewer. Everything follows from (seed, step), so a resumed run continues the same order.
    """

    def __init__(self, examples: int, batch_size: int, accumulation: int, epochs: int, max_steps: int | None,
                 seed: int, processes: int = 1, process: int = 0) -> None:
        self.examples, self.batch_size, self.accumulation = examples, batch_size, accumulation
        self.seed, self.processes, self.process = seed, processes, process
        self.batches = math.ceil(examples / batch_size)  # per epoch, all processes
        self.micro_per_epoch = math.ceil(self.batches / processes)  # per process
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / accumulation)
        self.total_steps = min(self.steps_per_epoch * epochs, max_steps or sys.maxsize)
        self._loader: torch.utils.data.DataLoader | None = None
        self._epoch = -1
        self._batches: list[list[int]] = []

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s batches: the loader's passes continue one generator, so replay the earlier ones."""
        if self._loader is None or epoch < self._epoch:
            self._loader = torch.utils.data.DataLoader(
                range(self.examples),  # type: ignore[arg-type]  # torch's stub wants a Dataset; a sequence is one
                batch_size=self.batch_size, shuffle=True, collate_fn=list,
                generator=torch.Generator().manual_seed(self.seed),
            )
            self._epoch = -1
        while self._epoch < epoch:
            self._batches, self._epoch = list(self._loader), self._epoch + 1
        return self._batches

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) of optimiser step `step` (0-based)."""
        batches = self._epoch_batches(self.epoch_of(step))
        first = (step % self.steps_per_epoch) * self.accumulation
        micro = range(first, min(first + self.accumulation, self.micro_per_epoch))
        return [batches[(m * self.processes + self.process) % self.batches] for m in micro]


# ---------------------------------------------------------------------------------------------- one side
@dataclass(frozen=True)
class ProjectorRun:
    """The result of training one side: the projector's weights (and the negative side's LoRA adapters with
    trainable="projector+lora_neg"), the loss of every micro-step and the optimiser steps taken."""

    side: Side
    state_dict: dict[str, Tensor]
    losses: list[float]
    steps: int
    lora: NegativeLora | None = None


@dataclass(frozen=True)
class SideCheckpoints:
    """Where one side's resumable checkpoints go, and what they must agree on to be resumed: the settings,
    the model and the data (`identity`)."""

    output_dir: Path
    side: Side
    identity: dict[str, Any]
    keep: int = 1

    @property
    def prefix(self) -> str:
        return CHECKPOINT_PREFIX[self.side]


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
    examples: Sequence[Example],
    side: Side,
    config: DCDTrainConfig,
) -> ProjectorRun:
    """Train the projector of one `side` ("pos" on chosen responses, "neg" on rejected ones) from P0 /
    `init_from`, in memory (no files), with `config.threads` threads. The model comes back unchanged; the
    trained weights are returned."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    with torch_threads(config.threads), projector_only(model) as original:
        prepared = accelerator.prepare(model)
        return _train_side(prepared, model, original, processor, examples, side, config, accelerator, None)


def _train_side(
    prepared: nn.Module,
    model: nn.Module,
    start: dict[str, Tensor],
    processor: Any,
    examples: Sequence[Example],
    side: Side,
    config: DCDTrainConfig,
    accelerator: Any,
    files: SideCheckpoints | None,
) -> ProjectorRun:
    """One side's optimisation loop on an accelerate-prepared model whose projector is trainable; with
    `files`, resumes from and writes resumable checkpoints."""
    from accelerate.utils import set_seed

    if not examples:
        raise PreferenceDataError(f"no examples for the {side!r} projector ({RESPONSE_FIELD[side]} responses); "
                                  "check the data, or leave the side out of `projectors`.")
    set_seed(config.seed)
    projector = get_adapter(model).projector
    with torch.no_grad():
        projector.load_state_dict(load_projector(config.init_from, model) if config.init_from else start)
    encoder = ResponseEncoder(processor)
    order = BatchOrder(len(examples), config.batch_size, config.gradient_accumulation_steps, config.epochs,
                       config.max_steps, config.seed, accelerator.num_processes, accelerator.process_index)
    total = order.total_steps
    lora = NegativeLora(model, config.lora_spec) if side == "neg" and config.trainable == "projector+lora_neg" \
        else None
    trainable = [*projector.parameters(), *(lora.parameters() if lora is not None else ())]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, int(config.warmup_ratio * total), total)
    steps = 0
    losses: list[float] = []
    if files is not None and not config.resume and accelerator.is_main_process:
        remove_checkpoints(files.output_dir, files.prefix)
    latest = latest_checkpoint(files.output_dir, files.prefix) if files is not None and config.resume else None
    if files is not None and latest is not None:
        steps, losses = _restore(latest, files, projector, lora, optimizer, scheduler)
        accelerator.print(f"[dcd {side}] resumed from {latest} (step {steps}/{total})")
    optimizer = accelerator.prepare(optimizer)
    prepared.eval()  # frozen parts without dropout; the projector trains
    projector.train()
    adapters = lora.attached(lambda: slice(None)) if lora is not None else nullcontext()  # every row: negative
    bar = progress_bar(total, steps, f"dcd {side}", accelerator.is_main_process)
    with adapters, bar:
        while steps < total:
            micro_batches = order.micro_batches(steps)
            for i, indices in enumerate(micro_batches):
                batch = {k: v.to(accelerator.device) for k, v in encoder.batch([examples[j] for j in indices]).items()}
                with nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(prepared):
                    loss = response_nll(prepared, batch, config.loss_reduction)
                    accelerator.backward(loss / config.gradient_accumulation_steps)
                losses.append(float(loss.detach()))
            if lora is not None and accelerator.num_processes > 1:
                for p in lora.parameters():  # outside the prepared (DDP) model: average by hand, on every rank
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)  # a layer off the loss path
                    p.grad = accelerator.reduce(grad, reduction="mean")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            bar.update(1)
            if steps % config.log_every == 0 or steps == total:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if files is not None and steps % config.save_every == 0 and steps < total:
                _save(files, steps, order, losses, projector, lora, optimizer, scheduler, accelerator)
    state = {k: v.detach().to("cpu").clone() for k, v in projector.state_dict().items()}
    return ProjectorRun(side, state, losses, steps, lora.requires_grad_(False) if lora is not None else None)


def _save(files: SideCheckpoints, steps: int, order: BatchOrder, losses: list[float], projector: nn.Module,
          lora: NegativeLora | None, optimizer: Any, scheduler: Any, accelerator: Any) -> None:
    """Write one side's resumable checkpoint after optimiser step `steps` (main process), keep the newest."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = dict(projector.state_dict())
        if lora is not None:
            weights.update({LORA_KEY + k: v for k, v in lora.state_dict().items()})
        opt_tensors, opt_state = optimizer_state(getattr(optimizer, "optimizer", optimizer))
        rng_tensors, rng_json = rng_state()
        state = {"side": files.side, "step": steps, "epoch": order.epoch_of(steps), "losses": losses,
                 "identity": files.identity, "optimizer": opt_state, "scheduler": scheduler.state_dict(),
                 "rng": rng_json}
        write_checkpoint(checkpoint_dir(files.output_dir, files.prefix, steps),
                         {WEIGHTS: weights, OPTIMIZER: opt_tensors, RNG: rng_tensors}, state)
        prune_checkpoints(files.output_dir, files.prefix, files.keep)
    accelerator.wait_for_everyone()


def _restore(directory: Path, files: SideCheckpoints, projector: nn.Module, lora: NegativeLora | None,
             optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[int, list[float]]:
    """Load a side's checkpoint into the run (after checking its settings, model and data); (steps, losses)."""
    state, tensors = read_checkpoint(directory, (WEIGHTS, OPTIMIZER, RNG))
    check_same_settings(state.get("identity", {}), files.identity, f"checkpoint {directory}")
    weights = tensors[WEIGHTS]
    try:
        with torch.no_grad():
            projector.load_state_dict({k: v for k, v in weights.items() if not k.startswith(LORA_KEY)})
            if lora is not None:
                lora.load_state_dict({k[len(LORA_KEY):]: v for k, v in weights.items() if k.startswith(LORA_KEY)})
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {directory} does not fit this model's projector ({error}); start over "
                              "(resume=false) or use another output_dir.") from error
    load_optimizer_state(optimizer, tensors[OPTIMIZER], state["optimizer"], directory)
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(tensors[RNG], state["rng"])
    return int(state["step"]), [float(x) for x in state["losses"]]


# ---------------------------------------------------------------------------------------------- a whole run
def _sources(config: DCDTrainConfig) -> tuple[str, str | Path, dict[str, str]]:
    """(model directory, preference data, provenance) of a config, checked before anything loads.

    provenance: the model directory and, for a toy, its settings hash (stored in the checkpoints, so a
    toy rebuilt with other settings can tell its projectors are stale).
    """
    from vlmfix.toy.build import model_settings_hash

    data = config.data
    if config.model in TOY_MODELS:
        from vlmfix.toy import build_toy

        paths = build_toy(fast=config.model == "toy_fast")
        model_path = str(paths.model_dir)
        data = data or str(paths.preference_file)
    else:
        model_path = check_model_source(config.model)
    if data is None:
        raise ConfigError("`data` is required unless model is toy or toy_fast: give preference data (a .jsonl / "
                          ".json / .parquet file, a saved dataset or a dataset folder).")
    check_path(data, "data", "preference data (a .jsonl / .json / .parquet file, a saved dataset or a folder)")
    if config.init_from is not None:
        check_path(config.init_from, "init_from", "a DCD projector checkpoint (positive/negative.safetensors)")
    toy_hash = model_settings_hash(model_path)  # any toy model directory, however it was named
    provenance = {"model_dir": str(model_path), **({"toy_settings_hash": toy_hash} if toy_hash else {})}
    return model_path, data, provenance


def _identity(config: DCDTrainConfig, provenance: dict[str, str], data: PreferenceData) -> dict[str, Any]:
    """What a side's checkpoints and final file must agree on to be reused: settings, model, data."""
    return {**config.fingerprint(), **provenance, "data_fingerprint": data.fingerprint}


def finished_with(path: Path, identity: dict[str, Any]) -> str | None:
    """None when `path` is a projector file trained with `identity`; otherwise why not (for the log)."""
    try:
        training = json.loads(read_metadata(path).get("training", "{}"))
    except CheckpointError as error:
        return str(error) if path.exists() else "not written yet"
    keys = differing_keys({k: training.get(k, "<unset>") for k in identity}, identity)
    return f"other {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}" if keys else None


def write_projector(path: Path, run: ProjectorRun, model: nn.Module, training: dict[str, Any]) -> Path:
    """`save_projector` of a trained side into `path`, atomically (a kill never leaves a truncated file)."""
    return replace_atomically(path, lambda tmp: save_projector(tmp, run.state_dict, model, run.side, training,
                                                               lora=run.lora))


def _sides_to_train(config: DCDTrainConfig, identity: dict[str, Any], output_dir: Path,
                    accelerator: Any) -> tuple[dict[Side, Path], list[Side]]:
    """(the finished sides kept, the sides to train); a side's checkpoint written with other settings, model or
    data is refused here, before the model loads."""
    kept: dict[Side, Path] = {}
    todo: list[Side] = []
    for side in config.projectors:
        final = output_dir / CHECKPOINT_FILES[side]
        why = finished_with(final, identity) if config.resume else "resume=false"
        if why is None:
            accelerator.print(f"[dcd {side}] {final} was trained with these settings, model and data: kept")
            kept[side] = final
            continue
        if final.exists():
            accelerator.print(f"[dcd {side}] training {final} again ({why})")
        latest = latest_checkpoint(output_dir, CHECKPOINT_PREFIX[side]) if config.resume else None
        if latest is not None:
            state, _ = read_checkpoint(latest, ())
            check_same_settings(state.get("identity", {}), identity, f"checkpoint {latest}")
        todo.append(side)
    return kept, todo


def train_dcd(config: DCDTrainConfig) -> dict[Side, Path]:
    """Train the configured projectors and write their files; returns {side: projector file}.

    Everything is checked before the model loads (model path, data rows and images, init_from); a side whose
    file already holds a projector trained with the same settings, model and data is kept (unless
    resume=false), and an interrupted side resumes from its newest checkpoint.
    """
    with torch_threads(config.threads):
        return _train_dcd(config)


def _train_dcd(config: DCDTrainConfig) -> dict[Side, Path]:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    model_path, data_source, provenance = _sources(config)
    data = load_preferences(data_source, config.max_rows, split=config.data_split, image_root=config.image_root)
    for side in config.projectors:
        if not data.examples(side):
            raise PreferenceDataError(f"{data.source} gives no {side!r} examples ({RESPONSE_FIELD[side]} responses; "
                                      f"layout {data.layout}); check the data, or train only the other projector.")
    identity = _identity(config, provenance, data)
    output_dir = Path(config.output_dir).expanduser()
    written, todo = _sides_to_train(config, identity, output_dir, accelerator)
    if not todo:
        return written
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_path)
    processor = AutoProcessor.from_pretrained(model_path)
    with projector_only(model) as original:
        prepared = accelerator.prepare(model)
        for side in todo:
            files = SideCheckpoints(output_dir, side, identity, config.keep_checkpoints)
            run = _train_side(prepared, model, original, processor, data.examples(side), side, config, accelerator,
                              files)
            if accelerator.is_main_process:
                training = {**config.as_dict(), **provenance, "data": str(data_source), "data_layout": data.layout,
                            "data_fingerprint": data.fingerprint, "rows": data.rows,
                            "examples": len(data.examples(side)), "steps": run.steps,
                            "final_loss": run.losses[-1] if run.losses else None}
                path = write_projector(output_dir / CHECKPOINT_FILES[side], run, model, training)
                remove_checkpoints(output_dir, CHECKPOINT_PREFIX[side])  # the file is the result now
                written[side] = path
                accelerator.print(f"[dcd {side}] wrote {path}")
            accelerator.wait_for_everyone()
    return written
