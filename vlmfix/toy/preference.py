"""DCD preference data: one (chosen, rejected) caption pair per training image, as JSON Lines.

Each line is `{"image": "images/train/<file>.png", "image_id": int, "prompt": "Describe this image.",
"chosen": str, "rejected": str}`; `image` is relative to the directory holding the file. Load it with
`datasets.load_dataset("json", data_files=str(path), split="train")`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .captions import CAPTION_PROMPT, preference_pair
from .dataset import ToyImage

_PREFERENCE_STREAM = 3  # generator stream id, distinct from the scenes' and the trainer's


def preference_rows(images: list[ToyImage], *, seed: int) -> list[dict]:
    """One preference row per image of the train split."""
    rows = []
    for index, image in enumerate(images):
        rng = np.random.default_rng([seed, _PREFERENCE_STREAM, index])
        chosen, rejected = preference_pair(list(image.scene.names), rng)
        rows.append({
            "image": f"images/{image.split}/{image.file_name}",
            "image_id": image.image_id,
            "prompt": CAPTION_PROMPT,
            "chosen": chosen,
            "rejected": rejected,
        })
    return rows


def write_preferences(path: Path, images: list[ToyImage], *, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(row, separators=(",", ":")) for row in preference_rows(images, seed=seed))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
