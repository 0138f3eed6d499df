"""The app on the benchmarks read from a local upstream release (AMBER, MME hallucination, HallusionBench, POPE on
A-OKVQA / GQA): a missing data path is one error before the model loads, naming the variable, the layout and the
source; tiny releases written here run end to end on the tiny LLaVA; text-only questions are decoded without
methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from benchmarks.app import CONFIG_DIR, check_settings, run
from benchmarks.generation import Item, chat_prompt, generate_predictions
from benchmarks.models import LOADERS, LoadedModel, LoaderSpec
from vlmfix.eval import amber, mme
from vlmfix.testing import random_image

from .conftest import tiny_model

LOADS: list[dict[str, Any]] = []
TINY_LOADER = f"model.loader._target_={__name__}.load_tiny"
RELEASE_BENCHMARKS = {  # benchmark -> (variable, words of its layout, words of its source)
    "amber": ("VLMFIX_AMBER", "data/{annotations.json", "junyangwang0410/AMBER"),
    "amber_generative": ("VLMFIX_AMBER", "image/AMBER_<id>.jpg", "junyangwang0410/AMBER"),
    "mme_hallucination": ("VLMFIX_MME", "{existence,count,position,color}", "Awesome-Multimodal"),
    "hallusionbench": ("VLMFIX_HALLUSIONBENCH", "HallusionBench.json", "tianyi-lab/HallusionBench"),
    "pope_aokvqa_random": ("VLMFIX_POPE", "output/seem/aokvqa/aokvqa_pope_seem_<split>.json", "RUCAIBox/POPE"),
    "pope_gqa_adversarial": ("VLMFIX_POPE", "experiments/data/POPE/gqa/gqa_pope_<split>.json", "DAMO-NLP-SG/VCD"),
}


def load_tiny(**settings: Any) -> LoadedModel:
    """The tiny LLaVA (same weights every call); each call is recorded."""
    LOADS.append(settings)
    tiny = tiny_model("llava")
    return LoadedModel(tiny.model, tiny.processor, source="tiny-llava", revision="test")


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny_config(tmp_path: Path, benchmark: str, *overrides: str):
    return composed("model=toy_fast", TINY_LOADER, f"benchmark={benchmark}", f"results_dir={tmp_path / 'results'}",
                    "model.chair_max_new_tokens=3", "model.pope_max_new_tokens=2", "progress=false", "batch_size=2",
                    *overrides)


@pytest.fixture(autouse=True)
def no_release_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """No release variable set, and the tiny loader declared as shipping no data (like a real checkpoint)."""
    for variable in ("VLMFIX_AMBER", "VLMFIX_MME", "VLMFIX_HALLUSIONBENCH", "VLMFIX_POPE", "VLMFIX_COCO", "VLMFIX_GQA"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setitem(LOADERS, f"{__name__}.load_tiny", LoaderSpec(lambda **settings: None, ships_data=False))


# ------------------------------------------------------------------ missing data: one error, before loading
@pytest.mark.parametrize("benchmark", sorted(RELEASE_BENCHMARKS))
def test_missing_data_names_variable_layout_and_source(benchmark: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    variable, layout, source = RELEASE_BENCHMARKS[benchmark]
    LOADS.clear()
    with pytest.raises(FileNotFoundError) as unset:
        run(tiny_config(tmp_path, benchmark))
    message = str(unset.value)
    assert f"the environment variable {variable} is not set" in message
    assert layout in message and source in message and "never downloads" in message
    monkeypatch.setenv(variable, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"'{tmp_path / 'nowhere'}' \(from {variable}\) does not exist"):
        run(tiny_config(tmp_path, benchmark))
    assert LOADS == [], "the model was loaded before the missing data was found"


def test_pope_preset_names_the_image_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFIX_POPE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"the environment variable VLMFIX_GQA is not set.*gqa"):
        check_settings(tiny_config(tmp_path, "pope_gqa_random", "limit=null"))


# ------------------------------------------------------------------ tiny releases, end to end
def write_amber_release(root: Path) -> Path:
    annotations = [
        {"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]},
        {"id": 2, "type": "generative", "truth": ["cat"], "hallu": ["dog"]},
        {"id": 3, "type": "discriminative-hallucination", "truth": "no"},
        {"id": 4, "type": "discriminative-attribute-state", "truth": "yes"},
        {"id": 5, "type": "discriminative-relation", "truth": "yes"},
        {"id": 6, "type": "discriminative-hallucination", "truth": "no"},
    ]
    (root / "data" / "query").mkdir(parents=True)
    (root / "image").mkdir()
    (root / "data" / "annotations.json").write_text(json.dumps(annotations))
    (root / "data" / "relation.json").write_text(json.dumps({"dog": ["puppy"], "cat": []}))
    (root / "data" / "safe_words.txt").write_text("")
    generative = [{"id": i, "image": f"AMBER_{i}.jpg", "query": "Describe this image."} for i in (1, 2)]
    discriminative = [{"id": 3, "image": "AMBER_1.jpg", "query": "Is there a cat in this image?"},
                      {"id": 4, "image": "AMBER_1.jpg", "query": "Is the dog brown in this image?"},
                      {"id": 5, "image": "AMBER_2.jpg", "query": "Is there direct contact between the cat and mat?"},
                      {"id": 6, "image": "AMBER_2.jpg", "query": "Is there a dog in this image?"}]
    (root / "data" / "query" / "query_generative.json").write_text(json.dumps(generative))
    (root / "data" / "query" / "query_discriminative.json").write_text(json.dumps(discriminative))
    for i in (1, 2):
        random_image(32, i).save(root / "image" / f"AMBER_{i}.jpg")
    return root


def test_amber_runs_and_records_its_similarity_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFIX_AMBER", str(write_amber_release(tmp_path / "AMBER")))
    overrides = ("benchmark.similarity=none", "benchmark.normalizer=simple")
    result = run(tiny_config(tmp_path, "amber", *overrides))
    metrics, fingerprint = result["metrics"], result["fingerprint"]
    assert fingerprint["benchmark"] == "amber"
    assert fingerprint["amber"]["similarity"] == {"similarity": "none", "comparable_to_official": False}
    assert metrics["similarity"] == fingerprint["amber"]["similarity"]  # printed with the result
    out = Path(result["result_dir"])
    generative, discriminative = ({r["id"]: r["response"] for r in map(json.loads, (out / name).open())}
                                  for name in ("predictions_generative.jsonl", "predictions_discriminative.jsonl"))
    assert sorted(generative) == [1, 2] and sorted(discriminative) == [3, 4, 5, 6]
    # the app's figures are the scorers' on its own predictions
    data = amber.load_amber(tmp_path / "AMBER")
    expected = amber.score_generative(generative, data, amber.SimpleNouns(), amber.NoSimilarity())
    assert metrics["CHAIR"] == expected.chair and metrics["Cover"] == expected.cover
    assert metrics["f1"] == amber.score_discriminative(discriminative, data).f1
    assert metrics["amber_score"] is not None and result["complete"]
    official_input = json.loads((out / "amber_inference.json").read_text())  # what inference.py reads
    assert {row["id"]: row["response"] for row in official_input} == {**generative, **discriminative}
    scored = json.loads((out / "amber_scored.json").read_text())  # the results browser's input: the verdicts
    assert [[m["hallucinated"] for m in r["mentions"]] for r in scored["generative"]["responses"]] == [
        list(o.hallucinated) for o in expected.outcomes]
    assert {r["id"]: r["correct"] for r in scored["discriminative"]["responses"]} == dict(
        amber.score_discriminative(discriminative, data).correct)
    assert [json.loads(line)["key"] for line in (out / "items.jsonl").open()] == [1, 2, 3, 4, 5, 6]
    # `limit` keeps the first image ids of both parts: a subset, so no AMBER score
    limited = run(tiny_config(tmp_path, "amber", *overrides, "limit=1"))
    assert limited["metrics"]["subset"] and limited["metrics"]["amber_score"] is None
    assert limited["metrics"]["discriminative"]["n_questions"] == 2  # ids 3 and 4 are about AMBER_1.jpg


def test_amber_official_similarity_without_spacy_fails_before_loading(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFIX_AMBER", str(write_amber_release(tmp_path / "AMBER")))
    monkeypatch.setitem(__import__("sys").modules, "spacy", None)
    monkeypatch.setattr("vlmfix.eval.amber.similarity.TABLE_DIR", tmp_path)
    LOADS.clear()
    with pytest.raises(amber.SimilarityUnavailableError, match="amber.similarity=none"):
        run(tiny_config(tmp_path, "amber", "benchmark.normalizer=simple", "benchmark.similarity=official"))
    assert LOADS == []


def write_mme_release(root: Path) -> Path:
    for subtask, stems in (("existence", ("a", "b")), ("color", ("c",))):
        folder = root / subtask
        folder.mkdir(parents=True)
        for n, stem in enumerate(stems):
            random_image(32, n).save(folder / f"{stem}.jpg")
            (folder / f"{stem}.txt").write_text("Is it red? Please answer yes or no.\tYes\n"
                                                "Is it blue? Please answer yes or no.\tNo\n")
    return root


def test_mme_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFIX_MME", str(write_mme_release(tmp_path / "MME")))
    result = run(tiny_config(tmp_path, "mme_hallucination", "benchmark.subtasks=[existence,color]",
                             "benchmark.prompt=lmms", "model.prompts.pope_suffix=' Answer yes or no.'"))
    out = Path(result["result_dir"])
    rows = {r["key"]: r["text"] for r in map(json.loads, (out / "predictions.jsonl").open())}
    questions = mme.load_mme_folder(tmp_path / "MME", ["existence", "color"])
    assert sorted(rows) == [q.key for q in questions] == [0, 1, 2, 3, 4, 5]
    scores = mme.score_mme(questions, rows)
    assert result["metrics"]["total"] == scores.total
    scored = json.loads((out / "mme_scored.json").read_text())  # the results browser's input: the verdicts
    assert [(q["key"], q["correct"]) for q in scored["questions"]] == [
        (q.key, scores.predictions[q.key] == q.answer) for q in questions]
    assert result["fingerprint"]["mme"]["prompt"] == "lmms"
    assert set(result["metrics"]["mme"]["subtasks"]) == {"existence", "color"}
    assert {"mme.subtasks.existence.acc_plus", "mme.subtasks.color.yes_ratio"} <= set(result["intervals"])


def write_hallusion_release(root: Path) -> Path:
    rows = [{"category": "VD", "subcategory": "illusion", "visual_input": "1", "set_id": "0", "figure_id": "0",
             "question_id": "0", "question": "Is the left line longer?", "gt_answer": "0",
             "filename": "./VD/illusion/0_0.png"},
            {"category": "VS", "subcategory": "chart", "visual_input": "0", "set_id": "0", "figure_id": "0",
             "question_id": "0", "question": "Is Paris the capital of France?", "gt_answer": "1", "filename": None}]
    (root / "hallusion_bench" / "VD" / "illusion").mkdir(parents=True)
    random_image(32, 0).save(root / "hallusion_bench" / "VD" / "illusion" / "0_0.png")
    (root / "HallusionBench.json").write_text(json.dumps(rows))
    return root


def test_hallusionbench_runs_with_a_text_only_question(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFIX_HALLUSIONBENCH", str(write_hallusion_release(tmp_path / "HB")))
    result = run(tiny_config(tmp_path, "hallusionbench", "benchmark.max_new_tokens=2"))
    assert result["metrics"]["n_text_only"] == 1
    assert result["fingerprint"]["hallusion"]["judge"] == "rule:vlmevalkit_yorn"
    rows = [json.loads(line) for line in (Path(result["result_dir"]) / "predictions.jsonl").open()]
    assert sorted(r["key"] for r in rows) == [0, 1]
    scored = json.loads((Path(result["result_dir"]) / "hallusion_scored.json").read_text())  # the browser's input
    assert [(q["key"], q["text_only"]) for q in scored["questions"]] == [(0, False), (1, True)]
    without = run(tiny_config(tmp_path, "hallusionbench", "benchmark.max_new_tokens=2",
                              "benchmark.include_text_only=false"))
    assert without["metrics"]["n_text_only"] == 0 and without["result_dir"] != result["result_dir"]


def test_text_only_items_are_decoded_without_methods(tmp_path: Path) -> None:
    import vlmfix

    tiny = tiny_model("llava")
    processor = tiny.processor
    processor.tokenizer.padding_side = "left"
    items = [Item(7, None, "is paris in france ?")]
    rows = generate_predictions(items, model=tiny.model, processor=processor, methods=[vlmfix.VHR()],
                                out_path=tmp_path / "p.jsonl", key_name="key", text_name="text", batch_size=1,
                                max_new_tokens=4, decoding={"do_sample": False, "num_beams": 1}, seed=0,
                                progress=False)
    # reference: the same prompt, templated without an image entry, through plain generate
    inputs = processor(text=[chat_prompt(processor, items[0].text, image=False)], return_tensors="pt")
    assert "<image>" not in chat_prompt(processor, items[0].text, image=False)
    with torch.inference_mode():
        out = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert rows[7]["text"] == expected


def test_pope_preset_reads_the_released_file_and_its_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"question_id": i + 1, "image": "1.jpg" if i < 2 else "2.jpg", "text": f"Is there a {name} in the image?",
             "label": label} for i, (name, label) in enumerate([("dog", "yes"), ("cat", "no"), ("cup", "yes"),
                                                                  ("bus", "no")])]
    questions = tmp_path / "VCD" / "experiments" / "data" / "POPE" / "gqa" / "gqa_pope_popular.json"
    questions.parent.mkdir(parents=True)
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "GQA" / "images").mkdir(parents=True)
    for n in (1, 2):
        random_image(32, n).save(tmp_path / "GQA" / "images" / f"{n}.jpg")
    monkeypatch.setenv("VLMFIX_POPE", str(tmp_path / "VCD"))
    monkeypatch.setenv("VLMFIX_GQA", str(tmp_path / "GQA"))
    with pytest.warns(UserWarning, match="not one of the pinned released files"):  # a file of our own: version=null
        result = run(tiny_config(tmp_path, "pope_gqa_popular", "limit=null", "benchmark.version=null"))
    assert result["benchmark"] == "pope_gqa_popular" and result["metrics"]["n_questions"] == 4
    assert result["fingerprint"]["pope"]["dataset"] == "gqa"
    assert set(result["fingerprint"]["pope"]["content_sha256"]) == {"popular"}


# ------------------------------------------------------------------ the toy's miniatures
TOY_DATA: list[Path] = []


def load_tiny_with_toy_data(**settings: Any) -> LoadedModel:
    """The tiny LLaVA with toy scenes as its own data (as the toy ships its val split)."""
    LOADS.append(settings)
    tiny = tiny_model("llava")
    return LoadedModel(tiny.model, tiny.processor, source="tiny-llava", revision="test", data_root=TOY_DATA[0])


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmfix.toy.dataset import generate_split, write_split

    root = tmp_path_factory.mktemp("toy_data")
    write_split(root, "val", generate_split("val", 12, 1, seed=0, image_size=112, pair_keep=0.98, broken_share=0.5))
    return root


@pytest.mark.parametrize(("benchmark", "key"), [("amber", "CHAIR"), ("mme_hallucination", "total"),
                                                ("hallusionbench", "qAcc")])
def test_a_model_that_ships_data_runs_the_miniature(toy_data: Path, tmp_path: Path, benchmark: str, key: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LOADERS, f"{__name__}.load_tiny_with_toy_data",
                        LoaderSpec(lambda **settings: None, ships_data=True))
    TOY_DATA[:] = [toy_data]
    cfg = composed("model=toy_fast", f"model.loader._target_={__name__}.load_tiny_with_toy_data",
                   f"benchmark={benchmark}", f"results_dir={tmp_path / 'results'}", "model.chair_max_new_tokens=3",
                   "model.pope_max_new_tokens=2", "model.hallusion_max_new_tokens=2", "progress=false", "limit=2")
    assert check_settings(cfg).data is None  # no release variable: the miniature is read once the model is loaded
    result = run(cfg)
    assert result["metrics"]["data_source"] == "toy_miniature"
    assert isinstance(result["metrics"][key], float)
    assert (tmp_path / "results" / ".cache" / "miniatures").is_dir()
    # the interval comes from units of the benchmark's own kind: 2 images (MME: 2 per subtask), 2 question sets
    assert result["intervals"][key]["low"] <= result["metrics"][key] <= result["intervals"][key]["high"]
    assert result["units"]["statistic"] == result["kind"]
    assert result["bootstrap"]["n_units"] == (8 if benchmark == "mme_hallucination" else 2)


def test_summary_shows_release_columns_and_marks_miniatures(tmp_path: Path) -> None:
    from benchmarks.summary import MINIATURE_MARK, write_summary

    results = [
        {"model": "toy", "method": "greedy", "kind": "mme", "benchmark": "mme_hallucination",
         "metrics": {"data_source": "toy_miniature", "total": 250.0, "existence score": 100.0}, "fingerprint": {}},
        {"model": "toy", "method": "greedy", "kind": "hallusion", "benchmark": "hallusionbench",
         "metrics": {"data_source": "folder", "aAcc": 0.5, "fAcc": 0.25, "qAcc": 0.125, "unknown_rate": 0.0},
         "fingerprint": {}},
    ]
    for job, result in enumerate(results):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "result.json").write_text(json.dumps(result))
    text = write_summary(tmp_path)
    assert text is not None
    header = text.splitlines()[0]
    assert f"mme_hallucination{MINIATURE_MARK} total" in header and "hallusionbench qAcc" in header
    assert "hallusionbench† qAcc" not in header
    assert "| toy | greedy | 250.000 | 100.000 | 0.500 | 0.250 | 0.125 | 0.000 |" in text
    assert f"{MINIATURE_MARK} the toy's miniature" in text


# ------------------------------------------------------------------ POPE: benchmark.version defaults to head
def write_gqa_random(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A four-question GQA random file in VCD's layout, with its images and variables set."""
    rows = [{"question_id": i + 1, "image": f"{1 + i // 2}.jpg", "text": f"Is there a {name} in the image?",
             "label": label} for i, (name, label) in enumerate([("dog", "yes"), ("cat", "no"), ("cup", "yes"),
                                                                  ("bus", "no")])]
    path = tmp_path / "VCD" / "experiments" / "data" / "POPE" / "gqa" / "gqa_pope_random.json"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "GQA" / "images").mkdir(parents=True)
    for n in (1, 2):
        random_image(32, n).save(tmp_path / "GQA" / "images" / f"{n}.jpg")
    monkeypatch.setenv("VLMFIX_POPE", str(tmp_path / "VCD"))
    monkeypatch.setenv("VLMFIX_GQA", str(tmp_path / "GQA"))
    return path


def test_pope_version_defaults_to_head() -> None:
    for benchmark in ("pope_random", "pope_popular", "pope_adversarial", "pope_aokvqa_random", "pope_gqa_popular"):
        assert composed(f"benchmark={benchmark}").benchmark.version == "head", benchmark


@pytest.mark.parametrize(("versions", "accepted"), [(("9b54106", "head"), True), (("9b54106",), False)])
def test_default_version_accepts_only_heads_release(versions, accepted, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmfix.eval.pope.questions import CONTENT_PINS, PinnedPopeFile, questions_sha256, read_questions

    path = write_gqa_random(tmp_path, monkeypatch)
    monkeypatch.setitem(CONTENT_PINS, questions_sha256(read_questions(path)),
                        PinnedPopeFile("random", versions, 4, "gqa"))
    cfg = tiny_config(tmp_path, "pope_gqa_random", "limit=null")
    if accepted:
        assert check_settings(cfg).options.question_file.versions == versions
        return
    with pytest.raises(ValueError, match=r"pins POPE version head, but .* is the released gqa 'random' file of "
                                         r"version\(s\) 9b54106.*benchmark\.version=null"):
        check_settings(cfg)


def test_default_version_refuses_an_unknown_file_until_version_is_null(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_gqa_random(tmp_path, monkeypatch)
    with pytest.warns(UserWarning, match="not one of the pinned"), pytest.raises(
            ValueError, match=r"pins POPE version head, but .* not a released file .*benchmark\.version=null"):
        check_settings(tiny_config(tmp_path, "pope_gqa_random", "limit=null"))
    with pytest.warns(UserWarning, match="not one of the pinned"):
        checked = check_settings(tiny_config(tmp_path, "pope_gqa_random", "limit=null", "benchmark.version=null"))
    assert checked.options.question_file.versions == ()
