"""DCD preference data: read through `datasets`, checked row by row, split into the two sides' examples.

The positive projector trains on (image, prompt, chosen response) examples, the negative one on (image,
prompt, rejected response) examples (spec dcd.md §3, steps 2-3).

Sources (`load_preferences(source)`):
- a JSON Lines (.jsonl), JSON (.json, a list of records) or Parquet (.parquet) file;
- a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (`split` picks the split);
- a local dataset folder of such files, as `datasets.load_dataset(folder)` reads it (train-*.parquet, ...);
- a `datasets.Dataset`.

Layouts, found from the column names:
- vlmfix's own (the toy's preference file): image, prompt, chosen, rejected;
- RLAIF-V (openbmb/RLAIF-V-Dataset): image, question, chosen, rejected;
- VLFeedback (MMInstruction/VLFeedback): prompt, img_path or image, and completions, each with a response
  and a "Visual Faithfulness" rating. A rating above 4 makes the response positive, below 2 negative; the
  others are not used (spec §3 step 1). Responses are not paired: DCD's two losses are decoupled, so D+
  and D- need not be paired (spec [R]). Every positive response of a record is one positive example, every
  negative one a negative example, in record order; a record with none adds nothing to that side.

Images: a path (relative to `image_root`, by default the data file's directory, or the dataset directory),
or an image stored in the dataset (datasets' Image feature: a PIL image, or {"bytes": ..., "path": ...}).
Every row is checked before training: a missing or empty field, a missing image file, or a file or stored
image that is not an image raises `PreferenceDataError` naming the file and its line or row.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmfix.errors import VlmfixError
from vlmfix.methods.dcd import Side
from vlmfix.validation import text

IGNORE = -100
IMAGE_COLUMNS = ("image", "img_path", "image_path")
FAITHFULNESS = "visual faithfulness"
POSITIVE_ABOVE = 4.0  # VLFeedback: Visual Faithfulness > 4 -> positive
NEGATIVE_BELOW = 2.0  # and < 2 -> negative
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
LAYOUTS = {
    "prompt": "image, prompt, chosen, rejected (vlmfix)",
    "rlaif_v": "image, question, chosen, rejected (RLAIF-V)",
    "vlfeedback": "prompt, completions, img_path or image (VLFeedback)",
}


class PreferenceDataError(VlmfixError, ValueError):
    """Preference data is missing or malformed; the message names the file, the line or row, and the fix."""


# ---------------------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class StoredImage:
    """An image stored in a dataset row (encoded bytes), read when a batch needs it."""

    dataset: Any = field(repr=False, compare=False)
    row: int
    column: str

    def read(self) -> bytes:
        return self.dataset[self.row][self.column]["bytes"]


@dataclass(frozen=True)
class Example:
    """One training example of one side: an image, the prompt, the response; `where` names its source row."""

    image: Any  # Path | StoredImage | PIL.Image.Image
    prompt: str
    response: str
    where: str

    def open_image(self) -> Any:
        """The image as an RGB PIL image; PreferenceDataError (naming the row) when it cannot be decoded."""
        from PIL import Image

        try:
            if isinstance(self.image, Image.Image):
                return self.image.convert("RGB")
            source = io.BytesIO(self.image.read()) if isinstance(self.image, StoredImage) else self.image
            with Image.open(source) as image:
                return image.convert("RGB")
        except OSError as error:
            raise PreferenceDataError(f"{self.where}: its image cannot be decoded ({error}); replace the image or "
                                      "drop the row.") from error


@dataclass(frozen=True)
class PreferenceData:
    """Checked preference data: each side's examples, where they came from, and a fingerprint of them all
    (prompts, responses and images), recorded in checkpoints so a resumed run can tell the data changed."""

    source: str
    layout: str
    rows: int
    positive: tuple[Example, ...]
    negative: tuple[Example, ...]
    fingerprint: str

    def examples(self, side: Side) -> tuple[Example, ...]:
        return self.positive if side == "pos" else self.negative


# ---------------------------------------------------------------------------------------------- reading
def load_preferences(
    source: str | Path | Any,
    max_rows: int | None = None,
    *,
    split: str = "train",
    image_root: str | Path | None = None,
) -> PreferenceData:
    """Read and check preference data (see the module docstring for sources and layouts).

    Args:
        source: a file, a saved dataset, a dataset folder, or a `datasets.Dataset`.
        max_rows: use only the first rows of the source (before VLFeedback responses are split by rating).
        split: the split of a saved `DatasetDict` or a dataset folder.
        image_root: the directory relative image paths start from (default: the data's directory).
    """
    import datasets

    dataset, base, where = _open(source, split)
    label = str(source) if not isinstance(source, datasets.Dataset) else "the dataset"
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    if len(dataset) == 0:
        raise PreferenceDataError(f"preference data {label} holds no rows.")
    layout = _layout(dataset.column_names, label)
    image_column = next((c for c in IMAGE_COLUMNS if c in dataset.column_names), None)
    if image_column is None:
        raise PreferenceDataError(f"{label} has no image column (one of {', '.join(IMAGE_COLUMNS)}); columns: "
                                  f"{sorted(dataset.column_names)}.")
    if isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # bytes / paths, decoded later
    images = _ImageChecker(dataset, image_column, Path(image_root).expanduser() if image_root else base)
    read = _vlfeedback_row if layout == "vlfeedback" else _paired_row
    sides: dict[Side, list[Example]] = {"pos": [], "neg": []}
    digest = hashlib.sha256()
    for index, record in enumerate(dataset):
        for side, example in read(record, index, where(index), images, layout):
            sides[side].append(example)
            digest.update(json.dumps([side, example.prompt, example.response, images.identity(example.image)])
                          .encode("utf-8"))
    return PreferenceData(label, layout, len(dataset), tuple(sides["pos"]), tuple(sides["neg"]), digest.hexdigest())


def _open(source: Any, split: str) -> tuple[Any, Path | None, Callable[[int], str]]:
    """(dataset, base directory of relative image paths, row -> "where" text) of a source."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source, None, lambda i: f"the dataset, row {i}"
    path = Path(source).expanduser()
    if not path.exists():
        raise PreferenceDataError(f"preference data {source} does not exist; pass data=<a .jsonl / .json / .parquet "
                                  "file, a saved dataset or a dataset folder>.")
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise PreferenceDataError(f"{path}: unsupported file type {path.suffix!r}; give a .jsonl, .json or "
                                      ".parquet file, a saved dataset or a dataset folder.")
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        except datasets.exceptions.DatasetGenerationError as error:
            raise _unreadable_file(path, error) from error
        except ValueError as error:  # datasets: 'Instruction "train" corresponds to no data!'
            raise PreferenceDataError(f"preference data {path} holds no rows.") from error
        if path.suffix.lower() == ".jsonl":
            return dataset, path.parent, _line_namer(path)
        return dataset, path.parent, lambda i: f"{path}, row {i}"
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PreferenceDataError(f"{path} has no split {split!r}; its splits: {sorted(loaded)} (set "
                                          "data_split).")
            return loaded[split], path, lambda i: f"{path} [{split}], row {i}"
        return loaded, path, lambda i: f"{path}, row {i}"
    try:
        dataset = datasets.load_dataset(str(path), split=split)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as error:
        raise PreferenceDataError(f"{path}: datasets cannot read a {split!r} split from this folder ({error}); give "
                                  "a folder of .jsonl / .json / .parquet files, a saved dataset, or a file.") from error
    return dataset, path, lambda i: f"{path} [{split}], row {i}"


def _line_namer(path: Path) -> Callable[[int], str]:
    """Row -> "file, line N" for a JSON Lines file (blank lines hold no row)."""
    with path.open(encoding="utf-8") as handle:
        lines = [number for number, line in enumerate(handle, start=1) if line.strip()]
    return lambda i: f"{path}, line {lines[i]}"


def _unreadable_file(path: Path, error: Exception) -> PreferenceDataError:
    """The first bad line / record of a JSON file datasets could not read, or datasets' own reason."""
    with path.open(encoding="utf-8") as handle:
        if path.suffix.lower() == ".jsonl":
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as bad:
                    return PreferenceDataError(f"{path}, line {number}: not valid JSON ({bad.msg}); fix or drop it.")
                if not isinstance(record, dict):
                    return PreferenceDataError(f"{path}, line {number}: expected a JSON object (with image, prompt, "
                                               f"chosen and rejected), got {type(record).__name__}.")
        elif path.suffix.lower() == ".json":
            try:
                records = json.load(handle)
            except json.JSONDecodeError as bad:
                return PreferenceDataError(f"{path}: not valid JSON ({bad.msg}, line {bad.lineno}).")
            if not isinstance(records, list):
                return PreferenceDataError(f"{path} must hold a JSON list of records, got {type(records).__name__} "
                                           "(or use JSON Lines, .jsonl).")
    cause = error.__cause__ or error
    return PreferenceDataError(f"{path}: datasets cannot read it ({type(cause).__name__}: {cause}); every record must "
                               "be an object with the same fields.")


def _layout(columns: Iterable[str], label: str) -> str:
    columns = set(columns)
    if "completions" in columns and "prompt" in columns:
        return "vlfeedback"
    if {"chosen", "rejected"} <= columns:
        if "prompt" in columns:
            return "prompt"
        if "question" in columns:
            return "rlaif_v"
    raise PreferenceDataError(f"{label} has none of the supported layouts (columns: {sorted(columns)}); give "
                              f"{'; or '.join(LAYOUTS.values())}.")


# ---------------------------------------------------------------------------------------------- rows
def _field(record: Mapping[str, Any], key: str, where: str, needs: str) -> str:
    try:
        return text(record.get(key), key)
    except ValueError as error:
        raise PreferenceDataError(f"{where}: {str(error).rstrip('.')}; every row needs {needs} (fill it in or drop "
                                  "the row).") from None


def _paired_row(record: Mapping[str, Any], index: int, where: str, images: _ImageChecker,
                layout: str) -> list[tuple[Side, Example]]:
    prompt_key = "question" if layout == "rlaif_v" else "prompt"
    needs = f"image, {prompt_key}, chosen and rejected"
    prompt, chosen, rejected = (_field(record, key, where, needs) for key in (prompt_key, "chosen", "rejected"))
    image = images.source(record, index, where)
    return [("pos", Example(image, prompt, chosen, where)), ("neg", Example(image, prompt, rejected, where))]


def _completions(record: Mapping[str, Any], where: str) -> list[Mapping[str, Any]]:
    """VLFeedback completions as a list of dicts (datasets may give a dict of lists)."""
    value = record.get("completions")
    if isinstance(value, Mapping):  # Sequence-of-struct features come back as columns
        keys = list(value)
        return [dict(zip(keys, items)) for items in zip(*(value[k] for k in keys))]
    if isinstance(value, list) and all(isinstance(c, Mapping) for c in value):
        return value
    raise PreferenceDataError(f"{where}: `completions` must be a list of objects with a response and annotations, "
                              f"got {value!r}.")


def _faithfulness(completion: Mapping[str, Any]) -> float | None:
    """A completion's Visual Faithfulness rating, or None when it has none (or "N/A")."""
    annotations = completion.get("annotations")
    if not isinstance(annotations, Mapping):
        return None
    entry = next((v for k, v in annotations.items() if k.lower().replace("_", " ") == FAITHFULNESS), None)
    rating = next((v for k, v in entry.items() if k.lower() == "rating"), None) if isinstance(entry, Mapping) else entry
    if rating is None:
        return None
    try:
        return float(rating)
    except (TypeError, ValueError):
        return None


def _vlfeedback_row(record: Mapping[str, Any], index: int, where: str, images: _ImageChecker,
                    layout: str) -> list[tuple[Side, Example]]:
    completions = _completions(record, where)
    chosen: list[tuple[Side, int]] = []
    for j, completion in enumerate(completions):
        rating = _faithfulness(completion)
        if rating is not None and (rating > POSITIVE_ABOVE or rating < NEGATIVE_BELOW):
            chosen.append(("pos" if rating > POSITIVE_ABOVE else "neg", j))
    if not chosen:
        return []
    prompt = _field(record, "prompt", where, "a prompt")
    image = images.source(record, index, where)
    return [(side, Example(image, prompt, _field(completions[j], "response", f"{where}, completion {j}",
                                                 "a response"), f"{where}, completion {j}")) for side, j in chosen]


class _ImageChecker:
    """Turns a row's image value into an image source, checking once per file that it is an image."""

    def __init__(self, dataset: Any, column: str, root: Path | None) -> None:
        self.dataset, self.column, self.root = dataset, column, root
        self.checked: set[Path] = set()

    def source(self, record: Mapping[str, Any], index: int, where: str) -> Any:
        from PIL import Image

        value = record.get(self.column)
        if isinstance(value, Mapping) and value.get("bytes"):
            self._check(io.BytesIO(value["bytes"]), where, "stored in the row")
            return StoredImage(self.dataset, index, self.column)
        if isinstance(value, Mapping) and value.get("path"):
            value = value["path"]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, str) and value.strip():
            path = Path(value).expanduser()
            path = path if path.is_absolute() or self.root is None else self.root / path
            if not path.is_file():
                raise PreferenceDataError(
                    f"{where}: image {value!r} not found (looked at {path}); relative image paths start at the data's "
                    "directory, or at image_root when it is set."
                )
            if path not in self.checked:
                self._check(path, where, repr(value))
                self.checked.add(path)
            return path
        raise PreferenceDataError(f"{where}: `{self.column}` must be an image path, an image or {{'bytes': ..., "
                                  f"'path': ...}}, got {value!r}; fill it in or drop the row.")

    @staticmethod
    def _check(source: Any, where: str, shown: str) -> None:
        from PIL import Image

        try:
            with Image.open(source):
                pass  # reads the header only
        except OSError as error:
            raise PreferenceDataError(f"{where}: image {shown} is not an image file ({error}); replace it with a PNG "
                                      "or JPEG, or drop the row.") from None

    @staticmethod
    def identity(image: Any) -> str:
        """What the fingerprint records of an image: its path, or a hash of its stored bytes or pixels."""
        if isinstance(image, Path):
            return str(image)
        data = image.read() if isinstance(image, StoredImage) else image.tobytes()
        return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- encoding
TEMPLATED_KEPT = 4096  # distinct prompts whose chat text an encoder keeps


class ResponseEncoder:
    """Model inputs of examples: the prompt through the processor (image tokens expanded), then
    ' ' + response + eos, with labels on the response tokens only."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.templated: dict[str, str] = {}  # prompt -> its chat text (preference data repeats a few prompts)

    def prompt_text(self, prompt: str) -> str:
        text = self.templated.get(prompt)
        if text is None:
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            if len(self.templated) < TEMPLATED_KEPT:
                self.templated[prompt] = text
        return text

    def encode(self, example: Example) -> dict[str, Tensor]:
        encoded = self.processor(images=[example.open_image()], text=[self.prompt_text(example.prompt)],
                                 return_tensors="pt")
        prompt_ids = encoded["input_ids"][0]  # [prompt_len]
        answer = self.tokenizer(" " + example.response, add_special_tokens=False)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            answer = [*answer, self.tokenizer.eos_token_id]
        answer_ids = torch.tensor(answer, dtype=prompt_ids.dtype)  # [response_len]
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

    def batch(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        """`collate` of the encoded examples."""
        return self.collate([self.encode(example) for example in examples])
