"""Reading a written lmms-eval task folder as lmms-eval does (its YAML, its utils.py imported from the file), and
computing its metrics as lmms-eval does, without lmms-eval."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import yaml


def load_utils(folder: Path) -> ModuleType:
    """A written task's utils.py, imported as lmms-eval's `!function` tag imports it (from its file)."""
    spec = importlib.util.spec_from_file_location("utils", folder / "utils.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Tags(yaml.SafeLoader):
    """Reads lmms-eval's `!function` tags as plain strings."""


_Tags.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_task(folder: Path) -> tuple[dict, ModuleType, list[dict]]:
    """(the parsed YAML, the utils module, the docs) of a written task; every `!function` it names exists."""
    config = yaml.load((folder / f"{folder.name}.yaml").read_text(), Loader=_Tags)
    utils = load_utils(folder)
    functions = [config[key] for key in ("doc_to_visual", "doc_to_text", "process_results")]
    functions += [entry["aggregation"] for entry in config["metric_list"]]
    for tag in functions:
        assert tag.startswith("!function utils.") and callable(getattr(utils, tag.removeprefix("!function utils.")))
    docs_path = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert docs_path.is_absolute() and docs_path.parent == folder
    return config, utils, [json.loads(line) for line in docs_path.read_text().splitlines()]


def aggregate(utils: ModuleType, docs: list[dict], answers: list[str]) -> dict[str, object]:
    """Every metric of a task, as lmms-eval computes it: process_results per doc, then each aggregation."""
    per_doc = [utils.process_results(doc, [answer]) for doc, answer in zip(docs, answers, strict=True)]
    return {metric: getattr(utils, f"aggregate_{metric}")([rows[metric] for rows in per_doc]) for metric in per_doc[0]}
