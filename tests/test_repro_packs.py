"""Reproduction packs (conf/experiment/repro_*.yaml): each composes with Hydra into the published setup it is
named after, validates before any model loads, and reads the image ids and question files it pins."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from benchmarks import app
from benchmarks.app import CONFIG_DIR, check_settings, prepare_chair, run
from vlmfix.eval import EvalInputError, chair, pope
from vlmfix.eval.chair.images import PINNED_DIR
from vlmfix.eval.pope.questions import CONTENT_PINS, PinnedPopeFile, questions_sha256, read_questions
from vlmfix.testing import random_image

from .test_app_release import write_amber_release, write_hallusion_release

PACKS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("repro_*.yaml"))
LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."
OPERA_HASH = "b438763b64aa385e3cee7f76c8b6fc74256aa9044c4224e9463b16551c4ef3b4"  # chair_pope.md A7 (verified)

# The published setups, written from the papers' code and the specs (not read from the configs):
# benchmark settings, then decoding (do_sample, num_beams, temperature, top_p, top_k), seed, sweep. VCD samples
# with no top-k cut (top_k=None under transformers 4.31), which transformers 5 spells top_k=0.
CHAIR_512 = {"kind": "chair", "prompt": "Please describe this image in detail.", "max_new_tokens": 512,
             "images.mode": "pinned", "images.image_ids_file": "opera_llava15_500", "normalizer": "opera_nltk",
             "quirks": "reference"}
GREEDY = (False, 1, None, None, None)
POPE_SPLITS = "pope_random,pope_popular,pope_adversarial"
VCD = {"kind": "pope", "parser": "vcd_substring", "prompt_suffix": " Please answer this question with one word.",
       "max_new_tokens": 1024}
SAMPLING = (True, 1, 1.0, 1.0, 0)
EXPECTED = {
    "repro_chair_opera500_512": (CHAIR_512, GREEDY, 0, None),
    "repro_chair_opera500_64": ({**CHAIR_512, "max_new_tokens": 64}, GREEDY, 0, None),
    "repro_pope_coco_llava15": ({"kind": "pope", "dataset": "coco", "version": "e3e3926", "parser": "official",
                                 "prompt_suffix": LLAVA_SUFFIX, "max_new_tokens": 128}, GREEDY, 0, POPE_SPLITS),
    "repro_pope_coco_opera": ({"kind": "pope", "dataset": "coco", "version": "e3e3926", "parser": "opera",
                               "prompt_suffix": "", "max_new_tokens": 10}, GREEDY, 0, POPE_SPLITS),
    "repro_pope_vcd_coco": ({**VCD, "dataset": "coco", "version": "edebdda"}, SAMPLING, 55, POPE_SPLITS),
    "repro_pope_vcd_aokvqa": ({**VCD, "dataset": "aokvqa", "version": "9b54106"}, SAMPLING, 55,
                              "pope_aokvqa_random,pope_aokvqa_popular,pope_aokvqa_adversarial"),
    "repro_pope_vcd_gqa": ({**VCD, "dataset": "gqa", "version": "9b54106"}, SAMPLING, 55,
                           "pope_gqa_random,pope_gqa_popular,pope_gqa_adversarial"),
    "repro_amber": ({"kind": "amber", "parts": ["generative", "discriminative"], "max_new_tokens_generative": 512,
                     "max_new_tokens": 128, "prompt_suffix": LLAVA_SUFFIX, "parser": "amber_exact",
                     "normalizer": "nltk", "similarity": "official", "threshold": 0.8, "quirks": "reference"},
                    GREEDY, 0, None),
    "repro_mme_hallucination": ({"kind": "mme", "subtasks": ["existence", "count", "position", "color"],
                                 "prompt": "official", "parser": "mme_official", "max_new_tokens": 128},
                                GREEDY, 0, None),
    "repro_mme_hallucination_lmms": ({"kind": "mme", "subtasks": ["existence", "count", "position", "color"],
                                      "prompt": "lmms", "prompt_suffix": LLAVA_SUFFIX, "parser": "mme_lmms",
                                      "max_new_tokens": 16}, GREEDY, 0, None),
    "repro_hallusionbench": ({"kind": "hallusion", "include_text_only": True, "prompt_suffix": "",
                              "parser": "vlmevalkit_yorn", "unknown_no_visual": "correct", "max_new_tokens": 128},
                             GREEDY, 0, None),
}


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def setting(node, dotted: str):
    for key in dotted.split("."):
        node = node[key]
    return app.plain(node)


@pytest.fixture
def checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local 'checkpoint' directory for the llava-1.5-7b preset (the checks look for its config.json only)."""
    folder = tmp_path / "llava-1.5-7b"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("VLMFIX_LLAVA15_7B", str(folder))
    for variable in ("VLMFIX_COCO", "VLMFIX_POPE", "VLMFIX_GQA", "VLMFIX_AMBER", "VLMFIX_MME", "VLMFIX_HALLUSIONBENCH"):
        monkeypatch.delenv(variable, raising=False)
    return folder


def test_every_pack_is_listed_with_its_published_setup():
    assert sorted(EXPECTED) == PACKS


@pytest.mark.parametrize("pack", PACKS)
def test_pack_composes_into_its_published_setup(pack: str):
    bench, (do_sample, beams, temperature, top_p, top_k), seed, sweep = EXPECTED[pack]
    cfg = composed(f"experiment={pack}")
    assert cfg.model.name == "llava-1.5-7b" and cfg.batch_size == 1 and cfg.limit is None and cfg.seed == seed
    assert {key: setting(cfg.benchmark, key) for key in bench} == bench
    assert (cfg.decoding.do_sample, cfg.decoding.num_beams) == (do_sample, beams)
    if do_sample:
        assert (cfg.decoding.temperature, cfg.decoding.top_p) == (temperature, top_p)
    assert cfg.decoding.top_k == top_k  # null: transformers' default; VCD's packs: 0, no cut
    params = cfg.hydra.sweeper.params or {}
    assert params.get("benchmark") == sweep
    for swept in (sweep or "").split(",")[1:]:  # every job of the sweep keeps the pack's settings
        job = composed(f"experiment={pack}", f"benchmark={swept}")
        assert job.benchmark.split == swept.rsplit("_", 1)[1]
        assert {key: setting(job.benchmark, key) for key in bench} == bench
        assert job.benchmark.split in job.benchmark.name and job.benchmark.name != cfg.benchmark.name


def test_packs_follow_model_and_method_overrides():
    cfg = composed("experiment=repro_chair_opera500_512", "model=qwen2-vl-7b", "method=opera")
    assert cfg.model.name == "qwen2-vl-7b" and cfg.decoding.num_beams == 5  # OPERA's beam search
    assert cfg.benchmark.max_new_tokens == 512 and cfg.benchmark.prompt == "Please describe this image in detail."


# ------------------------------------------------------------------ CHAIR: the pinned image list
def shipped_ids() -> list[int]:
    """The shipped list's ids, read as plain JSON (independently of the reader under test)."""
    return json.loads((Path(chair.__file__).parent.parent / "data" / PINNED_DIR /
                       "chair_opera_llava15_500.json").read_text())["image_ids"]


def test_shipped_list_is_operas_500_images():
    ids = shipped_ids()
    assert len(ids) == len(set(ids)) == 500 and ids[:3] == [226988, 337443, 112022]  # OPERA's log, file order
    selection = chair.read_pinned_list("opera_llava15_500")
    assert list(selection.image_ids) == ids and selection.mode == "pinned"
    assert hashlib.sha256(",".join(map(str, sorted(ids))).encode()).hexdigest() == OPERA_HASH == selection.hash
    assert chair.pinned_list_names() == ["opera_llava15_500"]


def test_an_edited_or_unknown_pinned_list_is_refused(tmp_path: Path):
    document = json.loads((Path(chair.__file__).parent.parent / "data" / PINNED_DIR /
                           "chair_opera_llava15_500.json").read_text())
    document["image_ids"][0] += 1
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(document))
    with pytest.raises(EvalInputError, match="the list was edited"):
        chair.read_pinned_list(edited)
    mine = {**document, "name": "mine", "image_ids": [1, 2, 3], "image_list_hash": chair.image_list_hash([1, 2, 3])}
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    assert chair.read_pinned_list(tmp_path / "mine.json").image_ids == (1, 2, 3)  # a list of one's own
    with pytest.raises(EvalInputError, match="opera_llava15_500"):
        chair.read_pinned_list("opera_llava15_5000")
    (tmp_path / "bare.json").write_text(json.dumps({"image_ids": [1]}))
    with pytest.raises(EvalInputError, match="lacks name, source, derivation, image_list_hash"):
        chair.read_pinned_list(tmp_path / "bare.json")


def write_coco(root: Path, image_ids: list[int]) -> Path:
    """A COCO 2014 val layout holding `image_ids` (empty image files: the checks look for the files only)."""
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in image_ids]
    categories = [{"id": 18, "name": "dog"}]
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(
        {"images": images, "categories": categories,
         "annotations": [{"id": 1, "image_id": image_ids[0], "category_id": 18, "iscrowd": 0,
                          "bbox": [0, 0, 1, 1], "area": 1}]}))
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(
        {"images": images, "annotations": [{"id": 1, "image_id": image_ids[0], "caption": "A dog."}]}))
    for image in images:
        (root / "val2014" / image["file_name"]).touch()
    return root


@pytest.mark.parametrize("pack", ["repro_chair_opera500_512", "repro_chair_opera500_64"])
def test_chair_pack_reads_its_pinned_ids_from_the_local_coco(pack, tmp_path, checkpoint, monkeypatch):
    ids = shipped_ids()
    monkeypatch.setenv("VLMFIX_COCO", str(write_coco(tmp_path / "coco", ids + [9, 10])))
    cfg = composed(f"experiment={pack}", f"results_dir={tmp_path / 'results'}", "benchmark.normalizer=simple")
    checked = check_settings(cfg)
    task = prepare_chair(cfg, checked.options, checked.data)
    assert [item.key for item in task.items] == ids  # OPERA's order; the two extra images are not used
    assert task.selection.describe() == {"mode": "pinned", "n": 500, "seed": None, "source": "opera_llava15_500",
                                         "image_list_hash": OPERA_HASH}
    limited = composed(f"experiment={pack}", f"results_dir={tmp_path / 'results'}", "benchmark.normalizer=simple",
                       "limit=7")
    assert list(check_settings(limited).options.image_list.image_ids) == ids[:7]


def test_chair_pack_without_nltk_data_or_coco_fails_naming_the_fix(tmp_path, checkpoint, monkeypatch):
    cfg = composed("experiment=repro_chair_opera500_512", f"results_dir={tmp_path}", "benchmark.normalizer=simple")
    with pytest.raises(FileNotFoundError, match="VLMFIX_COCO is not set"):
        check_settings(cfg)
    monkeypatch.setitem(sys.modules, "nltk", None)
    with pytest.raises(Exception, match="chair.normalizer=simple"):
        check_settings(composed("experiment=repro_chair_opera500_512", f"results_dir={tmp_path}"))


def test_pinned_ids_missing_from_the_local_coco_are_one_error_before_loading(tmp_path, checkpoint, monkeypatch):
    ids = shipped_ids()
    absent = {ids[0], ids[250], ids[499]}
    monkeypatch.setenv("VLMFIX_COCO", str(write_coco(tmp_path / "coco", [i for i in ids if i not in absent])))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the image list was checked")

    monkeypatch.setattr(app, "instantiate", no_model)
    cfg = composed("experiment=repro_chair_opera500_64", f"results_dir={tmp_path / 'results'}",
                   "benchmark.normalizer=simple")
    with pytest.raises(ValueError) as error:
        run(cfg)
    message = str(error.value)
    assert "benchmark.images.image_ids_file" in message and "data/repro/chair_opera_llava15_500.json" in message
    assert "3 of its 500 image ids are not in data.instances" in message
    assert str(sorted(absent)[0]) in message or str(ids[0]) in message


def test_image_ids_file_needs_the_pinned_mode(tmp_path, checkpoint):
    cfg = composed("experiment=repro_chair_opera500_512", f"results_dir={tmp_path}", "benchmark.normalizer=simple",
                   "benchmark.images.mode=sample")
    with pytest.raises(ValueError, match="set benchmark.images.mode=pinned to use it"):
        check_settings(cfg)
    cfg = composed("experiment=repro_chair_opera500_512", f"results_dir={tmp_path}", "benchmark.normalizer=simple",
                   "benchmark.images.image_ids_file=null")
    with pytest.raises(ValueError, match="opera_llava15_500"):
        check_settings(cfg)


# ------------------------------------------------------------------ POPE: the pinned release version
def write_pope_release(root: Path, images: Path, layout: str) -> Path:
    """A two-image question file in the RUCAIBox (`output/coco/`) or VCD layout, and its images."""
    rows = [{"question_id": n + 1, "image": f"COCO_val2014_{n // 2:012d}.jpg",
             "text": f"Is there a {name} in the image?", "label": label}
            for n, (name, label) in enumerate([("dog", "yes"), ("cat", "no"), ("cup", "yes"), ("bus", "no")])]
    path = root / layout
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    images.mkdir(parents=True, exist_ok=True)
    for n in range(2):
        random_image(8, n).save(images / f"COCO_val2014_{n:012d}.jpg")
    return path


@pytest.mark.parametrize(("pack", "layout", "versions", "accepted"), [
    ("repro_pope_coco_llava15", "output/coco/coco_pope_random.json", ("e3e3926",), True),
    ("repro_pope_coco_opera", "pope_coco/coco_pope_random.json", ("e3e3926",), True),  # an OPERA clone
    ("repro_pope_vcd_coco", "experiments/data/POPE/coco/coco_pope_random.json", ("edebdda", "head"), True),
    ("repro_pope_coco_llava15", "output/coco/coco_pope_random.json", ("edebdda", "head"), False),
    ("repro_pope_vcd_coco", "experiments/data/POPE/coco/coco_pope_random.json", ("e3e3926",), False),
])
def test_pope_pack_accepts_only_its_pinned_release(pack, layout, versions, accepted, tmp_path, checkpoint,
                                                   monkeypatch):
    path = write_pope_release(tmp_path / "POPE", tmp_path / "coco" / "val2014", layout)
    monkeypatch.setitem(CONTENT_PINS, questions_sha256(read_questions(path)), PinnedPopeFile("random", versions))
    monkeypatch.setenv("VLMFIX_POPE", str(tmp_path / "POPE"))
    monkeypatch.setenv("VLMFIX_COCO", str(tmp_path / "coco"))
    cfg = composed(f"experiment={pack}", f"results_dir={tmp_path / 'results'}")
    if not accepted:
        with pytest.raises(ValueError, match=f"pins POPE version {cfg.benchmark.version}, but .* version.s. "
                                             f"{', '.join(versions)}"):
            check_settings(cfg)
        return
    options = check_settings(cfg).options
    assert options.question_file.versions == versions and options.dataset == "coco"
    assert options.images == tmp_path / "coco" / "val2014"


def test_pope_pack_refuses_an_unreleased_file(tmp_path, checkpoint, monkeypatch):
    write_pope_release(tmp_path / "POPE", tmp_path / "coco" / "val2014", "output/coco/coco_pope_random.json")
    monkeypatch.setenv("VLMFIX_POPE", str(tmp_path / "POPE"))
    monkeypatch.setenv("VLMFIX_COCO", str(tmp_path / "coco"))
    cfg = composed("experiment=repro_pope_coco_llava15", f"results_dir={tmp_path / 'results'}")
    with pytest.warns(UserWarning, match="not one of the pinned"), pytest.raises(ValueError, match="not a released"):
        check_settings(cfg)
    cfg = composed("experiment=repro_pope_coco_llava15", f"results_dir={tmp_path / 'results'}",
                   "benchmark.version=null")
    with pytest.warns(UserWarning, match="not one of the pinned"):
        assert check_settings(cfg).options.question_file.versions == ()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="benchmark.version"):
        check_settings(composed("experiment=repro_pope_coco_llava15", f"results_dir={tmp_path / 'results'}",
                                "benchmark.version=v1"))


@pytest.mark.parametrize("pack", ["repro_pope_coco_llava15", "repro_pope_vcd_aokvqa", "repro_pope_vcd_gqa"])
def test_pope_pack_without_its_clone_names_the_variable(pack, tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="VLMFIX_POPE is not set"):
        check_settings(composed(f"experiment={pack}", f"results_dir={tmp_path}"))


def test_versions_name_the_pinned_releases():
    pinned = {version for file in CONTENT_PINS.values() for version in file.versions}
    assert pinned == set(pope.VERSIONS)


# ------------------------------------------------------------------ AMBER, MME, HallusionBench
def write_mme_subset(root: Path) -> Path:
    for n, subtask in enumerate(("existence", "count", "position", "color")):
        (root / subtask).mkdir(parents=True)
        random_image(8, n).save(root / subtask / "a.jpg")
        (root / subtask / "a.txt").write_text("Is there a dog? Please answer yes or no.\tYes\n"
                                              "Is there a cat? Please answer yes or no.\tNo\n")
    return root


@pytest.mark.parametrize("pack", ["repro_mme_hallucination", "repro_mme_hallucination_lmms"])
def test_mme_pack_validates_on_a_local_release(pack, tmp_path, checkpoint, monkeypatch):
    with pytest.raises(FileNotFoundError, match="VLMFIX_MME is not set"):
        check_settings(composed(f"experiment={pack}", f"results_dir={tmp_path}"))
    monkeypatch.setenv("VLMFIX_MME", str(write_mme_subset(tmp_path / "MME")))
    cfg = composed(f"experiment={pack}", f"results_dir={tmp_path}")
    checked = check_settings(cfg)
    task = app.KINDS["mme"].prepare(cfg, checked.options, checked.data)
    expected = ("Is there a dog? Please answer yes or no." if pack.endswith("hallucination")
                else "Is there a dog?" + LLAVA_SUFFIX)
    assert len(task.items) == 8 and task.items[0].text == expected


def test_hallusionbench_pack_validates_on_a_local_release(tmp_path, checkpoint, monkeypatch):
    with pytest.raises(FileNotFoundError, match="VLMFIX_HALLUSIONBENCH is not set"):
        check_settings(composed("experiment=repro_hallusionbench", f"results_dir={tmp_path}"))
    monkeypatch.setenv("VLMFIX_HALLUSIONBENCH", str(write_hallusion_release(tmp_path / "HB")))
    cfg = composed("experiment=repro_hallusionbench", f"results_dir={tmp_path}")
    checked = check_settings(cfg)
    task = app.KINDS["hallusion"].prepare(cfg, checked.options, checked.data)
    assert [item.text for item in task.items] == ["Is the left line longer?", "Is Paris the capital of France?"]


def test_amber_pack_needs_the_official_tools(tmp_path, checkpoint, monkeypatch):
    """The pack scores as inference.py does (NLTK nouns, spaCy en_core_web_lg); without them it is refused with
    the install command, before any model loads."""
    with pytest.raises(FileNotFoundError, match="VLMFIX_AMBER is not set"):
        check_settings(composed("experiment=repro_amber", f"results_dir={tmp_path}"))
    monkeypatch.setenv("VLMFIX_AMBER", str(write_amber_release(tmp_path / "AMBER")))
    monkeypatch.setitem(sys.modules, "nltk", None)
    with pytest.raises(Exception, match="nltk"):
        check_settings(composed("experiment=repro_amber", f"results_dir={tmp_path}"))
    cfg = composed("experiment=repro_amber", f"results_dir={tmp_path}", "benchmark.normalizer=simple",
                   "benchmark.similarity=none")
    assert check_settings(cfg).options.parts == ("generative", "discriminative")
