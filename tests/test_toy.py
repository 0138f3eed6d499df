"""Tests of the toy VLM (`vlmfix.toy`): data, co-occurrence prior, caching, model save/load/generate.

The fast toy is built once per session into a temporary directory (about a minute on 2 cores).
Expectations come from the issue and from COCO itself, recomputed here independently of the code.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmfix import toy
from vlmfix.toy import build as toy_build
from vlmfix.toy.dataset import generate_split, write_split
from vlmfix.toy.model import ModelSpec
from vlmfix.toy.preference import write_preferences
from vlmfix.toy.scenes import sample_train_names
from vlmfix.toy.train import (
    RowEncoder,
    TrainSpec,
    answer_loss,
    collate,
    image_features,
    images_to_tensor,
    normalise,
    patch_labels,
    sample_rows,
    train,
)

# Official COCO 2014 category ids (instances_*2014.json) of the categories the toy may use.
COCO_IDS = {
    "person": 1, "bicycle": 2, "car": 3, "motorcycle": 4, "airplane": 5, "bus": 6, "train": 7, "truck": 8,
    "boat": 9, "traffic light": 10, "fire hydrant": 11, "stop sign": 13, "bench": 15, "bird": 16, "cat": 17,
    "dog": 18, "horse": 19, "sheep": 20, "cow": 21, "umbrella": 28, "frisbee": 34, "skis": 35,
    "sports ball": 37, "kite": 38, "skateboard": 41, "surfboard": 42, "tennis racket": 43, "bottle": 44,
    "cup": 47, "fork": 48, "knife": 49, "spoon": 50, "bowl": 51, "banana": 52, "apple": 53, "pizza": 59,
    "chair": 62, "couch": 63, "laptop": 73, "mouse": 74, "remote": 75, "keyboard": 76, "book": 84,
    "clock": 85, "vase": 86, "scissors": 87,
}
# Words of the CHAIR synonym lines (node word first) for categories the toy may use; a caption word
# that is one of these for another category would be a false CHAIR mention.
CHAIR_WORDS = {
    "person": "person girl boy man woman kid child people adult rider player", "bicycle": "bicycle bike",
    "car": "car automobile van sedan cab jeep taxi", "boat": "boat ship sailboat canoe yacht",
    "traffic light": "traffic light stoplight streetlight", "bird": "bird duck owl parrot",
    "cat": "cat kitten", "dog": "dog puppy pup doggy", "horse": "horse pony", "umbrella": "umbrella",
    "frisbee": "frisbee", "sports ball": "ball", "surfboard": "surfboard longboard",
    "tennis racket": "racket", "bottle": "bottle", "fork": "fork", "knife": "knife", "banana": "banana",
    "pizza": "pizza", "chair": "chair seat stool", "laptop": "laptop computer notebook", "mouse": "mouse",
    "book": "book", "clock": "clock", "dining table": "table desk", "orange": "orange", "tie": "bow",
    "bowl": "container", "tv": "monitor television", "cell phone": "phone telephone", "remote": "remote",
}
TWO_WORD = {"traffic light", "sports ball", "tennis racket"}


def reference_mentions(caption: str) -> set[str]:
    """Categories a caption names, by the CHAIR word lists above (two-word names first)."""
    text = " " + " ".join(re.findall(r"[a-z]+", caption.lower())) + " "
    found = set()
    for name in TWO_WORD:
        if f" {name} " in text:
            found.add(name)
            text = text.replace(f" {name} ", " ")
    for name, words in CHAIR_WORDS.items():
        if any(f" {word} " in text for word in words.split() if " " not in word):
            found.add(name)
    return found


@pytest.fixture(scope="session")
def fast_toy(tmp_path_factory) -> toy.ToyPaths:
    return toy.build_toy(tmp_path_factory.mktemp("toy") / "fast", fast=True, progress=False)


@pytest.fixture(scope="session")
def loaded(fast_toy):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(fast_toy.model_dir)
    model = AutoModelForImageTextToText.from_pretrained(fast_toy.model_dir).eval()
    return processor, model


def _coco(path: Path):
    from pycocotools.coco import COCO

    return COCO(str(path))


# ---- vocabulary ----------------------------------------------------------------------------------


def test_categories_are_real_coco_categories_with_pairs():
    assert 20 <= len(toy.CATEGORIES) <= 28
    for category in toy.CATEGORIES:
        assert COCO_IDS[category.name] == category.id
        for synonym in category.synonyms:  # each synonym maps back to its own category under CHAIR
            assert synonym in CHAIR_WORDS[category.name].split()
    glyphs = {(c.glyph.shape, c.glyph.colour, c.glyph.pattern) for c in toy.CATEGORIES}
    assert len(glyphs) == len(toy.CATEGORIES)
    members = [name for pair in toy.PAIRS for name in pair]
    assert len(set(members)) == len(members) and set(members) <= {c.name for c in toy.CATEGORIES}
    assert ("dog", "frisbee") in toy.PAIRS and ("fork", "knife") in toy.PAIRS


def test_find_mentions_uses_names_synonyms_and_two_word_names():
    caption = "A puppy with a frisbee, a traffic light and a ball next to a man."
    assert toy.find_mentions(caption) == ["dog", "frisbee", "traffic light", "sports ball", "person"]
    assert toy.find_mentions("There is nothing in the image.") == []


# ---- scenes and COCO files -----------------------------------------------------------------------


def test_annotation_files_are_valid_coco(fast_toy):
    annotations = fast_toy.data_dir / "annotations"
    for split in ("train", "val"):
        instances = _coco(annotations / f"instances_{split}.json")
        captions = _coco(annotations / f"captions_{split}.json")
        names = {c["id"]: c["name"] for c in instances.loadCats(instances.getCatIds())}
        assert all(COCO_IDS[name] == cat_id for cat_id, name in names.items())
        image_ids = instances.getImgIds()
        assert image_ids and sorted(image_ids) == sorted(captions.getImgIds())
        for image_id in image_ids:
            info = instances.loadImgs([image_id])[0]
            path = fast_toy.data_dir / "images" / split / info["file_name"]
            with Image.open(path) as picture:
                assert picture.size == (info["width"], info["height"]) and picture.mode == "RGB"
                assert 96 <= picture.width <= 128
            objects = instances.loadAnns(instances.getAnnIds(imgIds=[image_id]))
            assert 1 <= len(objects) <= 4
            assert len({a["category_id"] for a in objects}) == len(objects)
            for obj in objects:
                x, y, w, h = obj["bbox"]
                assert 0 <= x and 0 <= y and x + w <= info["width"] and y + h <= info["height"]
                assert 0 < obj["area"] <= w * h and obj["iscrowd"] == 0
                assert instances.annToMask(obj).sum() > 0
            texts = [a["caption"] for a in captions.loadAnns(captions.getAnnIds(imgIds=[image_id]))]
            assert len(set(texts)) >= 3
            truth = {names[a["category_id"]] for a in objects}
            for text in texts:
                assert reference_mentions(text) == truth, text
    train_ids = set(_coco(annotations / "instances_train.json").getImgIds())
    assert not train_ids & set(_coco(annotations / "instances_val.json").getImgIds())


def test_captions_sometimes_use_chair_synonyms(fast_toy):
    payload = json.loads((fast_toy.data_dir / "annotations" / "captions_train.json").read_text())
    words = Counter(w for a in payload["annotations"] for w in re.findall(r"[a-z]+", a["caption"].lower()))
    synonyms = {s for c in toy.CATEGORIES for s in c.synonyms}
    assert sum(words[s] for s in synonyms) > 0.05 * sum(words[c.name.split()[-1]] for c in toy.CATEGORIES)


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    def files(seed: int, out: Path) -> dict[str, bytes]:
        for split, count, first in (("train", 12, 1), ("val", 6, 13)):
            images = generate_split(split, count, first, seed=seed, image_size=112, pair_keep=0.95,
                                    broken_share=0.5)
            write_split(out, split, images)
            if split == "train":
                write_preferences(out / "preference_train.jsonl", images, seed=seed)
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first, again, other = files(0, tmp_path / "a"), files(0, tmp_path / "b"), files(1, tmp_path / "c")
    assert len(first) == 18 + 4 + 1
    assert first == again
    assert first.keys() == other.keys()
    assert first["annotations/instances_train.json"] != other["annotations/instances_train.json"]
    pngs = [name for name in first if name.endswith(".png")]
    assert all(first[name] == again[name] for name in pngs)
    assert any(first[name] != other[name] for name in pngs)


def test_pairs_cooccur_in_at_least_85_percent_of_training_images():
    rng = np.random.default_rng(0)
    scenes = [set(sample_train_names(rng, pair_keep=toy.FULL.pair_keep)) for _ in range(6000)]
    for a, b in toy.PAIRS:
        either = [s for s in scenes if a in s or b in s]
        both = [s for s in either if a in s and b in s]
        assert len(either) > 300
        assert len(both) / len(either) >= 0.85, (a, b)
        assert len(both) < len(either)  # a few broken pairs exist, so the model can learn to look
    counts = Counter(len(s) for s in scenes)
    assert set(counts) == {1, 2, 3, 4}


def test_val_split_holds_the_controlled_share_of_broken_pairs(fast_toy):
    instances = _coco(fast_toy.data_dir / "annotations" / "instances_val.json")
    names = {c["id"]: c["name"] for c in instances.loadCats(instances.getCatIds())}
    partner = {a: b for a, b in toy.PAIRS} | {b: a for a, b in toy.PAIRS}
    broken = 0
    for image_id in instances.getImgIds():
        present = {names[a["category_id"]] for a in instances.loadAnns(instances.getAnnIds(imgIds=[image_id]))}
        lone = [n for n in present if n in partner and partner[n] not in present]
        assert len(lone) <= 1
        broken += len(lone)
    settings = toy.FAST
    assert broken == round(settings.val_images * settings.val_broken_share)


def test_preference_file_loads_with_datasets_and_rejects_a_hallucination(fast_toy):
    from datasets import load_dataset

    rows = load_dataset("json", data_files=str(fast_toy.preference_file), split="train")
    assert set(rows.column_names) >= {"image", "prompt", "chosen", "rejected"}
    instances = _coco(fast_toy.data_dir / "annotations" / "instances_train.json")
    assert len(rows) == len(instances.getImgIds())
    names = {c["id"]: c["name"] for c in instances.loadCats(instances.getCatIds())}
    partner = {a: b for a, b in toy.PAIRS} | {b: a for a, b in toy.PAIRS}
    added_partner = 0
    for row in rows:
        assert (fast_toy.data_dir / row["image"]).is_file()
        assert row["prompt"] == toy.CAPTION_PROMPT
        truth = {names[a["category_id"]] for a in instances.loadAnns(instances.getAnnIds(imgIds=[row["image_id"]]))}
        assert reference_mentions(row["chosen"]) == truth
        rejected = reference_mentions(row["rejected"])
        extra = rejected - truth
        assert len(extra) == 1 and len(truth - rejected) <= 1
        lone = {partner[n] for n in truth if n in partner and partner[n] not in truth}
        if lone:
            assert extra <= lone and rejected > truth  # adds the absent partner
            added_partner += 1
    assert added_partner > 0


# ---- training ------------------------------------------------------------------------------------


def test_training_rows_match_the_chat_template_tokenisation(loaded):
    processor, _ = loaded
    tokenizer = processor.tokenizer
    encoder = RowEncoder(tokenizer, image_tokens=49)
    for user, answer in (("Describe this image.", "A dog with a frisbee."), (toy.question("umbrella"), "No")):
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        text = processor.apply_chat_template(conversation)
        assert text == f"USER: <image>\n{user} ASSISTANT: {answer}</s>"
        picture = Image.new("RGB", (112, 112))
        expected = processor(images=[picture], text=[text], return_tensors="pt")["input_ids"][0].tolist()
        assert encoder.prompt(user) + encoder.answer(answer) == expected
        assert tokenizer.unk_token_id not in expected


def test_training_normalisation_matches_the_processor(loaded, fast_toy):
    processor, _ = loaded
    path = next((fast_toy.data_dir / "images" / "val").glob("*.png"))
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)  # [H, W, 3]
    expected = torch.from_numpy((pixels / 255.0 - 0.5) / 0.25).permute(2, 0, 1).float()
    got = processor.image_processor(images=[Image.open(path)], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    uint8 = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]
    torch.testing.assert_close(normalise(uint8)[0], expected, atol=1e-5, rtol=0)


def test_sample_rows_asks_present_and_absent_objects():
    images = generate_split("train", 4, 1, seed=3, image_size=112, pair_keep=0.95, broken_share=0.5)
    rng = np.random.default_rng(0)
    for image in images:
        rows = sample_rows(image, rng, questions=4)
        assert rows[0][1] in image.captions
        for user, answer in rows[1:]:
            name = re.match(r"Is there an? (.+) in the image\?", user).group(1)
            assert answer == ("Yes" if name in image.scene.names else "No")
        assert [a for _, a in rows[1:]] == ["Yes", "No", "Yes", "No"]


def test_shared_prefix_loss_equals_the_loss_of_full_rows(loaded):
    processor, model = loaded
    images = generate_split("train", 3, 1, seed=1, image_size=112, pair_keep=0.95, broken_share=0.5)
    rng = np.random.default_rng(0)
    rows = [row for image in images for row in sample_rows(image, rng, questions=2)]
    input_ids, attention_mask, labels = collate(RowEncoder(processor.tokenizer, 49), rows,
                                                processor.tokenizer.pad_token_id)
    pixels = normalise(images_to_tensor(images))  # [3, 3, 112, 112]
    with torch.no_grad():
        features = image_features(model, pixels)  # [3, 49, hidden]
        got = answer_loss(model, features, input_ids, attention_mask, labels)
        # reference: the stock forward on every full row, then per-row mean answer cross-entropy
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       pixel_values=pixels.repeat_interleave(3, dim=0)).logits  # [9, seq_len, vocab]
    per_row = []
    for row in range(len(rows)):
        answer = (labels[row] != -100).nonzero().flatten()
        log_probs = torch.log_softmax(logits[row, answer - 1], dim=-1)
        per_row.append(-log_probs[torch.arange(len(answer)), labels[row, answer]].mean())
    torch.testing.assert_close(got, torch.stack(per_row).mean(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same number of rows per image and one shared prefix, got 9 rows"):
        answer_loss(model, features[:2], input_ids, attention_mask, labels)


def test_patch_labels_take_the_majority_object_of_each_patch():
    images = generate_split("train", 2, 1, seed=2, image_size=112, pair_keep=0.95, broken_share=0.5)
    got = patch_labels(images, patch_size=16)  # [2, 49]
    assert got.shape == (2, 49)
    for image, row in zip(images, got):
        for patch in range(49):
            top, left = 16 * (patch // 7), 16 * (patch % 7)
            block = image.label_map[top : top + 16, left : left + 16].ravel()
            counts = np.bincount(block, minlength=len(toy.CATEGORIES) + 1)
            expected = 0 if counts[1:].sum() < 64 else int(np.argmax(counts[1:])) + 1
            assert int(row[patch]) == expected
        # the label map marks each object of the scene, and nothing else
        names = {toy.CATEGORIES[k - 1].name for k in np.unique(image.label_map) if k}
        assert names == set(image.scene.names)


def test_training_is_deterministic_and_lowers_the_loss(loaded):
    from vlmfix.toy.model import build_model

    processor, _ = loaded
    images = generate_split("train", 8, 1, seed=0, image_size=112, pair_keep=0.95, broken_share=0.5)
    spec = TrainSpec(steps=6, batch_images=4, warmup_steps=1, vision_steps=4, vision_batch_images=8)
    model_spec = ModelSpec()

    def run():
        torch.manual_seed(0)
        model = build_model(processor.tokenizer, model_spec)
        losses = train(model, processor.tokenizer, images, spec, image_tokens=model_spec.image_tokens, seed=0)
        return model.state_dict(), losses

    (first, losses), (second, again) = run(), run()
    assert len(losses) == spec.vision_steps + spec.steps
    assert losses == again
    assert all(torch.equal(first[key], second[key]) for key in first)
    vision, joint = losses[: spec.vision_steps], losses[spec.vision_steps :]
    assert vision[-1] < vision[0] and joint[-1] < joint[0]


# ---- model directory -----------------------------------------------------------------------------


def test_model_directory_is_a_stock_llava(fast_toy, loaded):
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration

    processor, model = loaded
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "chat_template.jinja", "vlmfix_toy.json"):
        assert (fast_toy.model_dir / name).is_file(), name
    assert type(model) is LlavaForConditionalGeneration
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)
    config = model.config
    assert config.vision_config.model_type == "clip_vision_model" and config.text_config.model_type == "llama"
    assert config.text_config.num_hidden_layers >= 6 and config.text_config.num_attention_heads >= 4
    assert config.vision_feature_select_strategy == "default"
    stored = json.loads((fast_toy.model_dir / "vlmfix_toy.json").read_text())
    assert stored["settings_hash"] == fast_toy.settings_hash


def test_processor_builds_llava_prompts_with_49_image_tokens(loaded):
    processor, model = loaded
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "USER: <image>\nDescribe this image. ASSISTANT:"
    batch = processor(images=[Image.new("RGB", (112, 112))], text=[prompt], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 49
    assert batch["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_generate_runs_on_a_left_padded_batch_and_matches_single_rows(loaded, fast_toy):
    processor, model = loaded
    paths = sorted((fast_toy.data_dir / "images" / "val").glob("*.png"))[:2]
    pictures = [Image.open(p).convert("RGB") for p in paths]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}], add_generation_prompt=True)
        for t in ("Describe this image.", toy.question("dog"))]
    batch = processor(images=pictures, text=texts, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert (mask[:, 0] == 0).any() and mask[:, -1].all()  # left padding
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, max_new_tokens=6)
        assert out.shape[0] == 2 and out.shape[1] > batch["input_ids"].shape[1]
        for row in range(2):
            single = processor(images=[pictures[row]], text=[texts[row]], return_tensors="pt")
            alone = model.generate(**single, do_sample=False, max_new_tokens=6)
            new = out[row, batch["input_ids"].shape[1]:]
            assert new[: alone.shape[1] - single["input_ids"].shape[1]].tolist() == \
                alone[0, single["input_ids"].shape[1]:].tolist()
    decoded = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(isinstance(text, str) for text in decoded)


# ---- cache and errors ----------------------------------------------------------------------------


def test_build_reuses_a_matching_build_and_rebuilds_on_a_hash_mismatch(tmp_path, monkeypatch):
    calls = []

    def fake_build(settings, paths, *, progress):
        calls.append(settings.hash())
        paths.model_dir.mkdir(parents=True)
        (paths.root / toy_build.MARKER).write_text(json.dumps({"settings_hash": paths.settings_hash}))

    monkeypatch.setattr(toy_build, "_build", fake_build)
    out = tmp_path / "toy"
    first = toy.build_toy(out, fast=True, seed=5)
    assert calls == [toy.ToySettings(**{**toy.FAST.__dict__, "seed": 5}).hash()] == [first.settings_hash]
    toy.build_toy(out, fast=True, seed=5)
    assert len(calls) == 1  # reused
    toy.build_toy(out, fast=True, seed=6)
    assert len(calls) == 2  # other settings: rebuilt
    (out / toy_build.MARKER).unlink()  # an interrupted build has no marker: rebuilt
    toy.build_toy(out, fast=True, seed=6)
    assert len(calls) == 3


def test_default_root_follows_vlmfix_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VLMFIX_CACHE", str(tmp_path))
    assert toy.default_root(fast=False) == tmp_path / "toy"
    assert toy.default_root(fast=True) == tmp_path / "toy-fast"


def test_settings_hash_changes_with_any_setting():
    base = toy.FULL
    assert base.hash() == toy.ToySettings().hash()
    assert len({base.hash(), toy.FAST.hash(), toy.ToySettings(seed=1).hash(),
                toy.ToySettings(pair_keep=0.9).hash()}) == 4


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"seed must be a non-negative int, got -1"):
        toy.build_toy(tmp_path / "x", seed=-1)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not a toy build \(notes.txt\)"):
        toy.build_toy(tmp_path / "foreign", fast=True)
    with pytest.raises(ValueError, match=r"text_layers must be >= 6, got 4"):
        ModelSpec(text_layers=4)
    with pytest.raises(ValueError, match=r"pair_keep must be in \[0, 1\], got 1.5"):
        toy.ToySettings(pair_keep=1.5)
