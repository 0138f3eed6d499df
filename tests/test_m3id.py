"""M3ID against plain-PyTorch references: the growing weight, the image-free stream, the rule, batching."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor

import vlmfix
from vlmfix.methods.m3id import M3ID, M3IDState
from vlmfix.methods.pai import PAI

from .conftest import tiny_model
from .reference_decoding import (
    QUESTIONS,
    assert_batch_rows_equal_rows_alone,
    assert_unchanged,
    grown,
    image_positions,
    reference_logits,
    snapshot,
)
from .test_pai import pai_row_edit


class Recording(M3ID):
    """M3ID that keeps the logits its `combine` receives, per step (the engine's view of both streams)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._seen: list[tuple[int, Tensor, Tensor]] = []

    def combine(self, state, positive_logits, negative_logits, step):
        self._seen.append((step, positive_logits.clone(), negative_logits.clone()))
        return super().combine(state, positive_logits, negative_logits, step)


def spec_scores(positive: Tensor, negative: Tensor, t: int, lambda_: float, beta: float | None = 0.1) -> Tensor:
    """The spec's rule written out: lc + w (lc - lu), w = exp(lambda t) - 1, -inf where l_c < log beta + max l_c."""
    lc, lu = positive.double().log_softmax(-1), negative.double().log_softmax(-1)
    w = math.exp(lambda_ * t) - 1
    scores = lc + w * (lc - lu)
    if beta is not None:
        scores[positive < math.log(beta) + positive.max(-1, keepdim=True).values] = -math.inf
    return scores.float()


def image_free_forward(model, inputs: dict, tokens: Tensor) -> Tensor:
    """Next-token logits [batch, vocab] of the prompts with their image span (image tokens, Qwen's vision
    start/end) deleted, followed by the generated `tokens` [batch, n] (kept whatever they are), re-left-padded."""
    config = model.config
    span = torch.tensor([config.image_token_id, getattr(config, "vision_start_token_id", -1),
                         getattr(config, "vision_end_token_id", -1)])
    rows = [torch.cat([ids[(m == 1) & ~torch.isin(ids, span)], new])
            for ids, m, new in zip(inputs["input_ids"], inputs["attention_mask"], tokens)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r.new_full((width - len(r),), model.generation_config.pad_token_id), r])
                       for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones_like(r)]) for r in rows])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]


def assert_scores_close(got: Tensor, want: Tensor, tol: float = 1e-4) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    torch.testing.assert_close(got[finite], want[finite], atol=tol, rtol=tol)


def run(tiny, inputs, method, steps, **kw):
    with vlmfix.apply(tiny.model, method) as session:
        out = session.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                               return_dict_in_generate=True, output_logits=True, **kw)
    return out, session.report()["m3id"]


# ---------------------------------------------------------------------------------------------
# the rule on hand-checkable numbers


def test_weight_schedule_golden():
    m3id = M3ID()  # lambda 0.02, t = step + 1
    assert [round(m3id.weight(t - 1), 4) for t in (1, 50, 100)] == [0.0202, 1.7183, 6.3891]
    assert M3ID(t_offset=0).weight(0) == 0.0  # RITUAL's origin: the first token is not corrected
    assert M3ID(max_weight=2.0).weight(99) == 2.0 and M3ID(max_weight=2.0).weight(0) == pytest.approx(0.0202, 1e-3)
    assert math.isfinite(M3ID(lambda_=1.0).weight(10_000))  # held at exp(80), never inf


def test_combine_equals_pai_refinement_with_growing_gamma():
    """M3ID(lambda) at step t is PAI's image-free refinement with gamma = e^(lambda t) (spec §3)."""
    generator = torch.Generator().manual_seed(0)
    positive, negative = torch.randn(3, 50, generator=generator), torch.randn(3, 50, generator=generator)
    before = positive.clone(), negative.clone()
    m3id = M3ID(lambda_=0.05)
    for step in (0, 9, 40):
        got = m3id.combine(M3IDState(rows=3), positive, negative, step)
        pai = PAI(gamma=math.exp(0.05 * (step + 1)), plausibility=0.1).combine(None, positive, negative, step)
        assert_scores_close(got, pai, 1e-6)
        assert_scores_close(got, spec_scores(positive, negative, step + 1, 0.05))
    assert torch.equal(positive, before[0]) and torch.equal(negative, before[1])


def test_large_t_picks_the_pmi_argmax_inside_the_plausible_set():
    generator = torch.Generator().manual_seed(1)
    positive, negative = torch.randn(4, 30, generator=generator) * 2, torch.randn(4, 30, generator=generator) * 2
    chosen = M3ID().combine(M3IDState(rows=4), positive, negative, 1999).argmax(-1)
    pmi = positive.log_softmax(-1) - negative.log_softmax(-1)
    pmi[positive < math.log(0.1) + positive.max(-1, keepdim=True).values] = -math.inf
    assert torch.equal(chosen, pmi.argmax(-1))


def test_raw_logits_give_the_same_choice_and_cutoff():
    """RITUAL's raw-logit form differs by a per-row constant: same argmax and same -inf set (spec §3 note)."""
    generator = torch.Generator().manual_seed(2)
    positive, negative = torch.randn(4, 40, generator=generator) * 3, torch.randn(4, 40, generator=generator) * 3
    scores = M3ID(lambda_=0.3).combine(M3IDState(rows=4), positive, negative, 5)
    w = math.exp(0.3 * 6) - 1
    raw = positive + w * (positive - negative)
    raw[positive < math.log(0.1) + positive.max(-1, keepdim=True).values] = -math.inf
    assert torch.equal(scores.isinf(), raw.isinf()) and torch.equal(scores.argmax(-1), raw.argmax(-1))


def test_confidence_gate_leaves_sure_rows_alone():
    positive = torch.tensor([[5.0, 0.0, 0.0], [1.0, 0.9, 0.0]])  # row 0: p_max ~ 0.99; row 1: ~ 0.46
    negative = torch.tensor([[5.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    state = M3IDState(rows=2)
    scores = M3ID(lambda_=1.0, apc_beta=None, confidence_gate=0.9).combine(state, positive, negative, 2)
    assert torch.equal(scores[0], positive[0].log_softmax(-1))  # gated: log p_c exactly
    assert_scores_close(scores[1:], spec_scores(positive[1:], negative[1:], 3, 1.0, beta=None))
    assert state.gated == [1, 0] and state.weights == [pytest.approx(math.e**3 - 1)]
    assert state.changed_top_token == [0, 1]  # row 1: token 1 beats token 0 once the image-free prior is removed


# ---------------------------------------------------------------------------------------------
# on tiny models


def test_lambda_zero_is_greedy(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    plain = tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[M3ID(lambda_=0.0)], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, plain)
    assert_unchanged(inputs, before)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_streams_and_scores_match_plain_forwards(family):
    """Both streams equal separate plain forwards (image prompt; prompt with the image span removed) at the
    prefill and three decode steps, and the scores equal the spec's formula with w_t growing over the steps."""
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    lambda_, steps = 0.5, 4
    method = Recording(lambda_=lambda_)
    out, report = run(tiny, inputs, method, steps)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert [step for step, _, _ in method._seen] == list(range(steps))
    for step, (_, positive, negative) in enumerate(method._seen):
        current = grown(inputs, tokens[:, :step])
        with torch.no_grad():
            plain = tiny.model(**current).logits[:, -1]
        free = image_free_forward(tiny.model, inputs, tokens[:, :step])
        torch.testing.assert_close(positive, plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(negative, free, atol=1e-5, rtol=1e-5)
        want = spec_scores(plain, free, step + 1, lambda_)
        assert_scores_close(out.logits[step], want)
        assert torch.equal(want.argmax(-1), tokens[:, step])
    assert report["weights"] == pytest.approx([math.exp(lambda_ * t) - 1 for t in range(1, steps + 1)])
    assert report["applied"]["contrast_steps"] == steps
    assert_unchanged(inputs, before)


def test_the_correction_changes_greedy_and_the_report_says_so():
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    plain = tiny.model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    out, report = run(tiny, inputs, M3ID(lambda_=0.5), 6)
    assert not torch.equal(out.sequences, plain)
    assert sum(report["changed_top_token"]) > 0 and report["gated_steps"] == [0, 0]
    gated, gated_report = run(tiny, inputs, M3ID(lambda_=0.5, confidence_gate=1e-6), 6)  # every row is "sure"
    assert torch.equal(gated.sequences, plain)
    assert gated_report["gated_steps"] == [6, 6] and gated_report["changed_top_token"] == [0, 0]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_rows_equal_rows_alone(family):
    tiny = tiny_model(family)
    batch = tiny.inputs(QUESTIONS)
    assert (batch["attention_mask"] == 0).any(), "the batch must exercise left padding"
    assert_batch_rows_equal_rows_alone(tiny, batch, [M3ID(lambda_=0.5)], steps=4)


def test_composes_with_an_attention_method():
    """PAI's boost (no refinement) edits the image rows only; M3ID contrasts them with the unedited image-free rows."""
    tiny = tiny_model("llava", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    lambda_, alpha = 0.5, 4.0
    with vlmfix.apply(tiny.model, PAI(alpha=alpha, cfg=False), M3ID(lambda_=lambda_)) as session:
        out = session.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                               return_dict_in_generate=True, output_logits=True)
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[:, prompt_len:]
    edit = pai_row_edit(alpha, image_positions(tiny, inputs))
    for step in range(3):
        current = grown(inputs, tokens[:, :step])
        positive = reference_logits(tiny.model, current, {2, 3, 4}, edit, prompt_len - 1)[:, -1]
        want = spec_scores(positive, image_free_forward(tiny.model, inputs, tokens[:, :step]), step + 1, lambda_)
        assert_scores_close(out.logits[step], want)
    report = session.report()
    assert report["pai"]["applied"]["attention_calls"] > 0 and report["m3id"]["applied"]["contrast_steps"] == 3
    with pytest.raises(ValueError, match="exactly one contrastive method per call is supported, got 2: vcd, m3id"):
        vlmfix.generate(tiny.model, **inputs, methods=[vlmfix.VCD(), M3ID()], max_new_tokens=2)


def test_sampling_and_beams_run():
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    torch.manual_seed(0)
    sampled = vlmfix.generate(tiny.model, **inputs, methods=["m3id"], do_sample=True, max_new_tokens=4)
    torch.manual_seed(0)
    assert torch.equal(sampled, vlmfix.generate(tiny.model, **inputs, methods=["m3id"], do_sample=True,
                                                max_new_tokens=4))
    beams = vlmfix.generate(tiny.model, **inputs, methods=[M3ID(lambda_=0.5)], num_beams=2, num_return_sequences=2,
                            max_new_tokens=4)
    assert beams.shape[0] == 4


def test_long_outputs_warn_unless_capped():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS[:1])
    with pytest.warns(UserWarning, match=r"lambda_ \* max_new_tokens = 5.0 > 4.*M3ID\(max_weight=...\)"):
        vlmfix.generate(tiny.model, **inputs, methods=[M3ID(lambda_=1.0)], max_new_tokens=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vlmfix.generate(tiny.model, **inputs, methods=[M3ID(lambda_=1.0, max_weight=10.0)], max_new_tokens=5)
        vlmfix.generate(tiny.model, **inputs, methods=[M3ID(lambda_=0.5)], max_new_tokens=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lambda_=-0.1), r"`lambda_` must be a finite number >= 0, got -0.1; lambda_ is the growth rate"),
        (dict(lambda_="0.02"), r"`lambda_` must be a finite number >= 0, got '0.02' \(a str\)"),
        (dict(t_offset=0.5), r"`t_offset` must be an int >= 0, got 0.5 \(a float\)"),
        (dict(apc_beta=0), r"`apc_beta` must be None or a finite number in \(0, 1\], got 0"),
        (dict(max_weight=-1), r"`max_weight` must be None or a finite number >= 0, got -1"),
        (dict(confidence_gate=1.5), r"`confidence_gate` must be None or a finite number in \(0, 1\], got 1.5"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        M3ID(**kwargs)


def test_registry_and_engine_requirement():
    assert vlmfix.methods.get("m3id") is M3ID and vlmfix.M3ID is M3ID
    tiny = tiny_model("llava")
    with pytest.raises(vlmfix.SessionError, match="M3ID is a two-stream method: call session.generate"):
        with vlmfix.apply(tiny.model, M3ID()):
            tiny.model.generate(**tiny.inputs(QUESTIONS), max_new_tokens=2)
