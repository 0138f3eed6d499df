"""lmms-eval tasks of AMBER (both parts), the MME hallucination subset and HallusionBench, without lmms-eval: the
written files parse and name functions their utils.py binds; process_results + the aggregations give the spec's
hand-computed figures on hand-built releases, and equal vlmfix's scorers on the toy's miniatures; the results
carry vlmfix's protocol fingerprint (the runner's sections, the model half recorded by the vlmfix model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from tests.lmms_task_files import aggregate, read_task
from vlmfix.eval import amber, amber_protocol, fingerprint_hash, hallusion, mme
from vlmfix.eval._io import sha256_file
from vlmfix.eval.fingerprint import Execution
from vlmfix.integrations import lmms_cli, lmms_tasks
from vlmfix.integrations.lmms_tasks import ModelRecord, RunRecord


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (90, 120, 30)).save(path)


# ------------------------------------------------------------------ hand-built releases (the spec's test cases)
DISCRIMINATIVE = [  # (type, truth, query, response): spec A8
    ("discriminative-hallucination", "no", "Is there a frisbee in this image?", "No"),
    ("discriminative-hallucination", "no", "Is there a cat in this image?", "Yes"),
    ("discriminative-attribute-state", "yes", "Is the dog brown in this image?", "Yes"),
    ("discriminative-attribute-state", "no", "Is the dog white in this image?", "No"),
    ("discriminative-attribute-number", "yes", "Is there one dog in this image?", "No"),
    ("discriminative-attribute-action", "no", "Does the dog sit in this image?", "yes"),
    ("discriminative-relation", "yes", "Is there direct contact between the dog and grass?", "Yes"),
    ("relation", "no", "Is there direct contact between the dog and sky?", "No."),
]
DESCRIPTIONS = ["A dog, a puppy, the ground, a frisbee, a car and a light.", "Dog on grass."]


@pytest.fixture
def amber_root(tmp_path: Path) -> Path:
    """Two images; generative ids 1-2 (truth dog, grass; hallu frisbee, cat), discriminative ids 3-10."""
    root = tmp_path / "AMBER"
    data = root / "data"
    (data / "query").mkdir(parents=True)
    generative = [{"id": i, "type": "generative", "truth": ["dog", "grass"], "hallu": ["frisbee", "cat"]}
                  for i in (1, 2)]
    rest = [{"id": i + 3, "type": kind, "truth": truth} for i, (kind, truth, _, _) in enumerate(DISCRIMINATIVE)]
    (data / "annotations.json").write_text(json.dumps(generative + rest))
    (data / "relation.json").write_text(json.dumps({"dog": ["puppy"], "grass": ["ground"], "frisbee": [], "cat": [],
                                                    "car": [], "light": []}))
    (data / "safe_words.txt").write_text("light\n")
    (data / "query" / "query_generative.json").write_text(json.dumps(
        [{"id": i, "image": f"AMBER_{i}.jpg", "query": "Describe this image."} for i in (1, 2)]))
    queries = [{"id": i + 3, "image": f"AMBER_{1 + i // 4}.jpg", "query": q}
               for i, (_, _, q, _) in enumerate(DISCRIMINATIVE)]
    (data / "query" / "query_discriminative.json").write_text(json.dumps(queries))
    for i in (1, 2):
        _image(root / "image" / f"AMBER_{i}.jpg")
    return root


def write_amber(root: Path, out: Path, **options) -> tuple[Path, Path]:
    data = amber.load_amber(root)
    paths = lmms_tasks.write_amber_tasks(out, data, name="t_amber", normalizer="simple", similarity="none",
                                         max_new_tokens_generative=16, max_new_tokens=4, **options)
    return paths[0].parent, paths[1].parent


def test_amber_tasks_give_the_hand_computed_figures(amber_root: Path, tmp_path: Path) -> None:
    generative, discriminative = write_amber(amber_root, tmp_path / "tasks", prompt_suffix=" Answer yes or no.")
    config, utils, docs = read_task(generative)
    assert config["generation_kwargs"]["max_new_tokens"] == 16 and [d["key"] for d in docs] == [1, 2]
    assert docs[0]["prompt"] == "Describe this image." and Path(docs[0]["image"]).name == "AMBER_1.jpg"
    better = {entry["metric"]: entry["higher_is_better"] for entry in config["metric_list"]}
    assert better == {"amber_CHAIR": False, "amber_Cover": True, "amber_Hal": False, "amber_Cog": False,
                      "vlmfix_fingerprint": None, "vlmfix_fingerprint_sha256": None}
    metrics = aggregate(utils, docs, DESCRIPTIONS)
    # R1 nouns dog, puppy, ground, frisbee, car, light (frisbee and car hallucinated, light safe); R2 "Dog on
    # grass." -> grass only (case-sensitive): CHAIR 2/7, Cover 3/4, Hal 1/2, Cog 1/4 (spec A8)
    assert math.isclose(metrics["amber_CHAIR"], 2 / 7) and math.isclose(metrics["amber_Cover"], 3 / 4)
    assert math.isclose(metrics["amber_Hal"], 1 / 2) and math.isclose(metrics["amber_Cog"], 1 / 4)

    config, utils, docs = read_task(discriminative)
    assert config["generation_kwargs"]["max_new_tokens"] == 4
    assert docs[0]["prompt"] == "Is there a frisbee in this image? Answer yes or no." and docs[0]["target"] == "no"
    metrics = aggregate(utils, docs, [response for *_, response in DISCRIMINATIVE])
    expected = {"accuracy": 1 / 2, "precision": 2 / 3, "recall": 2 / 5, "f1": 1 / 2, "existence_f1": 2 / 3,
                "attribute_f1": 1 / 2, "relation_f1": 0.0, "unknown_rate": 1 / 4}  # "yes" and "No." are unknown
    for name, value in expected.items():
        assert math.isclose(metrics[f"amber_{name}"], value, abs_tol=1e-12), name


def test_amber_limit_keeps_the_first_images_and_changed_data_is_refused(amber_root: Path, tmp_path: Path) -> None:
    generative, discriminative = write_amber(amber_root, tmp_path / "tasks", limit=1)
    assert [d["key"] for d in read_task(generative)[2]] == [1]
    _, utils, docs = read_task(discriminative)
    assert [d["key"] for d in docs] == [3, 4, 5, 6]  # AMBER_1's questions
    (amber_root / "data" / "safe_words.txt").write_text("light\ncar\n")
    with pytest.raises(ValueError, match="changed since this task was written"):
        aggregate(utils, docs, ["No"] * 4)


@pytest.fixture
def mme_root(tmp_path: Path) -> Path:
    folder = tmp_path / "MME" / "existence"
    for stem, obj in (("a", "dog"), ("b", "cat")):
        _image(folder / f"{stem}.jpg")
        (folder / f"{stem}.txt").write_text(f"Is there a {obj} in this image? Please answer yes or no.\tYes\n"
                                            "Is there a car in this image? Please answer yes or no.\tNo\n")
    return tmp_path / "MME"


def test_mme_task_gives_the_hand_computed_figures(mme_root: Path, tmp_path: Path) -> None:
    questions = mme.load_mme_folder(mme_root, ["existence"])
    lmms_tasks.write_mme_task(tmp_path / "tasks", questions, name="t_mme", prompt="lmms", prompt_suffix="\nShort.")
    _, utils, docs = read_task(tmp_path / "tasks" / "t_mme")
    assert docs[0]["prompt"] == "Is there a dog in this image?\nShort." and docs[0]["target"] == "yes"
    # image a: (Yes, "Yes"), (No, "No, there is not."): both right; image b: "Not sure" -> no (wrong), "There is a
    # cat." -> other (wrong): acc 2/4, acc+ 1/2, score 100, other 1/4 (spec B3)
    metrics = aggregate(utils, docs, ["Yes", "No, there is not.", "Not sure", "There is a cat."])
    assert metrics["mme_existence_acc"] == 0.5 and metrics["mme_existence_acc_plus"] == 0.5
    assert metrics["mme_existence_score"] == 100.0 and metrics["mme_total"] == 100.0
    assert metrics["mme_unknown_rate"] == 0.25


HALLUSION = [  # (category, subcategory, set, figure, question, visual_input, gt, answer): spec C5
    ("VD", "illusion", "0", "0", "0", "1", "1", "Yes"),
    ("VD", "illusion", "0", "0", "1", "1", "0", "No"),
    ("VD", "illusion", "0", "1", "0", "2", "0", "Yes"),
    ("VD", "illusion", "0", "1", "1", "2", "1", "Yes"),
    ("VS", "chart", "0", "0", "0", "0", "1", "I cannot tell without more information."),
    ("VS", "chart", "0", "1", "0", "1", "0", "No, it is not."),
]


@pytest.fixture
def hallusion_root(tmp_path: Path) -> Path:
    root = tmp_path / "HallusionBench"
    rows = []
    for category, sub, set_id, figure, question, visual, gt, _ in HALLUSION:
        filename = None if visual == "0" else f"./{category}/{sub}/{set_id}_{figure}.png"
        if filename:
            _image(root / "hallusion_bench" / filename)
        rows.append({"category": category, "subcategory": sub, "visual_input": visual, "set_id": set_id,
                     "figure_id": figure, "question_id": question, "sample_note": "", "question": f"Q{len(rows)}?",
                     "gt_answer_details": "", "gt_answer": gt, "filename": filename})
    (root / "HallusionBench.json").write_text(json.dumps(rows))
    return root


@pytest.mark.parametrize("unknown_no_visual, aacc, qacc", [("correct", 5 / 6, 2 / 3), ("wrong", 4 / 6, 1 / 3)])
def test_hallusion_task_gives_the_hand_computed_figures(hallusion_root: Path, tmp_path: Path, unknown_no_visual: str,
                                                        aacc: float, qacc: float) -> None:
    questions = hallusion.load_hallusion(hallusion_root)
    hashes = {**hallusion.file_hashes(hallusion_root, questions), "source": "folder"}
    lmms_tasks.write_hallusion_task(tmp_path / "tasks", questions, hashes, name="t_hb",
                                    unknown_no_visual=unknown_no_visual)
    _, utils, docs = read_task(tmp_path / "tasks" / "t_hb")
    assert docs[4]["image"] is None and utils.doc_to_visual(docs[4]) == []  # text-only: no image, no method
    metrics = aggregate(utils, docs, [row[-1] for row in HALLUSION])
    assert math.isclose(metrics["hallusion_aAcc"], aacc) and math.isclose(metrics["hallusion_qAcc"], qacc)
    assert math.isclose(metrics["hallusion_fAcc"], 2 / 3)  # VD fig 0 right, VD fig 1 wrong, VS fig 1 right
    assert math.isclose(metrics["hallusion_unknown_rate"], 1 / 6)
    if unknown_no_visual == "correct":
        assert metrics["hallusion_easy_aAcc"] == 1.0 and metrics["hallusion_hard_aAcc"] == 0.5


def test_hallusion_without_text_only_questions(hallusion_root: Path, tmp_path: Path) -> None:
    questions = hallusion.load_hallusion(hallusion_root)
    lmms_tasks.write_hallusion_task(tmp_path / "tasks", questions, {}, name="t_hb", include_text_only=False)
    assert all(doc["image"] is not None for doc in read_task(tmp_path / "tasks" / "t_hb")[2])


# ------------------------------------------------------------------ the toy's miniatures: equal to vlmfix's scorers
@pytest.fixture(scope="module")
def miniatures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmfix.toy.bench import write_miniatures
    from vlmfix.toy.dataset import generate_split, write_split

    root = tmp_path_factory.mktemp("toy_data")
    write_split(root, "val", generate_split("val", 16, 1, seed=0, image_size=112, pair_keep=0.98, broken_share=0.5))
    return write_miniatures(root, root / "mini")


def answers_for(docs: list[dict]) -> list[str]:
    """Deterministic answers of every kind: right, wrong, unparseable, descriptions naming objects."""
    words = ["dog", "frisbee", "cat", "person", "car", "kite"]
    out = []
    for i, doc in enumerate(docs):
        if doc["target"] in ("", None):
            out.append(f"A {words[i % 6]} and a {words[(i * 5 + 1) % 6]} on the grass.")
        else:
            out.append(("Yes", "No", "Maybe.", "yes", "No, it is not")[(i * 7 + doc["key"]) % 5])
    return out


def test_toy_amber_tasks_equal_vlmfix_scorers(miniatures: Path, tmp_path: Path) -> None:
    data = amber.load_amber(miniatures / "amber")
    paths = lmms_tasks.write_amber_tasks(tmp_path, data, name="toy_amber", normalizer="simple", similarity="none",
                                         source="toy_miniature")
    _, utils, docs = read_task(paths[0].parent)
    answers = answers_for(docs)
    metrics = aggregate(utils, docs, answers)
    expected = amber.score_generative({d["key"]: a for d, a in zip(docs, answers)}, data, amber.SimpleNouns(),
                                      amber.NoSimilarity())
    assert expected.n_hallucinated > 0 and len(docs) == len(data.queries("generative"))
    assert (metrics["amber_CHAIR"], metrics["amber_Cover"], metrics["amber_Hal"], metrics["amber_Cog"]) == (
        expected.chair, expected.cover, expected.hal, expected.cog)
    _, utils, docs = read_task(paths[1].parent)
    answers = answers_for(docs)
    metrics = aggregate(utils, docs, answers)
    scores = amber.score_discriminative({d["key"]: a for d, a in zip(docs, answers)}, data, "amber_exact")
    assert metrics["amber_f1"] == scores.f1 and metrics["amber_unknown_rate"] == scores.unknown_rate
    assert metrics["amber_existence_f1"] == scores.groups["existence"]["f1"]
    assert metrics["amber_accuracy"] == scores.groups["overall"]["accuracy"]


def test_toy_mme_and_hallusion_tasks_equal_vlmfix_scorers(miniatures: Path, tmp_path: Path) -> None:
    questions = mme.load_mme_folder(miniatures / "mme")
    lmms_tasks.write_mme_task(tmp_path, questions, name="toy_mme", source="toy_miniature")
    _, utils, docs = read_task(tmp_path / "toy_mme")
    answers = answers_for(docs)
    metrics = aggregate(utils, docs, answers)
    scores = mme.score_mme(questions, {d["key"]: a for d, a in zip(docs, answers)})
    assert metrics["mme_total"] == scores.total and len(docs) == len(questions)
    for name, sub in scores.subtasks.items():
        assert (metrics[f"mme_{name}_acc"], metrics[f"mme_{name}_acc_plus"], metrics[f"mme_{name}_score"]) == (
            sub.acc, sub.acc_plus, sub.score)

    bench = hallusion.load_hallusion(miniatures / "hallusionbench")
    hashes = {**hallusion.file_hashes(miniatures / "hallusionbench", bench), "source": "toy_miniature"}
    lmms_tasks.write_hallusion_task(tmp_path, bench, hashes, name="toy_hb")
    _, utils, docs = read_task(tmp_path / "toy_hb")
    answers = answers_for(docs)
    metrics = aggregate(utils, docs, answers)
    scores = hallusion.score_hallusion(bench, {d["key"]: a for d, a in zip(docs, answers)})
    assert (metrics["hallusion_aAcc"], metrics["hallusion_fAcc"], metrics["hallusion_qAcc"]) == (
        scores.aacc, scores.facc, scores.qacc)
    assert metrics["hallusion_yes_ratio"] == scores.yes_ratio


# ------------------------------------------------------------------ the fingerprint
def test_results_carry_vlmfix_fingerprint(amber_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lmms_tasks, "RUN", RunRecord())
    _, discriminative = write_amber(amber_root, tmp_path / "tasks", parser="vlmevalkit_yorn")
    _, utils, docs = read_task(discriminative)
    answers = [response for *_, response in DISCRIMINATIVE]
    unknown = aggregate(utils, docs, answers)["vlmfix_fingerprint"]
    assert unknown["model"]["id"] == lmms_tasks.UNKNOWN and unknown["method"]["name"] == lmms_tasks.UNKNOWN

    execution = Execution(batch_size=2, dtype="float32", attn_implementation="sdpa", device="cpu")
    lmms_tasks.RUN.record_model(ModelRecord("vlmfix-toy-fast", "abc", "pai", {"pai": {"alpha": 0.5}}, "{{ x }}",
                                            execution, seed=3))
    lmms_tasks.RUN.record_decoding("t_amber_discriminative", {"max_new_tokens": 4, "num_beams": 1, "do_sample": False})
    metrics = aggregate(utils, docs, answers)
    fingerprint = metrics["vlmfix_fingerprint"]
    assert metrics["vlmfix_fingerprint_sha256"] == fingerprint_hash(fingerprint)
    assert fingerprint["benchmark"] == "amber" and fingerprint["prompt"] == "query file"
    assert fingerprint["model"] == {"id": "vlmfix-toy-fast", "revision": "abc"}
    assert fingerprint["method"] == {"name": "pai", "params": {"pai": {"alpha": 0.5}}}
    assert fingerprint["decoding"]["max_new_tokens"] == 4 and fingerprint["decoding"]["seed"] == 3
    assert fingerprint["execution"]["batch_size"] == 2 and "lmms_eval" in fingerprint["libraries"]
    # the AMBER section is the app's (run_amber): amber_protocol + budget, source, suffix; backend of this process
    data = amber.load_amber(amber_root)
    section = amber_protocol(data, parts=["discriminative"], parser="vlmevalkit_yorn", normalizer=amber.SimpleNouns(),
                             similarity=amber.NoSimilarity(), threshold=0.8, quirks="reference", n_images=2,
                             subset=False)
    assert fingerprint["amber"] == {**section, "max_new_tokens": {"discriminative": 4}, "source": "folder",
                                    "prompt_suffix": ""}
    assert fingerprint["amber"]["similarity"] == {"similarity": "none", "comparable_to_official": False}
    assert fingerprint["amber"]["sha256"]["annotations.json"] == sha256_file(amber_root / "data" / "annotations.json")
    assert fingerprint["lmms_eval"]["task_yaml_sha256"] == sha256_file(discriminative / "t_amber_discriminative.yaml")
    assert metrics["amber_accuracy"] == 5 / 8  # vlmevalkit_yorn reads "yes" and "No." (spec A8: Acc 62.5)


def test_mme_and_hallusion_fingerprints_hold_their_sections(mme_root: Path, hallusion_root: Path,
                                                           tmp_path: Path) -> None:
    questions = mme.load_mme_folder(mme_root, ["existence"])
    lmms_tasks.write_mme_task(tmp_path, questions, name="t_mme", parser="mme_lmms")
    _, utils, docs = read_task(tmp_path / "t_mme")
    fingerprint = aggregate(utils, docs, ["Yes"] * 4)["vlmfix_fingerprint"]
    assert fingerprint["mme"]["parser"] == "mme_lmms"
    assert fingerprint["mme"]["content_sha256"] == mme.content_sha256(questions)
    bench = hallusion.load_hallusion(hallusion_root)
    hashes = {**hallusion.file_hashes(hallusion_root, bench), "source": "folder"}
    lmms_tasks.write_hallusion_task(tmp_path, bench, hashes, name="t_hb")
    _, utils, docs = read_task(tmp_path / "t_hb")
    fingerprint = aggregate(utils, docs, ["Yes"] * 6)["vlmfix_fingerprint"]
    assert fingerprint["hallusion"]["file_sha256"] == sha256_file(hallusion_root / "HallusionBench.json")
    assert fingerprint["hallusion"]["judge"] == "rule:vlmevalkit_yorn"


# ------------------------------------------------------------------ the command line
def test_write_tasks_command_reads_the_data_variables(amber_root: Path, mme_root: Path, hallusion_root: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    monkeypatch.delenv("VLMFIX_AMBER", raising=False)
    with pytest.raises(FileNotFoundError, match="VLMFIX_AMBER.*annotations.json.*github.com/junyangwang0410/AMBER"):
        lmms_cli.main(["write-tasks", "--out", str(out), "--benchmark", "amber"])
    monkeypatch.setenv("VLMFIX_AMBER", str(amber_root))
    lmms_cli.main(["write-tasks", "--out", str(out), "--benchmark", "amber", "--normalizer", "simple",
                   "--similarity", "none"])
    assert "--tasks vlmfix_amber_generative,vlmfix_amber_discriminative" in capsys.readouterr().out
    config, _, _ = read_task(out / "vlmfix_amber_generative")
    assert config["generation_kwargs"]["max_new_tokens"] == 512
    lmms_cli.main(["write-tasks", "--out", str(out), "--benchmark", "mme", "--data", str(mme_root), "--limit", "1",
                   "--subtasks", "existence"])
    assert len(read_task(out / "vlmfix_mme")[2]) == 2  # one image, its two questions
    monkeypatch.setenv("VLMFIX_HALLUSIONBENCH", str(hallusion_root))
    lmms_cli.main(["write-tasks", "--out", str(out), "--benchmark", "hallusionbench", "--no-text-only"])
    assert len(read_task(out / "vlmfix_hallusionbench")[2]) == 5
    with pytest.raises(SystemExit):
        lmms_cli.main(["write-tasks", "--out", str(out), "--benchmark", "mme", "--questions", "q.json"])
