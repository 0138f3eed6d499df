"""The `vlmfix` model inside lmms-eval, offline on the fast toy: lmms-eval's answers equal the benchmark app's runner
on the same items, its POPE and HallusionBench numbers equal vlmfix's scorers, and its results carry vlmfix's
protocol fingerprint. Skipped where lmms-eval is not installed (it is not
in CI: its dependencies replace the pinned CPU torch; see the README's lmms-eval section)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from benchmarks.generation import Item, generate_predictions  # noqa: E402
from benchmarks.models import load_toy  # noqa: E402
from vlmfix.eval import fingerprint_hash, hallusion, pope  # noqa: E402
from vlmfix.integrations.lmms_eval import NO_LIKELIHOOD, VlmfixLMM  # noqa: E402
from vlmfix.integrations.lmms_tasks import (  # noqa: E402
    toy_miniatures,
    toy_pope_questions,
    write_hallusion_task,
    write_pope_task,
)
from vlmfix.integrations.model_args import parse_methods  # noqa: E402

TASK = "vlmfix_toy_pope"
METHODS = "pai:alpha=0.5"  # a two-stream method the toy serves (VAR needs sink dimensions the toy lacks)
BATCH = 2
MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[pope.PopeQuestion], Path]:
    """The toy's 12 POPE questions (2 images) written as a local lmms-eval task."""
    root = tmp_path_factory.mktemp("lmms")
    questions, images = toy_pope_questions(True, "random", 2, root / "built")
    write_pope_task(root / "tasks", questions, images, name=TASK, split="random", max_new_tokens=MAX_NEW_TOKENS)
    return root, questions, images


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets.config

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # read at import time


def runner_answers(questions: list[pope.PopeQuestion], images: Path, out: Path) -> dict[int, str]:
    """The benchmark app's runner on the same items, methods, batch size and decoding."""
    loaded = load_toy(fast=True)
    items = [Item(q.question_id, images / q.image, q.text) for q in questions]
    rows = generate_predictions(items, model=loaded.model, processor=loaded.processor, methods=parse_methods(METHODS),
                                out_path=out, key_name="question_id", text_name="text", batch_size=BATCH,
                                max_new_tokens=MAX_NEW_TOKENS, decoding={"do_sample": False, "num_beams": 1}, seed=0,
                                progress=False)
    return {key: row["text"] for key, row in rows.items()}


def test_simple_evaluate_equals_the_runner_and_the_scorer(toy_task, tmp_path: Path) -> None:
    root, questions, images = toy_task
    lm = VlmfixLMM(pretrained="toy_fast", methods=METHODS, batch_size=BATCH, device="cpu",
                   report_path=str(tmp_path / "reports.jsonl"))
    results = simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(root / "tasks"),
                                                                                   include_defaults=False),
                              log_samples=True, bootstrap_iters=0)
    assert results is not None
    samples = results["samples"][TASK]
    answers = {int(s["doc"]["key"]): s["filtered_resps"][0] for s in samples}
    assert len(answers) == len(questions) == 12

    expected = runner_answers(questions, images, tmp_path / "runner.jsonl")
    assert answers == expected

    scores = pope.score_pope(questions, expected, parser="official", split="random")
    metrics = results["results"][TASK]
    assert math.isclose(metrics["pope_f1,none"], scores.f1)
    assert math.isclose(metrics["pope_accuracy,none"], scores.accuracy)
    assert math.isclose(metrics["pope_yes_ratio,none"], scores.yes_ratio)
    fingerprint = metrics["vlmfix_fingerprint,none"]  # the protocol, as the app's result.json holds it
    assert metrics["vlmfix_fingerprint_sha256,none"] == fingerprint_hash(fingerprint)
    assert fingerprint["model"]["id"] == "vlmfix-toy-fast" and fingerprint["method"]["name"] == "pai"
    assert fingerprint["method"]["params"]["pai"]["alpha"] == 0.5
    assert fingerprint["decoding"]["max_new_tokens"] == MAX_NEW_TOKENS and fingerprint["decoding"]["mode"] == "greedy"
    assert fingerprint["execution"]["batch_size"] == BATCH and fingerprint["pope"]["parser"] == "official"
    assert fingerprint["libraries"]["lmms_eval"] is not None
    # the method ran on every batch: its report counts the contrast steps it decided
    reports = [json.loads(line) for line in (tmp_path / "reports.jsonl").read_text().splitlines()]
    assert len(reports) == 12 // BATCH
    assert all(r["report"]["pai"]["applied"]["contrast_steps"] > 0 for r in reports)


def test_loglikelihood_and_multi_round_are_refused_with_the_reason() -> None:
    lm = VlmfixLMM(pretrained="toy_fast", device="cpu")
    request = Instance(request_type="loglikelihood", arguments=("ctx", "cont"), idx=0,
                       metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    with pytest.raises(NotImplementedError, match="act inside `generate`"):
        lm.loglikelihood([request])
    assert "generate_until" in NO_LIKELIHOOD
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([request])


def test_bad_model_arguments_fail_before_loading() -> None:
    with pytest.raises(ValueError, match="unknown vlmfix model argument"):
        VlmfixLMM(pretrained="toy_fast", method="var")
    with pytest.raises(ValueError, match="--batch_size auto"):
        VlmfixLMM(pretrained="toy_fast", batch_size="auto")
    with pytest.raises(ValueError, match="is not key=value"):
        VlmfixLMM(pretrained="toy_fast", methods="pai:alpha")


def test_cli_run_through_the_entry_point(toy_task, tmp_path: Path) -> None:
    if not any(ep.name == "vlmfix" for ep in entry_points(group="lmms_eval.models")):
        pytest.skip("vlmfix is not installed with its lmms_eval.models entry point (pip install -e .)")
    executable = shutil.which("lmms-eval", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("the lmms-eval command is not installed beside this Python")
    root, questions, images = toy_task
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    done = subprocess.run(
        [executable, "--model", "vlmfix", "--model_args", f"pretrained=toy_fast,methods={METHODS}",
         "--include_path", str(root / "tasks"), "--tasks", TASK, "--batch_size", str(BATCH), "--device", "cpu",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted((tmp_path / "out").rglob(f"*samples_{TASK}*.jsonl"))
    assert files, f"no samples file under {tmp_path / 'out'}: {done.stdout[-2000:]}"
    rows = [json.loads(line)["pope_f1"] for line in files[0].read_text().splitlines()]  # process_results' rows
    answers = {int(row["key"]): row["answer"] for row in rows}
    expected = runner_answers(questions, images, tmp_path / "runner.jsonl")
    assert answers == expected
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())["results"][TASK]
    assert math.isclose(results["pope_f1,none"], pope.score_pope(questions, expected, split="random").f1)
    assert results["vlmfix_fingerprint,none"]["method"]["params"]["pai"]["alpha"] == 0.5


def test_hallusion_task_with_text_only_questions_equals_the_runner_and_the_scorer(tmp_path: Path) -> None:
    root = toy_miniatures(True, tmp_path / "mini") / "hallusionbench"
    bench = hallusion.load_hallusion(root)
    sets = list(dict.fromkeys((q.category, q.subcategory, q.set_id) for q in bench if q.subcategory == "toy_pair"))
    kept = [q for q in bench if (q.category, q.subcategory, q.set_id) in sets[:2]]  # 2 sets: 6 questions, 2 no image
    write_hallusion_task(tmp_path / "tasks", kept, {"source": "toy_miniature"}, name="vlmfix_toy_hb",
                         max_new_tokens=MAX_NEW_TOKENS)
    lm = VlmfixLMM(pretrained="toy_fast", methods=METHODS, batch_size=BATCH, device="cpu")
    results = simple_evaluate(model=lm, tasks=["vlmfix_toy_hb"], bootstrap_iters=0, log_samples=True,
                              task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    assert results is not None
    answers = {int(s["doc"]["key"]): s["filtered_resps"][0] for s in results["samples"]["vlmfix_toy_hb"]}
    loaded = load_toy(fast=True)
    items = [Item(q.key, q.image_path, q.question) for q in kept]
    assert sum(item.image_path is None for item in items) == 2
    rows = generate_predictions(items, model=loaded.model, processor=loaded.processor, methods=parse_methods(METHODS),
                                out_path=tmp_path / "runner.jsonl", key_name="key", text_name="text", batch_size=BATCH,
                                max_new_tokens=MAX_NEW_TOKENS, decoding={"do_sample": False, "num_beams": 1}, seed=0,
                                progress=False)
    assert answers == {key: row["text"] for key, row in rows.items()}
    scores = hallusion.score_hallusion(kept, answers)
    metrics = results["results"]["vlmfix_toy_hb"]
    assert (metrics["hallusion_aAcc,none"], metrics["hallusion_qAcc,none"]) == (scores.aacc, scores.qacc)
    assert metrics["vlmfix_fingerprint,none"]["hallusion"]["include_text_only"] is True


def _request(doc_to_visual, doc_id: int, context: str) -> Instance:
    gen_kwargs = {"until": [], "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "do_sample": False}
    return Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1},
                    arguments=(context, gen_kwargs, doc_to_visual, doc_id, "t", "test"))


def test_text_only_requests_match_the_runner_and_two_images_are_refused(toy_task, tmp_path: Path) -> None:
    _, questions, images = toy_task
    lm = VlmfixLMM(pretrained="toy_fast", methods=METHODS, batch_size=BATCH, device="cpu")
    lm.task_dict = {"t": {"test": {0: {}, 1: {}}}}
    texts = [q.text for q in questions[:2]]
    answers = lm.generate_until([_request(lambda doc: [], i, text) for i, text in enumerate(texts)])
    loaded = load_toy(fast=True)
    rows = generate_predictions([Item(i, None, text) for i, text in enumerate(texts)], model=loaded.model,
                                processor=loaded.processor, methods=parse_methods(METHODS),
                                out_path=tmp_path / "runner.jsonl", key_name="question_id", text_name="text",
                                batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS, decoding={"do_sample": False},
                                seed=0, progress=False)
    assert answers == [rows[0]["text"], rows[1]["text"]]

    from PIL import Image

    two = [Image.open(images / questions[0].image)] * 2
    with pytest.raises(ValueError, match="2 images"):
        lm.generate_until([_request(lambda doc: two, 0, texts[0])])
