"""The AIA trainer: SFT batches and labels, trainable sets, the no-gradient error, resumable checkpoints,
and a short run that moves the measured intensities toward the targets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface, AutoModelForImageTextToText, AutoProcessor
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from vlmfix.errors import CheckpointError
from vlmfix.testing import build_tiny, random_image
from vlmfix.training.aia import measure_intensity, resolve_targets
from vlmfix.training.aia_config import AIATrainConfig
from vlmfix.training.aia_data import SFTCollator, SFTExample, coco_rows, example_from_record, iter_batches, load_rows
from vlmfix.training.aia_loop import AIAGradientError, batch_indices, train
from vlmfix.training.aia_trainer import config_from_args, main
from vlmfix.training.config import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "train" / "aia.yaml"
QA = [
    ("is there a dog ?", "yes , a dog ."),
    ("describe this image .", "a red car near a tree ."),
    ("what is this ?", "a cat"),
    ("is there a bus ?", "no"),
]


def qa_rows(count: int = 8) -> list[SFTExample]:
    rows = []
    for i in range(count):
        question, answer = QA[i % len(QA)]
        rows.append(
            SFTExample(
                (
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ),
                (random_image(48, 100 + i),),
            )
        )
    return rows


def quick(tmp_path: Path, **overrides) -> AIATrainConfig:
    values = dict(
        output_dir=str(tmp_path / "run"),
        trainable="qk",
        max_steps=2,
        batch_size=4,
        learning_rate=1e-2,
        warmup_epochs=0,
        log_every=100,
        save_every=100,
        seed=3,
    )
    values.update(overrides)
    return AIATrainConfig(**values)


def registries() -> tuple[set, set]:
    return set(AttentionInterface._global_mapping), set(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)


# ---------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_collator_labels_every_assistant_turn_only(family):
    tiny = build_tiny(family)
    row = example_from_record(
        {
            "image": random_image(48, 1),
            "conversations": [
                {"from": "human", "value": "<image>\nis there a dog ?"},
                {"from": "gpt", "value": "yes , a dog ."},
                {"from": "human", "value": "is there a cat ?"},
                {"from": "gpt", "value": "no"},
            ],
        },
        0,
    )
    short = SFTExample(qa_rows(1)[0].messages, (random_image(48, 2),))
    batch = SFTCollator(tiny.processor)([row, short])
    end = tiny.tokenizer.eos_token  # the end-of-turn token of both templates is the eos
    words = lambda b: tiny.tokenizer.convert_ids_to_tokens(batch["labels"][b][batch["labels"][b] != -100])  # noqa: E731
    assert words(0) == ["yes", ",", "a", "dog", ".", end, "no", end]
    assert words(1) == ["yes", ",", "a", "dog", ".", end]
    ids = batch["input_ids"]
    labelled = batch["labels"] != -100
    assert torch.equal(batch["labels"][labelled], ids[labelled])
    # the processor's image expansion and padding are kept
    image_id = tiny.model.config.image_token_id
    plain = tiny.processor(
        text=[SFTCollator(tiny.processor).render(r)[0] for r in (row, short)],
        images=[random_image(48, 1), random_image(48, 2)],
        return_tensors="pt",
        padding=True,
    )
    assert torch.equal(ids.eq(image_id).sum(1), plain["input_ids"].eq(image_id).sum(1))
    assert batch["aia_mask"].tolist() == [True, True]
    assert batch["attention_mask"][:, 0].tolist() == [1, 0]  # left padding (the tiny tokenizers pad left)


def test_collator_truncation_masks_the_row_or_refuses_to_cut_images():
    tiny = build_tiny("llava")
    rows = [qa_rows(4)[3], qa_rows(2)[1]]  # a yes/no row, then a caption row
    full = SFTCollator(tiny.processor)(rows)
    lengths = full["attention_mask"].sum(1).tolist()
    assert lengths[1] - 2 >= lengths[0]  # row 1 (a caption) is the longer one
    cut = SFTCollator(tiny.processor, max_length=lengths[1] - 2)(rows)
    assert cut["aia_mask"].tolist() == [True, False]
    assert cut["attention_mask"].sum(1).tolist() == [lengths[0], lengths[1] - 2]
    assert int((cut["labels"][1] != -100).sum()) == int((full["labels"][1] != -100).sum()) - 2
    with pytest.raises(ValueError, match="row 0: max_length=10 cuts through its image tokens"):
        SFTCollator(tiny.processor, max_length=10)(rows)


def test_record_formats_agree_and_bad_records_name_the_row(tmp_path):
    image = tmp_path / "a.png"
    random_image(48, 0).save(image)
    records = [
        {"image": "a.png", "question": "is there a dog ?", "answer": "yes"},
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nis there a dog ?"},
                {"from": "gpt", "value": "yes"},
            ],
        },
        {
            "images": ["a.png"],
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "is there a dog ?"}],
                },
                {"role": "assistant", "content": "yes"},
            ],
        },
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    rows = load_rows(tmp_path / "data.jsonl")
    tiny = build_tiny("llava")
    collate = SFTCollator(tiny.processor)
    assert len({collate.render(r)[0] for r in rows}) == 1
    assert rows[0].images == (str(tmp_path / "a.png"),)
    with pytest.raises(ValueError, match="record 4 has no assistant answer"):
        example_from_record({"question": "q", "answer": " "}, 4)
    with pytest.raises(ValueError, match="record 2 has 1 image placeholders but 2 images"):
        example_from_record({"images": ["a", "b"], "messages": records[2]["messages"]}, 2)
    with pytest.raises(ValueError, match="record 0 has none of the supported layouts"):
        example_from_record({"text": "q"}, 0)


def test_coco_rows_caption_and_yes_no_questions(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images" / "train").mkdir(parents=True)
    images = [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}]
    categories = [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}, {"id": 8, "name": "truck"}]
    (tmp_path / "annotations" / "captions_train.json").write_text(
        json.dumps(
            {
                "images": images,
                "annotations": [
                    {"id": 1, "image_id": 1, "caption": "A dog."},
                    {"id": 2, "image_id": 2, "caption": "A cat."},
                ],
            }
        )
    )
    (tmp_path / "annotations" / "instances_train.json").write_text(
        json.dumps(
            {
                "images": images,
                "categories": categories,
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 18},
                    {"id": 2, "image_id": 2, "category_id": 17},
                ],
            }
        )
    )
    rows = coco_rows(tmp_path, questions_per_image=2)
    texts = [[m["content"][-1]["text"] for m in r.messages] for r in rows]
    assert texts[0] == ["Describe this image.", "A dog."]
    assert texts[1] == ["Is there a dog in the image?", "Yes"]
    assert texts[2][1] == "No" and texts[2][0] in (
        "Is there a cat in the image?",
        "Is there a truck in the image?",
    )
    assert texts[4] == ["Is there a cat in the image?", "Yes"]
    assert rows[0].images == (str(tmp_path / "images" / "train" / "1.png"),)


# ---------------------------------------------------------------------------------------------- training
def test_one_step_changes_q_and_k_only_and_leaves_no_state(tmp_path):
    tiny = build_tiny("llava")
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    hooks_before = dict(tiny.model._forward_pre_hooks)
    regs = registries()
    result = train(quick(tmp_path, max_steps=1), model=tiny.model, processor=tiny.processor, rows=qa_rows())
    entry = result.history[0]
    assert all(torch.isfinite(torch.tensor(entry[k])) for k in ("loss", "ntp", "aia"))
    assert entry["aia"] > 0
    changed = {n for n, p in tiny.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("q_proj.weight", "k_proj.weight")) for n in changed)
    assert any("layers.3.self_attn.q_proj" in n for n in changed)
    # nothing of the sessions stays behind: registries, attention implementation, hooks
    assert registries() == regs
    assert tiny.model.config.text_config._attn_implementation == "sdpa"
    assert dict(tiny.model._forward_pre_hooks) == hooks_before
    assert not tiny.model.training
    # the final model reloads
    reloaded = AutoModelForImageTextToText.from_pretrained(result.final_dir)
    torch.testing.assert_close(
        reloaded.model.language_model.layers[0].self_attn.q_proj.weight,
        tiny.model.model.language_model.layers[0].self_attn.q_proj.weight,
    )
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["targets"]["rule"] == "R4"


def test_short_training_moves_intensities_toward_targets(tmp_path):
    tiny = build_tiny("llava", layers=3)
    rows = qa_rows(8)
    collate = SFTCollator(tiny.processor)
    targets = [(None, 0.9, 0.05)]
    goal = torch.tensor(resolve_targets(targets, 3).target)
    start = measure_intensity(tiny.model, iter_batches(rows, collate, 4)).mean
    config = quick(tmp_path, targets=targets, lambda_=50.0, max_steps=6, learning_rate=5e-2)
    train(config, model=tiny.model, processor=tiny.processor, rows=rows)
    end = measure_intensity(tiny.model, iter_batches(rows, collate, 4)).mean
    gap_start, gap_end = (start - goal).abs(), (end - goal).abs()
    assert float(gap_end.mean()) < 0.6 * float(gap_start.mean())
    assert (gap_end < gap_start).all()


def test_no_gradient_from_aia_is_a_clear_error(tmp_path):
    tiny = build_tiny("llava")
    config = quick(tmp_path, trainable=[r"layers\.3\.mlp\.", r"lm_head"])
    with pytest.warns(UserWarning, match="no decoder q_proj / k_proj parameter is trainable"):
        with pytest.raises(
            AIAGradientError, match="no trainable parameter receives gradient from the AIA term"
        ):
            train(config, model=tiny.model, processor=tiny.processor, rows=qa_rows())
    # the projector gets AIA gradient indirectly: a warning, not an error
    with pytest.warns(UserWarning, match="only indirectly"):
        train(
            quick(tmp_path, trainable=["multi_modal_projector"], max_steps=1, output_dir=str(tmp_path / "p")),
            model=build_tiny("llava").model,
            processor=tiny.processor,
            rows=qa_rows(),
        )
    with pytest.raises(ValueError, match="trainable=\\('nothing_matches',\\) selects no parameter"):
        train(
            quick(tmp_path, trainable=["nothing_matches"]),
            model=tiny.model,
            processor=tiny.processor,
            rows=qa_rows(),
        )


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    rows = qa_rows(8)
    straight = build_tiny("llava")
    config = quick(
        tmp_path, max_steps=4, save_every=2, output_dir=str(tmp_path / "a"), lambda_auto_ratio=50.0
    )
    first = train(config, model=straight.model, processor=straight.processor, rows=rows)
    checkpoints = sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-0000002", "checkpoint-0000004"]
    assert not list((tmp_path / "a" / "checkpoint-0000002").glob("*.pt")) and not list(
        (tmp_path / "a" / "checkpoint-0000002").glob("*.bin")
    )  # safetensors and JSON only
    # an "interrupted" run: only step 2's checkpoint survives; a fresh process resumes from it
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-0000002", tmp_path / "b" / "checkpoint-0000002")
    resumed = build_tiny("llava")
    second = train(
        AIATrainConfig(**{**config.as_dict(), "output_dir": str(tmp_path / "b")}),
        model=resumed.model,
        processor=resumed.processor,
        rows=rows,
    )
    assert second.resumed_from == 2 and second.lambda_ == first.lambda_
    assert [h["step"] for h in second.history] == [3, 4]
    for h1, h2 in zip(first.history[2:], second.history):
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-5)
    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    # other settings are refused, naming them; a model the checkpoint does not fit is refused too
    with pytest.raises(ConfigError, match=r"checkpoint .*checkpoint-0000004 was written with other settings "
                                          r"\(learning_rate: 0.01 -> 0.02; trainable: 'qk' -> 'full'\)"):
        train(
            AIATrainConfig(**{**config.as_dict(), "output_dir": str(tmp_path / "b"), "trainable": "full",
                              "learning_rate": 2e-2}),
            model=build_tiny("llava").model,
            processor=resumed.processor,
            rows=rows,
        )
    with pytest.raises(CheckpointError, match="does not fit this model and trainable set"):
        train(AIATrainConfig(**{**config.as_dict(), "output_dir": str(tmp_path / "b")}),
              model=build_tiny("llava", layers=2).model, processor=resumed.processor, rows=rows)
    # resume=false starts over and deletes the old checkpoints, so a later run cannot resume one of them
    fresh = train(AIATrainConfig(**{**config.as_dict(), "output_dir": str(tmp_path / "b"), "resume": False,
                                    "max_steps": 2, "learning_rate": 2e-2}),
                  model=build_tiny("llava").model, processor=resumed.processor, rows=rows)
    assert fresh.resumed_from is None and [h["step"] for h in fresh.history] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-0000002"]


def test_lambda_auto_ratio_sets_lambda_from_the_first_batches(tmp_path):
    tiny = build_tiny("llava")
    rows = qa_rows(8)
    config = quick(
        tmp_path, lambda_auto_ratio=50.0, lambda_auto_batches=1, max_steps=1, targets=[(None, 0.9, 0.05)]
    )
    # reference: NTP of a plain forward, AIA from eager maps, over the first batch of the run's order
    collate = SFTCollator(tiny.processor)
    eager = build_tiny("llava", attn_implementation="eager").model
    ntp = aia = 0.0
    with torch.no_grad():
        for index in range(1):
            chosen = [rows[i] for i in batch_indices(index, len(rows), 4, config.seed)]
            batch = collate(chosen)
            inputs = {k: v for k, v in batch.items() if k != "aia_mask"}
            ntp += float(tiny.model(**inputs, use_cache=False).loss)
            out = eager(
                **{k: v for k, v in inputs.items() if k != "labels"}, output_attentions=True, use_cache=False
            )
            image = batch["input_ids"] == eager.config.image_token_id
            answer = batch["labels"] != -100
            for probs in out.attentions:
                for b in range(len(chosen)):
                    value = probs[b][:, answer[b]][:, :, image[b]].sum(-1).mean()
                    e = abs(float(value) - 0.9)
                    aia += (0.5 * e * e if e <= 0.05 else 0.05 * (e - 0.025)) / (
                        len(out.attentions) * len(chosen)
                    )
    result = train(config, model=tiny.model, processor=tiny.processor, rows=rows)
    assert result.lambda_ == pytest.approx(ntp / (50.0 * aia), rel=1e-4)


def test_lora_on_q_and_k(tmp_path):
    pytest.importorskip("peft")
    tiny = build_tiny("llava")
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    result = train(
        quick(tmp_path, trainable="lora", lora_r=4, max_steps=2, learning_rate=5e-2),
        model=tiny.model,
        processor=tiny.processor,
        rows=qa_rows(),
    )
    merged = AutoModelForImageTextToText.from_pretrained(result.final_dir)
    changed = {n for n, p in merged.named_parameters() if not torch.allclose(p, before[n])}
    assert changed and all(
        ".language_model." in n and n.endswith(("q_proj.weight", "k_proj.weight")) for n in changed
    )


# ------------------------------------------------------------------------------------------ config and CLI
def test_yaml_config_loads_via_cli_and_hydra(tmp_path):
    config = config_from_args(
        ["--config", str(CONF), "max_steps=3", "trainable=[q_proj]", "targets=janus_pro_und"]
    )
    assert config.max_steps == 3 and config.trainable == ("q_proj",) and config.targets == "janus_pro_und"
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    assert isinstance(instantiate(OmegaConf.load(CONF), _convert_="all"), AIATrainConfig)
    with pytest.raises(ConfigError, match=r"unknown AIA training settings \['max_step'\]. Known: model, data, "):
        config_from_args(["--config", str(CONF), "max_step=3"])
    with pytest.raises(ValueError, match="`trainable` must be one of 'full', 'language_model', 'qk', 'lora', got "
                                         "'everything'; Or give a list of regular expressions"):
        AIATrainConfig(trainable="everything")


def test_cli_trains_a_saved_model_on_a_jsonl_file(tmp_path):
    tiny = build_tiny("llava")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.processor.save_pretrained(tmp_path / "model")
    for i in range(4):
        random_image(48, i).save(tmp_path / f"{i}.png")
    lines = [json.dumps({"image": f"{i}.png", "question": q, "answer": a}) for i, (q, a) in enumerate(QA)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines), encoding="utf-8")
    result = main(
        [
            "--config",
            str(CONF),
            f"model={tmp_path / 'model'}",
            f"data={tmp_path / 'train.jsonl'}",
            f"output_dir={tmp_path / 'out'}",
            "max_steps=2",
            "batch_size=2",
            "trainable=qk",
        ]
    )
    assert result.steps == 2 and (tmp_path / "out" / "final" / "model.safetensors").is_file()
    AutoProcessor.from_pretrained(tmp_path / "out" / "final")


@pytest.mark.slow
def test_toy_model_intensities_move_toward_targets(tmp_path):
    from vlmfix.toy import build_toy

    paths = build_toy(fast=True, progress=False)
    model = AutoModelForImageTextToText.from_pretrained(paths.model_dir)
    processor = AutoProcessor.from_pretrained(paths.model_dir)
    rows = coco_rows(paths.data_dir, limit=32)  # captions and yes/no questions of 16 images
    collate = SFTCollator(processor)
    layers = model.config.text_config.num_hidden_layers
    goal = torch.tensor(resolve_targets("r4", layers).target)
    start = measure_intensity(model, iter_batches(rows[:16], collate, 8)).mean
    config = AIATrainConfig(
        output_dir=str(tmp_path / "toy"),
        trainable="qk",
        max_steps=10,
        batch_size=8,
        learning_rate=5e-3,
        warmup_epochs=0,
        log_every=100,
        save_every=100,
    )
    result = train(config, model=model, processor=processor, rows=rows)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    end = measure_intensity(model, iter_batches(rows[:16], collate, 8)).mean
    # the toy attends to its 49 image tokens far more than R4's 0.10-0.30 (about 0.57-0.76 before training)
    assert float((end - goal).abs().mean()) < 0.5 * float((start - goal).abs().mean())
