"""Resuming training: a DCD run stopped at any point and started again ends with the same weights as an
uninterrupted run; checkpoints are written atomically; other settings are refused, naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from vlmfix.methods.dcd import read_metadata
from vlmfix.testing import build_tiny, random_image
from vlmfix.training import dcd_loop
from vlmfix.training.checkpoints import STATE_FILE, complete_checkpoints, latest_checkpoint, write_checkpoint
from vlmfix.training.config import ConfigError
from vlmfix.training.dcd_config import DCDTrainConfig
from vlmfix.training.dcd_loop import train_dcd

ROWS = [
    ("describe this image .", "a dog on the table .", "a dog and a cat on the table ."),
    ("what is in the picture ?", "a red car .", "a red car and a bus ."),
    ("describe this image .", "two birds in the sky .", "two birds and a frisbee in the sky ."),
    ("what is this ?", "a cup near a fork .", "a cup near a knife and a fork ."),
    ("what is that ?", "a cup .", "a cup and a fork ."),
]
# 5 rows in batches of 2 -> 3 micro-batches an epoch; 2 per optimiser step -> 2 steps an epoch; 2 epochs: each
# side takes 4 steps and 6 forwards (response_nll calls): steps 0 and 2 take two, steps 1 and 3 one.
FORWARDS_PER_SIDE = 6


class Killed(Exception):
    """Stands for a kill -9 at a chosen point of the run."""


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    tiny = build_tiny("llava")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.processor.save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    lines = []
    for i, (prompt, chosen, rejected) in enumerate(ROWS):
        random_image(40 + 8 * i, seed=i).save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "prompt": prompt, "chosen": chosen, "rejected": rejected}))
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dict(model=str(tmp_path / "model"), data=str(tmp_path / "prefs.jsonl"), batch_size=2,
                gradient_accumulation_steps=2, epochs=2, learning_rate=1e-2, warmup_ratio=0.25, save_every=1,
                trainable="projector+lora_neg", lora_rank=2)


def config(tmp_path: Path, name: str, settings: dict, **overrides) -> DCDTrainConfig:
    return DCDTrainConfig(**{**settings, "output_dir": str(tmp_path / name), **overrides})


def count_forwards(monkeypatch, kill_at: int | None = None) -> list[int]:
    """Count the trainer's response_nll calls; with `kill_at`, raise `Killed` at that call (1-based)."""
    calls = [0]
    real = dcd_loop.response_nll

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(dcd_loop, "response_nll", counted)
    return calls


def weights(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(directory / name)) for name in ("positive.safetensors", "negative.safetensors")}


def assert_same_weights(a: dict, b: dict) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def straight_run(tmp_path: Path, settings: dict, monkeypatch) -> dict:
    calls = count_forwards(monkeypatch)
    train_dcd(config(tmp_path, "straight", settings))
    assert calls[0] == 2 * FORWARDS_PER_SIDE
    return weights(tmp_path / "straight")


# ---------------------------------------------------------------------------------------------- DCD
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, setup, monkeypatch):
    reference = straight_run(tmp_path, setup, monkeypatch)
    run = config(tmp_path, "killed", setup)
    # killed in the negative side's step 1 (its third forward): the positive file and step 0's checkpoint exist
    count_forwards(monkeypatch, kill_at=FORWARDS_PER_SIDE + 3)
    with pytest.raises(Killed):
        train_dcd(run)
    out = tmp_path / "killed"
    assert (out / "positive.safetensors").is_file() and not (out / "negative.safetensors").exists()
    assert [step for step, _ in complete_checkpoints(out, "checkpoint-neg-")] == [1]
    assert not list(out.glob("checkpoint-pos-*"))  # a finished side keeps its file only
    positive_bytes = (out / "positive.safetensors").read_bytes()

    calls = count_forwards(monkeypatch)
    train_dcd(run)
    assert calls[0] == FORWARDS_PER_SIDE - 2  # the positive side kept, the negative one resumed after step 0
    assert (out / "positive.safetensors").read_bytes() == positive_bytes
    assert_same_weights(weights(out), reference)
    resumed = json.loads(read_metadata(out / "negative.safetensors")["training"])
    straight = json.loads(read_metadata(tmp_path / "straight" / "negative.safetensors")["training"])
    assert resumed["final_loss"] == straight["final_loss"] and resumed["steps"] == straight["steps"] == 4
    assert not list(out.glob("checkpoint-*"))


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one(tmp_path, setup, monkeypatch):
    reference = straight_run(tmp_path, setup, monkeypatch)
    run = config(tmp_path, "killed", setup)
    writes = [0]
    real = safetensors.torch.save_file

    def dies_in_the_fifth_checkpoint(*args, **kwargs):  # 3 files a checkpoint: the pos side writes 3 checkpoints,
        writes[0] += 1  # then neg's steps 1 and 2: die after the first file of the latter
        if writes[0] == 3 * 4 + 2:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", dies_in_the_fifth_checkpoint)
    with pytest.raises(Killed):
        train_dcd(run)
    out = tmp_path / "killed"
    assert (out / "checkpoint-neg-0000002.tmp" / "trainable.safetensors").is_file()
    assert not (out / "checkpoint-neg-0000002.tmp" / STATE_FILE).exists()
    assert latest_checkpoint(out, "checkpoint-neg-") == out / "checkpoint-neg-0000001"
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    train_dcd(run)
    assert_same_weights(weights(out), reference)
    assert not list(out.glob("checkpoint-*"))  # the half-written one too


def test_other_settings_or_data_are_refused_and_resume_false_starts_over(tmp_path, setup, monkeypatch):
    reference = straight_run(tmp_path, setup, monkeypatch)
    run = config(tmp_path, "killed", setup)
    count_forwards(monkeypatch, kill_at=FORWARDS_PER_SIDE + 3)
    with pytest.raises(Killed):
        train_dcd(run)
    calls = count_forwards(monkeypatch)
    with pytest.raises(ConfigError, match=r"checkpoint .*checkpoint-neg-0000001 was written with other settings "
                                          r"\(epochs: 2 -> 3; learning_rate: 0.01 -> 0.02\)\. Resume with the same "
                                          r"settings, or start over with resume=false"):
        train_dcd(config(tmp_path, "killed", setup, learning_rate=2e-2, epochs=3))
    rows = Path(setup["data"]).read_text(encoding="utf-8").replace("a red car and a bus", "a red car and a van")
    Path(setup["data"]).write_text(rows, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"other settings \(data_fingerprint: '[0-9a-f]{64}' -> '[0-9a-f]{64}'\)"):
        train_dcd(run)
    assert calls[0] == 0  # refused before any training (and before the model loaded)
    # settings that do not change the result may differ; resume=false trains both sides from the start
    Path(setup["data"]).write_text(rows.replace("a red car and a van", "a red car and a bus"), encoding="utf-8")
    train_dcd(config(tmp_path, "killed", setup, resume=False, log_every=1, keep_checkpoints=2))
    assert calls[0] == 2 * FORWARDS_PER_SIDE
    assert_same_weights(weights(tmp_path / "killed"), reference)


def test_a_finished_projector_is_kept_only_for_the_same_settings(tmp_path, setup, monkeypatch):
    reference = straight_run(tmp_path, setup, monkeypatch)
    out = tmp_path / "straight"
    calls = count_forwards(monkeypatch)
    assert train_dcd(config(tmp_path, "straight", setup, threads=2)) == {
        "pos": out / "positive.safetensors", "neg": out / "negative.safetensors"}
    assert calls[0] == 0
    train_dcd(config(tmp_path, "straight", setup, projectors=("neg",), learning_rate=2e-2))
    assert calls[0] == FORWARDS_PER_SIDE  # only the asked side, trained again for the new settings
    again = weights(out)
    assert torch.equal(again["positive.safetensors"]["linear_1.weight"],
                       reference["positive.safetensors"]["linear_1.weight"])
    assert not torch.equal(again["negative.safetensors"]["linear_1.weight"],
                           reference["negative.safetensors"]["linear_1.weight"])


# ---------------------------------------------------------------------------------------------- the writer
def test_checkpoint_directories_appear_whole_or_not_at_all(tmp_path, monkeypatch):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    write_checkpoint(tmp_path / "ckpt-0000001", {"a.safetensors": tensors, "b.safetensors": tensors}, {"step": 1})
    real = safetensors.torch.save_file
    calls = [0]

    def fails_second(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fails_second)
    with pytest.raises(Killed):
        write_checkpoint(tmp_path / "ckpt-0000002", {"a.safetensors": tensors, "b.safetensors": tensors}, {"step": 2})
    assert not (tmp_path / "ckpt-0000002").exists() and (tmp_path / "ckpt-0000002.tmp").is_dir()
    assert complete_checkpoints(tmp_path, "ckpt-") == [(1, tmp_path / "ckpt-0000001")]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    # the same step written again replaces it whole
    write_checkpoint(tmp_path / "ckpt-0000001", {"a.safetensors": {"w": tensors["w"] + 1}}, {"step": 1, "again": 1})
    assert sorted(p.name for p in (tmp_path / "ckpt-0000001").iterdir()) == ["a.safetensors", STATE_FILE]
    assert torch.equal(load_file(str(tmp_path / "ckpt-0000001" / "a.safetensors"))["w"], tensors["w"] + 1)
