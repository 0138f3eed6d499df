"""The Hydra benchmark app: configs compose and instantiate; generation resumes exactly; a small
multirun on the fast toy build writes the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_method
from omegaconf import OmegaConf

from benchmarks.app import CONFIG_DIR, build_methods, check_settings
from benchmarks.generation import Item, generate_predictions, read_predictions
from vlmfix.decoding.method import Method
from vlmfix.testing import random_image

from .conftest import tiny_model

CONF = Path(CONFIG_DIR)
REPO = CONF.parent


def group(name: str) -> list[str]:
    return sorted(p.stem for p in (CONF / name).glob("*.yaml") if not p.stem.startswith("_"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("method", group("method"))
def test_method_configs_instantiate(method):
    cfg = composed(f"method={method}")
    methods = build_methods(cfg)
    assert all(isinstance(m, Method) for m in methods)
    assert (len(methods) == 0) == (method in ("greedy", "greedy_penalty"))
    if methods:
        assert methods[0].name == method, "the config file is named after the registry name of its method"


@pytest.mark.parametrize("benchmark", group("benchmark"))
@pytest.mark.parametrize("model", group("model"))
def test_model_and_benchmark_configs_compose(model, benchmark):
    cfg = composed(f"model={model}", f"benchmark={benchmark}")
    assert cfg.benchmark.kind in ("chair", "pope", "speed", "amber", "mme", "hallusion")
    assert callable(get_method(cfg.model.loader._target_))
    if cfg.benchmark.kind != "speed":
        assert int(cfg.benchmark.max_new_tokens) > 0  # interpolations resolve
    if model not in ("toy", "toy_fast"):
        assert cfg.model.loader.local_files_only and not cfg.model.loader.trust_remote_code


def test_each_checkpoint_preset_names_its_own_checkpoint_and_variable():
    """Two presets for one hub id would load the same model class under two names (DeepSeek-VL 7B is the hybrid;
    the plain DeepSeek-VL preset is the 1.3B checkpoint)."""
    presets = [composed(f"model={name}").model for name in group("model") if name not in ("toy", "toy_fast")]
    hub_ids = [preset.hub_id for preset in presets if not OmegaConf.is_missing(preset, "hub_id")]  # Granite 4: none
    variables = [preset.path_env for preset in presets]
    assert len(set(hub_ids)) == len(hub_ids) and len(set(variables)) == len(variables)


RELEASE_VARIABLES = ("VLMFIX_AMBER", "VLMFIX_MME", "VLMFIX_HALLUSIONBENCH", "VLMFIX_POPE")


@pytest.mark.parametrize("benchmark", group("benchmark"))
def test_default_settings_pass_the_checks_without_loading(benchmark, tmp_path, monkeypatch):
    for variable in RELEASE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    cfg = composed("model=toy_fast", f"benchmark={benchmark}", f"results_dir={tmp_path}")
    if cfg.benchmark.kind == "pope" and cfg.benchmark.get("data") is not None:  # released files, no toy miniature
        with pytest.raises(FileNotFoundError, match=r"the environment variable VLMFIX_POPE is not set"):
            check_settings(cfg)
        return
    checked = check_settings(cfg)
    assert checked.data is None  # the toy ships its data (and miniatures of the release benchmarks): read once
    assert checked.methods == []  # the model is loaded


def test_pope_data_named_file_by_file_needs_no_root(tmp_path):
    """POPE reads no captions: its instances file and image folder are enough, without data.root."""
    (tmp_path / "images").mkdir()
    (tmp_path / "instances.json").write_text("{}", encoding="utf-8")
    checked = check_settings(composed("model=toy_fast", "benchmark=pope", f"results_dir={tmp_path / 'results'}",
                                      f"data.instances={tmp_path / 'instances.json'}",
                                      f"data.images={tmp_path / 'images'}"))
    assert checked.data is not None
    assert (checked.data.instances, checked.data.captions) == (tmp_path / "instances.json", None)


PUBLISHED_SINK_DIMS = {"llava-1.5-7b": [1415, 2533], "llava-1.5-13b": [2100, 4743], "qwen2-vl-7b": [458, 2570]}


@pytest.mark.parametrize("model", group("model"))
def test_var_reads_its_sink_dimensions_from_the_model_preset(model):
    cfg = composed(f"model={model}", "method=var")
    dims = PUBLISHED_SINK_DIMS.get(model)  # none published for the other presets (the toys: not measured yet)
    assert "var_sink_dims" in cfg.model and "var_tau" in cfg.model
    assert (cfg.model.var_sink_dims, cfg.model.var_tau) == (dims, 20.0)
    assert (cfg.method.sink_dims, cfg.method.tau) == (dims, 20.0)
    if dims is not None:
        [var] = build_methods(cfg)  # instantiating VAR loads no model
        assert var.sink_dims == tuple(dims) and var.tau == 20.0


def test_var_settings_follow_model_overrides_and_yield_to_method_overrides():
    cfg = composed("model=llava-1.5-7b", "method=var", "model.var_tau=5.0")
    assert (list(cfg.method.sink_dims), cfg.method.tau) == ([1415, 2533], 5.0)
    cfg = composed("model=llava-1.5-7b", "method=var", "method.sink_dims=[7]", "method.tau=3.0")
    assert (list(cfg.method.sink_dims), cfg.method.tau) == ([7], 3.0)


def test_default_sweep_covers_every_method_the_toy_can_run(capsys):
    from benchmarks.__main__ import toy_has_sink_dims

    cfg = composed("experiment=toy_sweep")
    swept = set(cfg.hydra.sweeper.params.method.split(","))
    assert swept == set(group("method")) - {"var"}  # VAR refuses the toy: it has no sink dimensions
    assert composed("model=toy", "method=var").method.sink_dims is None
    assert not toy_has_sink_dims() and "VAR left out of the default sweep" in capsys.readouterr().out
    benchmarks = cfg.hydra.sweeper.params.benchmark.split(",")
    assert set(benchmarks) == {"chair", "pope_random", "pope_popular", "pope_adversarial", "amber",
                               "mme_hallucination", "hallusionbench"}  # the toy miniatures of issue 16 included
    limits = {b: composed("experiment=toy_sweep", f"benchmark={b}").limit for b in benchmarks}
    assert limits == {"chair": 60, "pope_random": 30, "pope_popular": 30, "pope_adversarial": 30, "amber": 10,
                      "mme_hallucination": 15, "hallusionbench": 36}  # per kind, from sweep_limits
    assert cfg.threads == 1 and cfg.batch_size == 32


def test_slurm_launcher_preset_composes():
    cfg = composed("hydra/launcher=slurm")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_unknown_method_target_fails_before_loading():
    cfg = composed("method=greedy", "+extra_methods=[{_target_: vlmfix.NoSuchMethod}]")
    with pytest.raises(Exception, match="NoSuchMethod"):
        build_methods(cfg)


def test_killed_run_resumes_with_identical_predictions(tmp_path):
    tiny = tiny_model("llava")
    images = []
    for i in range(7):
        path = tmp_path / f"img{i}.png"
        random_image(32 + 8 * (i % 3), i).save(path)
        images.append(path)
    items = [Item(key=100 + i, image_path=p, text="describe this image .") for i, p in enumerate(images)]
    common = dict(model=tiny.model, processor=tiny.processor, methods=[], key_name="image_id", text_name="caption",
                  batch_size=3, max_new_tokens=5, decoding={"do_sample": True, "top_k": 10}, seed=1, progress=False)
    full = generate_predictions(items, out_path=tmp_path / "full.jsonl", **common)
    # a run killed in its second batch: first batch written, one row of the second, then a torn line
    lines = (tmp_path / "full.jsonl").read_text().splitlines()
    (tmp_path / "killed.jsonl").write_text("\n".join(lines[:4]) + '\n{"image_id": 10')
    resumed = generate_predictions(items, out_path=tmp_path / "killed.jsonl", **common)
    assert resumed == full
    assert read_predictions(tmp_path / "killed.jsonl", "image_id", "caption") == full
    assert len(full) == 7


def multirun(tmp_path: Path, sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m benchmarks --multirun model=toy_fast ...` with results under tmp_path; it must succeed."""
    env = {**os.environ, "VLMFIX_RESULTS": str(tmp_path / "results")}
    command = [sys.executable, "-m", "benchmarks", "--multirun", "model=toy_fast", *overrides, "progress=false",
               f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_small_multirun_on_fast_toy_writes_summary(tmp_path):
    sweep = tmp_path / "sweep"
    done = multirun(tmp_path, sweep, "method=greedy,pai", "benchmark=chair,pope_adversarial", "limit=4",
                    "batch_size=4")
    assert (sweep / "summary.md").exists() and (sweep / "summary.csv").exists() and (sweep / "summary.png").exists()
    assert "<tr class=\"item\"" in (sweep / "browse.html").read_text()  # the results browser, of every item
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("model,method") and len(rows) == 3  # header + greedy + pai
    assert "chair CHAIRi" in rows[0] and "pope_adversarial f1" in rows[0]
    assert "| toy_fast | greedy |" in done.stdout
    results = [json.loads(p.read_text()) for p in sweep.glob("*/result.json")]
    assert {r["benchmark"] for r in results} == {"chair", "pope_adversarial"}
    assert all(r["complete"] and r["fingerprint"] for r in results)
    # every metric carries its bootstrap interval over the 4 images; the summary pairs pai with greedy
    for r in results:
        assert r["bootstrap"] == {"method": "percentile", "unit": r["bootstrap"]["unit"], "n_units": 4,
                                  "n_resamples": 1000, "seed": 0, "level": 0.95}
        expected = {"CHAIRs", "Len"} if r["kind"] == "chair" else {"f1", "accuracy"}
        assert expected <= set(r["intervals"])
        assert all(i["low"] <= i["high"] and isinstance(r["metrics"][m], float) for m, i in r["intervals"].items())
    summary = (sweep / "summary.md").read_text()
    paired = summary[summary.index("## Paired difference to greedy"):]
    assert "| toy_fast | pai |" in paired and "| toy_fast | greedy |" not in paired
    assert "chair CHAIRs low" in rows[0] and "pope_adversarial f1 diff to greedy" in rows[0]
    # a rerun finds every prediction done and generates nothing new
    predictions = {p: p.read_text() for p in (tmp_path / "results").rglob("predictions.jsonl")}
    multirun(tmp_path, tmp_path / "s2", "method=greedy", "benchmark=chair", "limit=4", "batch_size=4")
    assert {p: p.read_text() for p in predictions} == predictions



@pytest.mark.slow
def test_speed_multirun_summarises_ratios_and_a_failed_method_fails_its_job(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    multirun(tmp_path, sweep, "method=greedy,pai", "benchmark=speed", "benchmark.new_tokens=3", "benchmark.repeats=1")
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert rows[0] == "model,method,speed ratio,speed wall ratio"
    assert [r.split(",")[1] for r in rows[1:]] == ["greedy", "pai"]
    assert all(float(value) > 0 for r in rows[1:] for value in r.split(",")[2:])

    import benchmarks.speed
    from benchmarks.app import run

    def greedy_only(variants, *args, **kwargs):  # as measure() reports a method that failed its warm-up
        return [benchmarks.speed.SpeedResult("greedy", 0.01, 1.0)]

    monkeypatch.setattr(benchmarks.speed, "measure", greedy_only)
    cfg = composed("model=toy_fast", "method=pai", "benchmark=speed", "benchmark.new_tokens=3",
                   "benchmark.repeats=1", f"results_dir={tmp_path / 'r2'}")
    with pytest.raises(RuntimeError, match="pai failed during its warm-up run"):
        run(cfg)


def test_main_command_retrains_dcd_only_for_missing_or_stale_toy_projectors(tmp_path):
    from benchmarks.__main__ import trained_for_toy
    from vlmfix.adapters import get_adapter
    from vlmfix.methods.dcd import save_projector

    tiny = tiny_model("llava")
    state = get_adapter(tiny.model).projector.state_dict()
    assert not trained_for_toy(tmp_path, "hash-a")  # nothing there
    save_projector(tmp_path / "negative.safetensors", state, tiny.model, "neg", {"toy_settings_hash": "hash-a"})
    assert not trained_for_toy(tmp_path, "hash-a")  # one of two
    save_projector(tmp_path / "positive.safetensors", state, tiny.model, "pos", {"toy_settings_hash": "hash-a"})
    assert trained_for_toy(tmp_path, "hash-a")
    assert not trained_for_toy(tmp_path, "hash-b")  # the toy was rebuilt with other settings
    (tmp_path / "positive.safetensors").write_bytes(b"not a checkpoint")
    assert not trained_for_toy(tmp_path, "hash-a")


def test_toy_dcd_projectors_are_kept_with_the_toy_build_keyed_by_toy_and_training_settings(tmp_path, monkeypatch):
    import benchmarks.__main__ as main_command
    from vlmfix.toy import FULL, default_root
    from vlmfix.toy.build import MARKER, _clear

    monkeypatch.setenv("VLMFIX_CACHE", str(tmp_path))
    directory = main_command.toy_dcd_dir()
    assert directory.parent == default_root(fast=False) / "dcd"
    assert main_command.toy_dcd_dir() == directory  # stable
    monkeypatch.setattr(main_command, "TOY_DCD_RECIPE", [*main_command.TOY_DCD_RECIPE, "epochs=3"])
    assert main_command.toy_dcd_dir() != directory  # other training settings, other projectors
    monkeypatch.setattr(FULL.__class__, "hash", lambda self: "another-toy")
    monkeypatch.setattr(main_command, "TOY_DCD_RECIPE", main_command.TOY_DCD_RECIPE[:-1])
    assert main_command.toy_dcd_dir() != directory  # another toy build, other projectors
    # a rebuild of the toy removes the projectors of the old build with it (they are part of the build's folder)
    root = default_root(fast=False)
    (directory / "positive.safetensors").parent.mkdir(parents=True)
    (directory / "positive.safetensors").write_bytes(b"weights")
    (root / MARKER).write_text("{}")
    _clear(root)
    assert not (root / "dcd").exists() and not (root / MARKER).exists()


def test_dola_config_runs_at_the_papers_repetition_penalty_and_greedy_penalty_matches_it():
    from benchmarks.app import decoding_of

    for method, penalty in (("dola", 1.2), ("greedy_penalty", 1.2), ("greedy", 1.0), ("vcd", 1.0)):
        fingerprint, kwargs = decoding_of(composed(f"method={method}"), 8)
        assert kwargs["repetition_penalty"] == fingerprint.repetition_penalty == penalty, method
    fingerprint, kwargs = decoding_of(composed("method=dola", "decoding.repetition_penalty=1.0"), 8)
    assert kwargs["repetition_penalty"] == fingerprint.repetition_penalty == 1.0  # the override wins


def test_summary_states_the_limit_of_each_benchmark(tmp_path):
    from benchmarks.summary import limits_note, write_summary

    def result(job, benchmark, limit):
        record = {"model": "toy", "method": "greedy", "kind": "pope", "benchmark": benchmark, "limit": limit,
                  "metrics": {"f1": 0.5}, "fingerprint": {"method": {"name": "greedy", "params": {}}}}
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "result.json").write_text(json.dumps(record))
        return record

    results = [result(0, "pope_random", 60), result(1, "amber", 20), result(2, "hallusionbench", None)]
    assert limits_note(results) == ("limit (images per benchmark; HallusionBench: figure sets): pope_random 60; "
                                    "amber 20; hallusionbench all\n")
    assert limits_note([{k: v for k, v in r.items() if k != "limit"} for r in results]) == ""  # older results
    assert limits_note(results) in (write_summary(tmp_path) or "")


def test_summary_keeps_one_row_per_swept_method_setting():
    from benchmarks.summary import table

    def result(method, kind, benchmark, metrics, **params):
        return {"model": "toy", "method": method, "kind": kind, "benchmark": benchmark, "metrics": metrics,
                "fingerprint": {"method": {"name": method, "params": {method: params}},
                                "decoding": {"mode": "greedy", "max_new_tokens": 48 if kind == "chair" else 8}}}

    results = [
        result("dcd", "chair", "chair", {"CHAIRi": 0.1}, alpha=1.0, apc_beta=0.1),
        result("dcd", "pope", "pope_random", {"f1": 0.8}, alpha=1.0, apc_beta=0.1),
        result("dcd", "chair", "chair", {"CHAIRi": 0.2}, alpha=2.0, apc_beta=0.1),
        result("greedy", "chair", "chair", {"CHAIRi": 0.3}),
    ]
    speed = {"model": "toy", "method": "greedy", "kind": "speed", "benchmark": "speed",
             "metrics": {"ratio_to_greedy": 1.0}, "fingerprint": {"method": {"name": "greedy", "params": {}}}}
    header, body = table([*results, speed])  # speed runs record no decoding block
    assert [row[1] for row in body] == ["dcd (alpha=1.0)", "dcd (alpha=2.0)", "greedy"]
    assert body[2][header.index("speed ratio")] == 1.0
    chair_i, f1 = header.index("chair CHAIRi"), header.index("pope_random f1")
    assert (body[0][chair_i], body[0][f1]) == (0.1, 0.8)  # a setting's benchmarks share one row
    assert (body[1][chair_i], body[1][f1]) == (0.2, None)
    # a setting that follows from one already shown is left out; an independent one stays
    runs = [result("dcd", "chair", "chair", {"CHAIRi": 0.1}, checkpoints=c, negative=f"{c}/negative", alpha=a)
            for c in ("x", "y") for a in (1.0, 2.0)]
    assert [row[1] for row in table(runs)[1]] == [
        "dcd (alpha=1.0, checkpoints=x)", "dcd (alpha=2.0, checkpoints=x)",
        "dcd (alpha=1.0, checkpoints=y)", "dcd (alpha=2.0, checkpoints=y)"]


def test_a_preset_batch_cap_sets_the_batch_predictions_run_at():
    """MiniMax M3 refuses padded batches: its preset caps `batch_size` at 1; other presets keep the run's."""
    from benchmarks.app import batch_size_of, check_model

    assert batch_size_of(composed("model=minimax-m3", "batch_size=16")) == 1
    assert batch_size_of(composed("model=llava-1.5-7b", "batch_size=16")) == 16
    assert batch_size_of(composed("model=llava-1.5-7b", "batch_size=3", "model.max_batch_size=8")) == 3
    assert batch_size_of(composed("model=toy", "batch_size=5")) == 5
    with pytest.raises(ValueError, match=r"model\.max_batch_size"):
        check_model(composed("model=llava-1.5-7b", "model.max_batch_size=0").model)
