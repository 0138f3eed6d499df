"""What a sweep's jobs share: the sweeper (hydra_plugins/vlmfix_sweeper) composes each job's config once, by the
check of the batch, and hands it to the launcher (a bad override still fails the sweep before any job runs); the
processor's inputs of a batch are kept for the next job that asks for the same batch (benchmarks.generation)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import BatchFeature

from benchmarks.generation import BatchInputs, Item
from hydra_plugins.vlmfix_sweeper import ComposedConfigs

REPO = Path(__file__).resolve().parent.parent


class CountingLoader:
    """Hydra's config loader, as far as the sweeper uses it: one new config per call, the calls counted."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def load_sweep_config(self, master_config, sweep_overrides):
        self.calls.append(list(sweep_overrides))
        return OmegaConf.create({"overrides": list(sweep_overrides), "call": len(self.calls)})

    def other(self) -> str:
        return "delegated"


def test_a_checked_config_reaches_the_launcher_without_a_second_composition():
    loader = CountingLoader()
    configs = ComposedConfigs(loader)
    master = OmegaConf.create({})
    batch = [["method=greedy", "benchmark=chair"], ["method=vcd", "benchmark=chair"]]
    for overrides in batch:  # the sweeper's check of the batch
        configs.compose_and_keep(master, overrides)
    assert len(loader.calls) == 2
    launched = [configs.load_sweep_config(master, list(overrides)) for overrides in batch]  # the launcher
    assert len(loader.calls) == 2  # nothing composed again
    assert [c.overrides for c in launched] == batch and [c.call for c in launched] == [1, 2]
    again = configs.load_sweep_config(master, batch[0])  # handed out once: a second request composes anew
    assert len(loader.calls) == 3 and again.call == 3 and again is not launched[0]
    assert configs.load_sweep_config(master, ["method=pai"]).call == 4  # one it never checked: composed
    assert configs.other() == "delegated"  # the rest of the loader's interface is Hydra's


STUB_CONFIG = """\
defaults:
  - override hydra/job_logging: none
  - override hydra/hydra_logging: none
  - _self_
x: 0
y: a
hydra:
  sweeper:
    _target_: hydra_plugins.vlmfix_sweeper.ComposeOnceSweeper
  launcher:
    _target_: hydra._internal.core_plugins.basic_launcher.BasicLauncher
  sweep:
    dir: {sweep}
  job:
    chdir: false
"""


def test_a_multirun_launches_each_job_through_the_configured_launcher_composed_once(tmp_path):
    """Hydra's own multirun (tests/sweep_multirun.py, a process of its own) of a stub task through the sweeper:
    each job reaches the task function through the launcher `hydra.launcher` names, with its overrides, and
    Hydra's config loader composed each job's config once (the sweeper's check), not again for the launcher."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(STUB_CONFIG.format(sweep=tmp_path / "sweep"))
    out = tmp_path / "record.json"
    command = [sys.executable, "-m", "tests.sweep_multirun", str(tmp_path / "conf"), str(out), "x=1,2", "y=b"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["composed"] == [["x=1", "y=b"], ["x=2", "y=b"]]  # once a job
    launcher = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert record["jobs"] == [{"x": 1, "y": "b", "overrides": ["x=1", "y=b"], "num": 0, "launcher": launcher},
                              {"x": 2, "y": "b", "overrides": ["x=2", "y=b"], "num": 1, "launcher": launcher}]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0", "1", "multirun.yaml"]


def test_a_multirun_with_a_bad_override_fails_before_any_job_runs(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "VLMFIX_RESULTS": str(tmp_path / "results")}
    command = [sys.executable, "-m", "benchmarks", "--multirun", "model=toy_fast", "method=greedy,no_such_method",
               "benchmark=chair", "limit=1", "progress=false", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "no_such_method" in done.stderr
    assert not (sweep / "0").exists() and not (tmp_path / "results").exists()  # the greedy job never ran


class CountingProcessor:
    """A processor's inputs of a batch: each image's pixel sum and the text lengths; the calls counted."""

    def __init__(self) -> None:
        self.calls = 0

    def inputs(self, batch: list[Item]) -> BatchFeature:
        self.calls += 1
        sums = [float(numpy.asarray(Image.open(item.image_path).convert("L")).sum()) for item in batch]
        pixels = torch.tensor(sums)  # [batch] float32
        return BatchFeature({"pixel_values": pixels, "input_ids": torch.tensor([[len(item.text)] for item in batch])})


def test_a_batch_asked_for_again_gets_a_copy_of_its_inputs_without_processing_them_again(tmp_path):
    paths = []
    for i, shade in enumerate((10, 200)):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), (shade, shade, shade)).save(paths[-1])
    batch = [Item(0, paths[0], "what is it?"), Item(1, paths[1], "a caption")]
    processor, cache = CountingProcessor(), BatchInputs()
    first = cache.get(processor, batch, lambda: processor.inputs(batch))
    expected = {k: v.clone() for k, v in first.items()}
    first["pixel_values"].add_(1)  # what a caller does to its inputs stays with it
    again = cache.get(processor, batch, lambda: processor.inputs(batch))
    assert processor.calls == 1 and isinstance(again, BatchFeature)
    assert all(torch.equal(again[k], expected[k]) for k in expected)
    again["input_ids"].mul_(0)
    assert torch.equal(cache.get(processor, batch, lambda: processor.inputs(batch))["input_ids"],
                       expected["input_ids"]) and processor.calls == 1
    # another text, another processor or a rewritten image file: processed anew
    other_text = [batch[0], Item(1, paths[1], "another caption")]
    cache.get(processor, other_text, lambda: processor.inputs(other_text))
    assert processor.calls == 2
    other = CountingProcessor()
    cache.get(other, batch, lambda: other.inputs(batch))
    assert other.calls == 1
    Image.new("RGB", (4, 4), (90, 90, 90)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # a new modification time even on a coarse clock
    rewritten = cache.get(processor, batch, lambda: processor.inputs(batch))
    assert processor.calls == 3 and rewritten["pixel_values"][1] == 90 * 16


def test_batch_inputs_keep_at_most_their_byte_budget_dropping_the_least_recently_used(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    batches = [[Item(0, path, "x" * n)] for n in range(3)]
    processor = CountingProcessor()
    cache = BatchInputs(max_bytes=2 * (4 + 8))  # two batches: a float32 pixel sum and an int64 length each
    for batch in (batches[0], batches[1], batches[0], batches[2]):  # the third drops batch 1, used least recently
        cache.get(processor, batch, lambda b=batch: processor.inputs(b))
    assert processor.calls == 3 and cache.bytes == 24
    cache.get(processor, batches[0], lambda: processor.inputs(batches[0]))
    assert processor.calls == 3  # still kept
    cache.get(processor, batches[1], lambda: processor.inputs(batches[1]))
    assert processor.calls == 4  # dropped


def test_a_batch_of_another_processor_drops_the_kept_batches_of_the_previous_one(tmp_path):
    """A multi-model sweep moves on to the next model: the old model's inputs (and its processor) are let go, not
    kept beside the new one's until the byte budget pushes them out."""
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    batches = [[Item(0, path, "x" * n)] for n in range(2)]
    cache = BatchInputs()  # room for far more than these three batches
    old = CountingProcessor()
    for batch in batches:
        cache.get(old, batch, lambda b=batch, p=old: p.inputs(b))
    assert cache.bytes == 2 * (4 + 8)
    old_alive = weakref.ref(old)
    new = CountingProcessor()
    cache.get(new, batches[0], lambda: new.inputs(batches[0]))
    assert new.calls == 1  # the old processor's inputs of the same batch are not the new one's
    assert cache.bytes == 4 + 8 and len(cache.kept) == 1
    del old
    gc.collect()
    assert old_alive() is None  # nothing in the cache holds the old processor
    cache.get(new, batches[0], lambda: new.inputs(batches[0]))
    assert new.calls == 1  # the new processor's batch is kept
