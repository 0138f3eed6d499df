"""What both trainers share: settings from YAML and key=value (typed as OmegaConf types them, checked with
vlmfix.validation), the model-path check, the thread count, the learning-rate schedule, the batch order and
the progress bar."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from vlmfix.testing import build_tiny, random_image
from vlmfix.training import aia_loop, dcd_loop
from vlmfix.training.aia_config import AIATrainConfig
from vlmfix.training.aia_data import SFTExample
from vlmfix.training.aia_loop import train
from vlmfix.training.aia_trainer import config_from_args
from vlmfix.training.config import ConfigError
from vlmfix.training.dcd import main as dcd_main
from vlmfix.training.dcd import parse_config
from vlmfix.training.dcd_config import DCDTrainConfig
from vlmfix.training.dcd_data import load_preferences
from vlmfix.training.dcd_loop import BatchOrder, train_projector
from vlmfix.training.loop import cosine_schedule

ROOT = Path(__file__).resolve().parents[1]
DCD_CONF, AIA_CONF = ROOT / "conf" / "train" / "dcd.yaml", ROOT / "conf" / "train" / "aia.yaml"
PARSERS = [pytest.param(parse_config, DCD_CONF, id="dcd"), pytest.param(config_from_args, AIA_CONF, id="aia")]


def preference_file(directory: Path) -> Path:
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(3):
        random_image(48, seed=i).save(directory / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "prompt": "describe this image .",
                                 "chosen": f"a dog number {i} .", "rejected": f"a dog and a cat number {i} ."}))
    (directory / "prefs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory / "prefs.jsonl"


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("parse, conf", PARSERS)
def test_cli_values_are_typed_as_omegaconf_types_them(parse, conf):
    assert yaml.safe_load("1e-3") == "1e-3"  # the YAML 1.1 trap a plain yaml.safe_load parser falls into
    config = parse(["--config", str(conf), "learning_rate=1e-3", "seed=7", "max_rows=null", "threads=null"])
    assert config.learning_rate == 0.001 and isinstance(config.learning_rate, float)
    assert config.seed == 7 and config.max_rows is None and config.threads is None
    assert parse(["learning_rate=2"]).learning_rate == 2.0  # an int where a float is asked is fine
    assert parse(["--config", str(conf)]).threads == 1  # the default for CPU runs
    assert parse(["--config", str(conf), "resume=false"]).resume is False


@pytest.mark.parametrize("parse, conf", PARSERS)
def test_cli_refuses_what_is_not_a_number_naming_the_setting(parse, conf):
    name = "epochs" if parse is parse_config else "max_steps"
    with pytest.raises(ConfigError, match=f"`{name}` must be an int >= 1, got 'abc' \\(a str\\)"):
        parse(["--config", str(conf), f"{name}=abc"])
    with pytest.raises(ConfigError, match="`learning_rate` must be a finite number > 0, got '1e-3' \\(a str\\)"):
        parse(["--config", str(conf), "learning_rate='1e-3'"])  # quoted: a string, as in YAML
    with pytest.raises(ConfigError, match=f"`{name}` must be an int >= 1, got 2.5 \\(a float\\)"):
        parse([f"{name}=2.5"])
    with pytest.raises(ConfigError, match="`threads` must be None or an int >= 1, got 0; threads is torch's CPU "
                                          "thread count"):
        parse(["threads=0"])
    assert parse(["resume=yes"]).resume is True  # YAML 1.1's booleans, as OmegaConf reads them
    with pytest.raises(ConfigError, match="`resume` must be True or False, got 'maybe'"):
        parse(["resume=maybe"])
    with pytest.raises(ConfigError, match="unknown .* settings \\['learning_rat'\\]. Known: model, data, "):
        parse(["learning_rat=1e-3"])
    with pytest.raises(ConfigError, match="settings are given as key=value, got \\['epochs'\\]. Known keys: model,"):
        parse(["epochs"])
    with pytest.raises(ConfigError, match="--config missing.yaml: no such file"):
        parse(["--config", "missing.yaml"])


def test_python_checks_use_the_same_messages():
    with pytest.raises(ValueError, match="`learning_rate` must be a finite number > 0, got '1e-3' \\(a str\\)"):
        DCDTrainConfig(learning_rate="1e-3")
    with pytest.raises(ValueError, match="`warmup_ratio` must be a finite number in \\[0, 1\\), got 1.0; warmup_ratio "
                                         "is the share of optimiser steps spent warming up"):
        DCDTrainConfig(warmup_ratio=1.0)
    with pytest.raises(ValueError, match="`min_learning_rate` must be a finite number in \\[0, 0.001\\], got 0.01"):
        AIATrainConfig(learning_rate=1e-3, min_learning_rate=1e-2)
    with pytest.raises(ValueError, match="`betas` must be a list of 2 numbers in \\[0, 1\\), got \\[0.9\\]"):
        AIATrainConfig(betas=[0.9])
    with pytest.raises(ValueError, match="`trainable\\[0\\]` must be a regular expression, got '\\(' "):
        AIATrainConfig(trainable=["("])
    assert AIATrainConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


@pytest.mark.parametrize("trainer", ["dcd", "aia"])
def test_a_model_path_that_does_not_exist_fails_before_anything_loads(trainer, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before the model path was checked")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_loading)
    data = preference_file(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    for model, message in [
        (str(tmp_path / "nope"), "does not exist: it is neither a model directory nor a model in the local Hugging "
                                 "Face cache. Give a directory written by save_pretrained, a cached hub id, or one of "
                                 "toy, toy_fast"),
        ("someone/not-cached-model", "does not exist: it is neither a model directory nor a model in the local"),
        (str(tmp_path / "empty_dir"), "is a directory without config.json"),
    ]:
        with pytest.raises(ConfigError, match=f"`model` '{model}' {message}"):
            if trainer == "dcd":
                dcd_main(["--config", str(DCD_CONF), f"model={model}", f"data={data}", f"output_dir={tmp_path}"])
            else:
                train(AIATrainConfig(model=model, data=str(data), output_dir=str(tmp_path)))


@pytest.mark.parametrize("module, setting", [("vlmfix.training.dcd", "epochs=abc"),
                                             ("vlmfix.training.aia_trainer", "model=/no/such/model")])
def test_the_commands_end_with_the_message_not_a_traceback(module, setting):
    conf = DCD_CONF if module.endswith("dcd") else AIA_CONF
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", module, "--config", str(conf), setting], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: `") and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------- threads, progress
def test_both_trainers_run_with_the_configured_threads_and_show_a_progress_bar(tmp_path, monkeypatch, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []
        real_nll, real_forward = dcd_loop.response_nll, aia_loop._forward
        monkeypatch.setattr(dcd_loop, "response_nll", lambda *a, **k: seen.append(torch.get_num_threads())
                            or real_nll(*a, **k))
        monkeypatch.setattr(aia_loop, "_forward", lambda *a, **k: seen.append(torch.get_num_threads())
                            or real_forward(*a, **k))
        tiny = build_tiny("llava")
        tiny.model.save_pretrained(tmp_path / "model")
        tiny.processor.save_pretrained(tmp_path / "model")
        data = preference_file(tmp_path)
        # the benchmark app's call: vlmfix.training.dcd.main(["--config", ..., key=value, ...])
        dcd_main(["--config", str(DCD_CONF), f"model={tmp_path / 'model'}", f"data={data}", "learning_rate=1e-3",
                  "gradient_accumulation_steps=1", "epochs=2", f"output_dir={tmp_path / 'dcd'}", "batch_size=2"])
        assert seen == [1] * 8 and torch.get_num_threads() == 2  # 2 sides x 2 epochs x 2 batches
        err = capsys.readouterr().err
        assert "dcd pos: 100%" in err and "dcd neg: 100%" in err and "loss=" in err
        seen.clear()
        train_projector(tiny.model, tiny.processor, load_preferences(data).positive, "pos",
                        DCDTrainConfig(model="unused", max_steps=1, batch_size=3, threads=None))
        assert seen == [2]  # threads=None leaves torch's setting
        seen.clear()
        rows = [SFTExample(({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a dog ?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}),
                           (random_image(48, i),)) for i in range(2)]
        train(AIATrainConfig(output_dir=str(tmp_path / "aia"), trainable="qk", max_steps=2, batch_size=2,
                             warmup_epochs=0, log_every=1), model=tiny.model, processor=tiny.processor, rows=rows)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        err = capsys.readouterr().err
        assert "aia: 100%" in err and "loss=" in err and "ntp=" in err
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- schedule, order
def test_one_cosine_schedule_for_both_trainers():
    """Linear warmup from 0, then a half cosine to min_lr_ratio; golden values worked by hand."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = cosine_schedule(optimizer, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    half = 0.5 * (1 + math.cos(math.pi / 4))  # progress 1/4 of the cosine
    expected = [0.0, 0.5, 1.0, 0.1 + 0.9 * half, 0.55, 0.1 + 0.9 * (1 - half), 0.1]
    assert rates == pytest.approx(expected, abs=1e-12)
    # without a floor it is transformers' get_cosine_schedule_with_warmup (the DCD trainer's schedule until now)
    ours = cosine_schedule(torch.optim.SGD([parameter], lr=1.0), 3, 11)
    theirs = transformers.get_cosine_schedule_with_warmup(torch.optim.SGD([parameter], lr=1.0), 3, 11)
    assert [ours.lr_lambdas[0](s) for s in range(12)] == [theirs.lr_lambdas[0](s) for s in range(12)]


def test_batch_order_is_the_shuffled_dataloaders_and_resumes_at_any_step():
    examples, batch_size, accumulation, epochs, seed = 7, 2, 3, 3, 5
    loader = torch.utils.data.DataLoader(range(examples), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    reference = []  # optimiser steps: groups of `accumulation` batches, the last group of an epoch shorter
    for _ in range(epochs):
        batches = [b.tolist() for b in loader]
        reference += [batches[i : i + accumulation] for i in range(0, len(batches), accumulation)]
    order = BatchOrder(examples, batch_size, accumulation, epochs, None, seed)
    assert order.total_steps == len(reference) == 6
    assert [order.micro_batches(s) for s in range(order.total_steps)] == reference
    for start in (5, 2, 3):  # a resumed run builds a fresh order and asks from its step on
        assert BatchOrder(examples, batch_size, accumulation, epochs, None, seed).micro_batches(start) == \
            reference[start]
    assert BatchOrder(examples, batch_size, accumulation, epochs, 4, seed).total_steps == 4
    # two processes take the 3 batches of 5 examples in turn; the one short of a batch takes the epoch's first
    shards = [BatchOrder(5, batch_size, 1, 1, None, seed, processes=2, process=p) for p in (0, 1)]
    first_epoch = [b.tolist() for b in torch.utils.data.DataLoader(
        range(5), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))]
    assert shards[0].total_steps == shards[1].total_steps == 2
    assert [shards[0].micro_batches(s)[0] for s in range(2)] == [first_epoch[0], first_epoch[2]]
    assert [shards[1].micro_batches(s)[0] for s in range(2)] == [first_epoch[1], first_epoch[0]]
