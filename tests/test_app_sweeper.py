"""The app's sweeper (hydra_plugins/vlmfix_sweeper): each job's config is composed once, by the check of the
batch, and handed to the launcher; a bad override still fails the sweep before any job runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

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


def test_a_multirun_with_a_bad_override_fails_before_any_job_runs(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "VLMFIX_RESULTS": str(tmp_path / "results")}
    command = [sys.executable, "-m", "benchmarks", "--multirun", "model=toy_fast", "method=greedy,no_such_method",
               "benchmark=chair", "limit=1", "progress=false", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "no_such_method" in done.stderr
    assert not (sweep / "0").exists() and not (tmp_path / "results").exists()  # the greedy job never ran
