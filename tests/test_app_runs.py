"""The benchmark app end to end on the tiny LLaVA and a few toy scenes: every bad setting fails before the model
loads, with an error naming the setting and the fix; a run resumed with another batch size does not mix its
predictions into the old ones; a hand-edited predictions file is refused, naming the line; a multirun with a
failed job still writes the summary of the others, lists the failed job and fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from benchmarks.app import CONFIG_DIR, check_settings, run
from benchmarks.generation import read_predictions
from benchmarks.models import LoadedModel, load_pretrained
from benchmarks.summary import FailedJobsError, SummaryCallback, write_failure, write_summary

from .conftest import tiny_model

REPO = Path(CONFIG_DIR).parent
LOADS: list[dict[str, Any]] = []
TINY_LOADER = f"model.loader._target_={__name__}.load_tiny"
TOY_LOADER = "model.loader._target_=benchmarks.models.load_toy"  # the real one: these cases never reach it


def load_tiny(**settings: Any) -> LoadedModel:
    """A model loader for these tests: the tiny LLaVA (same weights every call); each call is recorded."""
    LOADS.append(settings)
    tiny = tiny_model("llava")
    return LoadedModel(tiny.model, tiny.processor, source="tiny-llava", revision="test")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sixteen toy scenes in COCO format (annotations/{instances,captions}_val.json, images/val/)."""
    from vlmfix.toy.dataset import generate_split, write_split

    root = tmp_path_factory.mktemp("toy_data")
    write_split(root, "val", generate_split("val", 16, 1, seed=0, image_size=112, pair_keep=0.98, broken_share=0.5))
    return root


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny_run_config(toy_data: Path, tmp_path: Path, *overrides: str):
    """A quick CHAIR run on the tiny model: 4 images, 3 new tokens, results under tmp_path."""
    return composed("model=toy_fast", TINY_LOADER, f"data.root={toy_data}", f"results_dir={tmp_path / 'results'}",
                    "limit=4", "model.chair_max_new_tokens=3", "model.pope_max_new_tokens=2", "progress=false",
                    *overrides)


# ------------------------------------------------------------------ bad settings fail before loading
BAD_SETTINGS = [
    (["benchmark=pope_random", "benchmark.parser=offical"],
     ValueError, r"`benchmark\.parser` must be one of .*'official'.*got 'offical'; .*set benchmark\.parser="),
    (["benchmark=pope_random", "benchmark.split=randm"],
     ValueError, r"`benchmark\.split` must be one of 'random', 'popular', 'adversarial', got 'randm'"),
    (["benchmark.normalizer=nltk"], ValueError, r"`benchmark\.normalizer` must be one of 'opera_nltk', 'simple'"),
    (["benchmark.quirks=fix"], ValueError, r"`benchmark\.quirks` must be one of 'reference', 'fixed', got 'fix'"),
    (["benchmark.images.mode=all"], ValueError, r"`benchmark\.images\.mode` must be one of 'sample', 'list'"),
    (["benchmark.images.mode=list"],
     ValueError, r"`benchmark\.images\.list` must name a file of image ids .*set benchmark\.images\.list=<file>"),
    (["benchmark.images.mode=list", "benchmark.images.list=/nonexistent/ids.json"],
     FileNotFoundError, r"`benchmark\.images\.list` '/nonexistent/ids\.json' does not exist"),
    (["benchmark.images.list=/nonexistent/ids.json"],
     ValueError, r"benchmark\.images\.mode=sample ignores it; set benchmark\.images\.mode=list"),
    (["limit=abc"],
     ValueError, r"`limit` must be None or an int >= 1, got 'abc' \(a str\);.*set limit=<int> or limit=null"),
    (["limit=0"], ValueError, r"`limit` must be None or an int >= 1, got 0"),
    (["batch_size=0"], ValueError, r"`batch_size` must be an int >= 1, got 0;.*set batch_size=<int>"),
    (["batch_size=2.5"], ValueError, r"`batch_size` must be an int >= 1, got 2\.5 \(a float\)"),
    (["seed=-1"], ValueError, r"`seed` must be an int >= 0, got -1"),
    (["decoding.top_p=1.5"], ValueError, r"`decoding\.top_p` must be a finite number in \(0, 1\], got 1\.5"),
    (["decoding.do_sample=yes"], ValueError, r"`decoding\.do_sample` must be True or False, got 'yes'"),
    (["+decoding.min_p=0.1"], ValueError, r"`decoding\.min_p` is not a decoding setting of the app"),
    (["decoding.top_k=-1"], ValueError, r"`decoding\.top_k` must be None or an int >= 0, got -1;.*top_k=null"),
    (["decoding.top_k=2.5"], ValueError, r"`decoding\.top_k` must be None or an int >= 0, got 2\.5"),
    (["decoding.repetition_penalty=0"], ValueError, r"`decoding\.repetition_penalty` must be a finite number > 0, "
     r"got 0;.*set decoding\.repetition_penalty=<float>"),
    (["threads=0"], ValueError, r"`threads` must be None or an int >= 1, got 0;.*set threads=<int> or threads=null"),
    (["model.chair_max_new_tokens=0"], ValueError, r"`benchmark\.max_new_tokens` must be an int >= 1, got 0"),
    (["model.var_sink_dims=[-3]"], ValueError, r"`model\.var_sink_dims\[0\]` must be an int >= 0, got -3"),
    ([TOY_LOADER, "model.loader.fast=maybe"], ValueError, r"`model\.loader\.fast` must be True or False, got 'maybe'"),
    ([TOY_LOADER, "+model.loader.colour=red"], ValueError, r"model\.loader does not fit benchmarks\.models\.load_toy: "
     r"got an unexpected keyword argument 'colour'"),
    (["model.loader._target_=benchmarks.models.no_such_loader"],
     ValueError, r"`model\.loader\._target_` 'benchmarks\.models\.no_such_loader' cannot be imported"),
    (["benchmark=pope_random", "benchmark.questions=/nonexistent/q.jsonl", "limit=null"],
     FileNotFoundError, r"`benchmark\.questions` '/nonexistent/q\.jsonl' does not exist"),
    (["benchmark=pope_random", "benchmark.questions=/nonexistent/q.jsonl"],
     ValueError, r"`limit` caps the images of built question files, but benchmark\.questions is set"),
    (["method=vhr", 'method.alpha="2"'], ValueError, r"^`alpha` must be .*got '2'"),
    (["method=vhr", "+method.alfa=2"], TypeError, r"^VHR\.__init__\(\) got an unexpected keyword argument 'alfa'"),
    (["+extra_methods=[{_target_: vlmfix.NoSuchMethod}]"],
     ValueError, r"`extra_methods\[0\]\._target_` 'vlmfix\.NoSuchMethod' cannot be imported.*methods: .*vhr"),
    (["benchmark=speed", "benchmark.repeats=0"], ValueError, r"`benchmark\.repeats` must be an int >= 1, got 0"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_SETTINGS,
                         ids=[" ".join(case[0]) for case in BAD_SETTINGS])
def test_bad_setting_fails_before_the_model_loads(toy_data, tmp_path, overrides, error, message):
    cfg = tiny_run_config(toy_data, tmp_path, *overrides)
    LOADS.clear()
    with pytest.raises(error, match=message) as raised:
        run(cfg)
    assert LOADS == [], "the model was loaded before the bad setting was found"
    assert "Error in call to target" not in str(raised.value)  # a method's own message, not Hydra's wrapper


def test_missing_coco_names_its_variable_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFIX_COCO", str(tmp_path / "no_coco_here"))
    cfg = composed("data=coco2014", TINY_LOADER, f"results_dir={tmp_path}")
    LOADS.clear()
    with pytest.raises(FileNotFoundError, match=r"`data\.instances` .*no_coco_here/annotations/instances_val2014"
                       r"\.json' does not exist; VLMFIX_COCO='.*no_coco_here' does not hold it"):
        run(cfg)
    monkeypatch.delenv("VLMFIX_COCO")
    with pytest.raises(FileNotFoundError, match=r"VLMFIX_COCO is not set, so data\.root fell back to '/data/coco': "
                       r"set VLMFIX_COCO=<the dataset directory> or data\.root=<dir>"):
        run(composed("data=coco2014", TINY_LOADER, f"results_dir={tmp_path}"))
    assert LOADS == []


def test_a_pretrained_preset_without_a_checkpoint_fails_before_loading(toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFIX_LLAVA15_7B", str(tmp_path / "no_model_here"))
    cfg = composed("model=llava-1.5-7b", f"data.root={toy_data}", f"results_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"`model\.loader\.path` '.*no_model_here' is neither a checkpoint "
                       r"directory nor a model in the local hub cache.* reads it from the environment variable "
                       r"VLMFIX_LLAVA15_7B, now '.*no_model_here'"):
        run(cfg)
    with pytest.raises(ValueError, match=r"Model 'llava-1\.5-7b' ships no data: choose a dataset, e\.g\. data=coco"):
        run(composed("model=llava-1.5-7b", "model.loader.local_files_only=false", f"results_dir={tmp_path}"))
    with pytest.raises(ValueError, match=r"`model\.loader\.torch_dtype` must be one of 'float32', 'float16', "
                       r"'bfloat16', got 'bf16'"):
        run(composed("model=llava-1.5-7b", "model.loader.torch_dtype=bf16", f"data.root={toy_data}",
                     f"results_dir={tmp_path}"))


def test_load_pretrained_refuses_a_missing_path_and_loads_a_saved_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`model\.loader\.path` '/nonexistent/model' is neither a checkpoint "
                       r"directory nor a model in the local hub cache .*nothing is downloaded"):
        load_pretrained("/nonexistent/model")
    with pytest.raises(FileNotFoundError, match=r"holds no config\.json; point it at a checkpoint directory"):
        load_pretrained(str(tmp_path))
    tiny = tiny_model("llava")
    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.processor.save_pretrained(tmp_path / "tiny")
    loaded = load_pretrained(str(tmp_path / "tiny"), torch_dtype="float32", device="cpu")
    assert type(loaded.model) is type(tiny.model) and loaded.processor.tokenizer.padding_side == "left"


def test_a_whole_omni_checkpoint_loads_its_thinker_with_the_named_class(tmp_path, monkeypatch):
    """Qwen2.5-Omni's checkpoint is the whole model (config model_type qwen2_5_omni, weights under `thinker.`):
    AutoModelForImageTextToText refuses it, naming the setting; model_class loads the thinker with its weights."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    import benchmarks.models

    thinker = tiny_model("qwen2_5_omni_thinker")
    whole = Qwen2_5OmniForConditionalGeneration(
        Qwen2_5OmniConfig(thinker_config=thinker.model.config.to_dict(), enable_audio_output=False))
    whole.thinker.load_state_dict(thinker.model.state_dict())
    whole.save_pretrained(tmp_path / "omni")
    # the tiny processor drops the video processor (torchvision), so AutoProcessor cannot rebuild it here
    monkeypatch.setattr(benchmarks.models.AutoProcessor, "from_pretrained", lambda *a, **k: thinker.processor)
    assert json.loads((tmp_path / "omni" / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    with pytest.raises(ValueError, match=r"AutoModelForImageTextToText does not load .* Set "
                       r"model\.loader\.model_class .*Qwen2_5OmniThinkerForConditionalGeneration"):
        load_pretrained(str(tmp_path / "omni"), torch_dtype="float32", device="cpu")
    with pytest.raises(ValueError, match=r"`model\.loader\.model_class` 'AutoTokenizer' is not a transformers "
                       r"model class"):
        load_pretrained(str(tmp_path / "omni"), model_class="AutoTokenizer")
    loaded = load_pretrained(str(tmp_path / "omni"), torch_dtype="float32", device="cpu",
                             model_class="Qwen2_5OmniThinkerForConditionalGeneration")
    assert type(loaded.model) is type(thinker.model)
    expected, got = thinker.model.state_dict(), loaded.model.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    frames = thinker.tokenizer.convert_tokens_to_ids(["<|vision_bos|>", "<|vision_eos|>"])  # M-RoPE reads the start
    assert [loaded.model.config.vision_start_token_id, loaded.model.config.vision_end_token_id] == frames
    preset = composed("model=qwen2.5-omni-7b").model.loader
    assert preset.model_class == "Qwen2_5OmniThinkerForConditionalGeneration"


def test_a_hub_revision_is_checked_in_the_local_cache_and_named_when_missing():
    """ERNIE 4.5 VL's transformers-format checkpoint is a pull request of its hub repository (refs/pr/11), whose main
    branch is the remote-code one: the preset names the revision, and a cache without it fails naming it."""
    preset = composed("model=ernie-4.5-vl-28b-a3b").model.loader
    assert (preset.revision, preset.path) == ("refs/pr/11", "baidu/ERNIE-4.5-VL-28B-A3B-PT")
    with pytest.raises(FileNotFoundError, match=r"'baidu/ERNIE-4\.5-VL-28B-A3B-PT' is neither a checkpoint directory "
                       r"nor a model in the local hub cache at revision 'refs/pr/11'"):
        load_pretrained("baidu/ERNIE-4.5-VL-28B-A3B-PT", revision="refs/pr/11")
    with pytest.raises(ValueError, match=r"`model\.loader\.revision`"):
        load_pretrained("baidu/ERNIE-4.5-VL-28B-A3B-PT", revision="")


def test_an_image_list_with_ids_not_in_the_data_fails_before_loading(toy_data, tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text("[1, 2, 999999]")
    cfg = tiny_run_config(toy_data, tmp_path, "benchmark.images.mode=list", f"benchmark.images.list={ids}")
    LOADS.clear()
    missing = r"`benchmark\.images\.list` \(.*ids\.json\): 1 of its 3 image ids are not in data\.instances .*\[999999\]"
    with pytest.raises(ValueError, match=missing):
        run(cfg)
    ids.write_text("[1, 2, 2]")
    with pytest.raises(ValueError, match=r"`benchmark\.images\.list`: image ids \[2\] appear more than once"):
        run(cfg)
    assert LOADS == []


def test_missing_image_files_fail_before_loading(toy_data, tmp_path):
    cfg = tiny_run_config(toy_data, tmp_path, f"data.images={tmp_path}")
    LOADS.clear()
    with pytest.raises(FileNotFoundError, match=r"4 image file\(s\) of this run are missing under `data\.images`"):
        run(cfg)
    assert LOADS == []


# ------------------------------------------------------------------ runs
def test_decoding_top_k_reaches_generate_and_the_fingerprint(toy_data, tmp_path):
    """decoding.top_k is passed to generate when sampling: top_k=1 keeps only the argmax, so a sampled run gives
    the greedy captions; unset, sampling draws from the whole distribution (transformers' default cut) and the
    fingerprint has no top_k key (hashes of earlier runs hold)."""
    def captions(result):
        return {row["image_id"]: row["caption"] for row in map(json.loads, (Path(result["result_dir"]) /
                                                                          "predictions.jsonl").open())}

    greedy = run(tiny_run_config(toy_data, tmp_path))
    argmax = run(tiny_run_config(toy_data, tmp_path, "decoding.do_sample=true", "decoding.top_k=1", "seed=3"))
    sampled = run(tiny_run_config(toy_data, tmp_path, "decoding.do_sample=true", "seed=3"))
    assert argmax["fingerprint"]["decoding"]["top_k"] == 1 and argmax["fingerprint"]["decoding"]["mode"] == "sample"
    assert captions(argmax) == captions(greedy)
    assert "top_k" not in sampled["fingerprint"]["decoding"] and "top_k" not in greedy["fingerprint"]["decoding"]
    assert captions(sampled) != captions(greedy)  # the random-weight model's full distribution is not its argmax
    assert len({greedy["result_dir"], argmax["result_dir"], sampled["result_dir"]}) == 3


def test_built_pope_questions_take_the_default_head_and_refuse_older_pins(toy_data, tmp_path):
    """The toy's POPE is built from its annotations (as RUCAIBox/POPE HEAD builds files): the default version
    `head` and null fit it; a pinned older release cannot be built, so it is refused before loading."""
    cfg = tiny_run_config(toy_data, tmp_path, "benchmark=pope_random")
    assert cfg.benchmark.version == "head" and check_settings(cfg).options.question_file is None
    assert check_settings(tiny_run_config(toy_data, tmp_path, "benchmark=pope_random",
                                          "benchmark.version=null")).options.question_file is None
    for version in ("e3e3926", "edebdda", "9b54106"):
        with pytest.raises(ValueError, match=rf"`benchmark\.version` \('{version}'\) pins a released question file, "
                                             r"but none is given.*benchmark\.version=head \(the default\) or null"):
            check_settings(tiny_run_config(toy_data, tmp_path, "benchmark=pope_random", f"benchmark.version={version}"))
    with pytest.raises(ValueError, match=r"`benchmark\.version` must be one of .*'head'.*got 'HEAD'"):
        check_settings(tiny_run_config(toy_data, tmp_path, "benchmark=pope_random", "benchmark.version=HEAD"))


def test_decoding_of_passes_top_k_zero_and_only_when_sampling():
    from benchmarks.app import decoding_of

    fingerprint, kwargs = decoding_of(composed("decoding.do_sample=true", "decoding.top_k=0"), 8)
    assert kwargs["top_k"] == 0 and fingerprint.top_k == 0  # 0 (no cut) is a value, not "unset"
    fingerprint, kwargs = decoding_of(composed("decoding.do_sample=true"), 8)
    assert "top_k" not in kwargs and fingerprint.top_k is None
    fingerprint, kwargs = decoding_of(composed("decoding.top_k=0"), 8)  # greedy: like temperature, not passed
    assert "top_k" not in kwargs and fingerprint.top_k is None and fingerprint.mode == "greedy"


def test_resume_with_another_batch_size_does_not_mix_predictions(toy_data, tmp_path):
    """Sampling draws one generator per batch, so batch 2 and batch 3 give different predictions for the same
    item: the batch size keys the result directory, and each directory holds one batch size's predictions."""
    sampling = ("decoding.do_sample=true", "decoding.top_p=0.9")
    first = run(tiny_run_config(toy_data, tmp_path, "batch_size=2", *sampling))
    first_predictions = (Path(first["result_dir"]) / "predictions.jsonl").read_text()
    other = run(tiny_run_config(toy_data, tmp_path, "batch_size=3", *sampling))
    assert other["result_dir"] != first["result_dir"]
    assert (first["fingerprint"]["execution"]["batch_size"], other["fingerprint"]["execution"]["batch_size"]) == (2, 3)
    assert (Path(first["result_dir"]) / "predictions.jsonl").read_text() == first_predictions  # untouched
    assert len((Path(other["result_dir"]) / "predictions.jsonl").read_text().splitlines()) == 4  # all its own
    # the same batch size resumes into the first directory (here: nothing left to generate)
    again = run(tiny_run_config(toy_data, tmp_path, "batch_size=2", *sampling))
    assert again["result_dir"] == first["result_dir"] and again["metrics"] == first["metrics"]
    assert first["fingerprint"]["execution"] == {"batch_size": 2, "dtype": "float32", "attn_implementation": "sdpa",
                                                 "device": "cpu", "threads": None}
    threads = torch.get_num_threads()
    one_thread = run(tiny_run_config(toy_data, tmp_path, "batch_size=2", "threads=1", *sampling))
    assert one_thread["fingerprint"]["execution"]["threads"] == 1 and one_thread["result_dir"] != first["result_dir"]
    assert torch.get_num_threads() == threads  # restored after the run


def test_hand_edited_predictions_file_is_refused_naming_its_line(toy_data, tmp_path):
    cfg = tiny_run_config(toy_data, tmp_path, "benchmark=pope_random")
    result = run(cfg)
    path = Path(result["result_dir"]) / "predictions.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["text"]
    path.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=rf"predictions file '{path}', line 2: no 'text' field .*fix or delete that "
                       r"line \(a deleted row is generated again on the next run\)"):
        run(cfg)
    path.write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # deleting the line is the fix
    assert run(cfg)["complete"]


@pytest.mark.parametrize(("content", "message"), [
    ('{"image_id": 1, "caption": "a"}\n{"caption": "b"}\n', r"line 2: no 'image_id' field"),
    ('{"image_id": "1", "caption": "a"}\n', r"line 1: 'image_id' must be an int, got '1'"),
    ('{"image_id": 1, "caption": null}\n', r"line 1: 'caption' must be a string, got None"),
    ('{"image_id": 1, "caption": "a"}\nnot json\n{"image_id": 2, "caption": "b"}\n', r"line 2: not JSON"),
    ('[1, "a"]\n', r"line 1: not a JSON object"),
    ('{"image_id": 1, "caption": "a"}\n{"image_id": 1, "caption": "b"}\n', r"line 2: image_id 1 appears a second time"),
])
def test_read_predictions_refuses_malformed_rows(tmp_path, content, message):
    path = tmp_path / "predictions.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"predictions file '{path}', {message}"):
        read_predictions(path, "image_id", "caption")


def test_read_predictions_ignores_only_a_torn_last_line_and_blank_lines(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"image_id": 1, "caption": "a"}\n\n{"image_id": 2, "caption": "b"}\n{"image_id": 3, "capt')
    assert read_predictions(path, "image_id", "caption") == {1: {"image_id": 1, "caption": "a"},
                                                             2: {"image_id": 2, "caption": "b"}}


# ------------------------------------------------------------------ multirun with a failed job
def test_summary_lists_failed_jobs_and_fails_the_multirun(tmp_path, capsys):
    job = tmp_path / "0"
    job.mkdir()
    (job / "result.json").write_text(json.dumps({
        "model": "toy", "method": "greedy", "kind": "pope", "benchmark": "pope_random",
        "metrics": {"f1": 0.5, "accuracy": 0.5, "yes_ratio": 0.5}, "fingerprint": {}}))
    (tmp_path / "1").mkdir()
    try:
        raise ValueError("`limit` must be None or an int >= 1, got 'abc' (a str).\nsecond line")
    except ValueError as err:
        write_failure(tmp_path / "1", 1, ["method=vhr", "limit=abc"], err)
    text = write_summary(tmp_path)
    assert "| toy | greedy | 0.500 | 0.500 | 0.500 |" in text
    assert text.endswith("## Failed jobs\n\n- job 1 (`method=vhr limit=abc`): ValueError: `limit` must be None or "
                         "an int >= 1, got 'abc' (a str).\n")
    assert (tmp_path / "summary.md").read_text() == text and (tmp_path / "summary.csv").exists()
    config = compose_sweep_config(tmp_path)
    with pytest.raises(FailedJobsError, match=r"1 of 2 jobs failed \(see .*summary\.md\): job 1: ValueError: `limit`"):
        SummaryCallback().on_multirun_end(config)
    assert "## Failed jobs" in capsys.readouterr().out  # printed with the table


def compose_sweep_config(sweep_dir: Path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"hydra.sweep.dir={sweep_dir}"], return_hydra_config=True)


def test_multirun_with_a_failed_job_summarises_the_others_and_fails(toy_data, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "VLMFIX_RESULTS": str(tmp_path / "results"), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "benchmarks", "--multirun", "model=toy_fast", TINY_LOADER, f"data.root={toy_data}",
               "benchmark=chair", "model.chair_max_new_tokens=3", "limit=2,abc", "progress=false",
               f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode != 0, "a multirun with a failed job must fail"
    assert "1 of 2 jobs failed" in done.stderr
    summary = (sweep / "summary.md").read_text()
    assert "| toy_fast | greedy |" in summary  # the finished job
    assert "## Failed jobs" in summary and "limit=abc" in summary
    assert "ValueError: `limit` must be None or an int >= 1, got 'abc' (a str)" in summary
    assert "## Failed jobs" in done.stdout and "| toy_fast | greedy |" in done.stdout
    assert json.loads((sweep / "0" / "result.json").read_text())["complete"]
