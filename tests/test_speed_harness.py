"""The speed harness's plumbing (not its timings): method specs, the two-row floor, stand-in DCD."""

from __future__ import annotations

import pytest
import torch

import vlmfix
from benchmarks.speed import TokenClock, generate_variants, main, measure, parse_method, stand_in_dcd

from .conftest import tiny_model


def test_parse_method_reads_literals_and_names_bad_options():
    assert parse_method("gift") == ("gift", {})
    assert parse_method("pai:cfg=False,gamma=1.2") == ("pai", {"cfg": False, "gamma": 1.2})
    assert parse_method("dcd:variant=neg_only") == ("dcd", {"variant": "neg_only"})
    assert parse_method("vhr:layers=[2, 3],alpha=2") == ("vhr", {"layers": [2, 3], "alpha": 2})
    with pytest.raises(ValueError, match="not key=value"):
        parse_method("pai:cfg")


def test_two_row_floor_streams_one_row_of_two_identical_rows():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["describe this image ."])
    variants = generate_variants(tiny, inputs, {}, two_row_floor=True)
    assert list(variants) == ["greedy", "greedy, 2 rows (two-stream floor)"]
    clock = TokenClock()
    out = variants["greedy, 2 rows (two-stream floor)"](3, clock)
    assert out.shape[0] == 2 and torch.equal(out[0], out[1])
    assert len(clock.times) == 3  # one event per new token, as for batch 1


def test_stand_in_dcd_with_the_models_own_projector_is_greedy(tmp_path):
    """Both streams see the image through the same (copied) projector, so the contrast is a no-op on the
    argmax: DCD's tokens equal greedy's. This also checks the stand-in checkpoints load."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["describe this image ."])
    method = stand_in_dcd(tiny, str(tmp_path))
    greedy = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[method], tokenizer=tiny.processor, max_new_tokens=5,
                          do_sample=False)
    assert torch.equal(out, greedy)


def test_main_times_every_variant_with_ratios_to_greedy(capsys):
    results = main(["--layers", "1", "--heads", "2", "--head-dim", "8", "--new-tokens", "3", "--repeats", "1",
                    "--methods", "pai:cfg=False", "vcd"])
    assert [r.label for r in results] == ["greedy", "greedy, 2 rows (two-stream floor)", "pai:cfg=False", "vcd"]
    assert results[0].ratio == 1.0 and all(r.seconds_per_token > 0 for r in results)
    assert "| vcd |" in capsys.readouterr().out


def test_a_failing_variant_is_reported_and_left_out():
    def fine(n, streamer):
        streamer.put(torch.zeros(1))
        for _ in range(n):
            streamer.put(torch.zeros(1))

    def broken(n, streamer):
        raise RuntimeError("no such kernel")

    messages = []
    results = measure({"greedy": fine, "broken": broken, "other": fine}, 3, 1, progress=messages.append)
    assert [r.label for r in results] == ["greedy", "other"]
    assert any("broken: failed, left out: RuntimeError: no such kernel" in m for m in messages)
