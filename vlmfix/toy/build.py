"""Build the toy end to end (scenes, tokenizer, model, training, preference data), cached by settings hash.

```
root/
  vlmfix_toy.json        settings, their hash and build facts; written last (marks a complete build)
  model/                 config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
                         processor_config.json, chat_template.jinja, generation_config.json, vlmfix_toy.json
  data/                  images/{train,val}/*.png, annotations/{instances,captions}_{train,val}.json,
                         preference_train.jsonl
  dcd/<key>/             optional: DCD projectors the benchmark app trained on this build (`python -m benchmarks`)
```

`build_toy` reuses `root` only when its `vlmfix_toy.json` holds the same settings hash, so a build that
was interrupted (no marker) or made with other settings is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

from .captions import text_corpus
from .categories import PAIRS
from .dataset import SPLITS, ToyImage, generate_split, pair_cooccurrence, write_json, write_split
from .model import ModelSpec, build_model, build_processor
from .preference import write_preferences
from .tokenizer import build_tokenizer
from .train import TrainSpec, train

FORMAT_VERSION = 2  # bump when scenes, captions or training change without a settings change
MARKER = "vlmfix_toy.json"
_MANAGED = {"model", "data", "dcd", MARKER}  # dcd/: projectors trained on this build, removed with it


@dataclass(frozen=True)
class ToySettings:
    """Everything that determines a toy build; its hash keys the cache."""

    seed: int = 0
    train_images: int = 5000
    val_images: int = 400
    val_broken_share: float = 0.5  # share of val images holding one pair member without its partner
    pair_keep: float = 0.98  # P(a pair member drawn in training brings its partner)
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainSpec = field(default_factory=TrainSpec)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_broken_share <= 1.0:
            raise ValueError(f"val_broken_share must be in [0, 1], got {self.val_broken_share}.")
        if not 0.0 <= self.pair_keep <= 1.0:
            raise ValueError(f"pair_keep must be in [0, 1], got {self.pair_keep}.")
        if self.train_images < 1 or self.val_images < 1:
            raise ValueError(
                f"train_images and val_images must be >= 1, got {self.train_images} and {self.val_images}."
            )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """sha256 of the settings as canonical JSON."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


FULL = ToySettings()
FAST = ToySettings(
    train_images=600, val_images=60,
    training=TrainSpec(steps=40, batch_images=16, vision_steps=20, vision_batch_images=32),
)


@dataclass(frozen=True)
class ToyPaths:
    """Where a built toy lives. `preference_file` image paths are relative to `data_dir`."""

    root: Path
    model_dir: Path
    data_dir: Path
    preference_file: Path
    settings_hash: str


def settings_for(*, fast: bool, seed: int) -> ToySettings:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    return dataclasses.replace(FAST if fast else FULL, seed=seed)


def default_root(*, fast: bool) -> Path:
    """`$VLMFIX_CACHE/toy` or `~/.cache/vlmfix/toy`, with a `-fast` suffix for the fast build."""
    base = Path(os.environ["VLMFIX_CACHE"]) if os.environ.get("VLMFIX_CACHE") else Path.home() / ".cache" / "vlmfix"
    return base / ("toy-fast" if fast else "toy")


def toy_paths(root: Path, settings_hash: str) -> ToyPaths:
    data_dir = root / "data"
    return ToyPaths(root, root / "model", data_dir, data_dir / "preference_train.jsonl", settings_hash)


def model_settings_hash(model_dir: str | Path) -> str | None:
    """The toy settings hash of a toy model directory (its own marker, kept by copies), else None."""
    return stored_hash(Path(model_dir))


def stored_hash(root: Path) -> str | None:
    """The settings hash of the complete build in `root`, or None."""
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))["settings_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_toy(
    out: str | Path | None = None, *, fast: bool = False, seed: int = 0, progress: bool = True
) -> ToyPaths:
    """Build the toy VLM and its data into `out` (default: the cache dir), or reuse a matching build.

    Args:
        out: target directory; None uses `default_root(fast=fast)`. It must be empty, absent or a
            previous toy build.
        fast: the small build for tests (about a minute on 2 cores); the full build takes ~7 minutes.
        seed: seeds scenes, initialisation and training; the same seed gives the same files.
        progress: show tqdm progress bars.

    Returns:
        `ToyPaths` of the build.

    Example:
        >>> paths = build_toy(fast=True)  # doctest: +SKIP
        >>> AutoModelForImageTextToText.from_pretrained(paths.model_dir)  # doctest: +SKIP
    """
    settings = settings_for(fast=fast, seed=seed)
    root = Path(out).expanduser() if out is not None else default_root(fast=fast)
    settings_hash = settings.hash()
    paths = toy_paths(root, settings_hash)
    if stored_hash(root) == settings_hash:
        return paths
    _clear(root)
    _build(settings, paths, progress=progress)
    return paths


def _clear(root: Path) -> None:
    """Remove a previous (possibly partial) build from `root`; refuse to touch foreign files."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ValueError(f"out must be a directory, got the file {root}; pass a new or empty directory.")
    foreign = sorted(entry.name for entry in root.iterdir() if entry.name not in _MANAGED)
    if foreign:
        raise ValueError(
            f"out={str(root)!r} holds files that are not a toy build ({', '.join(foreign[:5])}); "
            "pass a new or empty directory."
        )
    (root / MARKER).unlink(missing_ok=True)  # first, so an interrupted clear never looks complete
    for name in ("model", "data", "dcd"):
        shutil.rmtree(root / name, ignore_errors=True)


def _build(settings: ToySettings, paths: ToyPaths, *, progress: bool) -> None:
    started = time.perf_counter()
    spec = settings.model
    counts = {"train": settings.train_images, "val": settings.val_images}
    first_ids = {"train": 1, "val": settings.train_images + 1}
    images: dict[str, list[ToyImage]] = {}
    with tqdm(total=sum(counts.values()), desc="toy scenes", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            images[split] = generate_split(
                split, counts[split], first_ids[split], seed=settings.seed, image_size=spec.image_size,
                pair_keep=settings.pair_keep, broken_share=settings.val_broken_share,
                on_image=lambda: bar.update(1),
            )
    # training reads the pixels in memory: the PNG files (PIL encodes without the GIL) are written on a
    # second thread meanwhile, which takes them off the build's wall time on a 2-core machine
    with ThreadPoolExecutor(max_workers=1) as writer:
        written = [writer.submit(write_split, paths.data_dir, split, images[split]) for split in SPLITS]
        write_preferences(paths.preference_file, images["train"], seed=settings.seed)
        captions = [caption for image in images["train"] for caption in image.captions]
        tokenizer = build_tokenizer([*text_corpus(), *captions])
        processor = build_processor(tokenizer, spec)
        model, losses = _train_deterministic(settings, tokenizer, images["train"], progress=progress)
        for future in written:
            future.result()  # raises a writing error here

    paths.model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(paths.model_dir)
    processor.save_pretrained(paths.model_dir)
    facts = {
        "format_version": FORMAT_VERSION,
        "settings_hash": paths.settings_hash,
        "settings": settings.as_dict(),
        "pairs": [list(pair) for pair in PAIRS],
        "train_pair_cooccurrence": pair_cooccurrence(images["train"]),
        "val_broken_images": sum(image.scene.broken is not None for image in images["val"]),
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "torch": torch.__version__,
    }
    facts["build_seconds"] = round(time.perf_counter() - started, 1)
    write_json(paths.model_dir / MARKER, facts)
    write_json(paths.root / MARKER, facts)  # last: marks the build complete


def _train_deterministic(
    settings: ToySettings, tokenizer: PreTrainedTokenizerFast, train_images: list[ToyImage], *, progress: bool
) -> tuple[LlavaForConditionalGeneration, list[float]]:
    """Initialise and train the model with a fixed seed, thread count and deterministic kernels."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]  # a module property
    torch.set_num_threads(settings.training.threads)
    torch.use_deterministic_algorithms(True)
    # deterministic mode fills every new tensor with NaN first (~3% of a step here); the kernels used write
    # every element they return, so the weights are the same without it
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    try:
        torch.manual_seed(settings.seed)
        model = build_model(tokenizer, settings.model)
        total = settings.training.vision_steps + settings.training.steps
        with tqdm(total=total, desc="toy training", unit="step", disable=not progress) as bar:

            def on_step(step: int, loss: float) -> None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}")

            losses = train(model, tokenizer, train_images, settings.training,
                           image_tokens=settings.model.image_tokens, seed=settings.seed, on_step=on_step)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
    return model, losses
