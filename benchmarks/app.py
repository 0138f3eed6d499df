"""The Hydra benchmark app: one run = one model x one method x one benchmark.

`main()` composes the config and calls `run(cfg) -> metrics`. `run` works in four steps:

1. `check_settings`: every setting (run, decoding, model preset and loader, benchmark, data, methods) is
   checked and the files the config names are read; a bad one raises an error that names the setting and
   the override that fixes it. Nothing is loaded yet.
2. The benchmark's items are prepared from the data (no model needed), still before loading when the
   config names the data; data that ships with the model (the toy's) is read right after loading.
3. The model is loaded and predictions are generated; 4. they are scored.

Results live under a stable `results_dir/<model>/<benchmark>/<method>-<fingerprint hash>/`:
`predictions.jsonl` (appended as produced; reruns resume), `result.json` (metrics, their bootstrap intervals
over images (`benchmarks.uncertainty`) + protocol fingerprint) and the scorer's per-item verdicts
(`chair_scored.json`, `amber_scored.json`, `mme_scored.json`, `hallusion_scored.json`); every run also records
its items (`items.jsonl`) for the results browser (`benchmarks.browse`, whose page every run and multirun
writes). Each Hydra job dir gets a copy of `result.json` for the multirun summary. The
fingerprint holds every setting that changes predictions, the batch size included, so a run resumed with other
settings starts a new directory instead of mixing predictions.

In a multirun a failed job is recorded (`failure.json` in its job dir) and the sweep goes on; the summary
lists it and the multirun exits with an error (`benchmarks.summary`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from benchmarks.browse import write_items
from benchmarks.generation import Item, Shard, generate_predictions
from benchmarks.models import LOADERS, LoadedModel
from benchmarks.summary import SUMMARY_CALLBACK, write_failure
from benchmarks.uncertainty import bootstrap_settings, interval_block
from vlmfix.decoding.method import METHODS, Method
from vlmfix.eval import (
    Decoding,
    EvalInputError,
    chair,
    chair_protocol,
    fingerprint_hash,
    pope,
    pope_protocol,
    protocol_fingerprint,
)
from vlmfix.eval._io import atomic_write_text, sha256_file, sha256_text
from vlmfix.eval.bootstrap import UnitTable
from vlmfix.eval.fingerprint import Execution, method_params, plain_json
from vlmfix.eval.unit_counts import chair_units, pope_units
from vlmfix.validation import boolean, choice, indices, number, optional_number, text

log = logging.getLogger("benchmarks")
T = TypeVar("T")

DECODING_KEYS = ("do_sample", "num_beams", "temperature", "top_p", "top_k", "repetition_penalty")
IMAGE_MODES = ("sample", "list", "pinned")


# ------------------------------------------------------------------ checked settings
@dataclass(frozen=True)
class DataPaths:
    """The COCO-format files of the evaluation split."""

    instances: Path
    captions: Path | None  # None when the config names no data.root and the benchmark reads no captions
    images: Path


@dataclass(frozen=True)
class Checked:
    """What `check_settings` built: the methods, the benchmark's checked options, and the data files when the
    config names them (None: they ship with the model and are checked once it is loaded)."""

    methods: list[Method]
    options: Any
    data: DataPaths | None
    own_data: bool = False  # the benchmark reads its own local release (benchmark.data), checked by its check


@dataclass(frozen=True)
class ChairOptions:
    """CHAIR's checked settings."""

    extractor: chair.MentionExtractor
    image_list: chair.ImageSelection | None  # images.mode=list or pinned (capped by limit)
    n_images: int  # images.mode=sample: images.n capped by limit
    seed: int


@dataclass(frozen=True)
class PopeOptions:
    """POPE's checked settings."""

    split: str
    parser: str
    question_file: pope.QuestionFile | None  # benchmark.questions; None builds the questions from the data
    n_images: int  # a built file's images: n_images capped by limit
    seed: int
    images: Path | None = None  # a dataset preset's image folder (benchmark.data); None: the data's images
    dataset: str | None = None  # coco, aokvqa or gqa for a dataset preset


def check_settings(cfg: DictConfig) -> Checked:
    """Check every setting of the run, build the methods and read the files the config names; nothing is loaded.

    Raises ValueError (a bad value) or FileNotFoundError (a missing file), naming the setting and the fix.
    """
    check_run_settings(cfg)
    check_decoding(cfg.decoding)
    check_model(cfg.model)
    batch_size = batch_size_of(cfg)
    if batch_size < int(cfg.batch_size):
        log.info("%s: batch_size=%d capped at the preset's model.max_batch_size=%d", cfg.model.name,
                 cfg.batch_size, batch_size)
    name = choice(cfg.benchmark.kind, "benchmark.kind", tuple(KINDS), meaning="set benchmark=<a conf/benchmark file>")
    kind = KINDS[name]
    text(cfg.benchmark.name, "benchmark.name")
    options = kind.check(cfg)
    methods = build_methods(cfg)
    check_beam_search_methods(cfg, name, methods)
    if kind.own_data(cfg):
        return Checked(methods, options, None, own_data=True)
    data = configured_data(cfg, kind.files)
    if data is None and kind.needs_data and not ships_data(cfg.model.loader):
        raise no_data_error(cfg)
    return Checked(methods, options, data)


def check_run_settings(cfg: DictConfig) -> None:
    text(cfg.task_name, "task_name")
    number(cfg.seed, "seed", low=0, integer=True, meaning="the run's random seed; set seed=<int>")
    number(cfg.batch_size, "batch_size", low=1, integer=True,
           meaning="the items per generate call (part of the fingerprint); set batch_size=<int>")
    optional_number(cfg.limit, "limit", low=1, integer=True,
                    meaning="the cap on images per benchmark, for quick looks; set limit=<int> or limit=null")
    text(cfg.results_dir, "results_dir")
    boolean(cfg.progress, "progress", meaning="set progress=true or progress=false")
    optional_number(cfg.get("threads"), "threads", low=1, integer=True,
                    meaning="torch's CPU threads (in the fingerprint); set threads=<int> or threads=null for torch's "
                            "default")
    bootstrap_settings(cfg)


def check_decoding(decoding: DictConfig) -> None:
    unknown = sorted(set(decoding) - set(DECODING_KEYS))
    if unknown:
        raise ValueError(f"`decoding.{unknown[0]}` is not a decoding setting of the app; it knows "
                         f"{', '.join(DECODING_KEYS)}. Remove the override.")
    boolean(decoding.do_sample, "decoding.do_sample", meaning="set decoding.do_sample=true or false")
    number(decoding.num_beams, "decoding.num_beams", low=1, integer=True,
           meaning="the beam count; set decoding.num_beams=<int>")
    number(decoding.temperature, "decoding.temperature", low=0, low_open=True,
           meaning="the sampling temperature; set decoding.temperature=<float>")
    number(decoding.top_p, "decoding.top_p", low=0, high=1, low_open=True,
           meaning="the nucleus mass kept when sampling; set decoding.top_p=<float>")
    optional_number(decoding.get("top_k"), "decoding.top_k", low=0, integer=True,
                    meaning="the top-k cut when sampling (0: none; null: transformers' default, 50 in "
                            "transformers 5); set decoding.top_k=<int> or decoding.top_k=null")
    number(decoding.repetition_penalty, "decoding.repetition_penalty", low=0, low_open=True,
           meaning="generate's repetition penalty (1.0: none; method=dola sets 1.2); set "
                   "decoding.repetition_penalty=<float>")


def check_model(model: DictConfig) -> None:
    """The preset's own keys and its loader's settings (without loading anything)."""
    text(model.name, "model.name")
    indices(plain(model.get("var_sink_dims")), "model.var_sink_dims", what="hidden dimensions",
            meaning="VAR's sink dimensions of this model (null when none are published)")
    number(model.get("var_tau", 20.0), "model.var_tau", low=0, low_open=True, meaning="VAR's sink threshold")
    optional_number(model.get("max_batch_size"), "model.max_batch_size", low=1, integer=True,
                    meaning="the most prompts per generate call the model runs right (null: no cap)")
    check_loader(model)


def check_loader(model: DictConfig) -> None:
    """`model.loader._target_` imports, its settings fit its signature, and a known loader's own check passes."""
    node = model.loader
    target = text(node.get("_target_"), "model.loader._target_", meaning="the function that loads the model")
    try:
        loader = get_method(target)
    except Exception as err:
        raise ValueError(f"`model.loader._target_` {target!r} cannot be imported ({err}); name a loader such as "
                         "benchmarks.models.load_pretrained.") from None
    settings = {key: value for key, value in plain(node).items() if not key.startswith("_")}
    try:
        inspect.signature(loader).bind(**settings)
    except TypeError as err:
        raise ValueError(f"model.loader does not fit {target}: {err}; fix the model preset or the override.") from None
    spec = LOADERS.get(target)
    if spec is None:
        return
    try:
        spec.check(**settings)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}{variable_hint(model.get('path_env'))}") from None


def ships_data(loader: DictConfig) -> bool:
    """Whether the loader brings its own data (unknown loaders are given the benefit of the doubt)."""
    spec = LOADERS.get(loader.get("_target_"))
    return spec is None or spec.ships_data


def variable_hint(variable: str | None) -> str:
    """The sentence naming the preset's path variable and its state, or '' when the preset has none."""
    if not variable:
        return ""
    value = os.environ.get(variable)
    state = "which is not set" if value is None else f"now {value!r}"
    return f" This preset reads it from the environment variable {variable}, {state}."


# ------------------------------------------------------------------ methods
def build_methods(cfg: DictConfig) -> list[Method]:
    """The run's methods: `method` (empty for greedy) plus `extra_methods`, instantiated (validated).

    A constructor's own error (e.g. "`alpha` must be a finite number > 0, got '2'") reaches the user as is,
    without Hydra's instantiation wrapper.
    """
    nodes: list[tuple[str, Any]] = [("method", cfg.method)] if cfg.method and cfg.method.get("_target_") else []
    extra = cfg.get("extra_methods")
    if extra is None:
        extra = []
    elif not isinstance(extra, ListConfig):
        raise ValueError(f"`extra_methods` must be a list of method configs, got {plain(extra)!r}; e.g. "
                         "+extra_methods=[{_target_: vlmfix.VAR}].")
    nodes += [(f"extra_methods[{i}]", node) for i, node in enumerate(extra)]
    return [instantiate_method(key, node) for key, node in nodes]


def instantiate_method(key: str, node: Any) -> Method:
    if not isinstance(node, DictConfig) or not node.get("_target_"):
        raise ValueError(f"`{key}` must be a method config with a _target_, e.g. {{_target_: vlmfix.VAR}}, "
                         f"got {plain(node)!r}.")
    try:
        method = instantiate(node)
    except InstantiationException as err:
        if str(err).startswith("Error locating target"):
            raise ValueError(f"`{key}._target_` {node._target_!r} cannot be imported; name a method class, e.g. "
                             f"vlmfix.VHR (methods: {', '.join(METHODS.names())}).") from None
        if err.__cause__ is not None:
            raise err.__cause__ from None  # the constructor's own message, not Hydra's wrapper
        raise
    if not isinstance(method, Method):
        raise ValueError(f"`{key}._target_` {node._target_!r} is not a vlmfix method (got a "
                         f"{type(method).__name__}); name a method class, e.g. vlmfix.VHR.")
    return method


def method_label(cfg: DictConfig, methods: list[Method]) -> str:
    if not methods:
        return "greedy"
    return "+".join(m.name for m in methods)


# ------------------------------------------------------------------ benchmark settings
def check_chair(cfg: DictConfig) -> ChairOptions:
    bench = cfg.benchmark
    text(bench.prompt, "benchmark.prompt", meaning="the caption prompt; set model.prompts.chair=<text>")
    check_max_new_tokens(bench.max_new_tokens, "chair")
    images = bench.images
    mode = choice(images.mode, "benchmark.images.mode", IMAGE_MODES,
                  meaning="how CHAIR picks images; set benchmark.images.mode=sample, =list with "
                          "benchmark.images.list=<file of image ids>, or =pinned with "
                          "benchmark.images.image_ids_file=<a shipped list, e.g. opera_llava15_500>")
    n_images = number(images.n, "benchmark.images.n", low=1, integer=True,
                      meaning="the images sampled; set benchmark.images.n=<int>")
    seed = number(images.seed, "benchmark.images.seed", low=0, integer=True,
                  meaning="the image sampling seed; set benchmark.images.seed=<int>")
    pinned = images.get("image_ids_file")
    for key, value, wanted in (("list", images.list, "list"), ("image_ids_file", pinned, "pinned")):
        if value is not None and mode != wanted:
            raise ValueError(f"`benchmark.images.{key}` is set ({value!r}) but benchmark.images.mode={mode} ignores "
                             f"it; set benchmark.images.mode={wanted} to use it, or benchmark.images.{key}=null.")
    image_list = None
    if mode == "list":
        image_list = read_image_list(images.list, cfg.limit)
    elif mode == "pinned":
        image_list = read_pinned_list(pinned, cfg.limit)
    normalizer = choice(bench.normalizer, "benchmark.normalizer", chair.NORMALIZERS.names(),
                        meaning="the CHAIR normalizer; set benchmark.normalizer=simple or opera_nltk")
    quirks = choice(bench.quirks, "benchmark.quirks", chair.QUIRK_MODES,
                    meaning="the CHAIR quirk mode; set benchmark.quirks=reference or fixed")
    extractor = chair.make_extractor(normalizer=normalizer, quirks=quirks)  # opera_nltk: needs nltk data, now
    return ChairOptions(extractor, image_list, capped(n_images, cfg.limit), seed)


def read_image_list(value: Any, limit: int | None) -> chair.ImageSelection:
    """The ids of `benchmark.images.list` (the first `limit` of them)."""
    if value is None:
        raise ValueError("`benchmark.images.list` must name a file of image ids (a JSON list or one id per line) "
                         "when benchmark.images.mode=list, got None; set benchmark.images.list=<file> or "
                         "benchmark.images.mode=sample.")
    path = existing_file(value, "benchmark.images.list", "a JSON list of image ids or one id per line")
    selection = scorer_input("benchmark.images.list", chair.read_image_list, path)
    if limit is not None and limit < len(selection.image_ids):
        selection = chair.images_from_list(selection.image_ids[:limit], f"{path} (first {limit})")
    return selection


def read_pinned_list(value: Any, limit: int | None) -> chair.ImageSelection:
    """The ids of `benchmark.images.image_ids_file`: a pinned list shipped with vlmfix (by name) or a file of
    that format (the first `limit` of them)."""
    if value is None:
        raise ValueError("`benchmark.images.image_ids_file` must name a pinned image list when "
                         f"benchmark.images.mode=pinned, got None; set it to one of "
                         f"{', '.join(chair.pinned_list_names())} or to a pinned-list file.")
    name = text(value, "benchmark.images.image_ids_file", meaning="a pinned image list")
    selection = scorer_input("benchmark.images.image_ids_file", chair.read_pinned_list, name)
    if limit is not None and limit < len(selection.image_ids):
        first = selection.image_ids[:limit]
        selection = chair.ImageSelection(first, "pinned", None, f"{selection.source} (first {limit})",
                                         chair.image_list_hash(first))
    return selection


def check_pope(cfg: DictConfig) -> PopeOptions:
    bench = cfg.benchmark
    split = choice(bench.split, "benchmark.split", pope.SPLITS,
                   meaning="how POPE picks negatives; set benchmark=pope_random, pope_popular or pope_adversarial")
    parser = choice(bench.parser, "benchmark.parser", pope.PARSERS.names(),
                    meaning="the answer parser (official is POPE's own); set benchmark.parser=<name>")
    text(bench.prompt_suffix, "benchmark.prompt_suffix", allow_empty=True)
    check_max_new_tokens(bench.max_new_tokens, "pope")
    n_images = number(bench.n_images, "benchmark.n_images", low=1, integer=True,
                      meaning="the images of a built question file; set benchmark.n_images=<int>")
    seed = number(bench.seed, "benchmark.seed", low=0, integer=True,
                  meaning="the question building seed; set benchmark.seed=<int>")
    question_file = None
    if bench.get("data") is not None:  # a dataset preset (pope_aokvqa_*, pope_gqa_*): the released files
        return check_pope_release(cfg, split, parser)
    if bench.questions is not None:
        if cfg.limit is not None:
            raise ValueError(f"`limit` caps the images of built question files, but benchmark.questions is set "
                             f"({bench.questions!r}); set limit=null, or pass a smaller question file.")
        path = existing_file(bench.questions, "benchmark.questions", "a POPE question file (JSON Lines or array)")
        question_file = scorer_input("benchmark.questions", pope.load_question_file, path, split)
        check_pope_version(bench.get("version"), question_file)
    else:
        check_built_version(bench.get("version"))
    return PopeOptions(split, parser, question_file, capped(n_images, cfg.limit), seed)


def pope_version(version: Any) -> str | None:
    """`benchmark.version` checked: a released POPE version, or None (any file)."""
    if version is None:
        return None
    return choice(str(version), "benchmark.version", pope.VERSIONS,
                  meaning="the released POPE version the question file must be (head is the default); or "
                          "benchmark.version=null for any file")


def check_built_version(version: Any) -> None:
    """Questions built from the data (the toy's, or data=coco2014 without benchmark.questions) are no release:
    they follow RUCAIBox/POPE HEAD's builder (chair_pope.md B3), so the default `head` and null fit them; a pin of
    an older release cannot be built and is refused."""
    version = pope_version(version)
    if version not in (None, "head"):
        raise ValueError(f"`benchmark.version` ({version!r}) pins a released question file, but none is given and "
                         "questions are built from the data (as RUCAIBox/POPE HEAD builds them); set "
                         "benchmark.questions=<the released file>, or benchmark.version=head (the default) or null.")


def check_pope_version(version: Any, question_file: pope.QuestionFile) -> None:
    """`benchmark.version` (`head` by default, a reproduction pack's pin such as e3e3926): the file, identified by
    the content of its rows, must be that release; null accepts any file (an unknown one with a warning)."""
    version = pope_version(version)
    if version is None or version in question_file.versions:
        return
    found = (f"the released {question_file.dataset} {question_file.split!r} file of version(s) "
             f"{', '.join(question_file.versions)}" if question_file.versions else
             f"not a released file (content sha256 {question_file.content_sha256})")
    raise ValueError(f"`benchmark.version` pins POPE version {version}, but {question_file.path!r} is {found}. "
                     f"Use that release's file (e.g. `git -C $VLMFIX_POPE checkout {version}` in a RUCAIBox/POPE "
                     "clone, or the copy the pack's paper ships; see the pack's comment), or set "
                     "benchmark.version=null to score any file.")


def check_beam_search_methods(cfg: DictConfig, kind: str, methods: list[Method]) -> None:
    """Methods with their own beam search (OPERA) need decoding.num_beams >= 2 and no speed benchmark."""
    own = [m.name for m in methods if m.owns_decoding]
    if own and kind == "speed":
        raise ValueError(f"benchmark=speed times greedy decoding through a streamer; {', '.join(own)} runs its own "
                         f"beam search: time it with python -m benchmarks.opera_speed.")
    if own and (int(cfg.decoding.num_beams) < 2 or bool(cfg.decoding.do_sample)):
        raise ValueError(f"{', '.join(own)} is a beam-search method; set decoding.num_beams=5 (>= 2) and "
                         f"decoding.do_sample=false (got num_beams={cfg.decoding.num_beams}, do_sample="
                         f"{cfg.decoding.do_sample}).")


def check_pope_release(cfg: DictConfig, split: str, parser: str) -> PopeOptions:
    """A POPE dataset preset: the released question file (benchmark.questions, else found under the preset's
    $VLMFIX_POPE) identified by content, and the image folder of the preset's own variable."""
    from benchmarks.release_kinds import local_images, local_root

    bench = cfg.benchmark
    dataset = choice(bench.dataset, "benchmark.dataset", pope.DATASETS)
    if cfg.limit is not None:
        raise ValueError("`limit` caps the images of built question files, but this preset reads a released file; "
                         "set limit=null.")
    if bench.questions is not None:
        path = existing_file(bench.questions, "benchmark.questions", "a POPE question file (JSON Lines or array)")
        images = local_images(bench.data)
    else:
        root, images = local_root(bench.data), local_images(bench.data)
        path = scorer_input("benchmark.data.root", pope.find_question_file, root, dataset, split)
    question_file = scorer_input("benchmark.questions", pope.load_question_file, path, split, dataset)
    check_pope_version(bench.get("version"), question_file)
    return PopeOptions(split, parser, question_file, 0, 0, images=images, dataset=dataset)


def check_speed(cfg: DictConfig) -> None:
    bench = cfg.benchmark
    text(bench.prompt, "benchmark.prompt")
    number(bench.new_tokens, "benchmark.new_tokens", low=1, integer=True,
           meaning="the tokens timed per run; set benchmark.new_tokens=<int>")
    number(bench.repeats, "benchmark.repeats", low=1, integer=True,
           meaning="the timed runs; set benchmark.repeats=<int>")


def check_max_new_tokens(value: Any, kind: str) -> int:
    return number(value, "benchmark.max_new_tokens", low=1, integer=True,
                  meaning=f"the generation budget; set model.{kind}_max_new_tokens=<int>")


def capped(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def existing_file(value: Any, name: str, what: str) -> Path:
    path = Path(text(value, name, meaning=what)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`{name}` {str(path)!r} does not exist; set {name}=<{what}>.")
    return path


def scorer_input(name: str, read: Callable[..., T], *args: Any) -> T:
    """`read(*args)`; a scorer's input error is raised again naming the setting it came from."""
    try:
        return read(*args)
    except EvalInputError as err:
        raise EvalInputError(f"`{name}`: {err}") from err


# ------------------------------------------------------------------ data
def configured_data(cfg: DictConfig, files: Sequence[str]) -> DataPaths | None:
    """The data files the config names, checked; None when they come with the model (data=from_model)."""
    data = cfg.data
    for key in ("root", "instances", "captions", "images"):
        if data[key] is not None:
            text(data[key], f"data.{key}")
    text(data.split, "data.split")
    if data.root is None and any(data[name] is None for name in files):
        return None
    return checked_data(cfg, Path(data.root) if data.root is not None else None, files)


def model_data(cfg: DictConfig, loaded: LoadedModel, files: Sequence[str], needed: bool) -> DataPaths | None:
    """The data that ships with the model, checked (None if it ships none and the benchmark can do without)."""
    if loaded.data_root is None:
        if not needed:
            return None
        raise no_data_error(cfg)
    return checked_data(cfg, loaded.data_root, files)


def no_data_error(cfg: DictConfig) -> ValueError:
    return ValueError(f"Model {cfg.model.name!r} ships no data: choose a dataset, e.g. data=coco2014 (with "
                      "VLMFIX_COCO pointing at a local COCO 2014), or set data.root=<a COCO-format directory>.")


def checked_data(cfg: DictConfig, root: Path | None, files: Sequence[str]) -> DataPaths:
    """instances / captions / images of the split (explicit paths win over `root`); the `files` must exist.
    Without `root` the config names every file the benchmark reads (`configured_data`); the others are None."""
    data = cfg.data
    split = data.split

    def located(name: str, *under_root: str) -> Path | None:
        if data[name]:
            return Path(data[name])
        return root.joinpath(*under_root) if root is not None else None

    instances = located("instances", "annotations", f"instances_{split}.json")
    images = located("images", "images", split)
    assert instances is not None and images is not None  # every benchmark reads both
    paths = DataPaths(instances=instances, captions=located("captions", "annotations", f"captions_{split}.json"),
                      images=images)
    for name in files:
        path = getattr(paths, name)
        if not (path.is_dir() if name == "images" else path.is_file()):
            raise FileNotFoundError(f"`data.{name}` {str(path)!r} does not exist; {data_fix(cfg, name, root)}")
    return paths


def data_fix(cfg: DictConfig, name: str, root: Path | None) -> str:
    """How to point the app at the data, naming the environment variable the data config reads."""
    variable = cfg.data.get("root_env")
    if variable and os.environ.get(variable) is None:
        return (f"{variable} is not set, so data.root fell back to {str(root)!r}: set {variable}=<the dataset "
                f"directory> or data.root=<dir>.")
    if variable:
        return f"{variable}={os.environ[variable]!r} does not hold it: point {variable} at the dataset directory."
    return f"set data.{name}=<path> or data.root=<a directory with annotations/ and images/{cfg.data.split}/>."


def image_files(instances: Path) -> dict[int, str]:
    """image id -> file name, from a COCO-format instances file."""
    try:
        return {int(img["id"]): str(img["file_name"]) for img in json.loads(instances.read_text())["images"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"`data.instances` {str(instances)!r} is not a COCO instances file ({type(err).__name__}: "
                         f"{err}); point data.instances at annotations/instances_<split>.json.") from None


def check_image_files(items: Sequence[Item], images: Path) -> None:
    missing = sorted({str(item.image_path) for item in items
                      if item.image_path is not None and not item.image_path.is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) of this run are missing under `data.images` "
                                f"{str(images)!r}, e.g. {missing[0]!r}; point data.images (or data.root) at the "
                                "folder that holds them.")


# ------------------------------------------------------------------ items (from the data, no model)
@dataclass(frozen=True)
class ChairTask:
    """What a CHAIR run generates and scores, from the data alone."""

    extractor: chair.MentionExtractor
    selection: chair.ImageSelection
    ground_truth: chair.GroundTruth
    items: list[Item]


@dataclass(frozen=True)
class PopeTask:
    """What a POPE run generates and scores, from the data alone."""

    questions: list[pope.PopeQuestion]
    source: str
    versions: tuple[str, ...]
    sha256: str
    items: list[Item]
    content_sha256: str | None = None
    dataset: str | None = None


def prepare_chair(cfg: DictConfig, options: ChairOptions, paths: DataPaths) -> ChairTask:
    files = image_files(paths.instances)
    if options.image_list is not None:
        selection = options.image_list
        unknown = [i for i in selection.image_ids if i not in files]
        if unknown:
            key, source = "list", selection.source
            if selection.mode == "pinned":
                key, name = "image_ids_file", cfg.benchmark.images.image_ids_file
                source = f"{name}, file {str(chair.pinned_list_path(name))!r}"
            raise ValueError(f"`benchmark.images.{key}` ({source}): {len(unknown)} of its "
                             f"{len(selection.image_ids)} image ids are not in data.instances "
                             f"{str(paths.instances)!r} (e.g. {unknown[:10]}); point data (VLMFIX_COCO) at the "
                             "dataset the list was made for (COCO 2014 val for the shipped lists), or list images "
                             "of that file.")
    else:
        pool = sorted(files)
        selection = chair.sample_images(pool, n=min(options.n_images, len(pool)), seed=options.seed)
    assert paths.captions is not None  # CHAIR reads them, so checked_data found them
    ground_truth = chair.ground_truth_from_coco([paths.instances], [paths.captions], extractor=options.extractor,
                                                cache_dir=Path(cfg.results_dir) / ".cache" / "chair")
    items = [Item(i, paths.images / files[i], cfg.benchmark.prompt) for i in selection.image_ids]
    check_image_files(items, paths.images)
    return ChairTask(options.extractor, selection, ground_truth, items)


def prepare_pope(cfg: DictConfig, options: PopeOptions, paths: DataPaths | None) -> PopeTask:
    content = None
    if options.question_file is not None:
        file = options.question_file
        questions, source, versions, digest = list(file.questions), "file", file.versions, file.sha256
        content = file.content_sha256
    else:
        assert paths is not None  # built questions read the data's annotations
        question_file = built_questions(cfg, options, paths.instances)
        questions, source, versions = pope.read_questions(question_file), "built", ()
        digest = sha256_file(question_file)
    images = options.images if options.images is not None else cast(DataPaths, paths).images
    suffix = cfg.benchmark.prompt_suffix
    items = [Item(q.question_id, images / q.image, q.text + suffix) for q in questions]
    check_image_files(items, images)
    return PopeTask(questions, source, versions, digest, items, content, options.dataset)


def built_questions(cfg: DictConfig, options: PopeOptions, instances: Path) -> Path:
    """The split's question file built from the instances (cached under results_dir/.cache/pope)."""
    build_dir = Path(cfg.results_dir) / ".cache" / "pope" / sha256_text(
        f"{sha256_file(instances)}:{options.n_images}:{options.seed}")[:16]
    if not (build_dir / "meta.json").exists():  # every rank builds the same deterministic files; writes are atomic
        config = pope.PopeBuildConfig(n_images=options.n_images, seed=options.seed)
        scorer_input("benchmark.n_images (capped by limit)", pope.build_pope, instances, build_dir, "data", config)
    return build_dir / f"data_pope_{options.split}.jsonl"


def prepare_speed(cfg: DictConfig, options: None, paths: DataPaths | None) -> DataPaths | None:
    return paths


# ------------------------------------------------------------------ benchmarks
def decoding_of(cfg: DictConfig, max_new_tokens: int) -> tuple[Decoding, dict[str, Any]]:
    """The run's `Decoding` (fingerprint) and its `generate` keywords. Sampling settings (temperature, top_p,
    top_k) are passed and recorded only when sampling; `decoding.top_k=null` passes none (transformers' default)."""
    d = cfg.decoding
    mode = "beam" if d.num_beams > 1 else ("sample" if d.do_sample else "greedy")
    top_k = int(d.top_k) if d.do_sample and d.get("top_k") is not None else None
    fingerprint = Decoding(max_new_tokens=int(max_new_tokens), mode=mode, num_beams=int(d.num_beams),
                           temperature=float(d.temperature) if d.do_sample else None,
                           top_p=float(d.top_p) if d.do_sample else None, seed=int(cfg.seed),
                           repetition_penalty=float(d.repetition_penalty), top_k=top_k)
    kwargs: dict[str, Any] = {"do_sample": bool(d.do_sample), "num_beams": int(d.num_beams),
                              "repetition_penalty": float(d.repetition_penalty)}
    if d.do_sample:
        kwargs.update(temperature=float(d.temperature), top_p=float(d.top_p))
        if top_k is not None:
            kwargs["top_k"] = top_k
    return fingerprint, kwargs


def batch_size_of(cfg: DictConfig) -> int:
    """The prompts per generate call: `batch_size`, capped by the model preset's `max_batch_size` (MiniMax M3: 1,
    as vlmfix refuses its padded batches); `check_settings` logs it when the cap applies."""
    cap = cfg.model.get("max_batch_size")
    if cap is None or int(cfg.batch_size) <= int(cap):
        return int(cfg.batch_size)
    return int(cap)


def execution_of(cfg: DictConfig, loaded: LoadedModel) -> Execution:
    """The settings besides the protocol that change predictions (see `Execution`); the batch size is the one
    predictions run at (`batch_size_of`)."""
    parameter = next(loaded.model.parameters())
    return Execution(batch_size=batch_size_of(cfg), dtype=str(parameter.dtype).removeprefix("torch."),
                     threads=int(cfg.threads) if cfg.get("threads") is not None else None,
                     attn_implementation=getattr(loaded.model.config, "_attn_implementation", None),
                     device=parameter.device.type)


def predict(cfg: DictConfig, loaded: LoadedModel, methods: list[Method], items: list[Item], out_dir: Path,
             key_name: str, text_name: str, shard: Shard) -> dict[int, dict[str, Any]]:
    _, kwargs = decoding_of(cfg, cfg.benchmark.max_new_tokens)
    return generate_predictions(
        items, model=loaded.model, processor=loaded.processor, methods=methods,
        out_path=out_dir / "predictions.jsonl", key_name=key_name, text_name=text_name,
        batch_size=batch_size_of(cfg), max_new_tokens=int(cfg.benchmark.max_new_tokens), decoding=kwargs,
        seed=int(cfg.seed), shard=shard, progress=cfg.progress,
        description=f"{cfg.benchmark.name} {method_label(cfg, methods)}",
    )


def run_chair(cfg: DictConfig, loaded: LoadedModel, methods: list[Method], task: ChairTask,
              shard: Shard) -> dict[str, Any]:
    bench = cfg.benchmark
    decoding, _ = decoding_of(cfg, bench.max_new_tokens)
    fingerprint = protocol_fingerprint(
        model_id=loaded.source, model_revision=loaded.revision, method=method_label(cfg, methods),
        method_params=method_params(methods), decoding=decoding, prompt=bench.prompt,
        chat_template=getattr(loaded.processor, "chat_template", None),
        chair=chair_protocol(task.extractor, task.selection, task.ground_truth),
        execution=execution_of(cfg, loaded),
    )
    out_dir = _result_dir(cfg, methods, fingerprint)
    rows = predict(cfg, loaded, methods, task.items, out_dir, "image_id", "caption", shard)
    if shard.rank != 0:
        return {}
    write_items(out_dir, task.items)
    captions = [chair.Caption(image_id=k, caption=row["caption"]) for k, row in rows.items()]
    report = chair.score_chair(captions, task.ground_truth, task.extractor)
    chair.write_chair_scored(out_dir / "chair_scored.json", report, fingerprint)
    metrics = asdict(report.overall)
    return _finish(cfg, out_dir, method_label(cfg, methods), fingerprint, metrics,
                   complete=len(rows) == len(task.items), units=chair_units(report))


def run_pope(cfg: DictConfig, loaded: LoadedModel, methods: list[Method], task: PopeTask,
             shard: Shard) -> dict[str, Any]:
    bench = cfg.benchmark
    decoding, _ = decoding_of(cfg, bench.max_new_tokens)
    fingerprint = protocol_fingerprint(
        model_id=loaded.source, model_revision=loaded.revision, method=method_label(cfg, methods),
        method_params=method_params(methods), decoding=decoding, prompt="{question}" + bench.prompt_suffix,
        chat_template=getattr(loaded.processor, "chat_template", None),
        pope=pope_protocol(task.source, task.versions, {bench.split: task.sha256}, bench.parser, task.dataset,
                           {bench.split: task.content_sha256} if task.dataset is not None and task.content_sha256
                           else None),
        execution=execution_of(cfg, loaded),
    )
    out_dir = _result_dir(cfg, methods, fingerprint)
    rows = predict(cfg, loaded, methods, task.items, out_dir, "question_id", "text", shard)
    if shard.rank != 0:
        return {}
    write_items(out_dir, task.items, {q.question_id: {"label": q.label, "object": q.object} for q in task.questions})
    scores = pope.score_pope(task.questions, {k: row["text"] for k, row in rows.items()}, parser=bench.parser,
                             split=bench.split)
    metrics = {"accuracy": scores.accuracy, "precision": scores.precision, "recall": scores.recall,
               "f1": scores.f1, "yes_ratio": scores.yes_ratio, "unknown_rate": scores.unknown_rate,
               "n_questions": scores.n_questions, "n_missing": scores.n_missing}
    return _finish(cfg, out_dir, method_label(cfg, methods), fingerprint, metrics, complete=scores.n_missing == 0,
                   units=pope_units(task.questions, scores))


def run_speed(cfg: DictConfig, loaded: LoadedModel, methods: list[Method], paths: DataPaths | None,
              shard: Shard) -> dict[str, Any]:
    """The method's decode time per token and wall time per caption against plain greedy `generate` (and the
    two-stream floor for a two-stream method), interleaved in one run; fails when the method edits nothing."""
    from benchmarks.speed import FLOOR, GREEDY, TinyVLM, generate_variants, is_two_stream, measure

    bench = cfg.benchmark
    tiny = TinyVLM(family="llava", model=loaded.model, processor=loaded.processor)
    if paths is not None:
        first = next(iter(image_files(paths.instances).values()))
        from PIL import Image

        images = [Image.open(paths.images / first).convert("RGB")]
        from benchmarks.generation import chat_prompt

        inputs = dict(loaded.processor(images=images, text=[chat_prompt(loaded.processor, bench.prompt)],
                                       return_tensors="pt"))
    else:
        inputs = tiny.inputs([bench.prompt])
    label = method_label(cfg, methods)
    variant = label if label != GREEDY else "vlmfix, no method"  # the baseline is plain generate, "greedy"
    variants = generate_variants(tiny, inputs, {variant: methods}, two_row_floor=is_two_stream(methods))
    results = {r.label: r for r in measure(variants, int(bench.new_tokens), int(bench.repeats), progress=log.info)}
    row = results.get(variant)
    if row is None or row.failure:
        reason = row.failure if row is not None else "warm-up run (no result)"
        raise RuntimeError(f"speed: {label} failed during its {reason}; no figure recorded.")
    greedy = results[GREEDY]
    metrics = {"ms_per_token_greedy": 1000 * greedy.seconds_per_token, "ms_per_token": 1000 * row.seconds_per_token,
               "ratio_to_greedy": row.ratio, "wall_s_greedy": greedy.wall_seconds, "wall_s": row.wall_seconds,
               "wall_ratio_to_greedy": row.wall_ratio, "fastest_run_ratio_to_greedy": row.fastest_run_ratio,
               "edited": row.edited}
    if FLOOR in results:
        metrics.update(floor_ratio_to_greedy=results[FLOOR].ratio, floor_wall_ratio_to_greedy=results[FLOOR].wall_ratio,
                       floor_fastest_run_ratio_to_greedy=results[FLOOR].fastest_run_ratio)
    fingerprint = {"model": loaded.source, "method": {"name": label, "params": method_params(methods)},
                   "benchmark": "speed", "new_tokens": int(bench.new_tokens), "repeats": int(bench.repeats)}
    out_dir = Path(cfg.results_dir) / cfg.model.name / "speed" / label
    return _finish(cfg, out_dir, label, fingerprint, metrics, complete=True)


@dataclass(frozen=True)
class BenchmarkKind:
    """One kind of benchmark: its settings check, its items from the data (no model), and its run."""

    check: Callable[[DictConfig], Any]
    prepare: Callable[[DictConfig, Any, Any], Any]
    run: Callable[[DictConfig, LoadedModel, list[Method], Any, Shard], dict[str, Any]]
    files: tuple[str, ...]  # the data files it reads
    needs_data: bool = True
    own_data: Callable[[DictConfig], bool] = lambda cfg: False  # reads its local release (benchmark.data) itself


KINDS = {
    "chair": BenchmarkKind(check_chair, prepare_chair, run_chair, ("instances", "captions", "images")),
    "pope": BenchmarkKind(check_pope, prepare_pope, run_pope, ("instances", "images"),
                          own_data=lambda cfg: cfg.benchmark.get("data") is not None),
    "speed": BenchmarkKind(check_speed, prepare_speed, run_speed, ("instances", "images"), needs_data=False),
}
from benchmarks.release_kinds import KINDS as RELEASE_KINDS  # noqa: E402  (uses the helpers above)

KINDS.update(RELEASE_KINDS)


# ------------------------------------------------------------------ plumbing
def plain(value: Any) -> Any:
    """An OmegaConf node as plain Python (lists, dicts), anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _result_dir(cfg: DictConfig, methods: list[Method], fingerprint: dict[str, Any]) -> Path:
    label = method_label(cfg, methods)
    return Path(cfg.results_dir) / cfg.model.name / cfg.benchmark.name / f"{label}-{fingerprint_hash(fingerprint)[:12]}"


def _finish(cfg: DictConfig, out_dir: Path, label: str, fingerprint: dict[str, Any], metrics: dict[str, Any],
            complete: bool, units: UnitTable | None = None) -> dict[str, Any]:
    """Write result.json (metrics, their bootstrap intervals over `units` when given, the fingerprint)."""
    block = interval_block(units, metrics, bootstrap_settings(cfg)) if units is not None else {}
    result = {
        "model": cfg.model.name, "benchmark": cfg.benchmark.name, "kind": cfg.benchmark.kind,
        "method": label, "metrics": plain_json(metrics), **{k: v for k, v in block.items() if k != "units"},
        "complete": complete, "limit": cfg.get("limit"), "result_dir": str(out_dir), "fingerprint": fingerprint,
        **({"units": block["units"]} if block else {}),  # last: the per-unit counts the summary pairs with greedy's
    }
    content = json.dumps(result, indent=2, default=str)
    atomic_write_text(out_dir / "result.json", content)
    if HydraConfig.initialized():
        atomic_write_text(Path(HydraConfig.get().runtime.output_dir) / "result.json", content)
    return result


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` inside (None: left alone), restored after. The toy's matmuls are tiny:
    one thread beats two, and by far on a busy CPU."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one model x method x benchmark and return its result (metrics and fingerprint).

    Every setting is checked, and the data the config names is read, before the model is loaded.
    """
    checked = check_settings(cfg)
    kind = KINDS[cfg.benchmark.kind]
    task = None
    if checked.own_data or checked.data is not None:
        task = kind.prepare(cfg, checked.options, checked.data)
    with torch_threads(cfg.get("threads")):
        loaded: LoadedModel = instantiate(cfg.model.loader)
        if task is None:
            task = kind.prepare(cfg, checked.options, model_data(cfg, loaded, kind.files, kind.needs_data))
        result = kind.run(cfg, loaded, checked.methods, task, Shard.current())
    if result:
        log.info("%s / %s / %s: %s", cfg.model.name, cfg.benchmark.name, result["method"],
                 json.dumps(result["metrics"], default=str))
    return result


def objective(result: dict[str, Any] | None) -> float | None:
    """The number a sweeper optimises: CHAIR_i, POPE / AMBER F1, MME total, HallusionBench qAcc or the speed
    ratio."""
    metrics = result.get("metrics", {}) if result else {}
    value = next((metrics[k] for k in ("CHAIRi", "f1", "total", "qAcc", "ratio_to_greedy")
                  if isinstance(metrics.get(k), (int, float))), None)
    return float(value) if isinstance(value, (int, float)) else None


def summarised_multirun() -> bool:
    """Whether this job runs in a multirun whose summary callback lists failed jobs (then a failure is
    recorded and the sweep goes on; the callback makes the multirun fail at its end)."""
    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    callbacks = hydra_cfg.callbacks or {}
    return hydra_cfg.mode == RunMode.MULTIRUN and any(
        node.get("_target_") == SUMMARY_CALLBACK for node in callbacks.values())


CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    log.debug(OmegaConf.to_yaml(cfg))
    if not summarised_multirun():
        return objective(run(cfg))
    try:
        return objective(run(cfg))
    except Exception as err:
        log.error("This job failed; the sweep goes on, lists it in summary.md and exits with an error.",
                  exc_info=True)
        hydra_cfg = HydraConfig.get()
        write_failure(Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.num, list(hydra_cfg.overrides.task), err)
        return None
