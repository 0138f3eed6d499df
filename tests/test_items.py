"""The shared item builders (`vlmfix.eval.items`): which questions AMBER, MME and HallusionBench ask under `limit` and
with what prompt, checked against hand-written expectations; and the benchmark app and the lmms-eval tasks, which
both call them, ask exactly the same items on the same release."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.app import KINDS, check_settings
from benchmarks.models import LOADERS, LoaderSpec
from vlmfix.eval import amber, hallusion, mme
from vlmfix.eval.items import amber_items, hallusion_items, mme_items
from vlmfix.integrations.lmms_benchmarks import amber_content, hallusion_content, mme_content
from vlmfix.testing import random_image

from .test_app_release import tiny_config
from .test_mme import Q_NO, Q_YES, write_flat

SUFFIX = " Answer with one word."
OFFICIAL_MME_SUFFIX = " Please answer yes or no."


def write_amber(root: Path) -> Path:
    """Images AMBER_10, AMBER_2, AMBER_3 (in that file order): one description query and two yes/no queries each."""
    annotations, generative, discriminative = [], [], []
    for image in (10, 2, 3):
        annotations.append({"id": len(annotations) + 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]})
        generative.append({"id": len(annotations), "image": f"AMBER_{image}.jpg", "query": "Describe this image."})
    for image in (10, 2, 3):
        for word in ("dog", "cat"):
            annotations.append({"id": len(annotations) + 1, "type": "discriminative-hallucination", "truth": "no"})
            discriminative.append({"id": len(annotations), "image": f"AMBER_{image}.jpg",
                                   "query": f"Is there a {word} in this image?"})
    (root / "data" / "query").mkdir(parents=True)
    (root / "image").mkdir()
    (root / "data" / "annotations.json").write_text(json.dumps(annotations))
    (root / "data" / "relation.json").write_text(json.dumps({"dog": [], "cat": []}))
    (root / "data" / "safe_words.txt").write_text("")
    (root / "data" / "query" / "query_generative.json").write_text(json.dumps(generative))
    (root / "data" / "query" / "query_discriminative.json").write_text(json.dumps(discriminative))
    for image in (10, 2, 3):
        random_image(16, image).save(root / "image" / f"AMBER_{image}.jpg")
    return root


def write_hallusion(root: Path) -> Path:
    """Three question sets in file order VD/illusion/0, VS/chart/0, VD/illusion/1; VS set 0 has a text-only figure."""
    rows = []
    for category, sub, set_id in (("VD", "illusion", "0"), ("VS", "chart", "0"), ("VD", "illusion", "1")):
        for figure in ("0", "1"):
            text_only = category == "VS" and figure == "0"
            rows.append({"category": category, "subcategory": sub, "visual_input": "0" if text_only else "1",
                         "set_id": set_id, "figure_id": figure, "question_id": "0",
                         "question": f"Q {category} {set_id} {figure}?", "gt_answer": "1",
                         "filename": None if text_only else f"./{category}/{sub}/{set_id}_{figure}.png"})
            if not text_only:
                folder = root / "hallusion_bench" / category / sub
                folder.mkdir(parents=True, exist_ok=True)
                random_image(16, len(rows)).save(folder / f"{set_id}_{figure}.png")
    (root / "HallusionBench.json").write_text(json.dumps(rows))
    return root


# ------------------------------------------------------------------ the builders, against hand-written items
def test_amber_items_keep_the_first_image_ids_by_number(tmp_path: Path) -> None:
    data = amber.load_amber(write_amber(tmp_path))
    chosen = amber_items(data, ("generative", "discriminative"), limit=2, prompt_suffix=SUFFIX)
    # images sorted by number: 2, 3, 10 -> limit 2 keeps 2 and 3 (not the file's first two, 10 and 2)
    assert (chosen.n_images, chosen.subset) == (2, True)
    assert [(i.key, i.prompt, i.image_path) for i in chosen.items["generative"]] == [
        (2, "Describe this image.", tmp_path / "image" / "AMBER_2.jpg"),
        (3, "Describe this image.", tmp_path / "image" / "AMBER_3.jpg")]
    assert [(i.key, i.prompt) for i in chosen.items["discriminative"]] == [
        (6, "Is there a dog in this image?" + SUFFIX), (7, "Is there a cat in this image?" + SUFFIX),
        (8, "Is there a dog in this image?" + SUFFIX), (9, "Is there a cat in this image?" + SUFFIX)]
    everything = amber_items(data, ("discriminative",))
    assert (everything.n_images, everything.subset, list(everything.items)) == (3, False, ["discriminative"])
    assert [i.key for i in everything.items["discriminative"]] == [4, 5, 6, 7, 8, 9]
    assert everything.items["discriminative"][0].prompt == "Is there a dog in this image?"  # no suffix given
    with pytest.raises(ValueError, match="`limit` must be None or an int >= 1, got 0"):
        amber_items(data, ("generative",), limit=0)


def test_mme_items_keep_the_first_images_of_each_subtask(tmp_path: Path) -> None:
    write_flat(tmp_path, "existence", ("a", "b", "c"))
    write_flat(tmp_path, "count", ("d", "e"))
    questions = mme.load_mme_folder(tmp_path, subtasks=["existence", "count"])
    chosen = mme_items(questions, limit=1)
    assert [(i.row.subtask, i.row.image, i.prompt) for i in chosen] == [  # the loaded order: subtasks by name
        ("count", "d.jpg", Q_YES), ("count", "d.jpg", Q_NO),
        ("existence", "a.jpg", Q_YES), ("existence", "a.jpg", Q_NO)]
    assert [i.key for i in chosen] == [i.row.key for i in chosen] and all(i.image_path.is_file() for i in chosen)
    lmms = mme_items(questions, prompt="lmms", prompt_suffix=SUFFIX)
    assert len(lmms) == 10 and lmms[0].prompt == Q_YES.removesuffix(OFFICIAL_MME_SUFFIX) + SUFFIX


def test_hallusion_items_keep_whole_question_sets(tmp_path: Path) -> None:
    questions = hallusion.load_hallusion(write_hallusion(tmp_path))
    chosen = hallusion_items(questions, limit=2, prompt_suffix="!")
    assert [(i.row.category, i.row.set_id, i.row.figure_id, i.prompt, i.image_path is None) for i in chosen] == [
        ("VD", "0", "0", "Q VD 0 0?!", False), ("VD", "0", "1", "Q VD 0 1?!", False),
        ("VS", "0", "0", "Q VS 0 0?!", True), ("VS", "0", "1", "Q VS 0 1?!", False)]
    with_images = hallusion_items(questions, include_text_only=False, limit=2)
    assert [(i.row.category, i.row.set_id, i.row.figure_id) for i in with_images] == [
        ("VD", "0", "0"), ("VD", "0", "1"), ("VS", "0", "1")]


# ------------------------------------------------------------------ the app and the lmms-eval tasks agree
@pytest.fixture
def tiny_loader_without_data(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import test_app_release

    monkeypatch.setitem(LOADERS, f"{test_app_release.__name__}.load_tiny",
                        LoaderSpec(lambda **settings: None, ships_data=False))


def app_items(cfg) -> list[tuple[int, Path | None, str]]:
    kind = KINDS[cfg.benchmark.kind]
    task = kind.prepare(cfg, check_settings(cfg).options, None)
    items = task.items if isinstance(task.items, list) else [i for part in task.items.values() for i in part]
    return [(i.key, i.image_path and i.image_path.resolve(), i.text) for i in items]


def lmms_items(content) -> list[tuple[int, Path | None, str]]:
    return [(doc["key"], doc["image"] and Path(doc["image"]), doc["prompt"]) for doc in content.docs]


def test_app_and_lmms_tasks_ask_the_same_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               tiny_loader_without_data: None) -> None:
    monkeypatch.setenv("VLMFIX_AMBER", str(write_amber(tmp_path / "AMBER")))
    monkeypatch.setenv("VLMFIX_MME", str(write_flat(write_flat(tmp_path / "MME", "existence", ("a", "b", "c")),
                                                    "count", ("d", "e"))))
    monkeypatch.setenv("VLMFIX_HALLUSIONBENCH", str(write_hallusion(tmp_path / "HB")))
    amber_cfg = tiny_config(tmp_path, "amber", "limit=2", "benchmark.similarity=none", "benchmark.normalizer=simple",
                            f"benchmark.prompt_suffix='{SUFFIX}'")
    data = amber.load_amber(tmp_path / "AMBER")
    lmms_amber = [item for part in ("generative", "discriminative") for item in lmms_items(amber_content(
        data, part, similarity="none", normalizer="simple", prompt_suffix=SUFFIX, limit=2))]
    assert app_items(amber_cfg) == lmms_amber and len(lmms_amber) == 6

    mme_cfg = tiny_config(tmp_path, "mme_hallucination", "limit=2", "benchmark.prompt=lmms",
                          "benchmark.subtasks=[existence,count]",
                          f"benchmark.prompt_suffix='{SUFFIX}'")
    questions = mme.load_mme_folder(tmp_path / "MME", subtasks=["existence", "count"])
    lmms_mme = lmms_items(mme_content(questions, prompt="lmms", prompt_suffix=SUFFIX, limit=2))
    assert app_items(mme_cfg) == lmms_mme and len(lmms_mme) == 8

    hb_cfg = tiny_config(tmp_path, "hallusionbench", "limit=2", "benchmark.include_text_only=false")
    hb = hallusion.load_hallusion(tmp_path / "HB")
    lmms_hb = lmms_items(hallusion_content(hb, {}, include_text_only=False, limit=2))
    assert app_items(hb_cfg) == lmms_hb and len(lmms_hb) == 3
