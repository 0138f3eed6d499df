"""DoLa: candidate buckets, divergences and the contrast on hand-made numbers; decoding against a plain-PyTorch
reference built from `output_hidden_states`; greedy when the contrast cannot change anything; batches; errors;
composition with an attention method; hook hygiene."""

from __future__ import annotations

import math

import pytest
import torch

import vlmfix
from vlmfix.methods.dola import DoLa, candidate_layers, dola_scores, layer_divergence, select_premature

from .conftest import tiny_model

QUESTIONS = ["describe this image .", "is there a dog on the table ?"]  # rows of different lengths
EVERY_LAYER = [0, 1, 2, 3, 4, 5]  # premature hidden indices of a 6-layer model (6 is the mature one)


# ---------------------------------------------------------------------------------------------- the rule alone
@pytest.mark.parametrize("num_layers, tied, low, high", [
    (32, False, list(range(0, 16, 2)), list(range(16, 32, 2))),  # LLaVA-1.5-7B (Vicuna-7B)
    (40, False, list(range(0, 20, 2)), list(range(20, 40, 2))),  # LLaVA-1.5-13B
    (28, True, list(range(2, 14, 2)), list(range(14, 28, 2))),  # Qwen2-VL-2B (tied embeddings)
    (28, False, list(range(0, 14, 2)), list(range(14, 28, 2))),  # Qwen2-VL-7B
    (48, False, list(range(0, 20, 2)), list(range(28, 48, 2))),  # beyond 40 layers: 20 indices per bucket
    (2, True, [1], [1]),  # start == N // 2
])
def test_buckets_follow_the_spec_table(num_layers, tied, low, high):
    assert list(candidate_layers("low", num_layers, tied)) == low
    assert list(candidate_layers("high", num_layers, tied)) == high
    assert candidate_layers((3, 5), num_layers, tied) == (3, 5)


def test_divergences_on_hand_made_distributions():
    # p_N = [1/2, 1/4, 1/4], p_j = [1/4, 1/2, 1/4]: M = [3/8, 3/8, 1/4]
    mature = torch.tensor([[0.5, 0.25, 0.25]]).log()
    premature = torch.tensor([[[0.25, 0.5, 0.25]]]).log()
    code = 0.5 * (2 * 0.375 * math.log(1.125)) / 3  # [KL(M||p_N) + KL(M||p_j)] / 2 / |V|
    paper = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)  # KL(p_N||M) = KL(p_j||M)
    assert layer_divergence(mature, premature, "dola_code").item() == pytest.approx(code, rel=1e-5)
    assert layer_divergence(mature, premature, "jsd").item() == pytest.approx(paper, rel=1e-5)
    # a pair of candidates on which the two divergences disagree: the code's picks 0, the paper's picks 1
    mature = torch.tensor([[0.7, 0.2, 0.1]]).log()
    pair = torch.tensor([[[1 / 33, 16 / 33, 16 / 33]], [[2 / 19, 1 / 19, 16 / 19]]]).log()  # [2, 1, 3]
    assert select_premature(layer_divergence(mature, pair, "dola_code")).tolist() == [0]
    assert select_premature(layer_divergence(mature, pair, "jsd")).tolist() == [1]


def test_per_row_and_batch_mean_selection():
    divergence = torch.tensor([[0.1, 0.5], [0.3, 0.2]])  # [candidates, batch]
    assert select_premature(divergence, "per_row").tolist() == [1, 0]
    assert select_premature(divergence, "batch_mean").tolist() == [0, 0]  # means 0.3 > 0.25


def test_contrast_keeps_only_plausible_tokens():
    mature = torch.tensor([[0.6, 0.3, 0.05, 0.05]]).log()
    premature = torch.tensor([[0.2, 0.2, 0.3, 0.3]]).log()
    before = (mature.clone(), premature.clone())
    scores = dola_scores(mature, premature, relative_top=0.1)  # keeps p_N >= 0.06: tokens 0 and 1
    expected = torch.tensor([[math.log(3.0), math.log(1.5), float("-inf"), float("-inf")]])
    torch.testing.assert_close(scores, expected)
    assert dola_scores(mature, premature, relative_top=1.0).isfinite().tolist() == [[True, False, False, False]]
    assert torch.equal(mature, before[0]) and torch.equal(premature, before[1])


# ---------------------------------------------------------------------------------------------- the reference
@torch.no_grad()
def reference_dola(model, inputs, candidates, *, relative_top=0.1, divergence="dola_code", selection="per_row",
                   early_exit_norm=False):
    """DoLa's scores for the newest position from one plain forward with output_hidden_states=True, in fp64.

    Returns ([batch, vocab] scores, [batch] chosen hidden indices)."""
    out = model(**inputs, output_hidden_states=True)
    head, norm = model.get_output_embeddings(), model.model.language_model.norm
    p_n = out.logits[:, -1].double().softmax(-1)  # [batch, vocab]
    batch, vocab = p_n.shape
    premature, divergences = [], []
    for j in candidates:
        hidden = out.hidden_states[j][:, -1]  # input of decoder layer j, newest position
        z = head(norm(hidden) if early_exit_norm else hidden).double()
        p_j = z.softmax(-1)
        m = (p_n + p_j) / 2
        if divergence == "dola_code":
            d = 0.5 * ((m * (m / p_n).log()).sum(-1) + (m * (m / p_j).log()).sum(-1)) / vocab
        else:
            d = 0.5 * ((p_n * (p_n / m).log()).sum(-1) + (p_j * (p_j / m).log()).sum(-1))
        premature.append(p_j)
        divergences.append(d)
    table = torch.stack(divergences)  # [candidates, batch]
    picks = table.argmax(0) if selection == "per_row" else table.mean(1).argmax().repeat(batch)
    base = torch.stack([premature[int(picks[b])][b] for b in range(batch)])
    scores = p_n.log() - base.log()
    scores[p_n < relative_top * p_n.max(-1, keepdim=True).values] = float("-inf")
    return scores.float(), [candidates[int(i)] for i in picks]


def prefix_inputs(tiny, inputs, tokens):
    """The forward kwargs of prompt + `tokens` [batch, t], positions as generate computes them."""
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
    out = {**inputs, "input_ids": torch.cat([inputs["input_ids"], tokens], dim=1), "attention_mask": mask}
    if tiny.family == "llava":  # Qwen's M-RoPE positions come from the model's own rope index
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if "mm_token_type_ids" in inputs:  # Qwen: generated tokens are text
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], dim=1)
    return out


def penalized(scores, ids, mask, penalty):
    """generate's repetition penalty: every token of the row so far (padding left out) has its score divided by
    `penalty` where positive and multiplied where negative."""
    out = scores.clone()
    for b in range(scores.shape[0]):
        seen = ids[b][mask[b].bool()].unique()
        values = out[b, seen]
        out[b, seen] = torch.where(values < 0, values * penalty, values / penalty)
    return out


@pytest.mark.parametrize("family, options", [
    ("llava", {}),
    ("qwen2_vl", {"divergence": "jsd", "early_exit_norm": True}),
    ("llava", {"layer_selection": "batch_mean", "relative_top": 0.3}),
])
def test_scores_and_tokens_match_the_reference_over_steps(family, options):
    tiny = tiny_model(family, layers=6)
    inputs = tiny.inputs(QUESTIONS)
    before = {k: v.clone() for k, v in inputs.items()}
    steps = 5
    with vlmfix.apply(tiny.model, DoLa(layers=EVERY_LAYER, **options)) as session:
        out = session.generate(**inputs, max_new_tokens=steps, do_sample=False, repetition_penalty=1.2,
                               return_dict_in_generate=True, output_logits=True, output_scores=True)
    report = session.report()["dola"]
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert tokens.shape[1] == steps and report["steps"] == steps
    assert report["applied"]["contrast_steps"] == steps
    chosen = []
    for step in range(steps):
        prefix = prefix_inputs(tiny, inputs, tokens[:, :step])
        want, picks = reference_dola(tiny.model, prefix, EVERY_LAYER,
                                     relative_top=options.get("relative_top", 0.1),
                                     divergence=options.get("divergence", "dola_code"),
                                     selection=options.get("layer_selection", "per_row"),
                                     early_exit_norm=options.get("early_exit_norm", False))
        chosen.append(picks)
        got = out.logits[step]  # the model's logits = DoLa's scores, before generate's processors
        finite = want.isfinite()
        assert torch.equal(got.isfinite(), finite)
        torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)
        # the repetition penalty runs after the contrast, on the DoLa scores (the official order)
        processed = penalized(want, prefix["input_ids"], prefix["attention_mask"], 1.2)
        torch.testing.assert_close(out.scores[step][finite], processed[finite], atol=1e-4, rtol=1e-4)
        assert torch.equal(processed.argmax(-1), tokens[:, step])
    assert [row["premature_layers"] for row in report["rows"]] == [list(r) for r in zip(*chosen)]
    for key, value in before.items():
        assert torch.equal(inputs[key], value)


def test_relative_top_one_is_greedy(family):  # every supported family
    """Only the final layer's top token keeps a score, so the contrast cannot change the choice."""
    tiny = tiny_model(family, layers=6)
    inputs = tiny.inputs(QUESTIONS)
    plain = tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with pytest.warns(UserWarning, match=r"repetition_penalty=1.0; the paper's DoLa results all use 1.2"):
        with vlmfix.apply(tiny.model, DoLa(layers="high", relative_top=1.0)) as session:
            out = session.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, plain)
    assert session.report()["dola"]["applied"]["contrast_steps"] == 6  # it ran, and changed nothing


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_padded_rows_equal_rows_decoded_alone(family):
    tiny = tiny_model(family, layers=6)
    batch = tiny.inputs(QUESTIONS)
    assert not batch["attention_mask"].all()  # the shorter row is left-padded
    method = DoLa(layers=EVERY_LAYER)
    kwargs = dict(max_new_tokens=6, do_sample=False, repetition_penalty=1.2)
    with vlmfix.apply(tiny.model, method) as session:
        together = session.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
    rows = session.report()["dola"]["rows"]
    for i, question in enumerate(QUESTIONS):
        alone = tiny.inputs([question], seed=i)
        with vlmfix.apply(tiny.model, method) as session:
            out = session.generate(**alone, **kwargs)[:, alone["input_ids"].shape[1]:]
        assert torch.equal(out[0], together[i])
        assert session.report()["dola"]["rows"][0] == rows[i]


def test_sampling_draws_only_plausible_tokens_and_beams_are_refused():
    tiny = tiny_model("qwen2_vl", layers=6)
    inputs = tiny.inputs(QUESTIONS)
    method = DoLa(layers="high")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(vlmfix.generate(tiny.model, **inputs, methods=[method], do_sample=True, max_new_tokens=5,
                                    repetition_penalty=1.2, return_dict_in_generate=True, output_logits=True))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    tokens = runs[0].sequences[:, inputs["input_ids"].shape[1]:]
    for step, scores in enumerate(runs[0].logits):  # every drawn token had a finite DoLa score
        assert scores.gather(1, tokens[:, step:step + 1]).isfinite().all()
    with pytest.raises(ValueError, match=r"not by beam search \(num_beams=2\).*Set num_beams=1"):
        vlmfix.generate(tiny.model, **inputs, methods=[method], num_beams=2, max_new_tokens=2,
                        repetition_penalty=1.2)


ATTENTION_METHODS = {
    "vhr": lambda: vlmfix.VHR(alpha=2.0, layers=[1, 3, 4]),  # with an extra scoring pass at each prompt
    "var": lambda: vlmfix.VAR(summ=0.0, sink_dims=[0, 5, 9, 13], tau=2.0),  # a few sinks per layer on tiny models
}


@pytest.mark.parametrize("name", ATTENTION_METHODS)
def test_composes_with_an_attention_method(name):
    """DoLa contrasts the layers of the attention-edited model; an extra analysis pass is not a DoLa step."""
    tiny = tiny_model("llava", layers=6)
    inputs = tiny.inputs(QUESTIONS)
    attention = ATTENTION_METHODS[name]()
    with vlmfix.apply(tiny.model, attention) as session:  # the edited model's hidden states, first step
        edited = session.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                  output_hidden_states=True, output_logits=True)
    head = tiny.model.get_output_embeddings()
    p_n = edited.logits[0].double().softmax(-1)
    with vlmfix.apply(tiny.model, DoLa(layers=[2]), attention) as session:  # DoLa first: its hooks see any pass
        out = session.generate(**inputs, max_new_tokens=3, do_sample=False, repetition_penalty=1.2,
                               return_dict_in_generate=True, output_logits=True)
    report = session.report()
    assert report[name]["applied"]["attention_calls"] > 0
    assert report["dola"]["applied"]["contrast_steps"] == 3
    p_2 = head(edited.hidden_states[0][2][:, -1]).double().softmax(-1)  # DoLa-static: layer 2
    want = p_n.log() - p_2.log()
    want[p_n < 0.1 * p_n.max(-1, keepdim=True).values] = float("-inf")
    finite = want.isfinite()
    assert torch.equal(out.logits[0].isfinite(), finite)
    torch.testing.assert_close(out.logits[0][finite], want[finite].float(), atol=1e-4, rtol=1e-4)


def test_two_stream_methods_are_refused_before_any_forward():
    tiny = tiny_model("llava", layers=6)
    calls = []
    tiny.model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"dola cannot run in one call with the two-stream method vcd.*separate"):
        vlmfix.generate(tiny.model, **tiny.inputs(QUESTIONS), methods=[DoLa(layers="low"), vlmfix.VCD()],
                        max_new_tokens=2)
    with pytest.raises(ValueError, match=r"layers` holds \[6, 9\], but the language model has 6 layers"):
        vlmfix.apply(tiny.model, DoLa(layers=[2, 6, 9]))
    assert not calls


def test_constructor_refuses_bad_layers_and_options():
    with pytest.raises(ValueError, match=r"DoLa needs `layers`, the candidate premature layers: 'high'"):
        DoLa()
    with pytest.raises(ValueError, match=r"DoLa needs `layers`"):
        vlmfix.methods.create("dola")
    with pytest.raises(ValueError, match=r"`layers` must be 'low', 'high' or a list of hidden indices, got 'mid'"):
        DoLa(layers="mid")
    with pytest.raises(ValueError, match=r"`layers` must be distinct hidden indices, got \[2, 2\]"):
        DoLa(layers=[2, 2])
    with pytest.raises(ValueError, match=r"`layers\[0\]` must be an int >= 0, got -1"):
        DoLa(layers=[-1])
    with pytest.raises(ValueError, match=r"`relative_top` must be a finite number in \(0, 1\], got 0"):
        DoLa(layers="high", relative_top=0)
    with pytest.raises(ValueError, match=r"`divergence` must be one of 'dola_code', 'jsd'"):
        DoLa(layers="high", divergence="kl")
    with pytest.raises(ValueError, match=r"`layer_selection` must be one of 'per_row', 'batch_mean'"):
        DoLa(layers="high", layer_selection="per_batch")
    with pytest.raises(ValueError, match=r"`early_exit_norm` must be True or False, got 'no'"):
        DoLa(layers="high", early_exit_norm="no")
    assert DoLa(layers=[4, 0, 2]).layers == (0, 2, 4)
    assert vlmfix.methods.get("dola") is DoLa


def test_presets_resolve_on_the_model_and_report_their_candidates():
    tiny = tiny_model("llava", layers=6)  # untied: low = 0, 2; high = 3, 5
    inputs = tiny.inputs(QUESTIONS[:1])
    for layers, candidates in (("low", [0, 2]), ("high", [3, 5])):
        with vlmfix.apply(tiny.model, DoLa(layers=layers)) as session:  # a bare generate inside the block
            tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False, repetition_penalty=1.2)
        report = session.report()["dola"]
        assert (report["candidates"], report["mature_layer"], report["steps"]) == (candidates, 6, 3)
        [row] = report["rows"]
        assert set(row["premature_layers"]) <= set(candidates) and sum(row["counts"].values()) == 3


def test_hooks_are_removed_on_exit_and_on_exception():
    tiny = tiny_model("qwen2_vl", layers=6)
    inputs = tiny.inputs(QUESTIONS)
    model = tiny.model
    modules = [model.lm_head, *vlmfix.get_adapter(model).decoder_layers]
    with torch.no_grad():
        stock = model(**inputs).logits
    with pytest.raises(RuntimeError, match="boom"):
        with vlmfix.apply(model, DoLa(layers=EVERY_LAYER)) as session:
            session.generate(**inputs, max_new_tokens=2, repetition_penalty=1.2)
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)


def test_hydra_config_sets_the_bucket_per_benchmark():
    from benchmarks.app import build_methods

    from .test_app import composed

    for benchmark, layers in (("chair", "low"), ("pope_random", "high"), ("speed", "high")):
        [method] = build_methods(composed("method=dola", f"benchmark={benchmark}"))
        assert isinstance(method, DoLa) and method.layers == layers, benchmark
    [method] = build_methods(composed("method=dola", "benchmark=pope_random", "method.layers=[2,4]"))
    assert method.layers == (2, 4)
