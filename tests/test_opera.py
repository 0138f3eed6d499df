"""OPERA: the column scores and the rollback rule against plain references written from the spec
(opera.md §3.3-3.5), beam-search parity with the penalty off, batched rows against rows alone (with a
rollback in one row only), a cache that stays consistent through rollbacks, and refusals before any work."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import vlmfix
import vlmfix.decoding.opera as opera_loop
from vlmfix import OPERA
from vlmfix.methods.opera_rules import RetrospectionRule, column_scores, local_scores, mode, rollback_position

from .conftest import tiny_model

QUESTIONS = ["Describe this image.", "Is there a dog on the table?"]


# ------------------------------------------------------------------------------ references from the spec
def reference_phi(matrix: torch.Tensor, scale: float) -> list[float]:
    """phi_c = 1e-7 * prod_{i=c..n-1} scale * A[i, c], one column at a time, in float64."""
    n = matrix.shape[0]
    out = []
    for c in range(n):
        product = 1.0
        for i in range(c, n):
            product *= scale * float(matrix[i, c])
        out.append(1e-7 * product)
    return out


def reference_float16(phis: list[float]) -> tuple[float, int]:
    """The official code's float16 store: below 2^-24 is 0, above 65504 is inf; the max and its first column."""
    stored = [0.0 if p < 2.0**-24 else (math.inf if p > 65504.0 else p) for p in phis]
    best = max(stored)
    return best, stored.index(best)


def random_rows(n: int, seed: int) -> torch.Tensor:
    """[n, n] lower-triangular attention rows (each row a share of a larger key set: sums below 1)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(n, n, generator=g).tril() * 0.5
    return weights / (weights.sum(dim=-1, keepdim=True) + torch.rand(n, 1, generator=g))


# ------------------------------------------------------------------------------ column scores
def test_column_scores_golden_three_by_three():
    """σ = 50: column 0 has 50·1 · 50·0.5 · 50·0.2 = 12500 -> 1.25e-3; column 1 375; column 2 25."""
    a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    phi, where = column_scores(a, 50.0)
    torch.testing.assert_close(phi, torch.tensor(1.25e-3))
    assert int(where) == 0
    b = torch.tensor([[1.0, 0.0, 0.0], [0.1, 0.9, 0.0], [0.05, 0.9, 0.05]])  # column 1: 45 · 45 = 2025
    phi, where = column_scores(b, 50.0, "exact")
    torch.testing.assert_close(phi, torch.tensor(2.025e-4))
    assert int(where) == 1


def test_column_scores_float16_range_veto_and_floor():
    """A 30-row column at σ·a = 3 overflows float16 (a veto); products below 2^-24 flush to 0 (location 0)."""
    strong = torch.full((30, 30), 3.0 / 50).tril()
    phi, _ = column_scores(strong, 50.0, "float16")
    assert math.isinf(float(phi))
    phi, _ = column_scores(strong, 50.0, "exact")
    torch.testing.assert_close(phi, torch.tensor(1e-7 * 3.0**30), rtol=1e-4, atol=0)
    weak = torch.full((4, 4), 0.001).tril()  # σ·a = 0.05: the best column is 5e-9 < 2^-24
    phi, where = column_scores(weak, 50.0, "float16")
    assert float(phi) == 0.0 and int(where) == 0
    _, where = column_scores(weak, 50.0, "exact")
    assert int(where) == 3  # exactly, the shortest product is the largest


@pytest.mark.parametrize("n, window, scale, score_range", [
    (6, 512, 50.0, "float16"),  # window covers every token
    (9, 4, 50.0, "float16"),  # a sliding window over the last 4 tokens
    (7, 3, 8.0, "exact"),
    (12, 12, 5.0, "float16"),  # small products: flushed to 0 in places
])
def test_local_scores_match_the_reference(n, window, scale, score_range):
    """Random lower-triangular patterns of 3 candidates: phi and the absolute location match the reference
    computed column by column over the window."""
    history = random_rows(n, seed=n)  # rows 0..n-1 of the beam, as [n, n]
    stored = torch.cat([history, torch.zeros(n, 1)], dim=1)  # [n, n+1]
    candidates = torch.stack([random_rows(n + 1, seed=100 + k)[-1] for k in range(3)])  # [3, n+1]
    phi, where = local_scores(stored.expand(3, n, n + 1), candidates, scale, window, score_range)
    for k in range(3):
        full = torch.cat([history, torch.zeros(n, 1)], dim=1)
        matrix = torch.cat([full, candidates[k][None]]).double()  # [n+1, n+1]
        start = max(0, n + 1 - window)
        phis = reference_phi(matrix[start:, start:], scale)
        if score_range == "float16":
            best, column = reference_float16(phis)
        else:
            best, column = max(phis), phis.index(max(phis))
        torch.testing.assert_close(phi[k].double(), torch.tensor(best, dtype=torch.float64), rtol=1e-4, atol=0)
        assert int(where[k]) == column + start


def test_mode_ties_go_to_the_smallest_value():
    assert mode(torch.tensor([[3, 1, 3, 1, 2], [4, 4, 0, 0, 0]]), 5).tolist() == [1, 0]


# ------------------------------------------------------------------------------ the rollback rule
RULE = RetrospectionRule(threshold=15, max_attempts=5, window=512)


def histories(location: int, repeats: int, beams: int = 3) -> torch.Tensor:
    return torch.tensor([[location] * repeats + [0] * (20 - repeats)] * beams)


def test_rollback_triggers_above_the_threshold_in_every_beam():
    attempts: dict[int, int] = {}
    assert rollback_position(histories(12, 16), 12, 40, attempts, RULE) == 13  # 16 > r = 15
    assert attempts == {13: 1}
    assert rollback_position(histories(12, 15), 12, 40, {}, RULE) is None  # 15 is not > 15
    assert rollback_position(histories(9, 30), 9, 40, {}, RULE) is None  # location below 10
    one_short = histories(12, 16)
    one_short[1, :2] = 0  # one beam saw 12 only 14 times
    assert rollback_position(one_short, 12, 40, {}, RULE) is None


def test_rollback_moves_back_one_position_when_attempts_run_out():
    attempts: dict[int, int] = {}
    positions = [rollback_position(histories(12, 16), 12, 40, attempts, RULE) for _ in range(11)]
    assert positions == [13] * 5 + [12] * 5 + [None]


def test_rollback_position_stays_in_the_window_and_before_the_candidate():
    rule = RetrospectionRule(threshold=0, max_attempts=5, window=4)
    assert rollback_position(histories(12, 1), 12, 30, {}, rule) == 30 - 4 - 1  # 30 - 13 > 4 + 1: slides up
    assert rollback_position(histories(12, 1), 12, 13, {}, rule) is None  # 13 is the candidate's own position


# ------------------------------------------------------------------------------ decoding
def penalty_off(vocab: int, **knobs: Any) -> OPERA:
    """OPERA that reduces to beam search: every token a candidate, no penalty, no bonus, no rollback."""
    knobs = {"penalty_weights": 0.0, "num_attn_candidates": vocab, "image_bonus_steps": 0, "threshold": 10**6, **knobs}
    return OPERA(**knobs)


@pytest.mark.parametrize("family, extra", [
    ("llava", {}),
    # generate's finished-hypothesis rules and processors: kept hypotheses, early stop, length penalty
    ("qwen2_vl", dict(num_return_sequences=2, early_stopping=True, length_penalty=0.5, repetition_penalty=1.3)),
    # the generated positions continue the prefill's slot numbering (the model drops generate's position ids)
    ("hyperclovax_vision_v2", {}),
])
def test_penalty_off_equals_plain_beam_search(family, extra):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)  # two prompts of different lengths: left padding
    settings = dict(num_beams=3, do_sample=False, max_new_tokens=6, return_dict_in_generate=True, output_scores=True,
                    **extra)
    plain = tiny.model.generate(**inputs, **settings)
    with vlmfix.apply(tiny.model, penalty_off(tiny.model.config.text_config.vocab_size)) as session:
        out = session.generate(**inputs, **settings)
    assert torch.equal(out.sequences, plain.sequences)
    torch.testing.assert_close(out.sequences_scores, plain.sequences_scores, atol=1e-5, rtol=1e-5)
    report = session.report()["opera"]
    assert report["rollbacks"] == [0, 0] and report["bonus_steps"] == [0, 0]
    assert report["applied"]["decoding_steps"] == sum(report["penalty_steps"]) > 0


def test_penalty_changes_the_choice_and_is_counted():
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    plain = tiny.model.generate(**inputs, num_beams=3, do_sample=False, max_new_tokens=10)
    with vlmfix.apply(tiny.model, OPERA(image_bonus_steps=2, num_attn_candidates=3)) as session:
        out = session.generate(**inputs, num_beams=3, max_new_tokens=10)
    assert not torch.equal(out, plain)
    report = session.report()["opera"]
    assert report["bonus_steps"] == [2, 2]
    assert all(p > 0 for p in report["penalty_steps"])
    assert report["applied"]["decoding_steps"] == sum(report["bonus_steps"]) + sum(report["penalty_steps"])


def test_overflowing_scores_veto_and_lift():
    """At scale 1e6 every column product beyond the first tokens overflows float16's range: every candidate is
    vetoed, so every beam is, and the veto is lifted for the step (counted); "exact" keeps these products finite
    (up to fp32's 3.4e38) and vetoes nothing."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    with vlmfix.apply(tiny.model, OPERA(scale_factor=1e6, image_bonus_steps=0, num_attn_candidates=3)) as session:
        session.generate(**inputs, num_beams=2, max_new_tokens=6, min_new_tokens=6)
    report = session.report()["opera"]
    assert report["penalty_steps"] == [6, 6]
    assert all(lifted >= 6 - 2 for lifted in report["lifted_vetoes"])  # 2+ generated tokens: 2+ factors overflow
    assert all(v >= 2 * lifted for v, lifted in zip(report["vetoed_beams"], report["lifted_vetoes"]))
    exact = OPERA(scale_factor=1e6, image_bonus_steps=0, num_attn_candidates=3, score_range="exact")
    with vlmfix.apply(tiny.model, exact) as session:
        session.generate(**inputs, num_beams=2, max_new_tokens=6, min_new_tokens=6)
    assert session.report()["opera"]["vetoed_beams"] == [0, 0]


def test_pope_regime_never_computes_the_penalty():
    """max_new_tokens = 10 with the default 10 bonus steps: only the image bonus acts, no rollback."""
    tiny = tiny_model("llava")
    with vlmfix.apply(tiny.model, OPERA(threshold=0, min_location=0)) as session:
        session.generate(**tiny.inputs(QUESTIONS), num_beams=2, max_new_tokens=10)
    report = session.report()["opera"]
    assert report["penalty_steps"] == [0, 0] and report["rollbacks"] == [0, 0] and report["bonus_steps"] == [10, 10]


@pytest.mark.parametrize("family, knobs, beams, rolled", [
    # item 0 ends (eos) before its histories trigger; item 1 rolls back
    ("qwen2_vl", dict(threshold=7, min_location=0, image_bonus_steps=1, num_attn_candidates=3), 2, [False, True]),
    # both items roll back, at the same step
    ("llava", dict(threshold=2, min_location=0, image_bonus_steps=2, num_attn_candidates=3), 3, [True, True]),
])
def test_batch_rows_equal_rows_alone(family, knobs, beams, rolled):
    tiny = tiny_model(family)
    opera = OPERA(**knobs)
    with vlmfix.apply(tiny.model, opera) as session:
        batch = session.generate(**tiny.inputs(QUESTIONS), num_beams=beams, max_new_tokens=12)
    assert [n > 0 for n in session.report()["opera"]["rollbacks"]] == rolled
    for i, question in enumerate(QUESTIONS):
        alone_inputs = tiny.inputs([question], seed=i)  # row i of the batch has image seed i
        with vlmfix.apply(tiny.model, opera) as alone_session:
            alone = alone_session.generate(**alone_inputs, num_beams=beams, max_new_tokens=12)
        new = alone[0, alone_inputs["input_ids"].shape[1]:]
        row = batch[i, batch.shape[1] - 12:][: new.shape[0]]
        assert torch.equal(row, new), f"row {i}: {row.tolist()} alone {new.tolist()}"
        assert alone_session.report()["opera"]["rollbacks"][0] == session.report()["opera"]["rollbacks"][i]


@pytest.mark.parametrize("family, knobs, beams", [
    ("llava", dict(threshold=2, min_location=0, image_bonus_steps=2, num_attn_candidates=3), 3),  # both roll back
    # M-RoPE positions; item 0 ends (eos) early, item 1 rolls back
    ("qwen2_vl", dict(threshold=7, min_location=0, image_bonus_steps=1, num_attn_candidates=3), 2),
])
def test_sequential_look_ahead_equals_the_tree_pass(monkeypatch, family, knobs, beams):
    """The look-ahead as C one-token forwards, each followed by a cache crop (spec D7, the regression test for
    the official code's issue #16), gives the tree pass's candidate logits and attention rows at every step,
    and the same tokens, scores and rollbacks, on a left-padded batch of 2 with rollbacks (the setup of
    test_batch_rows_equal_rows_alone)."""
    tiny = tiny_model(family)
    original = opera_loop._Run.look_ahead
    looks: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {"tree": [], "sequential": []}

    def recorded(self: Any, cand_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, seen = original(self, cand_ids, lengths)
        cache_length = self.cache.layers[0].keys.shape[2]  # the C candidates' slots follow the valid ones
        looks[self.method.candidate_pass].append((logits.clone(), seen.clone(), cache_length - self.valid.shape[1]))
        return logits, seen

    monkeypatch.setattr(opera_loop._Run, "look_ahead", recorded)
    outs, reports, forwards = {}, {}, {}
    calls: list[int] = []
    handle = tiny.model.register_forward_pre_hook(lambda *args: calls.append(1))
    for candidate_pass in looks:
        calls.clear()
        with vlmfix.apply(tiny.model, OPERA(candidate_pass=candidate_pass, **knobs)) as session:
            outs[candidate_pass] = session.generate(**tiny.inputs(QUESTIONS), num_beams=beams, max_new_tokens=12,
                                                    return_dict_in_generate=True, output_scores=True)
        reports[candidate_pass], forwards[candidate_pass] = session.report()["opera"], len(calls)
    handle.remove()
    steps = len(looks["tree"])
    assert forwards["sequential"] - forwards["tree"] == (3 - 1) * steps  # C forwards per look-ahead instead of 1
    assert reports["sequential"].pop("candidate_pass") == "sequential"
    assert reports["tree"].pop("candidate_pass") == "tree"
    assert reports["sequential"] == reports["tree"]
    assert reports["tree"]["rollbacks"][1] > 0, reports["tree"]
    assert torch.equal(outs["sequential"].sequences, outs["tree"].sequences)
    torch.testing.assert_close(outs["sequential"].sequences_scores, outs["tree"].sequences_scores)
    assert len(looks["sequential"]) == steps > 0
    for tree, sequential in zip(looks["tree"], looks["sequential"]):
        (tree_logits, tree_seen, tree_left), (seq_logits, seq_seen, seq_left) = tree, sequential
        assert tree_left == seq_left == 0  # the cache is as long as the slots the loop tracks
        torch.testing.assert_close(seq_logits, tree_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(seq_seen, tree_seen, atol=1e-5, rtol=1e-4)


def test_padded_rows_continue_the_prefill_positions_the_model_chose():
    """HyperCLOVA X Vision V2 and EXAONE 4.5 drop generate's position ids in prepare_inputs_for_generation, so
    their decoder stack numbers the prefill by cache slot (a padded row's pads count). Here LLaVA is given that
    override: plain beam search stays row-independent (RoPE sees relative positions), and OPERA's generated
    positions must continue the slot numbering, not the padding mask's, for the padded row to get the tokens
    and scores of the row decoded alone."""
    tiny = tiny_model("llava")
    prepare = tiny.model.prepare_inputs_for_generation

    def slot_positions(*args: Any, **kwargs: Any) -> Any:
        inputs = prepare(*args, **kwargs)
        inputs["position_ids"] = None
        return inputs

    tiny.model.prepare_inputs_for_generation = slot_positions
    settings = dict(num_beams=2, max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True, output_scores=True)
    batch_inputs = tiny.inputs(QUESTIONS)
    assert not bool(batch_inputs["attention_mask"].all())  # a padded row
    opera = OPERA(num_attn_candidates=3, image_bonus_steps=2)
    with vlmfix.apply(tiny.model, opera) as session:
        batch = session.generate(**batch_inputs, **settings)
    plain = tiny.model.generate(**batch_inputs, **settings)
    for i, question in enumerate(QUESTIONS):
        alone_inputs = tiny.inputs([question], seed=i)
        with vlmfix.apply(tiny.model, opera) as alone_session:
            alone = alone_session.generate(**alone_inputs, **settings)
        plain_alone = tiny.model.generate(**alone_inputs, **settings)
        # the override keeps beam search row-independent
        assert torch.equal(plain.sequences[i, -8:], plain_alone.sequences[0, -8:])
        torch.testing.assert_close(plain.sequences_scores[i], plain_alone.sequences_scores[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batch.sequences[i, -8:], alone.sequences[0, -8:]), f"row {i}"
        torch.testing.assert_close(batch.sequences_scores[i], alone.sequences_scores[0], atol=1e-5, rtol=1e-5)


def teacher_forced_scores(tiny: Any, inputs: dict, sequences: torch.Tensor, eos: int) -> torch.Tensor:
    """Each returned hypothesis's summed full-vocabulary log-probability divided by its length (generate's
    beam score with length_penalty 1), from one fresh forward over prompt + hypothesis."""
    prompt = inputs["input_ids"].shape[1]
    generated = sequences[:, prompt:]
    lengths = []
    for row in generated.tolist():
        lengths.append(row.index(eos) + 1 if eos in row else len(row))
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(generated)], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:  # Qwen: generated tokens are text
        extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(generated)], dim=1)
    logits = tiny.model(input_ids=sequences, attention_mask=mask, **extra).logits
    log_probs = logits[:, prompt - 1 : -1].float().log_softmax(dim=-1)  # [rows, new, V]: predicting each new token
    picked = log_probs.gather(2, generated[..., None])[..., 0]
    return torch.stack([picked[r, :n].sum() / n for r, n in enumerate(lengths)])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cache_stays_consistent_through_rollbacks(monkeypatch, family):
    """Rollbacks to position 4 (a summary location forced at column 3 for the first few item steps): the
    returned beam scores equal a fresh teacher-forced pass, so every token's keys and values (holes,
    catch-up, re-decided tokens) were those of its own prefix. With C = vocabulary and no penalty, OPERA's
    scores are full-vocabulary log-probabilities."""
    tiny = tiny_model(family)
    real = opera_loop.local_scores
    forced_calls = [12]

    def summary_at_three(rows: torch.Tensor, candidate: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        phi, where = real(rows, candidate, *args)
        if forced_calls[0] > 0 and candidate.shape[-1] > 6:  # 6+ tokens generated: column 3 is a real position
            forced_calls[0] -= 1
            return phi, torch.full_like(where, 3)
        return phi, torch.zeros_like(where)  # below min_location: no rollback

    monkeypatch.setattr(opera_loop, "local_scores", summary_at_three)
    inputs = tiny.inputs(QUESTIONS)
    # full length, no image placeholder generated (the reference forward would read it as an image token); the
    # processors' -inf on those tokens leaves the chosen tokens' log-probabilities unchanged
    settings = dict(num_beams=2, max_new_tokens=10, min_new_tokens=10, return_dict_in_generate=True,
                    output_scores=True, suppress_tokens=[tiny.model.config.image_token_id])
    with vlmfix.apply(tiny.model, penalty_off(tiny.model.config.text_config.vocab_size, threshold=1,
                                              min_location=1)) as session:
        out = session.generate(**inputs, **settings)
    positions = session.report()["opera"]["rollback_positions"]
    assert sum(len(p) for p in positions) >= 2 and {q for p in positions for q in p} == {4}, positions
    eos = int(tiny.model.generation_config.eos_token_id)
    expected = teacher_forced_scores(tiny, inputs, out.sequences, eos)
    torch.testing.assert_close(out.sequences_scores, expected, atol=1e-4, rtol=1e-4)


def test_observed_rows_equal_eager_attention(monkeypatch):
    """The rows OPERA stores (last layer, max over heads, renormalised over every visible key) equal those
    recomputed from an eager forward with output_attentions on each final beam's sequence."""
    runs: list[Any] = []
    original = opera_loop._Run.output

    def keep_run(self: Any) -> Any:
        runs.append(self)
        return original(self)

    monkeypatch.setattr(opera_loop._Run, "output", keep_run)
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS[:1])
    with vlmfix.apply(tiny.model, OPERA(num_attn_candidates=3, image_bonus_steps=2)) as session:
        session.generate(**inputs, num_beams=2, max_new_tokens=6, min_new_tokens=6)
    run = runs[0]
    assert session.report()["opera"]["rollbacks"] == [0]
    eager = tiny_model("qwen2_vl", attn="eager").model  # the same weights
    prompt = inputs["input_ids"].shape[1]
    n = run.length[0]
    for r in range(2):
        ids = torch.cat([inputs["input_ids"], run.tokens[r : r + 1, :n]], dim=1)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, n, dtype=torch.long)], dim=1)
        out = eager(input_ids=ids, mm_token_type_ids=types, output_attentions=True, **extra)
        top = out.attentions[-1][0].amax(dim=0)  # [L, L]: max over heads
        expected = top[prompt : prompt + n] / top[prompt : prompt + n].sum(dim=-1, keepdim=True)
        expected = expected[:, prompt : prompt + n].tril()  # [n, n]: generated token i over generated j <= i
        torch.testing.assert_close(run.attn[r, :n, :n], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("other", [lambda: vlmfix.VHR(alpha=3.0), lambda: vlmfix.PAI(alpha=1.0, cfg=False)],
                         ids=["vhr", "pai"])
def test_composes_with_an_attention_method(other):
    """An all-rows attention method edits OPERA's forwards too: its calls count beyond the prefill (one per
    edited layer and step), and the result differs from OPERA alone."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    with vlmfix.apply(tiny.model, OPERA(num_attn_candidates=3)) as session:
        alone = session.generate(**inputs, num_beams=2, max_new_tokens=6, min_new_tokens=6,
                                 return_dict_in_generate=True, output_scores=True)
    method = other()
    with vlmfix.apply(tiny.model, method, OPERA(num_attn_candidates=3)) as session:
        both = session.generate(**inputs, num_beams=2, max_new_tokens=6, min_new_tokens=6,
                                return_dict_in_generate=True, output_scores=True)
    report = session.report()
    assert report[method.name]["applied"]["attention_calls"] >= 6  # the decode forwards are edited too
    assert report["opera"]["applied"]["decoding_steps"] == 12
    assert not torch.allclose(both.sequences_scores, alone.sequences_scores)
    assert tiny.model.config.text_config._attn_implementation == "sdpa"


def test_eager_backend_gives_the_sdpa_result():
    inputs_seed = dict(num_beams=2, max_new_tokens=8)
    outs = []
    for attn in ("sdpa", "eager"):
        tiny = tiny_model("llava", attn=attn)
        with vlmfix.apply(tiny.model, OPERA(num_attn_candidates=3, image_bonus_steps=2)) as session:
            outs.append(session.generate(**tiny.inputs(QUESTIONS), **inputs_seed))
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------ refusals, before any work
@pytest.fixture
def counted():
    tiny = tiny_model("llava")
    calls: list[int] = []
    handle = tiny.model.register_forward_pre_hook(lambda *args: calls.append(1))
    yield tiny, calls
    handle.remove()


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"OPERA is a beam-search method; set num_beams >= 2 and do_sample=False \(got num_beams=None"),
    ({"num_beams": 1}, r"set num_beams >= 2 and do_sample=False \(got num_beams=1"),
    ({"num_beams": 3, "do_sample": True}, r"set num_beams >= 2 and do_sample=False \(got num_beams=3, do_sample=True"),
    ({"num_beams": 3, "streamer": object()}, r"streamer cannot be used with OPERA"),
    ({"num_beams": 3, "output_attentions": True}, r"output_attentions cannot be used with OPERA"),
    ({"num_beams": 3, "stop_strings": ["dog"]}, r"stop_strings cannot be used with OPERA: OPERA stops at max_new"),
    ({"num_beams": 3, "max_time": 5.0}, r"max_time cannot be used with OPERA"),
])
def test_generate_settings_are_refused_before_any_forward(counted, kwargs, message):
    tiny, calls = counted
    with pytest.raises(ValueError, match=message):
        vlmfix.generate(tiny.model, **tiny.inputs(QUESTIONS), methods=[OPERA()], tokenizer=tiny.processor,
                        max_new_tokens=4, **kwargs)
    assert not calls, "the error came after a forward pass"
    assert tiny.model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("methods, message", [
    (lambda: [OPERA(), vlmfix.VCD()], r"OPERA cannot be combined with two-stream methods \(vcd\)"),
    (lambda: [vlmfix.GIFT(), OPERA()], r"OPERA cannot be combined with gift: they assume one new token per decode"),
    (lambda: [vlmfix.VAR(sink_dims=[3]), OPERA()], r"OPERA cannot be combined with var: they assume one new token"),
])
def test_refused_combinations(counted, methods, message):
    tiny, calls = counted
    with pytest.raises(ValueError, match=message):
        vlmfix.generate(tiny.model, **tiny.inputs(QUESTIONS), methods=methods(), tokenizer=tiny.processor,
                        num_beams=2, max_new_tokens=4)
    assert not calls


def test_bare_model_generate_says_to_use_session_generate():
    tiny = tiny_model("llava")
    with vlmfix.apply(tiny.model, OPERA()):
        with pytest.raises(vlmfix.SessionError, match=r"call session.generate\(\*\*inputs, num_beams=5\)"):
            tiny.model.generate(**tiny.inputs(QUESTIONS), num_beams=2, max_new_tokens=4)
    assert tiny.model.config.text_config._attn_implementation == "sdpa"


def test_flash_attention_is_refused_when_the_session_is_made():
    tiny = tiny_model("llava")
    tiny.model.config.text_config._attn_implementation = "flash_attention_2"  # what the check reads
    with pytest.raises(ValueError, match=r"OPERA needs an attention backend that honours 4-D masks.*'sdpa' or"):
        vlmfix.apply(tiny.model, OPERA())


def test_sparse_attention_models_are_refused_by_name_when_the_session_is_made():
    """Mistral Large 4's indexed layers cache the indexer's keys beside the latents; OPERA's slot rewrites and
    rollbacks cover plain dynamic layers only, so it refuses the model before any forward, naming why."""
    tiny = tiny_model("mistral_large4")
    with pytest.raises(vlmfix.UnsupportedModelError, match=r"mistral_large4's sparse-attention layers cache the "
                                                           r"indexer's keys"):
        vlmfix.apply(tiny.model, OPERA())


@pytest.mark.parametrize("make, message", [
    (lambda: OPERA(scale_factor=0), r"`scale_factor` must be a finite number > 0, got 0"),
    (lambda: OPERA(threshold=-1), r"`threshold` must be an int >= 0, got -1"),
    (lambda: OPERA(threshold=2.5), r"`threshold` must be an int >= 0, got 2.5 \(a float\)"),
    (lambda: OPERA(num_attn_candidates=0), r"`num_attn_candidates` must be an int >= 1, got 0"),
    (lambda: OPERA(penalty_weights=-0.5), r"`penalty_weights` must be a finite number >= 0, got -0.5"),
    (lambda: OPERA(window=0), r"`window` must be an int >= 1, got 0"),
    (lambda: OPERA(image_bonus_steps="10"), r"`image_bonus_steps` must be an int >= 0, got '10' \(a str\)"),
    (lambda: OPERA(score_range="half"), r"`score_range` must be one of 'float16', 'exact', got 'half'"),
    (lambda: OPERA(history="beam"), r"`history` must be one of 'lineage', 'slot', got 'beam'"),
    (lambda: OPERA(realloc="topk"), r"`realloc` must be one of 'vocab', 'candidates', got 'topk'"),
    (lambda: OPERA(candidate_pass="chunk"), r"`candidate_pass` must be one of 'tree', 'sequential', got 'chunk'"),
])
def test_constructor_refuses_out_of_range_knobs(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ------------------------------------------------------------------------------ the benchmark app
def test_app_config_sets_beams_and_refuses_settings_before_loading(tmp_path):
    from benchmarks.app import check_settings

    from .test_app import composed

    checked = check_settings(composed("model=toy_fast", "method=opera", f"results_dir={tmp_path}"))
    assert [m.name for m in checked.methods] == ["opera"]
    assert composed("method=opera").decoding.num_beams == 5  # the config file carries the paper's beams
    with pytest.raises(ValueError, match=r"opera is a beam-search method; set decoding.num_beams=5"):
        check_settings(composed("model=toy_fast", "method=opera", "decoding.num_beams=1", f"results_dir={tmp_path}"))
    with pytest.raises(ValueError, match=r"benchmark=speed .* time it with python -m benchmarks.opera_speed"):
        check_settings(composed("model=toy_fast", "method=opera", "benchmark=speed", f"results_dir={tmp_path}"))


def test_speed_script_runs_per_dtype_and_batch():
    """benchmarks/opera_speed.py on a 1-layer model: one block per (dtype, batch), with OPERA's report of each
    item of the batch and the penalised flag read from it (timings are not checked: the machine is shared)."""
    from benchmarks.opera_speed import main

    result = main(["--device", "cpu", "--layers", "1", "--heads", "2", "--head-dim", "32", "--beams", "2",
                   "--new-tokens", "3", "--repeats", "1", "--dtype", "float32", "bfloat16", "--batch", "2",
                   "--opera", "image_bonus_steps=1"])
    assert [(r["dtype"], r["batch"]) for r in result["rows"]] == [("float32", 2), ("bfloat16", 2)]
    for row in result["rows"]:
        report = row["opera_report_last_call"]
        assert report["bonus_steps"] == [1, 1] and report["penalty_steps"] == [2, 2] and row["penalised"]
        assert math.isfinite(row["ratio"])
