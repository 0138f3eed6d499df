"""The Hydra benchmark app: one run = one model x one method x one benchmark.

`main()` composes the config and calls `run(cfg) -> metrics`. Results live under a stable
`results_dir/<model>/<benchmark>/<method>-<fingerprint hash>/`: `predictions.jsonl` (appended as
produced; reruns resume), `result.json` (metrics + protocol fingerprint) and, for CHAIR,
`chair_scored.json`. Each Hydra job dir gets a copy of `result.json` for the multirun summary.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from benchmarks.generation import Item, Shard, generate_predictions
from benchmarks.models import LoadedModel
from vlmfix.decoding.method import Method
from vlmfix.eval import (
    Decoding,
    chair,
    chair_protocol,
    fingerprint_hash,
    pope,
    pope_protocol,
    protocol_fingerprint,
)
from vlmfix.eval._io import atomic_write_text, sha256_file, sha256_text

log = logging.getLogger("benchmarks")


# ------------------------------------------------------------------ config -> objects
def build_methods(cfg: DictConfig) -> list[Method]:
    """The run's methods: `method` (empty for greedy) plus `extra_methods`, instantiated (validated)."""
    nodes = [cfg.method] if cfg.method and cfg.method.get("_target_") else []
    nodes += list(cfg.get("extra_methods") or [])
    return [instantiate(node) for node in nodes]


def method_label(cfg: DictConfig, methods: list[Method]) -> str:
    if not methods:
        return "greedy"
    return "+".join(m.name for m in methods)


def decoding_of(cfg: DictConfig, max_new_tokens: int) -> tuple[Decoding, dict[str, Any]]:
    d = cfg.decoding
    mode = "beam" if d.num_beams > 1 else ("sample" if d.do_sample else "greedy")
    fingerprint = Decoding(max_new_tokens=int(max_new_tokens), mode=mode, num_beams=int(d.num_beams),
                           temperature=float(d.temperature) if d.do_sample else None,
                           top_p=float(d.top_p) if d.do_sample else None, seed=int(cfg.seed))
    kwargs: dict[str, Any] = {"do_sample": bool(d.do_sample), "num_beams": int(d.num_beams)}
    if d.do_sample:
        kwargs.update(temperature=float(d.temperature), top_p=float(d.top_p))
    return fingerprint, kwargs


def data_paths(cfg: DictConfig, loaded: LoadedModel) -> dict[str, Path]:
    """instances / captions / images of the evaluation split (the model's own data by default)."""
    data = cfg.data
    root = Path(data.root) if data.root else loaded.data_root
    if root is None:
        raise ValueError(f"Model {cfg.model.name!r} ships no data: choose a dataset, e.g. data=coco2014 "
                         "(with VLMFIX_COCO pointing at a local COCO 2014).")
    split = data.split
    return {
        "instances": Path(data.instances or root / "annotations" / f"instances_{split}.json"),
        "captions": Path(data.captions or root / "annotations" / f"captions_{split}.json"),
        "images": Path(data.images or root / "images" / split),
    }


def image_files(instances: Path) -> dict[int, str]:
    return {img["id"]: img["file_name"] for img in json.loads(instances.read_text())["images"]}


# ------------------------------------------------------------------ benchmarks
def run_chair(cfg: DictConfig, loaded: LoadedModel, methods: list[Method], shard: Shard) -> dict[str, Any]:
    bench = cfg.benchmark
    paths = data_paths(cfg, loaded)
    extractor = chair.make_extractor(normalizer=bench.normalizer, quirks=bench.quirks)
    if bench.images.mode == "list":
        selection = chair.read_image_list(bench.images.list)
    else:
        pool = chair.image_ids_from_coco(paths["instances"])
        n = min(int(cfg.limit or bench.images.n), len(pool))
        selection = chair.sample_images(pool, n=n, seed=int(bench.images.seed))
    ground_truth = chair.ground_truth_from_coco([paths["instances"]], [paths["captions"]], extractor=extractor,
                                                cache_dir=Path(cfg.results_dir) / ".cache" / "chair")
    decoding, kwargs = decoding_of(cfg, bench.max_new_tokens)
    fingerprint = protocol_fingerprint(
        model_id=loaded.source, model_revision=loaded.revision, method=method_label(cfg, methods),
        method_params=_method_params(methods), decoding=decoding, prompt=bench.prompt,
        chat_template=getattr(loaded.processor, "chat_template", None),
        chair=chair_protocol(extractor, selection, ground_truth),
    )
    out_dir = _result_dir(cfg, methods, fingerprint)
    files = image_files(paths["instances"])
    items = [Item(i, paths["images"] / files[i], bench.prompt) for i in selection.image_ids]
    rows = generate_predictions(
        items, model=loaded.model, processor=loaded.processor, methods=methods,
        out_path=out_dir / "predictions.jsonl", key_name="image_id", text_name="caption",
        batch_size=int(cfg.batch_size), max_new_tokens=int(bench.max_new_tokens), decoding=kwargs,
        seed=int(cfg.seed), shard=shard, progress=cfg.progress, description=f"chair {method_label(cfg, methods)}",
    )
    if shard.rank != 0:
        return {}
    captions = [chair.Caption(image_id=k, caption=row["caption"]) for k, row in rows.items()]
    report = chair.score_chair(captions, ground_truth, extractor)
    chair.write_chair_scored(out_dir / "chair_scored.json", report, fingerprint)
    metrics = asdict(report.overall)
    return _finish(cfg, out_dir, method_label(cfg, methods), fingerprint, metrics, complete=len(rows) == len(items))


def run_pope(cfg: DictConfig, loaded: LoadedModel, methods: list[Method], shard: Shard) -> dict[str, Any]:
    bench = cfg.benchmark
    paths = data_paths(cfg, loaded)
    if bench.questions:
        question_file = Path(bench.questions)
        source, version = "file", None
    else:
        n_images = int(cfg.limit or bench.n_images)
        build_dir = Path(cfg.results_dir) / ".cache" / "pope" / sha256_text(
            f"{sha256_file(paths['instances'])}:{n_images}:{bench.seed}")[:16]
        meta = build_dir / "meta.json"
        if not meta.exists():  # every rank builds the same deterministic files; writes are atomic
            config = pope.PopeBuildConfig(n_images=n_images, seed=int(bench.seed))
            pope.build_pope(paths["instances"], build_dir, name="data", config=config)
        question_file = build_dir / f"data_pope_{bench.split}.jsonl"
        source, version = "built", None
    questions = pope.read_questions(question_file)
    decoding, kwargs = decoding_of(cfg, bench.max_new_tokens)
    fingerprint = protocol_fingerprint(
        model_id=loaded.source, model_revision=loaded.revision, method=method_label(cfg, methods),
        method_params=_method_params(methods), decoding=decoding, prompt="{question}" + bench.prompt_suffix,
        chat_template=getattr(loaded.processor, "chat_template", None),
        pope=pope_protocol(source, version, {bench.split: sha256_file(question_file)}, bench.parser),
    )
    out_dir = _result_dir(cfg, methods, fingerprint)
    items = [Item(q.question_id, paths["images"] / q.image, q.text + bench.prompt_suffix) for q in questions]
    rows = generate_predictions(
        items, model=loaded.model, processor=loaded.processor, methods=methods,
        out_path=out_dir / "predictions.jsonl", key_name="question_id", text_name="text",
        batch_size=int(cfg.batch_size), max_new_tokens=int(bench.max_new_tokens), decoding=kwargs,
        seed=int(cfg.seed), shard=shard, progress=cfg.progress,
        description=f"{bench.name} {method_label(cfg, methods)}",
    )
    if shard.rank != 0:
        return {}
    scores = pope.score_pope(questions, {k: row["text"] for k, row in rows.items()}, parser=bench.parser,
                             split=bench.split)
    metrics = {"accuracy": scores.accuracy, "precision": scores.precision, "recall": scores.recall,
               "f1": scores.f1, "yes_ratio": scores.yes_ratio, "unknown_rate": scores.unknown_rate,
               "n_questions": scores.n_questions, "n_missing": scores.n_missing}
    return _finish(cfg, out_dir, method_label(cfg, methods), fingerprint, metrics, complete=scores.n_missing == 0)


def run_speed(cfg: DictConfig, loaded: LoadedModel, methods: list[Method], shard: Shard) -> dict[str, Any]:
    from benchmarks.speed import TinyVLM, generate_variants, measure

    bench = cfg.benchmark
    paths = data_paths(cfg, loaded) if loaded.data_root or cfg.data.root else None
    tiny = TinyVLM(family="llava", model=loaded.model, processor=loaded.processor)
    if paths is not None:
        first = next(iter(image_files(paths["instances"]).values()))
        from PIL import Image

        images = [Image.open(paths["images"] / first).convert("RGB")]
        from benchmarks.generation import chat_prompt

        inputs = dict(loaded.processor(images=images, text=[chat_prompt(loaded.processor, bench.prompt)],
                                       return_tensors="pt"))
    else:
        inputs = tiny.inputs([bench.prompt])
    label = method_label(cfg, methods)
    variant = label if label != "greedy" else "vlmfix, no method"  # the baseline is plain generate, "greedy"
    results = {r.label: r for r in measure(generate_variants(tiny, inputs, {variant: methods}),
                                           int(bench.new_tokens), int(bench.repeats), progress=log.info)}
    if variant not in results:
        raise RuntimeError(f"speed: {label} failed during its warm-up run (see the log above); no figure recorded.")
    metrics = {"ms_per_token_greedy": 1000 * results["greedy"].seconds_per_token,
               "ms_per_token": 1000 * results[variant].seconds_per_token, "ratio_to_greedy": results[variant].ratio}
    fingerprint = {"model": loaded.source, "method": {"name": label, "params": _method_params(methods)},
                   "benchmark": "speed", "new_tokens": int(bench.new_tokens), "repeats": int(bench.repeats)}
    out_dir = Path(cfg.results_dir) / cfg.model.name / "speed" / label
    return _finish(cfg, out_dir, method_label(cfg, methods), fingerprint, metrics, complete=True)


RUNNERS = {"chair": run_chair, "pope": run_pope, "speed": run_speed}


# ------------------------------------------------------------------ plumbing
def _method_params(methods: list[Method]) -> dict[str, Any]:
    return {m.name: {k: _plain(v) for k, v in m.params().items()} for m in methods}


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def _result_dir(cfg: DictConfig, methods: list[Method], fingerprint: dict[str, Any]) -> Path:
    label = method_label(cfg, methods)
    return Path(cfg.results_dir) / cfg.model.name / cfg.benchmark.name / f"{label}-{fingerprint_hash(fingerprint)[:12]}"


def _finish(cfg: DictConfig, out_dir: Path, label: str, fingerprint: dict[str, Any], metrics: dict[str, Any],
            complete: bool) -> dict[str, Any]:
    result = {
        "model": cfg.model.name, "benchmark": cfg.benchmark.name, "kind": cfg.benchmark.kind,
        "method": label, "metrics": _plain(metrics), "complete": complete,
        "result_dir": str(out_dir), "fingerprint": fingerprint,
    }
    text = json.dumps(result, indent=2, default=str)
    atomic_write_text(out_dir / "result.json", text)
    if HydraConfig.initialized():
        atomic_write_text(Path(HydraConfig.get().runtime.output_dir) / "result.json", text)
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one model x method x benchmark and return its result (metrics and fingerprint)."""
    kind = cfg.benchmark.kind
    if kind not in RUNNERS:
        raise ValueError(f"Unknown benchmark kind {kind!r}. Available: {', '.join(sorted(RUNNERS))}")
    methods = build_methods(cfg)  # validated before any model is loaded
    loaded: LoadedModel = instantiate(cfg.model.loader)
    result = RUNNERS[kind](cfg, loaded, methods, Shard.current())
    if result:
        log.info("%s / %s / %s: %s", cfg.model.name, cfg.benchmark.name, result["method"],
                 json.dumps(result["metrics"], default=str))
    return result


CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    log.debug(OmegaConf.to_yaml(cfg))
    result = run(cfg)
    metrics = result.get("metrics", {}) if result else {}
    value = metrics.get("CHAIRi", metrics.get("f1", metrics.get("ratio_to_greedy")))
    return float(value) if isinstance(value, (int, float)) else None
