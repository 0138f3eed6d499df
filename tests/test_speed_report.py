"""The speed harness's report (never its timings): the table and files of `python -m benchmarks.speed`, its exit
status, the peak-memory probe, and the Hydra speed benchmark's metrics and failures."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import vlmfix
from benchmarks import speed
from benchmarks.app import CONFIG_DIR, run_speed
from benchmarks.generation import Shard
from benchmarks.models import LoadedModel
from benchmarks.speed import main
from benchmarks.speed_memory import CHILD_ENV
from benchmarks.speed_timing import FLOOR
from vlmfix.decoding.method import Method

from .conftest import tiny_model

REPO = Path(CONFIG_DIR).parent
QUICK = ["--quick", "--threads", "1"]


class EditsNothing(Method):
    name = "edits-nothing-test"

    def prepare(self, session: vlmfix.Session) -> None:
        return None

    def edits(self, state: None, layer_idx: int) -> tuple:
        return ()


def test_main_reports_every_figure_per_dtype_and_batch_and_writes_json_and_csv(tmp_path, capsys):
    out = tmp_path / "speed.json"
    rows = main([*QUICK, "--no-memory", "--dtype", "float32", "bfloat16", "--batch", "1", "2",
                 "--methods", "none", "pai:cfg=False", "vcd", "--out", str(out)])
    per_block = ["greedy", FLOOR, "vlmfix, no method", "pai:cfg=False", "vcd"]
    assert [(r.dtype, r.batch, r.variant) for r in rows] == [
        (d, b, v) for d in ("float32", "bfloat16") for b in (1, 2) for v in per_block]
    assert all(r.failure is None and r.decode_ms_per_token > 0 and r.wall_s_per_caption > 0 for r in rows)
    assert [r.edited for r in rows[:5]] == [None, None, None, True, True]
    assert all(r.decode_ratio == 1.0 == r.wall_ratio for r in rows if r.variant == "greedy")
    printed = capsys.readouterr().out
    assert "threads" in printed and "device: cpu" in printed
    assert "| vcd | bfloat16 | 2 |" in printed and "| wall s/caption |" in printed
    written = json.loads(out.read_text())
    assert written["setup"]["threads"] == 1 and len(written["rows"]) == len(rows)
    main([*QUICK, "--no-memory", "--methods", "vhr", "--dtype", "float32", "--batch", "1",
          "--out", str(tmp_path / "speed.csv")])
    with (tmp_path / "speed.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["greedy", "vhr"] and table[1]["edited"] == "True"


def test_each_finished_block_is_printed_and_written_before_the_next_runs(tmp_path, capsys, monkeypatch):
    """A run cut short (a time limit, a crash) keeps the blocks it finished, on screen and in --out."""
    out = tmp_path / "speed.json"
    run_block = speed.run_block

    def second_block_dies(args, tiny, dtype, batch):
        if batch == 2:
            raise KeyboardInterrupt
        return run_block(args, tiny, dtype, batch)

    monkeypatch.setattr(speed, "run_block", second_block_dies)
    with pytest.raises(KeyboardInterrupt):
        main([*QUICK, "--no-memory", "--dtype", "float32", "--batch", "1", "2", "--methods", "vhr", "--out", str(out)])
    assert "| vhr | float32 | 1 |" in capsys.readouterr().out
    written = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["batch"]) for r in written] == [("greedy", 1), ("vhr", 1)]


def test_the_command_fails_a_method_that_edits_nothing_and_exits_1(tmp_path):
    """On 2 layers PAI's boost band (layers 2..L-1) is empty: the row fails, the others still run."""
    command = [sys.executable, "-m", "benchmarks.speed", *QUICK, "--layers", "2", "--no-memory",
               "--dtype", "float32", "--batch", "1", "--methods", "pai:cfg=False", "vcd",
               "--out", str(tmp_path / "speed.json")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "| pai:cfg=False | float32 | 1 | - | - | - | - | - | - | - | - | FAILED |" in done.stdout
    assert "- pai:cfg=False (float32, batch 1) failed during its warm-up run: pai edited nothing" in done.stdout
    assert "| vcd | float32 | 1 |" in done.stdout and "| yes |" in done.stdout
    failed = json.loads((tmp_path / "speed.json").read_text())["rows"][2]
    assert failed["variant"] == "pai:cfg=False" and failed["decode_ms_per_token"] is None
    assert failed["edited"] is False and "pai edited nothing" in failed["failure"]


def test_a_method_the_family_refuses_is_listed_as_refused_not_failed(tmp_path, capsys):
    rows = main([*QUICK, "--family", "gemma3", "--no-memory", "--dtype", "float32", "--batch", "1",
                 "--methods", "sid", "vcd", "--out", str(tmp_path / "speed.json")])
    assert [r.variant for r in rows] == ["greedy", FLOOR, "sid", "vcd"]
    sid, vcd = rows[2], rows[3]
    assert sid.failure is None and "sliding-window" in sid.refused and sid.edited is None
    assert vcd.refused is None and vcd.failure is None and vcd.edited is True
    printed = capsys.readouterr().out
    assert "gemma3-shaped model" in printed and "(256 image tokens)" in printed
    assert "| sid | float32 | 1 | - | - | - | - | - | - | - | - | refused |" in printed
    assert "- sid refused: SID selects and hides image keys by sequence position" in printed
    written = json.loads((tmp_path / "speed.json").read_text())
    assert written["setup"]["family"] == "gemma3" and "sliding-window" in written["rows"][2]["refused"]
    # a setting the model cannot serve (SID's layer 2 on 2 layers) is no refusal: its row fails, the run goes on
    rows = main([*QUICK, "--layers", "2", "--no-memory", "--dtype", "float32", "--batch", "1", "--methods", "sid"])
    assert rows[-1].refused is None and "`layer` holds [2], but the language model has 2 layers" in rows[-1].failure


def test_unknown_methods_are_refused_before_any_work(capsys):
    with pytest.raises(SystemExit, match="2"):  # argparse: usage error
        main(["--methods", "vhr", "vcdd"])
    assert "unknown methods ['vcdd']; known: none, avisc, dcd, dola" in capsys.readouterr().err


def test_peak_growth_sees_what_a_call_holds_at_its_peak():
    """In a process set up as the probe's (glibc's mmap threshold fixed), after other allocations were freed."""
    code = (
        "import torch\n"
        "from benchmarks.speed_memory import peak_growth\n"
        "torch.ones(32 * 2**20).sum()  # 128 MB held and freed before: must not hide the next call's peak\n"
        "print(peak_growth(lambda: torch.ones(16 * 2**20).sum()), peak_growth(lambda: None))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **CHILD_ENV},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    holds_64_mb, holds_nothing = map(int, done.stdout.split())
    # the kernel updates its resident-set counters in batches of pages: exact to within about 1 MB
    assert holds_64_mb >= 63 * 2**20 and holds_nothing < 4 * 2**20


def test_memory_is_measured_per_variant_in_a_fresh_process():
    rows = main([*QUICK, "--dtype", "float32", "--batch", "1", "8", "--methods", "none"])
    peak = {(r.variant, r.batch): r.peak_mb for r in rows}
    assert all(value is not None and value > 0 for value in peak.values())
    assert peak["greedy", 8] > 4 * peak["greedy", 1]  # 8 rows of KV cache and activations
    assert all(r.memory_ratio == 1.0 for r in rows if r.variant == "greedy")


def speed_cfg(tmp_path: Path, method: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=toy_fast", f"method={method}", "benchmark=speed", "benchmark.new_tokens=3", "benchmark.repeats=1",
            f"results_dir={tmp_path}"])


def test_hydra_speed_reports_decode_and_wall_ratios_and_the_floor(tmp_path):
    tiny = tiny_model("llava", layers=4)
    loaded = LoadedModel(tiny.model, tiny.processor, source="tiny-llava")
    cfg = speed_cfg(tmp_path, "pai")
    result = run_speed(cfg, loaded, [vlmfix.PAI()], None, Shard.current())
    metrics = result["metrics"]
    assert metrics["edited"] is True and metrics["ratio_to_greedy"] > 0 and metrics["wall_ratio_to_greedy"] > 0
    assert metrics["floor_ratio_to_greedy"] > 0  # PAI with refinement is two-stream
    assert json.loads((Path(result["result_dir"]) / "result.json").read_text())["metrics"]["wall_s"] > 0


def test_hydra_speed_fails_a_method_that_edits_nothing(tmp_path):
    tiny = tiny_model("llava")
    loaded = LoadedModel(tiny.model, tiny.processor, source="tiny-llava")
    with pytest.raises(RuntimeError, match="edits-nothing-test failed during its warm-up run: edits-nothing-test "
                                           "edited nothing"):
        run_speed(speed_cfg(tmp_path, "greedy"), loaded, [EditsNothing()], None, Shard.current())


def test_python_m_benchmarks_speed_runs_gift_on_the_toy(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "model=toy_fast", "method=gift", "benchmark=speed",
               "benchmark.new_tokens=3", "benchmark.repeats=1", f"results_dir={tmp_path / 'results'}",
               f"hydra.run.dir={tmp_path / 'run'}", "progress=false"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "results").rglob("result.json")).read_text())["metrics"]
    assert metrics["edited"] is True and metrics["wall_ratio_to_greedy"] > 0 and metrics["ratio_to_greedy"] > 0
