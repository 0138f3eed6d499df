"""The speed harness's behaviour (never its timings): every method edits on the planted model, a variant
whose method edits nothing fails, the wall clock covers prepare passes, the two-stream floor decodes
identical row pairs, method specs and stand-in DCD; the lockstep clock's turns, paired figures and failures."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import vlmfix
from benchmarks import speed_lockstep, speed_timing
from benchmarks.speed import main as speed_main
from benchmarks.speed_setup import (
    BEAM_SEARCH_METHODS,
    FULL_RUN,
    IMAGE_TOKENS,
    NO_METHOD,
    SINK_DIMS,
    batch_inputs,
    build_methods,
    llava_shaped,
    parse_method,
    refusal,
    sink_tau,
    speed_model,
    stand_in_dcd,
)
from benchmarks.speed_timing import FLOOR, GREEDY, TokenClock, generate_variants, measure, unedited
from vlmfix.decoding.edits import KeyBias
from vlmfix.decoding.method import Method

from .conftest import tiny_model

SMALL = dict(layers=4, heads=4, head_dim=16)  # hidden 64: room for the planted dims; VAR and PAI edit layer 2+


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared machine, spinning OpenMP threads make tiny models crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SlowPrepare(Method):
    """Sleeps in `prepare`, then biases the image keys on every layer (so it edits)."""

    name = "slow-prepare-test"
    needs_image = True

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def prepare(self, session: vlmfix.Session) -> Any:
        time.sleep(self.seconds)
        return KeyBias(abs_gain=session.spans.image[:, None].float() * 0.1, rows="last")

    def edits(self, state: Any, layer_idx: int) -> tuple:
        return (state,)


class Rows(BaseStreamer):
    """Keeps every step's tokens."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def put(self, value: torch.Tensor) -> None:
        self.steps.append(value)

    def end(self) -> None:
        pass


def test_parse_method_reads_literals_and_names_bad_options():
    assert parse_method("gift") == ("gift", {})
    assert parse_method("pai:cfg=False,gamma=1.2") == ("pai", {"cfg": False, "gamma": 1.2})
    assert parse_method("dcd:variant=neg_only") == ("dcd", {"variant": "neg_only"})
    assert parse_method("vhr:layers=[2, 3],alpha=2") == ("vhr", {"layers": [2, 3], "alpha": 2})
    with pytest.raises(ValueError, match="not key=value"):
        parse_method("pai:cfg")


def test_every_method_of_the_full_run_edits_on_the_planted_model(tmp_path):
    tiny = speed_model(**SMALL)
    inputs = batch_inputs(tiny, 2)
    specs = [s for s in FULL_RUN if s != NO_METHOD]
    covered = {parse_method(s)[0] for s in specs} | set(BEAM_SEARCH_METHODS)  # beam search: opera_speed.py
    assert covered == set(vlmfix.methods.names())  # every registered method
    methods = {spec: build_methods(spec, tiny, str(tmp_path)) for spec in specs}
    variants = generate_variants(tiny, inputs, methods)
    for spec in specs:
        session = variants[spec](3, TokenClock())
        assert unedited(session.report()) is None, spec


def test_var_edits_its_whole_layer_band_only_where_massive_activations_are_planted():
    """The planted sinks hold through the layers: VAR edits each of layers 2..L-2 in every forward."""
    shape = dict(SMALL, layers=6)
    var = vlmfix.VAR(sink_dims=list(SINK_DIMS), tau=sink_tau(64))
    for tiny, calls in [(llava_shaped(**shape), 0), (speed_model(**shape), 3 * 3)]:  # 3 layers x 3 forwards
        with vlmfix.apply(tiny.model, var, tokenizer=tiny.processor) as session:
            session.generate(**batch_inputs(tiny, 1), max_new_tokens=3, do_sample=False)
        assert session.report()["var"]["applied"]["attention_calls"] == calls


def test_a_variant_whose_method_edits_nothing_fails_with_the_reason():
    """PAI's boost band is layers 2..L-1, empty on a 2-layer model: PAI without refinement edits nothing."""
    tiny = speed_model(layers=2, heads=4, head_dim=16)
    methods = {"pai:cfg=False": [vlmfix.PAI(cfg=False)], "pai": [vlmfix.PAI()]}
    messages: list[str] = []
    results = measure(generate_variants(tiny, batch_inputs(tiny, 1), methods), 3, 1, progress=messages.append)
    failed, timed = results[1], results[2]
    assert failed.label == "pai:cfg=False" and failed.failure is not None and failed.edited is False
    assert ("warm-up run: pai edited nothing (pai: attention_calls=0, rewrites=0, contrast_steps=0, "
            "decoding_steps=0)") in failed.failure
    assert failed.seconds_per_token != failed.seconds_per_token  # NaN: no figure
    assert any("pai:cfg=False: failed during its warm-up run: pai edited nothing" in m for m in messages)
    assert timed.failure is None and timed.edited is True  # the refinement's contrast steps count as edits


def test_a_failing_variant_is_reported_and_the_others_are_timed():
    def fine(n, streamer):
        for _ in range(n + 1):
            streamer.put(torch.zeros(1))

    def broken(n, streamer):
        raise RuntimeError("no such kernel")

    messages: list[str] = []
    results = measure({"greedy": fine, "broken": broken, "other": fine}, 3, 2, progress=messages.append)
    assert [r.label for r in results] == ["greedy", "broken", "other"]
    assert results[1].failure == "warm-up run: RuntimeError: no such kernel" and results[1].edited is None
    assert results[2].failure is None and results[2].edited is None and results[2].wall_seconds > 0
    assert any("broken: failed during its warm-up run: RuntimeError: no such kernel" in m for m in messages)
    with pytest.raises(RuntimeError, match="the baseline 'broken' failed: RuntimeError: no such kernel"):
        measure({"broken": broken, "fine": fine}, 3, 1, progress=messages.append)


def recording_variant(calls: list[str], label: str):
    """A variant that appends `label` to `calls` when it runs and streams its tokens at once."""

    def fn(n, streamer):
        calls.append(label)
        for _ in range(n + 1):
            streamer.put(torch.zeros(1))

    return fn


def test_the_warm_up_call_may_run_a_cheaper_variant():
    calls: list[str] = []
    measure({"greedy": recording_variant(calls, "greedy")}, 3, 2, progress=lambda _: None,
            warm_up={"greedy": recording_variant(calls, "cheap")})
    assert calls == ["cheap", "greedy", "greedy"]


def test_each_run_of_the_runs_clock_starts_one_place_further_along_the_rotation():
    calls: list[str] = []
    measure({label: recording_variant(calls, label) for label in "abc"}, 2, 4, progress=lambda _: None)
    runs = ["".join(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert runs == ["abc", "abc", "bca", "cab", "abc"]  # the warm-up run, then runs 1-4


def test_the_wall_clock_covers_prepare_and_the_decode_clock_does_not():
    tiny = tiny_model("llava")
    variants = generate_variants(tiny, tiny.inputs(["describe this image ."]), {"slow": [SlowPrepare(1.0)]})
    greedy, slow = measure(variants, 4, 1, progress=lambda _: None)
    assert slow.edited is True
    assert slow.wall_seconds >= 1.0 > greedy.wall_seconds
    assert 3 * slow.seconds_per_token < 1.0  # the decode steps after the prefill


def test_the_two_stream_floor_decodes_each_prompt_twice_as_identical_rows():
    tiny = speed_model(**SMALL)
    inputs = batch_inputs(tiny, 2)  # two prompts with different images
    variants = generate_variants(tiny, inputs, {}, two_row_floor=True)
    assert list(variants) == [GREEDY, FLOOR]
    rows = Rows()
    variants[FLOOR](3, rows)
    prompt, *steps = rows.steps
    assert prompt.shape[0] == 4 and len(steps) == 3
    for step in steps:  # rows [a, b, a, b], as a two-stream method stacks [positive; negative]
        assert step.shape == (4,) and torch.equal(step[:2], step[2:])


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


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3"])
def test_family_shaped_models_keep_their_family_s_layout(family):
    """Qwen3-VL: 576 image tokens (768 px, 32 px per merged token), DeepStack from 3 vision blocks, 4 query heads per
    key/value head. Gemma 3: 256 image tokens, sliding layers with a global one (the last, on fewer than 6 layers;
    every 6th on more), 2 query heads per key/value head."""
    tiny = speed_model(layers=2, heads=8, head_dim=16, family=family)
    inputs = batch_inputs(tiny, 2)
    image = vlmfix.get_adapter(tiny.model).image_mask(inputs["input_ids"])
    assert image.sum(1).tolist() == [IMAGE_TOKENS[family]] * 2 == [{"qwen3_vl": 24 * 24, "gemma3": 16 * 16}[family]] * 2
    text = tiny.model.config.text_config
    assert text.num_key_value_heads == {"qwen3_vl": 2, "gemma3": 4}[family]
    if family == "qwen3_vl":
        assert tiny.model.config.vision_config.deepstack_visual_indexes == [0, 1, 2]
    else:
        assert text.layer_types == ["sliding_attention", "full_attention"] and text.sliding_window == 1024
        deeper = speed_model(layers=7, heads=4, head_dim=16, family=family).model.config.text_config
        assert [i for i, kind in enumerate(deeper.layer_types) if kind == "full_attention"] == [5]


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3"])
def test_every_method_of_the_full_run_edits_or_is_refused_per_family(family, tmp_path):
    """On each family's planted model every method of the full run edits, or the family refuses it up front (only
    the refusals the methods document: DualStream's token selection and SID's full-attention need, on Gemma 3)."""
    tiny = speed_model(**SMALL, family=family)
    inputs = batch_inputs(tiny, 1)
    specs = [s for s in FULL_RUN if s != NO_METHOD]
    methods = {spec: build_methods(spec, tiny, str(tmp_path)) for spec in specs}
    refused = {spec for spec, ms in methods.items() if refusal(tiny, ms) is not None}
    assert refused == ({"dual_stream", "dual_stream:cfg=False", "sid"} if family == "gemma3" else set())
    variants = generate_variants(tiny, inputs, {s: ms for s, ms in methods.items() if s not in refused})
    for spec in specs:
        if spec not in refused:
            assert unedited(variants[spec](2, TokenClock()).report()) is None, spec


def test_the_fastest_run_is_the_least_loaded_runs_mean_step(monkeypatch):
    # a fake clock: each variant's calls put tokens at scripted times (the first put is the prompt)
    now = [0.0]
    monkeypatch.setattr(speed_timing.time, "perf_counter", lambda: now[0])
    scripts = {"greedy": iter([[0, 1, 2, 3], [0, 2, 6, 10], [0, 2, 5, 8], [0, 2, 4.5, 7]]),
               "slow": iter([[0, 1, 2, 3], [0, 3, 4.5, 12], [0, 3, 6, 9], [0, 3, 7, 11]])}

    def scripted(label):
        def fn(n, streamer):
            for t in next(scripts[label]):
                now[0] = t
                streamer.put(torch.zeros(1))

        return fn

    greedy, slow = measure({"greedy": scripted("greedy"), "slow": scripted("slow")}, 3, 3, progress=lambda _: None)
    # each variant's first call is its warm-up; then per run the mean step (last - first token) / 2:
    # greedy 4, 3, 2.5; slow 4.5, 3, 4 (slow's single shortest step, 1.5, lies in its slowest run)
    assert (greedy.fastest_run_seconds, slow.fastest_run_seconds) == (2.5, 3)
    assert slow.fastest_run_ratio == 3 / 2.5
    assert (greedy.seconds_per_token, slow.seconds_per_token) == (3, 4) and slow.ratio == 4 / 3  # the medians


def put_steps(streamer: BaseStreamer, puts: int, work: Callable[[], None] = lambda: None) -> None:
    """What generate does to its streamer: `work`, then a put (the prompt, then each step), `puts` times."""
    for _ in range(puts):
        work()
        streamer.put(torch.zeros(1))
    work()  # after the last token: leaving the call


def test_lockstep_variants_take_strict_round_robin_turns():
    """No two variants ever work at once, and the turn goes round in the variants' order; a variant that ends
    early leaves the rotation and the others keep alternating."""
    lock = threading.Lock()
    intervals: list[str] = []  # the label of each unit of work, in the order the units ran
    running: list[str] = []
    overlaps: list[tuple[str, ...]] = []

    def variant(label: str, puts: int | None = None):
        def work() -> None:
            with lock:
                running.append(label)
                if len(running) > 1:
                    overlaps.append(tuple(running))
                intervals.append(label)
            time.sleep(0.002)  # room for another thread to barge in, were the turns broken
            with lock:
                running.remove(label)

        def fn(n, streamer):
            put_steps(streamer, n + 1 if puts is None else puts, work)

        return fn

    outcomes = speed_lockstep.run_round({"a": variant("a"), "b": variant("b", puts=2), "c": variant("c")}, 3)
    assert overlaps == []
    # a and c: 4 puts (prompt + 3 tokens), 5 units each; b: 2 puts, 3 units, then it leaves
    assert "".join(intervals) == "abc" * 3 + "ac" * 2
    assert list(outcomes) == ["a", "b", "c"]
    steps = [o for o in outcomes.values() if isinstance(o, speed_lockstep.Steps)]
    assert [len(o.seconds) for o in steps] == [2, 0, 2]  # units 2.. are the decode steps
    assert all(o.edited is None for o in steps)  # no session: no method to edit


def test_lockstep_figures_pair_each_decode_step_with_the_baselines():
    # a fake clock: a variant's unit of work takes the scripted seconds (set-up, prefill + first token, then
    # the decode steps); only one variant works at a time, so a shared counter times each unit exactly
    now = [0.0]
    scripts = {  # per call: the warm-up (3 tokens), then two rounds of 4 tokens
        "greedy": iter([[5, 5, 1, 1], [5, 5, 1, 2, 4], [5, 5, 2, 2, 2]]),
        "slow": iter([[90, 50, 1, 1], [90, 50, 1.5, 3, 4], [90, 50, 3, 2, 7]]),  # set-up and prefill: not compared
    }

    def scripted(label):
        def fn(n, streamer):
            units = next(scripts[label])
            assert len(units) == n + 1
            for seconds in units:
                now[0] += seconds
                streamer.put(torch.zeros(1))

        return fn

    messages: list[str] = []
    greedy, slow = speed_lockstep.measure_lockstep({"greedy": scripted("greedy"), "slow": scripted("slow")}, 4, 2,
                                                   progress=messages.append, clock=lambda: now[0])
    # slow / greedy per step: round 1: 1.5, 1.5, 1; round 2: 1.5, 1, 3.5 -> sorted 1, 1, 1.5, 1.5, 1.5, 3.5
    assert slow.paired_ratio == pytest.approx(1.5)
    assert slow.paired_ratio_q1 == pytest.approx(1 + 0.25 * (1.5 - 1))  # position 0.25 * 5 = 1.25 of the sorted
    assert slow.paired_ratio_q3 == pytest.approx(1.5)  # position 3.75: between two 1.5s
    assert slow.summed_ratio == pytest.approx((8.5 + 12) / (7 + 6))
    assert slow.seconds_per_token == pytest.approx(20.5 / 6) and greedy.seconds_per_token == pytest.approx(13 / 6)
    assert (greedy.paired_ratio, greedy.paired_ratio_q1, greedy.paired_ratio_q3, greedy.summed_ratio) == (1, 1, 1, 1)
    assert slow.failure is None and slow.edited is None
    assert messages == ["  round 1/2 done", "  round 2/2 done"]


def test_each_lockstep_round_starts_one_place_further_along_the_rotation():
    first_units: list[str] = []  # which variant ran the first unit of each call, in order

    def variant(label):
        def fn(n, streamer):
            first_units.append(label)
            put_steps(streamer, n + 1)

        return fn

    speed_lockstep.measure_lockstep({label: variant(label) for label in "abc"}, 2, 4, progress=lambda _: None)
    rounds = ["".join(first_units[i : i + 3]) for i in range(0, len(first_units), 3)]
    assert rounds == ["abc", "abc", "bca", "cab", "abc"]  # the warm-up round, then rounds 1-4


def test_a_lockstep_variant_that_raises_mid_run_fails_without_stalling_the_others():
    calls = {"broken": 0, "other": 0}

    def fine(label):
        def fn(n, streamer):
            calls[label] = calls.get(label, 0) + 1
            put_steps(streamer, n + 1)

        return fn

    def broken(n, streamer):
        calls["broken"] += 1
        streamer.put(torch.zeros(1))  # the prompt
        streamer.put(torch.zeros(1))  # the first token
        raise RuntimeError("no such kernel")

    messages: list[str] = []
    results: list[speed_lockstep.LockstepResult] = []
    variants = {"greedy": fine("greedy"), "broken": broken, "other": fine("other")}
    worker = threading.Thread(target=lambda: results.extend(
        speed_lockstep.measure_lockstep(variants, 4, 2, progress=messages.append)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the lockstep rounds deadlocked"
    greedy, failed, other = results
    assert failed.failure == "warm-up round: RuntimeError: no such kernel" and failed.edited is None
    assert failed.paired_ratio != failed.paired_ratio  # NaN: no figure
    assert calls == {"greedy": 3, "broken": 1, "other": 3}  # left out of the timed rounds
    assert other.failure is None and other.paired_ratio > 0 and greedy.paired_ratio == 1
    assert "  broken: failed during its warm-up round: RuntimeError: no such kernel; no figure" in messages
    with pytest.raises(RuntimeError, match="the baseline 'broken' failed: RuntimeError: no such kernel"):
        speed_lockstep.measure_lockstep({"broken": broken, "fine": fine("fine")}, 4, 1, progress=messages.append)


def test_a_lockstep_variant_whose_method_edits_nothing_fails_with_the_reason(tmp_path):
    """On 2 layers PAI's boost band is empty: without refinement PAI edits nothing. Each variant runs on its own
    copy of the model, so the two PAI sessions run side by side."""
    tiny = speed_model(layers=2, heads=4, head_dim=16)
    variants = speed_lockstep.copied_variants(tiny, batch_inputs(tiny, 1), {"pai:cfg=False": "pai:cfg=False",
                                                                            "pai": "pai"}, str(tmp_path))
    assert list(variants) == [GREEDY, FLOOR, "pai:cfg=False", "pai"]  # PAI with refinement is two-stream
    greedy, floor, failed, timed = speed_lockstep.measure_lockstep(variants, 3, 1, progress=lambda _: None)
    assert failed.edited is False and failed.failure is not None
    assert failed.failure.startswith("warm-up round: pai edited nothing (pai: attention_calls=0")
    assert timed.failure is None and timed.edited is True and floor.failure is None and floor.edited is None


def test_the_lockstep_clock_runs_end_to_end_on_the_quick_model(tmp_path, capsys):
    out = tmp_path / "speed.json"
    rows = speed_main(["--quick", "--threads", "1", "--clock", "lockstep", "--no-memory", "--dtype", "float32",
                       "--batch", "1", "--methods", "none", "pai:cfg=False", "--out", str(out)])
    assert [r.variant for r in rows] == [GREEDY, "vlmfix, no method", "pai:cfg=False"]
    for r in rows:
        assert r.failure is None and r.clock == "lockstep" and r.decode_ms_per_token > 0
        assert 0 < r.paired_ratio_q1 <= r.paired_ratio <= r.paired_ratio_q3 < math.inf
        assert 0 < r.summed_ratio < math.inf and math.isnan(r.wall_ratio)  # lockstep reads no wall time
    assert rows[0].paired_ratio == 1.0 == rows[0].summed_ratio and rows[2].edited is True
    assert "| paired IQR |" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["setup"]["clock"] == "lockstep" and written["rows"][2]["paired_ratio"] > 0
