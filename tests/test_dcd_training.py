"""The DCD projector trainer: JSON Lines preference data, the response NLL, one step, projector files.

Other data formats: tests/test_training_dcd_data.py; resuming: tests/test_training_resume.py; settings,
command line and threads: tests/test_training_config.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.methods.dcd import DCD, load_negative_lora, load_projector, read_metadata, save_projector
from vlmfix.methods.dcd_lora import LoraSpec, NegativeLora
from vlmfix.testing import random_image
from vlmfix.training.config import ConfigError
from vlmfix.training.dcd import parse_config
from vlmfix.training.dcd_config import DCDTrainConfig
from vlmfix.training.dcd_data import PreferenceDataError, ResponseEncoder, load_preferences
from vlmfix.training.dcd_loop import response_nll, train_dcd, train_projector

from .conftest import tiny_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "train" / "dcd.yaml"
ROWS = [
    ("describe this image .", "a dog on the table .", "a dog and a cat on the table ."),
    ("what is in the picture ?", "a red car .", "a red car and a bus ."),
    ("describe this image .", "two birds in the sky .", "two birds and a frisbee in the sky ."),
    ("what is this ?", "a cup near a fork .", "a cup near a knife and a fork ."),
]


def write_preferences(directory: Path, rows=ROWS, extra_lines: tuple[str, ...] = ()) -> Path:
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prompt, chosen, rejected) in enumerate(rows):
        random_image(40 + 8 * i, seed=i).save(directory / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "prompt": prompt, "chosen": chosen, "rejected": rejected}))
    path = directory / "preferences.jsonl"
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return path


def saved(tiny, directory: Path) -> Path:
    """A model directory (weights, processor) as a user would point the trainer at."""
    tiny.model.save_pretrained(directory)
    tiny.processor.save_pretrained(directory)
    return directory


def step_config(**overrides) -> DCDTrainConfig:
    settings = dict(model="tiny", data="unused", learning_rate=1e-2, warmup_ratio=0.0, max_steps=1, batch_size=4,
                    gradient_accumulation_steps=1)
    return DCDTrainConfig(**{**settings, **overrides})


# ------------------------------------------------------------------------------------------- data
def test_preference_rows_are_read_and_checked(tmp_path):
    path = write_preferences(tmp_path)
    data = load_preferences(path)
    assert data.layout == "prompt" and data.rows == len(ROWS)
    assert [(p.prompt, p.response, n.response) for p, n in zip(data.positive, data.negative)] == ROWS
    assert [e.where for e in data.negative] == [f"{path}, line {i + 1}" for i in range(len(ROWS))]
    assert data.positive[2].image == tmp_path / "images" / "2.png" == data.negative[2].image
    assert data.positive[2].open_image().tobytes() == random_image(56, seed=2).convert("RGB").tobytes()
    short = load_preferences(path, max_rows=2)
    assert len(short.positive) == len(short.negative) == 2 and short.fingerprint != data.fingerprint
    assert load_preferences(path).fingerprint == data.fingerprint


@pytest.mark.parametrize("line, message", [
    ('{"image": "images/0.png", "prompt": "p", "chosen": "c"', r"line 5: not valid JSON"),
    ('["images/0.png", "p", "c", "r"]', r"line 5: expected a JSON object \(with image, prompt, chosen and rejected\), "
                                        r"got list"),
    ('{"image": "images/0.png", "prompt": "p", "chosen": "c"}', r"line 5: `rejected` must be a non-empty string, "
                                                                  r"got None \(a NoneType\); every row needs image, "
                                                                  r"prompt, chosen and rejected \(fill it in or drop "),
    ('{"image": "images/0.png", "prompt": "p", "chosen": " ", "rejected": "r"}', r"line 5: `chosen` must be a "
                                                                                  r"non-empty string, got ' '"),
    ('{"image": "images/nope.png", "prompt": "p", "chosen": "c", "rejected": "r"}', r"line 5: image "
                                                                                     r"'images/nope.png' not found"),
    ('{"image": "notes.txt", "prompt": "p", "chosen": "c", "rejected": "r"}', r"line 5: image 'notes.txt' is not an "
                                                                               r"image file \(cannot identify image"),
    ('{"image": "", "prompt": "p", "chosen": "c", "rejected": "r"}',
     r"line 5: `image` must be an image path, an image or \{'bytes': ..., 'path': ...\}, got ''"),
])
def test_bad_preference_row_names_the_row(tmp_path, line, message):
    path = write_preferences(tmp_path, extra_lines=("", line))  # a blank line 5 holds no row
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=message.replace("line 5", "line 6")):
        load_preferences(path)


def test_empty_or_missing_preference_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(PreferenceDataError, match="empty.jsonl holds no rows"):
        load_preferences(tmp_path / "empty.jsonl")
    with pytest.raises(PreferenceDataError, match="nope.jsonl does not exist; pass data="):
        load_preferences(tmp_path / "nope.jsonl")


def test_labels_cover_the_response_only(tmp_path):
    tiny = tiny_model("llava")
    example = load_preferences(write_preferences(tmp_path)).negative[0]
    encoder = ResponseEncoder(tiny.processor)
    item = encoder.encode(example)
    answer = tiny.tokenizer(" " + ROWS[0][2], add_special_tokens=False)["input_ids"] + [tiny.tokenizer.eos_token_id]
    prompt_len = len(item["input_ids"]) - len(answer)
    assert item["input_ids"][prompt_len:].tolist() == answer
    assert (item["labels"][:prompt_len] == -100).all() and item["labels"][prompt_len:].tolist() == answer
    image_id = tiny.model.config.image_token_id
    assert int((item["input_ids"] == image_id).sum()) == 16  # (32 / 8)^2 image tokens, all unlabelled


def test_an_encoder_templates_each_prompt_once_and_encodes_as_a_fresh_one(tmp_path):
    tiny = tiny_model("llava")
    examples = load_preferences(write_preferences(tmp_path)).positive  # rows 0 and 2 share their prompt
    templated = []

    class CountingProcessor:  # the processor, its chat template calls counted
        def __getattr__(self, name):
            return getattr(tiny.processor, name)

        def __call__(self, *args, **kwargs):
            return tiny.processor(*args, **kwargs)

        def apply_chat_template(self, conversation, **kwargs):
            templated.append(conversation[0]["content"][1]["text"])
            return tiny.processor.apply_chat_template(conversation, **kwargs)

    encoder = ResponseEncoder(CountingProcessor())
    encoded = [encoder.encode(example) for example in [*examples, *examples]]
    assert sorted(templated) == sorted({row[0] for row in ROWS})  # once per distinct prompt
    for example, item in zip([*examples, *examples], encoded):
        fresh = ResponseEncoder(tiny.processor).encode(example)
        assert item.keys() == fresh.keys() and all(torch.equal(item[k], fresh[k]) for k in fresh)


def test_response_nll_matches_a_reference(tmp_path):
    tiny = tiny_model("qwen2_vl")
    data = load_preferences(write_preferences(tmp_path))
    encoder = ResponseEncoder(tiny.processor)
    batch = encoder.batch(data.positive[:3])
    with torch.no_grad():
        logits = tiny.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        per_row, tokens = [], []
        for b in range(3):  # -log p(y_t | y_<t), response positions only
            positions = (batch["labels"][b] != -100).nonzero().flatten().tolist()
            nll = [-torch.log_softmax(logits[b, t - 1], -1)[batch["labels"][b, t]] for t in positions]
            per_row.append(torch.stack(nll).mean())
            tokens.extend(nll)
        torch.testing.assert_close(response_nll(tiny.model, batch, "sequence"), torch.stack(per_row).mean())
        torch.testing.assert_close(response_nll(tiny.model, batch, "token"), torch.stack(tokens).mean())


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_one_step_lowers_the_loss_and_trains_the_projector_only(family, tmp_path):
    tiny = tiny_model(family)
    model = tiny.model
    data = load_preferences(write_preferences(tmp_path))
    projector_names = {f"{name}" for name, _ in get_adapter(model).projector.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    run = train_projector(model, tiny.processor, data.negative, "neg", step_config())

    # the model comes back as it was: weights and requires_grad flags
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.requires_grad == flags[name]
    # the trained weights: every projector tensor moved
    p0 = get_adapter(model).projector.state_dict()
    assert set(run.state_dict) == projector_names
    assert all(not torch.equal(run.state_dict[k], p0[k]) for k in p0)
    assert run.side == "neg" and run.steps == 1 and len(run.losses) == 1
    # the step lowered the loss of that batch (the rejected responses)
    batch = ResponseEncoder(tiny.processor).batch(data.negative)
    trained = get_adapter(model).projector
    with torch.no_grad():
        start = response_nll(model, batch)
        torch.testing.assert_close(start, torch.tensor(run.losses[0]), atol=1e-5, rtol=1e-5)
        trained.load_state_dict(run.state_dict)
        after = response_nll(model, batch)
        trained.load_state_dict(p0)
    assert float(after) < float(start) - 1e-3


def merged_copy(model: torch.nn.Module, tensors: dict, spec) -> torch.nn.Module:
    """Reference for the LoRA fallback: a copy of the model whose target weights hold W + s * up @ down."""
    clone = copy.deepcopy(model)
    language_model = get_adapter(clone).language_model
    for name, module in language_model.named_modules():
        if f"lora.{name}.down" in tensors:
            with torch.no_grad():
                module.weight += spec.scaling * tensors[f"lora.{name}.up"] @ tensors[f"lora.{name}.down"]
    return clone


def test_lora_fallback_trains_projector_and_adapters_and_leaves_the_model(tmp_path):
    tiny = tiny_model("llava")
    model = tiny.model
    data = load_preferences(write_preferences(tmp_path))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = step_config(trainable="projector+lora_neg", lora_rank=4, max_steps=2)

    run = train_projector(model, tiny.processor, data.negative, "neg", config)

    for name, p in model.named_parameters():  # base weights untouched, no hook left behind
        assert torch.equal(p, before[name]), name
    tensors = run.lora.tensors()
    layers = [n for n, m in get_adapter(model).language_model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert sorted(tensors) == sorted(f"lora.{n}.{part}" for n in layers for part in ("down", "up"))
    assert all(tensors[f"lora.{n}.up"].abs().sum() > 0 for n in layers)  # up starts at zero and moved
    # the hooks compute what merged weights compute, and the steps lowered the loss of that batch
    batch = ResponseEncoder(tiny.processor).batch(data.negative)
    projector = get_adapter(model).projector
    p0 = {k: v.clone() for k, v in projector.state_dict().items()}
    with torch.no_grad():
        start = response_nll(model, batch)
        projector.load_state_dict(run.state_dict)
        with run.lora.attached(lambda: slice(None)):
            hooked = response_nll(model, batch)
        merged = merged_copy(model, tensors, config.lora_spec)
        reference = response_nll(merged, batch)
        projector.load_state_dict(p0)
    torch.testing.assert_close(hooked, reference, atol=1e-5, rtol=1e-5)
    assert float(hooked) < float(start) - 1e-3


def test_lora_checkpoint_round_trip_and_mismatch(tmp_path):
    tiny = tiny_model("llava")
    model_dir = saved(tiny, tmp_path / "model")
    data = write_preferences(tmp_path / "data")
    config = parse_config(["--config", str(CONF), f"model={model_dir}", f"data={data}", "trainable=projector+lora_neg",
                           "lora_rank=2", "lora_targets=[v_proj]", f"output_dir={tmp_path / 'out'}", "max_steps=1",
                           "batch_size=2", "gradient_accumulation_steps=1", "learning_rate=1e-2"])
    written = train_dcd(config)
    assert read_metadata(written["pos"]).get("lora") is None  # the positive projector has no adapters
    lora = load_negative_lora(written["neg"], tiny.model)
    assert lora.spec == LoraSpec(rank=2, alpha=16.0, targets=("v_proj",))
    assert all(k.endswith(("v_proj.down", "v_proj.up")) for k in lora.tensors())
    projector = get_adapter(tiny.model).projector.state_dict()
    assert load_projector(written["neg"], tiny.model, "neg").keys() == projector.keys()
    with pytest.raises(vlmfix.CheckpointError, match="does not fit this model's language model"):
        NegativeLora.from_tensors(tiny.model, LoraSpec(rank=2, targets=("q_proj", "v_proj")), lora.tensors())
    with pytest.raises(ValueError, match="no linear layer of the language model is named \\['qkv'\\]"):
        NegativeLora(tiny.model, LoraSpec(targets=("qkv",)))


def test_checkpoint_round_trip_and_refusals(tmp_path):
    tiny = tiny_model("llava")
    model = tiny.model
    state = {k: v + 1.0 for k, v in get_adapter(model).projector.state_dict().items()}
    path = save_projector(tmp_path / "negative.safetensors", state, model, "neg", {"learning_rate": 0.1})
    loaded = load_projector(path, model, "neg")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    metadata = read_metadata(path)
    assert metadata["side"] == "neg" and json.loads(metadata["training"]) == {"learning_rate": 0.1}
    assert metadata["base_model"] == "LlavaForConditionalGeneration"
    # the same architecture loaded with another attention backend is the same base model
    assert load_projector(path, tiny_model("llava", attn="eager").model, "neg").keys() == state.keys()

    with pytest.raises(vlmfix.CheckpointError, match="holds the 'neg' projector, but the 'pos' one was asked for"):
        load_projector(path, model, "pos")
    other = tiny_model("llava", layers=2).model
    with pytest.raises(vlmfix.CheckpointError, match="trained for base model 'LlavaForConditionalGeneration' "
                                                     r"\(config hash [0-9a-f]{12}\), but this model is"):
        load_projector(path, other, "neg")
    wrong = {k: v[..., :3] for k, v in state.items()}
    bad_shapes = save_projector(tmp_path / "bad.safetensors", wrong, model, "neg")
    with pytest.raises(vlmfix.CheckpointError, match="does not fit the projector of this model"):
        load_projector(bad_shapes, model, "neg")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(vlmfix.CheckpointError, match="not a vlmfix DCD projector checkpoint"):
        load_projector(tmp_path / "plain.safetensors", model)
    (tmp_path / "broken.safetensors").write_bytes(path.read_bytes()[:50])
    with pytest.raises(vlmfix.CheckpointError, match="not a readable safetensors file"):
        load_projector(tmp_path / "broken.safetensors", model)


def test_projectors_of_another_toy_build_are_refused(tmp_path):
    """A toy rebuilt with other settings has the same config but other weights: the settings hash in the
    toy's marker file decides."""
    from transformers import AutoModelForImageTextToText

    from vlmfix.toy.build import MARKER

    tiny = tiny_model("llava")
    root = tmp_path / "toy"
    tiny.model.save_pretrained(root / "model")
    (root / "model" / MARKER).write_text(json.dumps({"settings_hash": "b" * 64}))  # as a build writes it
    model = AutoModelForImageTextToText.from_pretrained(root / "model")
    state = get_adapter(model).projector.state_dict()
    same = save_projector(tmp_path / "same.safetensors", state, model, "neg", {"toy_settings_hash": "b" * 64})
    assert load_projector(same, model, "neg").keys() == state.keys()
    stale = save_projector(tmp_path / "stale.safetensors", state, model, "neg", {"toy_settings_hash": "a" * 64})
    with pytest.raises(vlmfix.CheckpointError, match="trained on the toy build with settings aaaaaaaaaaaa, but the "
                                                     "model at .* is the build with settings bbbbbbbbbbbb"):
        load_projector(stale, model, "neg")
    assert load_projector(stale, tiny.model, "neg").keys() == state.keys()  # not loaded from a toy directory
    unknown = save_projector(tmp_path / "unknown.safetensors", state, model, "neg", {})
    with pytest.warns(UserWarning, match="records no toy build"):
        load_projector(unknown, model, "neg")


def test_train_dcd_writes_checkpoints_that_dcd_loads(tmp_path):
    tiny = tiny_model("llava")
    model_dir = saved(tiny, tmp_path / "model")
    data = write_preferences(tmp_path / "data")
    config = parse_config(["--config", str(CONF), f"model={model_dir}", f"data={data}",
                           f"output_dir={tmp_path / 'out'}", "max_steps=1", "batch_size=2",
                           "gradient_accumulation_steps=2", "learning_rate=1e-3"])
    written = train_dcd(config)
    assert sorted(p.name for p in written.values()) == ["negative.safetensors", "positive.safetensors"]
    training = json.loads(read_metadata(written["pos"])["training"])
    assert training["steps"] == 1 and training["data"] == str(data) and training["learning_rate"] == 1e-3
    assert training["model_dir"] == str(model_dir) and "toy_settings_hash" not in training
    assert training["data_fingerprint"] == load_preferences(data).fingerprint and training["examples"] == len(ROWS)
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # resumable checkpoints go once the file is written
    inputs = tiny.inputs(["describe this image ."])
    out = vlmfix.generate(tiny.model, **inputs, methods=[DCD(tmp_path / "out")], max_new_tokens=3,
                          min_new_tokens=3)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_config_checks():
    with pytest.raises(ValueError, match="`loss_reduction` must be one of 'sequence', 'token', got 'mean'"):
        DCDTrainConfig(loss_reduction="mean")
    with pytest.raises(ValueError, match="`projectors\\[0\\]` must be one of 'pos', 'neg', got 'both'"):
        DCDTrainConfig(projectors=("both",))
    with pytest.raises(ValueError, match="`projectors` must be a non-empty list of sides"):
        DCDTrainConfig(projectors=())
    with pytest.raises(ValueError, match="`projectors` must be distinct sides"):
        DCDTrainConfig(projectors=("neg", "neg"))
    with pytest.raises(ValueError, match="`lora_rank` must be an int >= 1, got 0"):
        DCDTrainConfig(trainable="projector+lora_neg", lora_rank=0)
    with pytest.raises(ValueError, match="include 'neg' in `projectors`"):
        DCDTrainConfig(trainable="projector+lora_neg", projectors=("pos",))
    assert DCDTrainConfig(trainable="projector+lora_neg", lora_targets=["q_proj"]).lora_spec.targets == ("q_proj",)
    with pytest.raises(ConfigError, match="unknown DCD training settings \\['lr'\\]. Known: model, data, "):
        parse_config(["lr=1e-3"])
    with pytest.raises(ConfigError, match="unknown DCD training settings \\['streams'\\] \\(`streams` is now "
                                          "`projectors`\\)"):
        parse_config(["--config", str(CONF), "streams=[neg]"])
    config = parse_config(["--config", str(CONF), "projectors=[neg]"])
    assert config.projectors == ("neg",) and config.learning_rate == 2e-5 and config.gradient_accumulation_steps == 16


@pytest.mark.slow
def test_toy_preference_file_trains():
    from vlmfix.toy import build_toy

    paths = build_toy(fast=True)
    config = DCDTrainConfig(model=str(paths.model_dir), data=str(paths.preference_file), max_rows=8, batch_size=4,
                            gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-3, projectors=("neg",))
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(paths.model_dir)
    processor = AutoProcessor.from_pretrained(paths.model_dir)
    run = train_projector(model, processor, load_preferences(paths.preference_file, 8).negative, "neg", config)
    assert run.steps == 2 and all(loss == loss for loss in run.losses)
