"""The lmms-eval plugin's parts that need no lmms-eval: model arguments, generation kwargs, and the POPE task writer
(its metrics checked against figures computed by hand). The AMBER, MME and HallusionBench writers and the
fingerprint are in tests/test_lmms_benchmarks.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

import vlmfix
from tests.lmms_task_files import aggregate, read_task
from vlmfix.eval import pope
from vlmfix.eval._io import sha256_file
from vlmfix.eval.generation import chat_prompt
from vlmfix.integrations import lmms_cli, lmms_tasks
from vlmfix.integrations.model_args import (
    cut_at_stops,
    generation_settings,
    methods_from_config,
    parse_methods,
)


def test_chat_prompt_is_still_importable_from_the_app() -> None:
    from benchmarks.generation import chat_prompt as app_chat_prompt

    assert app_chat_prompt is chat_prompt


def test_methods_from_the_model_argument() -> None:
    methods = parse_methods("vhr; pai:alpha=0.5:cfg=False+vcd")
    assert [type(m) for m in methods] == [vlmfix.VHR, vlmfix.PAI, vlmfix.VCD]
    assert methods[1].alpha == 0.5 and methods[1].cfg is False
    assert parse_methods("") == [] and parse_methods(None) == []
    with pytest.raises(ValueError, match="is not key=value"):
        parse_methods("pai:alpha")
    with pytest.raises(vlmfix.UnknownNameError, match="Available"):
        parse_methods("vhrr")
    with pytest.raises(ValueError, match="alpha"):
        parse_methods("pai:alpha=-1")


def test_methods_from_a_yaml_file_of_method_nodes(tmp_path: Path) -> None:
    path = tmp_path / "methods.yaml"
    path.write_text("- {_target_: vlmfix.PAI, alpha: 0.3, cfg: false}\n- _target_: vlmfix.VHR\n")
    pai, vhr = methods_from_config(path)
    assert isinstance(pai, vlmfix.PAI) and pai.alpha == 0.3 and isinstance(vhr, vlmfix.VHR)
    path.write_text("_target_: vlmfix.VAR\ntau: ${oc.select:model.var_tau,20.0}\n")
    with pytest.raises(ValueError, match="interpolation"):
        methods_from_config(path)
    path.write_text("_target_: pathlib.Path\n")
    with pytest.raises(ValueError, match="not a vlmfix method class"):
        methods_from_config(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        methods_from_config(tmp_path / "absent.yaml")


def test_method_params_are_the_fingerprints_plain_data() -> None:
    from vlmfix.eval.fingerprint import method_params

    params = method_params(parse_methods("pai:alpha=0.5;vhr"))
    assert list(params) == ["pai", "vhr"] and params["pai"]["alpha"] == 0.5
    assert json.loads(json.dumps(params)) == params  # JSON as it is (tuples become lists, objects their repr)


def test_generation_kwargs_follow_lmms_eval_conventions() -> None:
    greedy = generation_settings({"until": ["\n\n"], "max_new_tokens": 8, "temperature": 0, "top_p": 1.0,
                                  "num_beams": 1, "do_sample": False, "image_aspect_ratio": "pad"})
    assert greedy.kwargs == {"max_new_tokens": 8, "num_beams": 1, "do_sample": False}
    assert greedy.stops == ("\n\n",) and greedy.ignored == ("image_aspect_ratio",)
    sampled = generation_settings({"temperature": 0.7, "top_p": 0.9, "until": "###"})
    assert sampled.kwargs == {"max_new_tokens": 1024, "num_beams": 1, "do_sample": True, "temperature": 0.7,
                              "top_p": 0.9}
    assert sampled.stops == ("###",)
    # do_sample with temperature 0 is greedy (lmms-eval's temperature-0 convention)
    assert generation_settings({"do_sample": True, "temperature": 0}).kwargs["do_sample"] is False
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation_settings({"max_new_tokens": 0})


@pytest.mark.parametrize("top_k", [0, 7, None])
def test_a_tasks_top_k_reaches_generate_and_the_fingerprint_as_the_apps_decoding_top_k(top_k) -> None:
    """The app's `decoding_of` (benchmarks.app) is the reference: the same sampling settings give the same
    `generate` keywords and the same fingerprint `Decoding` (top_k 0: no cut; left out: transformers' default)."""
    from omegaconf import OmegaConf

    from benchmarks.app import decoding_of as app_decoding_of

    task = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 8,
            **({} if top_k is None else {"top_k": top_k})}
    settings = generation_settings(task)
    assert settings.ignored == ()
    cfg = OmegaConf.create({"seed": 3, "decoding": {"do_sample": True, "num_beams": 1, "temperature": 0.7,
                                                    "top_p": 0.9, "top_k": top_k, "repetition_penalty": 1.0}})
    fingerprint, app_kwargs = app_decoding_of(cfg, 8)
    assert app_kwargs.pop("repetition_penalty") == 1.0  # the app's own knob; tasks set none
    assert settings.kwargs == {"max_new_tokens": 8, **app_kwargs}
    assert ("top_k" in settings.kwargs) == (top_k is not None)
    assert lmms_tasks.decoding_of(settings.kwargs, 3) == fingerprint
    # greedy: like temperature, the task's top_k is not passed (and not reported as ignored either)
    greedy = generation_settings({"temperature": 0, "top_k": 7})
    assert "top_k" not in greedy.kwargs and greedy.ignored == ()
    with pytest.raises(ValueError, match="top_k"):
        generation_settings({"temperature": 0.7, "top_k": -1})


def test_stop_strings_cut_at_the_first_one() -> None:
    assert cut_at_stops(" Yes, there is.\nUSER: no", ("\nUSER", ",")) == "Yes"
    assert cut_at_stops(" No ", ()) == "No"
    assert cut_at_stops("abc", ("",)) == "abc"  # an empty stop string stops nothing


@pytest.fixture
def task(tmp_path: Path) -> tuple[Path, list[pope.PopeQuestion]]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(images / name)
    questions = [pope.PopeQuestion(i + 1, name, f"Is there a {obj} in the image?", label)
                 for i, (name, obj, label) in enumerate([("a.png", "dog", "yes"), ("a.png", "cat", "no"),
                                                         ("b.png", "car", "yes"), ("b.png", "bus", "no")])]
    lmms_tasks.write_pope_task(tmp_path / "tasks", questions, images, name="t_pope", split="random",
                               prompt_suffix=" Answer yes or no.", max_new_tokens=6)
    return tmp_path / "tasks" / "t_pope", questions


def test_written_task_names_its_docs_and_vlmfix_metrics(task) -> None:
    folder, questions = task
    config, utils, docs = read_task(folder)
    assert config["task"] == "t_pope" and config["output_type"] == "generate_until"
    assert config["generation_kwargs"]["until"] == [] and config["generation_kwargs"]["max_new_tokens"] == 6
    assert [m["metric"] for m in config["metric_list"]] == [
        *(f"pope_{m}" for m in lmms_tasks.METRICS), "vlmfix_fingerprint", "vlmfix_fingerprint_sha256"]
    assert [d["prompt"] for d in docs] == [q.text + " Answer yes or no." for q in questions]
    assert [d["target"] for d in docs] == [q.label for q in questions]
    assert all(Path(d["image"]).is_file() for d in docs)
    assert utils.doc_to_visual(docs[0])[0].size == (8, 8)
    assert utils.doc_to_text(docs[0]) == docs[0]["prompt"]


def test_aggregators_come_from_one_factory_under_their_own_names(task) -> None:
    folder, _ = task
    config, utils, _ = read_task(folder)
    for entry in config["metric_list"]:
        name = entry["aggregation"].removeprefix("!function utils.")
        assert getattr(utils, name).__name__ == name == f"aggregate_{entry['metric']}"
    with pytest.raises(ValueError, match="a metric of task 't_pope'"):
        utils.TASK.aggregator("pope_f2")


def test_task_metrics_equal_hand_computed_pope_figures(task) -> None:
    folder, _ = task
    _, utils, docs = read_task(folder)
    # labels yes, no, yes, no; answers yes, yes, no, "maybe" -> official parser: "maybe" has no "no" word: yes
    metrics = aggregate(utils, docs, ["Yes, there is.", "yes", "No.", "maybe"])
    # TP = 1 (q1), FP = 2 (q2, q4), FN = 1 (q3), TN = 0: precision 1/3, recall 1/2, F1 = 2PR/(P+R) = 0.4
    assert math.isclose(metrics["pope_precision"], 1 / 3)
    assert math.isclose(metrics["pope_recall"], 1 / 2)
    assert math.isclose(metrics["pope_f1"], 0.4)
    assert math.isclose(metrics["pope_accuracy"], 1 / 4)
    assert math.isclose(metrics["pope_yes_ratio"], 3 / 4)
    # lmms-eval --limit 2 answers the first two docs only: scored on those (TP 1, FP 1)
    assert math.isclose(aggregate(utils, docs[:2], ["Yes", "Yes"])["pope_precision"], 1 / 2)
    with pytest.raises(ValueError, match="rows of task"):
        utils.aggregate_pope_f1([{"task": "other", "key": 1, "answer": "yes"}])


def test_missing_images_and_empty_tasks_are_refused(tmp_path: Path) -> None:
    question = pope.PopeQuestion(1, "absent.png", "Is there a dog in the image?", "yes")
    with pytest.raises(FileNotFoundError, match="missing"):
        lmms_tasks.write_pope_task(tmp_path, [question], tmp_path, name="t")
    with pytest.raises(ValueError, match="no questions"):
        lmms_tasks.write_pope_task(tmp_path, [], tmp_path, name="t")
    with pytest.raises(ValueError, match="parser"):
        lmms_tasks.write_pope_task(tmp_path, [question], tmp_path, name="t", parser="nope")


def test_write_tasks_command_from_a_question_file(task, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, questions = task
    question_file = tmp_path / "q.jsonl"
    pope.write_questions(question_file, questions)
    with pytest.warns(UserWarning, match="not one of the pinned"):
        lmms_cli.main(["write-tasks", "--out", str(tmp_path / "cli"), "--questions", str(question_file),
                       "--images", str(tmp_path / "images"), "--name", "cli_pope"])
    assert "--tasks cli_pope" in capsys.readouterr().out
    _, utils, docs = read_task(tmp_path / "cli" / "cli_pope")
    assert [doc["key"] for doc in docs] == [1, 2, 3, 4]
    fingerprint = utils.TASK.fingerprint(utils.TASK.score([{"task": "cli_pope", "key": 1, "answer": "yes"}]))
    assert fingerprint["pope"]["split_sha256"] == {"random": sha256_file(question_file)}
