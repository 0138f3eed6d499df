"""The app's benchmarks read from a local copy of their upstream release (hallu_benchmarks.md): AMBER, the MME
hallucination subset, HallusionBench, and the local-data check shared with POPE on A-OKVQA / GQA.

Each benchmark config names its data as `benchmark.data` (a `conf/data/*.yaml` node: the environment variable,
the expected layout and where users get the data). Data is never downloaded: a missing path is one
`FileNotFoundError` naming the variable, the layout and the source, raised by the benchmark's settings check,
before any model loads. Items are built from the data alone, also before loading.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from benchmarks import app
from benchmarks.browse import write_items
from benchmarks.generation import Item, Shard, generate_predictions
from benchmarks.models import LoadedModel
from vlmfix.decoding.method import Method
from vlmfix.eval import amber, amber_protocol, hallusion, hallusion_protocol, mme, mme_protocol, yesno
from vlmfix.eval._io import atomic_write_text
from vlmfix.eval.fingerprint import method_params, protocol_fingerprint
from vlmfix.eval.items import AMBER_PARTS, PromptedItem, amber_items, hallusion_items, mme_items
from vlmfix.eval.unit_counts import amber_units, hallusion_units, mme_units
from vlmfix.validation import boolean, choice, number, text

log = logging.getLogger("benchmarks")
SOURCES = ("folder", "hf")


# ------------------------------------------------------------------ local data
def local_root(node: DictConfig, key: str = "root", env_key: str = "root_env", what: str = "data") -> Path:
    """The folder a data node names, which must exist; else one error naming the variable, layout and source."""
    variable = node.get(env_key)
    value = node.get(key)
    name = node.get("name", "the benchmark")
    where = (f"Expected layout: {node.get('layout')}. Get it from {node.get('source')}; vlmfix never downloads "
             "data.") if what == "data" else f"Get it from {node.get('images_source')}; vlmfix never downloads data."
    if value is None:
        raise FileNotFoundError(f"{name} {what}: the environment variable {variable} is not set; set {variable}=<the "
                                f"local folder> (or benchmark.data.{key}=<dir>). {where}")
    path = Path(text(value, f"benchmark.data.{key}")).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{name} {what}: {str(path)!r} (from {variable}) does not exist; point {variable} at "
                                f"the local folder. {where}")
    return path


def local_images(node: DictConfig) -> Path:
    """The image folder of a POPE dataset preset: `images_root` (its own variable) / `images_subdir`."""
    root = local_root(node, "images_root", "images_env", what="images")
    folder = root / str(node.images_subdir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{node.get('name')} images: {str(folder)!r} does not exist; point "
                                f"{node.images_env} at the folder holding {node.images_subdir}/. Get it from "
                                f"{node.get('images_source')}.")
    return folder


def release_root(cfg: DictConfig) -> Path | None:
    """The local release the benchmark reads, or None when its variable is unset and the model ships data (the
    toy): then the benchmark runs on the toy's miniature of it, written once the model is loaded."""
    node = cfg.benchmark.data
    if node.get("root") is None and app.ships_data(cfg.model.loader):
        return None
    return local_root(node)


def own_data(cfg: DictConfig) -> bool:
    """Whether the benchmark reads its local release (before loading), not the model's miniature."""
    return cfg.benchmark.data.get("root") is not None or not app.ships_data(cfg.model.loader)


def miniature_root(cfg: DictConfig, paths: app.DataPaths | None) -> Path:
    """The toy miniatures (`vlmfix.toy.bench`) of the model's own data, written (or reused) under results_dir."""
    from vlmfix.eval._io import sha256_file
    from vlmfix.toy.bench import write_miniatures

    if paths is None:
        raise app.no_data_error(cfg)
    key = sha256_file(paths.instances)[:16]
    return write_miniatures(paths.instances.parent.parent, Path(cfg.results_dir) / ".cache" / "miniatures" / key)


def as_items(prompted: Sequence[PromptedItem[Any]]) -> list[Item]:
    """The shared builders' items (`vlmfix.eval.items`, also the lmms-eval tasks') as generation requests."""
    return [Item(p.key, p.image_path, p.prompt) for p in prompted]


# ------------------------------------------------------------------ AMBER
@dataclass(frozen=True)
class AmberOptions:
    data: amber.AmberData | None  # None: the toy's miniature, read once the model is loaded
    parts: tuple[str, ...]
    parser: str
    normalizer: Any
    similarity: Any
    threshold: float
    quirks: str


@dataclass(frozen=True)
class AmberTask:
    options: AmberOptions
    items: dict[str, list[Item]]  # part -> items
    subset: bool
    n_images: int
    miniature: bool = False  # the toy's miniature (a pipeline check; not AMBER's numbers)


def check_amber(cfg: DictConfig) -> AmberOptions:
    bench = cfg.benchmark
    parts = app.plain(bench.parts)
    if not (isinstance(parts, list) and parts and set(parts) <= set(AMBER_PARTS) and len(set(parts)) == len(parts)):
        raise ValueError(f"`benchmark.parts` must be a non-empty list of {', '.join(AMBER_PARTS)}, got {parts!r}; "
                         "e.g. benchmark=amber_generative.")
    parser = choice(bench.parser, "benchmark.parser", yesno.PARSERS.names(),
                    meaning="the yes/no parser (amber_exact is AMBER's own); set benchmark.parser=<name>")
    normalizer = choice(bench.normalizer, "benchmark.normalizer", amber.NORMALIZERS.names(),
                        meaning="AMBER's noun extraction; set benchmark.normalizer=nltk or simple")
    quirks = choice(bench.quirks, "benchmark.quirks", amber.QUIRK_MODES,
                    meaning="set benchmark.quirks=reference or fixed")
    threshold = number(bench.threshold, "benchmark.threshold", low=0, high=1, low_open=True,
                       meaning="the similarity threshold (0.8 is AMBER's)")
    backend = choice(bench.similarity, "benchmark.similarity", amber.BACKENDS,
                     meaning="AMBER's word similarity; set benchmark.similarity=official, table, spacy or none")
    text(cfg.benchmark.prompt_suffix, "benchmark.prompt_suffix", allow_empty=True)
    app.check_max_new_tokens(bench.max_new_tokens, "pope")
    number(bench.max_new_tokens_generative, "benchmark.max_new_tokens_generative", low=1, integer=True,
           meaning="the description budget; set model.chair_max_new_tokens=<int>")
    root = release_root(cfg)
    data = app.scorer_input("benchmark.data.root", amber.load_amber, root) if root is not None else None
    made_normalizer = amber.make_normalizer(normalizer, lower=quirks == "fixed")  # nltk: probes its data now
    similarity = app.scorer_input("benchmark.similarity", functools.partial(
        amber.make_similarity, spacy_model=bench.get("spacy_model"), table=bench.get("table"),
        threshold=float(threshold), vocabulary_sha256=data.vocabulary_sha256 if data else None), backend)
    return AmberOptions(data, tuple(parts), parser, made_normalizer, similarity, float(threshold), quirks)


def prepare_amber(cfg: DictConfig, options: AmberOptions, paths: app.DataPaths | None) -> AmberTask:
    miniature = options.data is None
    if miniature:
        options = dataclasses.replace(options, data=amber.load_amber(miniature_root(cfg, paths) / "amber"))
    data = options.data
    assert data is not None
    chosen = amber_items(data, options.parts, cfg.limit, cfg.benchmark.prompt_suffix)
    items = {part: as_items(prompted) for part, prompted in chosen.items.items()}
    for part_items in items.values():
        app.check_image_files(part_items, (data.root or Path(".")) / "image")
    return AmberTask(options, items, subset=chosen.subset, n_images=chosen.n_images, miniature=miniature)


def run_amber(cfg: DictConfig, loaded: LoadedModel, methods: list[Method], task: AmberTask,
              shard: Shard) -> dict[str, Any]:
    bench, options = cfg.benchmark, task.options
    assert options.data is not None  # prepare_amber read it
    budgets = {"generative": int(bench.max_new_tokens_generative), "discriminative": int(bench.max_new_tokens)}
    decoding, _ = app.decoding_of(cfg, budgets[options.parts[0]])
    fields = amber_protocol(options.data, parts=options.parts, parser=options.parser, normalizer=options.normalizer,
                            similarity=options.similarity, threshold=options.threshold, quirks=options.quirks,
                            n_images=task.n_images, subset=task.subset)
    fields["max_new_tokens"] = budgets
    fields["source"] = "toy_miniature" if task.miniature else "folder"
    fields["prompt_suffix"] = bench.prompt_suffix
    fingerprint = protocol_fingerprint(
        model_id=loaded.source, model_revision=loaded.revision, method=app.method_label(cfg, methods),
        method_params=method_params(methods), decoding=decoding, prompt="query file",
        chat_template=getattr(loaded.processor, "chat_template", None), amber=fields,
        execution=app.execution_of(cfg, loaded))
    out_dir = app._result_dir(cfg, methods, fingerprint)
    rows = {part: generate_predictions(
        task.items[part], model=loaded.model, processor=loaded.processor, methods=methods,
        out_path=out_dir / f"predictions_{part}.jsonl", key_name="id", text_name="response",
        batch_size=app.batch_size_of(cfg), max_new_tokens=budgets[part],
        decoding=app.decoding_of(cfg, budgets[part])[1], seed=int(cfg.seed), shard=shard, progress=cfg.progress,
        description=f"{bench.name} {part} {app.method_label(cfg, methods)}") for part in options.parts}
    if shard.rank != 0:
        return {}
    responses = [{"id": key, "response": row["response"]} for part in options.parts for key, row in rows[part].items()]
    atomic_write_text(out_dir / "amber_inference.json", json.dumps(responses, indent=1) + "\n")  # official input
    metrics: dict[str, Any] = {"similarity": options.similarity.describe(), "subset": task.subset,
                               "data_source": fields["source"]}
    complete = all(len(rows[p]) == len(task.items[p]) for p in options.parts)
    generative = discriminative = None
    if "generative" in rows:
        generative = amber.score_generative({k: r["response"] for k, r in rows["generative"].items()}, options.data,
                                            options.normalizer, options.similarity, options.threshold, options.quirks)
        metrics.update(CHAIR=generative.chair, Cover=generative.cover, Hal=generative.hal, Cog=generative.cog,
                       generative=generative.to_json())
    if "discriminative" in rows:
        discriminative = amber.score_discriminative({k: r["response"] for k, r in rows["discriminative"].items()},
                                                    options.data, options.parser)
        overall = discriminative.groups["overall"]
        metrics.update(accuracy=overall["accuracy"], precision=overall["precision"], recall=overall["recall"],
                       f1=overall["f1"], unknown_rate=discriminative.unknown_rate,
                       yes_ratio=discriminative.yes_ratio, discriminative=discriminative.to_json())
    full = (generative is not None and discriminative is not None and not task.subset and complete
            and not amber.missing_dimensions(discriminative))
    metrics["amber_score"] = amber.amber_score(generative, discriminative) if full and generative and discriminative \
        else None
    log.info("AMBER similarity backend: %s", metrics["similarity"])
    asked = {item.key for part in options.parts for item in task.items[part]}
    images = {q.id: q.image for part in options.parts for q in options.data.queries(part) if q.id in asked}
    units = amber_units(options.data, images, generative, discriminative)
    write_items(out_dir, [item for part in options.parts for item in task.items[part]],
                {item.key: {"part": part} for part in options.parts for item in task.items[part]})
    amber.write_amber_scored(out_dir / "amber_scored.json", options.data,
                             {k: r["response"] for part in options.parts for k, r in rows[part].items()},
                             generative, discriminative, fingerprint)
    return app._finish(cfg, out_dir, app.method_label(cfg, methods), fingerprint, metrics, complete=complete,
                       units=units)


# ------------------------------------------------------------------ MME
@dataclass(frozen=True)
class MmeOptions:
    questions: list[mme.MmeQuestion] | None  # None: the toy's miniature, read once the model is loaded
    source: str
    parser: str
    prompt: str
    subtasks: tuple[str, ...] = mme.HALLUCINATION_SUBTASKS


@dataclass(frozen=True)
class MmeTask:
    options: MmeOptions
    questions: list[mme.MmeQuestion]
    items: list[Item]


def check_mme(cfg: DictConfig) -> MmeOptions:
    bench = cfg.benchmark
    subtasks = app.plain(bench.subtasks)
    if not (isinstance(subtasks, list) and subtasks and all(isinstance(s, str) and s for s in subtasks)):
        raise ValueError(f"`benchmark.subtasks` must be a non-empty list of MME subtask names, got {subtasks!r}.")
    source = choice(bench.source, "benchmark.source", SOURCES, meaning="set benchmark.source=folder or hf")
    prompt = choice(bench.prompt, "benchmark.prompt", ("official", "lmms"),
                    meaning="official (verbatim) or lmms (lmms-eval's suffix swap)")
    parser = choice(bench.parser, "benchmark.parser", yesno.PARSERS.names(),
                    meaning="the yes/no parser (mme_official is MME's own); set benchmark.parser=<name>")
    text(bench.prompt_suffix, "benchmark.prompt_suffix", allow_empty=True)
    app.check_max_new_tokens(bench.max_new_tokens, "pope")
    root = release_root(cfg)
    questions = None
    if root is not None and source == "folder":
        questions = app.scorer_input("benchmark.data.root", mme.load_mme_folder, root, subtasks)
    elif root is not None:
        image_dir = Path(cfg.results_dir) / ".cache" / "mme_images"
        questions = app.scorer_input("benchmark.data.root", mme.load_mme_hf, root, subtasks, image_dir)
    return MmeOptions(questions, source, parser, prompt, tuple(subtasks))


def prepare_mme(cfg: DictConfig, options: MmeOptions, paths: app.DataPaths | None) -> MmeTask:
    everything = options.questions
    if everything is None:
        everything = mme.load_mme_folder(miniature_root(cfg, paths) / "mme", options.subtasks)
        options = dataclasses.replace(options, questions=everything, source="toy_miniature")
    chosen = mme_items(everything, cfg.limit, options.prompt, cfg.benchmark.prompt_suffix)
    items = as_items(chosen)
    app.check_image_files(items, Path(cfg.benchmark.data.root or "."))
    return MmeTask(options, [item.row for item in chosen], items)


def run_mme(cfg: DictConfig, loaded: LoadedModel, methods: list[Method], task: MmeTask, shard: Shard) -> dict[str, Any]:
    bench, options = cfg.benchmark, task.options
    decoding, _ = app.decoding_of(cfg, bench.max_new_tokens)
    fields = mme_protocol(options.source, mme.content_sha256(task.questions), options.parser, options.prompt)
    fingerprint = protocol_fingerprint(
        model_id=loaded.source, model_revision=loaded.revision, method=app.method_label(cfg, methods),
        method_params=method_params(methods), decoding=decoding,
        prompt="{question}" if options.prompt == "official" else f"lmms:{bench.prompt_suffix}",
        chat_template=getattr(loaded.processor, "chat_template", None), mme=fields,
        execution=app.execution_of(cfg, loaded))
    out_dir = app._result_dir(cfg, methods, fingerprint)
    rows = app.predict(cfg, loaded, methods, task.items, out_dir, "key", "text", shard)
    if shard.rank != 0:
        return {}
    answers = {k: r["text"] for k, r in rows.items()}
    scores = mme.score_mme(task.questions, answers, options.parser)
    write_items(out_dir, task.items)
    mme.write_mme_scored(out_dir / "mme_scored.json", task.questions, answers, scores)
    metrics = {"data_source": options.source,
               "total": scores.total, "unknown_rate": scores.unknown_rate, "yes_ratio": scores.yes_ratio,
               **{f"{name} score": s.score for name, s in scores.subtasks.items()}, "mme": scores.to_json()}
    return app._finish(cfg, out_dir, app.method_label(cfg, methods), fingerprint, metrics,
                       complete=scores.n_missing == 0, units=mme_units(task.questions, scores))


# ------------------------------------------------------------------ HallusionBench
@dataclass(frozen=True)
class HallusionOptions:
    questions: list[hallusion.HallusionQuestion] | None  # None: the toy's miniature, read once the model is loaded
    hashes: dict[str, str | None]
    parser: str
    unknown_no_visual: str
    include_text_only: bool


@dataclass(frozen=True)
class HallusionTask:
    options: HallusionOptions
    questions: list[hallusion.HallusionQuestion]
    items: list[Item]


def check_hallusion(cfg: DictConfig) -> HallusionOptions:
    bench = cfg.benchmark
    parser = choice(bench.parser, "benchmark.parser", yesno.PARSERS.names(),
                    meaning="the yes/no rule standing in for the GPT judge; set benchmark.parser=<name>")
    unknown = choice(bench.unknown_no_visual, "benchmark.unknown_no_visual", hallusion.UNKNOWN_NO_VISUAL)
    include = boolean(bench.include_text_only, "benchmark.include_text_only")
    text(bench.prompt_suffix, "benchmark.prompt_suffix", allow_empty=True)
    number(bench.max_new_tokens, "benchmark.max_new_tokens", low=1, integer=True,
           meaning="the generation budget; set benchmark.max_new_tokens=<int>")
    source = choice(bench.source, "benchmark.source", SOURCES, meaning="set benchmark.source=folder or hf")
    root = release_root(cfg)
    if root is None:
        return HallusionOptions(None, {}, parser, unknown, include)
    if source == "folder":
        questions = app.scorer_input("benchmark.data.root", hallusion.load_hallusion, root)
    else:
        image_dir = Path(cfg.results_dir) / ".cache" / "hallusionbench_images"
        questions = app.scorer_input("benchmark.data.root", hallusion.load_hallusion_hf, root, image_dir)
    hashes = {**hallusion.file_hashes(root, questions), "source": source}
    return HallusionOptions(questions, hashes, parser, unknown, include)


def prepare_hallusion(cfg: DictConfig, options: HallusionOptions, paths: app.DataPaths | None) -> HallusionTask:
    if options.questions is None:
        root = miniature_root(cfg, paths) / "hallusionbench"
        loaded = hallusion.load_hallusion(root)
        options = dataclasses.replace(options, questions=loaded,
                                      hashes={**hallusion.file_hashes(root, loaded), "source": "toy_miniature"})
    assert options.questions is not None
    chosen = hallusion_items(options.questions, options.include_text_only, cfg.limit, cfg.benchmark.prompt_suffix)
    items = as_items(chosen)
    app.check_image_files(items, Path(cfg.benchmark.data.root or "."))
    return HallusionTask(options, [item.row for item in chosen], items)


def run_hallusion(cfg: DictConfig, loaded: LoadedModel, methods: list[Method], task: HallusionTask,
                  shard: Shard) -> dict[str, Any]:
    bench, options = cfg.benchmark, task.options
    decoding, _ = app.decoding_of(cfg, bench.max_new_tokens)
    fields = hallusion_protocol(options.hashes, options.parser, options.unknown_no_visual, options.include_text_only)
    fingerprint = protocol_fingerprint(
        model_id=loaded.source, model_revision=loaded.revision, method=app.method_label(cfg, methods),
        method_params=method_params(methods), decoding=decoding, prompt="{question}" + bench.prompt_suffix,
        chat_template=getattr(loaded.processor, "chat_template", None), hallusion=fields,
        execution=app.execution_of(cfg, loaded))
    out_dir = app._result_dir(cfg, methods, fingerprint)
    rows = app.predict(cfg, loaded, methods, task.items, out_dir, "key", "text", shard)
    if shard.rank != 0:
        return {}
    answers = {k: r["text"] for k, r in rows.items()}
    scores = hallusion.score_hallusion(task.questions, answers, options.parser, options.unknown_no_visual)
    write_items(out_dir, task.items)
    hallusion.write_hallusion_scored(out_dir / "hallusion_scored.json", task.questions, answers, scores)
    metrics = {"data_source": options.hashes.get("source"),
               "aAcc": scores.aacc, "fAcc": scores.facc, "qAcc": scores.qacc, "unknown_rate": scores.unknown_rate,
               "yes_ratio": scores.yes_ratio, "n_text_only": scores.n_text_only, "hallusion": scores.to_json()}
    return app._finish(cfg, out_dir, app.method_label(cfg, methods), fingerprint, metrics,
                       complete=scores.n_missing == 0, units=hallusion_units(task.questions, scores))


KINDS = {
    "amber": app.BenchmarkKind(check_amber, prepare_amber, run_amber, ("instances", "images"), own_data=own_data),
    "mme": app.BenchmarkKind(check_mme, prepare_mme, run_mme, ("instances", "images"), own_data=own_data),
    "hallusion": app.BenchmarkKind(check_hallusion, prepare_hallusion, run_hallusion, ("instances", "images"),
                                   own_data=own_data),
}
