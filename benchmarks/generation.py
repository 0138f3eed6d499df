"""Batched, resumable, shardable generation: each prediction is appended to a JSON Lines file as
soon as its batch is done, and a rerun skips finished items.

Batches have fixed boundaries (item order / batch size), and each batch is seeded by its index, so
a run killed midway and resumed with the same batch size produces exactly the predictions of an
uninterrupted run. A prediction does depend on its batch (left padding changes the sums; generate
samples a batch from one generator), so the app keys result directories by the batch size. With
several processes (`accelerate launch`) each rank takes every world-th batch into its own file and
rank 0 merges them in item order.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image
from tqdm import tqdm

import vlmfix
from vlmfix.decoding.method import Method
from vlmfix.eval.generation import chat_prompt  # re-exported: it lived here first
from vlmfix.validation import number


@dataclass(frozen=True)
class Item:
    """One generation request: `key` identifies it in the predictions file. `image_path` None is a text-only
    request (HallusionBench): batched apart, templated without an image entry and decoded by plain
    `model.generate` with no method (the methods act on image tokens)."""

    key: int
    image_path: Path | None
    text: str


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Shard:
        """The process layout under `accelerate launch` / `torchrun` (WORLD_SIZE > 1), else one process."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            state = _partial_state()
            return cls(state.process_index, state.num_processes)
        return cls()

    def wait(self) -> None:
        if self.world > 1:
            _partial_state().wait_for_everyone()


class BatchInputs:
    """The processor's inputs of image batches, kept for the next run in this process that asks for the same
    batch: a sweep's methods (the toy sweep's 14) each ask for every batch of a benchmark, and decoding and
    processing the same images each time costs as much as a tenth of a toy job.

    A batch is known by each item's text and image file (path, size, modification time); the caller gets fresh
    copies of the kept tensors (nothing it does reaches the cache). Only one processor's batches are kept: a batch
    of another processor (a multi-model sweep moved on to the next model) drops them, and the old processor with
    them. At most `max_bytes` of tensors are kept, the least recently used dropped first.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.processor: Any = None  # whose batches `kept` holds
        self.kept: OrderedDict[tuple[Any, ...], tuple[dict[str, Any], int]] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def key(batch: Sequence[Item]) -> tuple[Any, ...]:
        files = []
        for item in batch:
            stat = os.stat(cast(Path, item.image_path))
            files.append((str(item.image_path), stat.st_size, stat.st_mtime_ns, item.text))
        return tuple(files)

    def get(self, processor: Any, batch: Sequence[Item], process: Callable[[], Any]) -> Any:
        """`process()` (the processor's BatchFeature of `batch`), or a copy of the one kept for this batch."""
        if processor is not self.processor:
            self.processor, self.bytes = processor, 0
            self.kept.clear()
        key = self.key(batch)
        kept = self.kept.get(key)
        if kept is None:
            features = process()
            size = sum(v.numel() * v.element_size() for v in features.values() if isinstance(v, torch.Tensor))
            if size <= self.max_bytes:
                self.kept[key] = ({k: _copied(v) for k, v in features.items()}, size)
                self.bytes += size
                while self.bytes > self.max_bytes:
                    self.bytes -= self.kept.popitem(last=False)[1][1]
            return features
        self.kept.move_to_end(key)
        return batch_feature({k: _copied(v) for k, v in kept[0].items()})


def batch_feature(data: dict[str, Any]) -> Any:
    from transformers import BatchFeature

    return BatchFeature(data)


def _copied(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


BATCH_INPUTS = BatchInputs()  # one per process: what a sweep's jobs share


def _partial_state():
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # several CPU processes use gloo


def read_predictions(path: Path, key_name: str, text_name: str) -> dict[int, dict[str, Any]]:
    """Rows of a predictions file by key.

    The rule: a last line without its newline is a write cut short by a killed run and is ignored (that item
    is generated again), and blank lines are skipped. Every other line must be a JSON object with an int
    `key_name` and a string `text_name`, each key once; anything else (a hand edit) raises a `ValueError`
    naming the file and line, since resuming over it would mix unknown rows into the results.
    """
    rows: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return rows
    complete_lines = path.read_text().split("\n")[:-1]  # what follows the last newline is empty or torn
    for line_number, line in enumerate(complete_lines, start=1):
        if not line.strip():
            continue
        row = _prediction_row(line, key_name, text_name)
        if isinstance(row, str):
            raise ValueError(f"predictions file {str(path)!r}, line {line_number}: {row}; fix or delete that line "
                             "(a deleted row is generated again on the next run).")
        if row[key_name] in rows:
            raise ValueError(f"predictions file {str(path)!r}, line {line_number}: {key_name} {row[key_name]} appears "
                             "a second time; delete one of the two lines.")
        rows[row[key_name]] = row
    return rows


def _prediction_row(line: str, key_name: str, text_name: str) -> dict[str, Any] | str:
    """The row of one line, or what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not JSON ({err.msg})"
    if not isinstance(row, dict):
        return f"not a JSON object ({line[:60]!r})"
    for name, kinds, what in ((key_name, int, "an int"), (text_name, str, "a string")):
        if name not in row:
            return f"no {name!r} field ({line[:60]!r})"
        if not isinstance(row[name], kinds) or isinstance(row[name], bool):
            return f"{name!r} must be {what}, got {row[name]!r}"
    return row


def drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so that appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _append(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def generate_predictions(
    items: Sequence[Item],
    *,
    model: Any,
    processor: Any,
    methods: Sequence[Method],
    out_path: Path,
    key_name: str,
    text_name: str,
    batch_size: int,
    max_new_tokens: int,
    decoding: dict[str, Any],
    seed: int,
    shard: Shard = Shard(),
    progress: bool = True,
    description: str = "generating",
) -> dict[int, dict[str, Any]]:
    """Generate for every item not yet in `out_path`; return all rows by key (merged on rank 0)."""
    number(batch_size, "batch_size", low=1, integer=True, meaning="the items per generate call")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    own_path = out_path if shard.world == 1 else out_path.with_suffix(f".rank{shard.rank}.jsonl")
    drop_torn_tail(own_path)
    done = {**read_predictions(out_path, key_name, text_name), **read_predictions(own_path, key_name, text_name)}
    with_image = [item for item in items if item.image_path is not None]
    text_only = [item for item in items if item.image_path is None]  # batched after the image items
    batches = [with_image[i : i + batch_size] for i in range(0, len(with_image), batch_size)]
    batches += [text_only[i : i + batch_size] for i in range(0, len(text_only), batch_size)]
    todo = [
        (index, batch) for index, batch in enumerate(batches)
        if index % shard.world == shard.rank and any(item.key not in done for item in batch)
    ]
    device = next(model.parameters()).device
    bar = tqdm(total=len(items), initial=len(items) - sum(len(b) for _, b in todo) * shard.world,
               desc=description, disable=not progress or shard.rank != 0, unit="item")
    for index, batch in todo:
        torch.manual_seed(seed * 100_003 + index)
        if batch[0].image_path is None:
            prompts = [chat_prompt(processor, item.text, image=False) for item in batch]
            inputs = processor(text=prompts, padding=True, return_tensors="pt").to(device)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, **decoding)
        else:
            def process(batch: list[Item] = batch) -> Any:
                images = [Image.open(cast(Path, item.image_path)).convert("RGB") for item in batch]
                prompts = [chat_prompt(processor, item.text) for item in batch]
                return processor(images=images, text=prompts, padding=True, return_tensors="pt")

            inputs = BATCH_INPUTS.get(processor, batch, process).to(device)
            with torch.inference_mode():
                out = vlmfix.generate(model, **inputs, methods=methods, tokenizer=processor,
                                      max_new_tokens=max_new_tokens, **decoding)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        rows = [{key_name: item.key, text_name: text.strip()} for item, text in zip(batch, texts)
                if item.key not in done]
        _append(own_path, rows)
        done.update({row[key_name]: row for row in rows})
        bar.update(len(batch) * shard.world)
    bar.close()
    shard.wait()
    if shard.world > 1 and shard.rank == 0:
        merged = read_predictions(out_path, key_name, text_name)
        for rank in range(shard.world):
            merged.update(read_predictions(out_path.with_suffix(f".rank{rank}.jsonl"), key_name, text_name))
        order = [item.key for item in items if item.key in merged]
        out_path.write_text("".join(json.dumps(merged[k]) + "\n" for k in order))
        done = merged
    return {item.key: done[item.key] for item in items if item.key in done}
