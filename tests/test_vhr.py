"""VHR against a slow layer-by-layer reference written from the spec (vhr.md Step 0-2), on tiny models.

The reference runs the two branches (the image prompt, and the same token ids with the image span
deleted) one decoder layer at a time through the model's own modules, reads each head's output before
`o_proj` with a plain torch hook, scores and reinforces in plain Python, and finishes each layer by hand.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

import vlmfix
from vlmfix.decoding.edits import HeadScale, KeyBias
from vlmfix.methods.vhr import VHR, default_layers
from vlmfix.testing import FAMILIES

from .conftest import PlannedEdits, tiny_model

QUESTIONS = ["describe this image .", "is there a dog in the picture ?"]
GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


# ---------------------------------------------------------------------------------------------
# the reference


def layer0_input(model, inputs: dict) -> tuple[Tensor, Any]:
    """Hidden states entering decoder layer 0, and its rotary (cos, sin), from a plain forward (one row)."""
    seen: dict[str, Any] = {}

    def grab(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        seen["pe"] = kwargs["position_embeddings"]

    handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["h"], seen["pe"]


def head_outputs(layer, h: Tensor, pe: Any) -> Tensor:
    """[1, T, heads, head_dim]: the layer's per-head attention output before o_proj (causal, no padding)."""
    got: dict[str, Tensor] = {}
    handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: got.setdefault("a", args[0].clone()))
    try:
        with torch.no_grad():
            layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=pe, attention_mask=None)
    finally:
        handle.remove()
    heads = layer.self_attn.config.num_attention_heads
    return got["a"].view(*got["a"].shape[:2], heads, -1)


def finish_layer(layer, h: Tensor, heads_out: Tensor) -> Tensor:
    with torch.no_grad():
        h = h + layer.self_attn.o_proj(heads_out.flatten(-2))
        return h + layer.mlp(layer.post_attention_layernorm(h))


def choose(a_img: Tensor, a_txt: Tensor, outlier_filter: bool = True) -> tuple[list[int], list[float], list[int]]:
    """Spec Step 1.2-1.5 for one row and layer, in float64 Python: (chosen heads, vhd, zeroed outliers)."""
    n = a_img.shape[0]
    vhd = [math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a_img[i], a_txt[i]))) for i in range(n)]
    ta = [sum(float(y) ** 2 for y in a_txt[i]) for i in range(n)]

    def above(xs: list[float]) -> list[bool]:
        mean = sum(xs) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)  # population std (D8)
        return [x > mean + std for x in xs]

    outliers = [a and b for a, b in zip(above(vhd), above(ta))] if outlier_filter else [False] * n
    filtered = [0.0 if o else v for v, o in zip(vhd, outliers)]
    median = sorted(filtered)[(n - 1) // 2]  # the lower middle value, as torch.median
    return [i for i in range(n) if filtered[i] > median], vhd, [i for i in range(n) if outliers[i]]


def reference_vhr(model, image_inputs: dict, text_ids: Tensor, layers, alpha: float, lockstep: bool = True,
                  outlier_filter: bool = True) -> dict[str, Any]:
    """Plan and first-token logits of VHR for one prompt, layer by layer with both branches in lockstep."""
    lm = model.model.language_model
    heads = lm.config.num_attention_heads
    h_img, pe_img = layer0_input(model, image_inputs)
    h_txt, pe_txt = layer0_input(model, {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids)})
    plan: dict[int, list[int]] = {}
    vhd: dict[int, list[float]] = {}
    outliers: dict[int, list[int]] = {}
    for index, layer in enumerate(lm.layers):
        a_img, a_txt = head_outputs(layer, h_img, pe_img), head_outputs(layer, h_txt, pe_txt)
        scale = torch.ones(heads)
        if index in layers:
            plan[index], vhd[index], outliers[index] = choose(a_img[0, -1], a_txt[0, -1], outlier_filter)
            if lockstep:
                scale[plan[index]] = alpha
        h_img = finish_layer(layer, h_img, a_img * scale[:, None])
        h_txt = finish_layer(layer, h_txt, a_txt * scale[:, None])
    if not lockstep:  # the plan comes from the unreinforced model; generation then applies it
        h_img, _ = layer0_input(model, image_inputs)
        for index, layer in enumerate(lm.layers):
            scale = torch.ones(heads)
            scale[plan.get(index, [])] = alpha
            h_img = finish_layer(layer, h_img, head_outputs(layer, h_img, pe_img) * scale[:, None])
    with torch.no_grad():
        logits = model.lm_head(lm.norm(h_img))[0, -1]
    return {"plan": plan, "vhd": vhd, "outliers": outliers, "logits": logits}


def without_image_span(tiny, input_ids: Tensor) -> Tensor:
    """[1, T] -> [1, T']: the ids with image placeholders (and Qwen's vision start/end) deleted."""
    config = tiny.model.config
    drop = {config.image_token_id, getattr(config, "vision_start_token_id", -1),
            getattr(config, "vision_end_token_id", -1)}
    return torch.tensor([[t for t in input_ids[0].tolist() if t not in drop]])


def run_vhr(tiny, inputs: dict, method: VHR, **kwargs: Any) -> tuple[Any, dict]:
    with vlmfix.apply(tiny.model, method) as session:
        out = tiny.model.generate(**inputs, **kwargs)
    return out, session.report()["vhr"]


def snapshot(inputs: dict) -> dict:
    return {k: v.clone() for k, v in inputs.items() if isinstance(v, Tensor)}


def assert_unchanged(inputs: dict, before: dict) -> None:
    for key, value in before.items():
        assert torch.equal(inputs[key], value), f"input {key} was modified in place"


# ---------------------------------------------------------------------------------------------
# against the reference


def test_reference_reproduces_the_model(family):
    """Sanity of the reference machinery: with alpha = 1 it gives the model's own logits."""
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS[:1])
    ref = reference_vhr(tiny.model, inputs, without_image_span(tiny, inputs["input_ids"]), layers=[1], alpha=1.0)
    with torch.no_grad():
        plain = tiny.model(**inputs).logits[0, -1]
    torch.testing.assert_close(ref["logits"], plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("selection", ["lockstep", "two_pass"])
def test_plan_vhd_and_logits_match_reference(family, selection):
    tiny = tiny_model(family)
    for seed, question in enumerate(QUESTIONS):
        inputs = tiny.inputs([question], seed=seed)
        before = snapshot(inputs)
        method = VHR(selection=selection)
        out, report = run_vhr(tiny, inputs, method, max_new_tokens=1, **GREEDY)
        layers = report["layers"]
        assert layers == [0, 1, 2, 3]  # rule R1 on a 4-layer model: {1} + the last 14 = every layer
        ref = reference_vhr(tiny.model, inputs, without_image_span(tiny, inputs["input_ids"]), layers, 2.0,
                            lockstep=selection == "lockstep")
        row = report["rows"][0]["layers"]
        for layer in layers:
            assert row[layer]["heads"] == ref["plan"][layer], f"layer {layer}"
            assert row[layer]["outliers"] == ref["outliers"][layer]
            torch.testing.assert_close(torch.tensor(row[layer]["vhd"]), torch.tensor(ref["vhd"][layer]),
                                       atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.logits[0][0], ref["logits"], atol=1e-4, rtol=1e-4)
        # the method really changed the model: the first-token logits differ from greedy's
        with torch.no_grad():
            assert not torch.allclose(tiny.model(**inputs).logits[0, -1], ref["logits"], atol=1e-4)
        assert_unchanged(inputs, before)


def test_lockstep_and_two_pass_differ():
    """Earlier reinforcement changes later layers' scores (coupling), so the two selections differ."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS[:1])
    _, lockstep = run_vhr(tiny, inputs, VHR(), max_new_tokens=1)
    _, two_pass = run_vhr(tiny, inputs, VHR(selection="two_pass"), max_new_tokens=1)
    first, later = lockstep["rows"][0]["layers"], two_pass["rows"][0]["layers"]
    assert first[0]["vhd"] == pytest.approx(later[0]["vhd"], rel=1e-5)  # layer 0 sees no earlier layer
    assert any(first[layer]["vhd"] != pytest.approx(later[layer]["vhd"], rel=1e-3) for layer in (1, 2, 3))


def test_explicit_layers_and_no_filter_match_reference():
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS[1:])
    out, report = run_vhr(tiny, inputs, VHR(layers=[1, 3], outlier_filter=False, alpha=2.5), max_new_tokens=1,
                          **GREEDY)
    ref = reference_vhr(tiny.model, inputs, without_image_span(tiny, inputs["input_ids"]), [1, 3], 2.5,
                        outlier_filter=False)
    assert report["layers"] == [1, 3] and report["layers_source"] == "given"
    assert {layer: report["rows"][0]["layers"][layer]["heads"] for layer in (1, 3)} == ref["plan"]
    assert all(not report["rows"][0]["layers"][layer]["outliers"] for layer in (1, 3))
    torch.testing.assert_close(out.logits[0][0], ref["logits"], atol=1e-4, rtol=1e-4)


def test_scaled_head_outputs_before_o_proj():
    """At the prompt's prefill the chosen heads' outputs (o_proj input) are alpha times the unedited ones."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS[:1])
    layer = tiny.model.model.language_model.layers[2]
    layer_inputs: list[tuple[Tensor, Any]] = []
    o_proj_inputs: list[Tensor] = []

    def grab(module, args, kwargs):
        layer_inputs.append(((args[0] if args else kwargs["hidden_states"]).clone(), kwargs["position_embeddings"]))

    pre = layer.register_forward_pre_hook(grab, with_kwargs=True)
    post = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: o_proj_inputs.append(args[0].clone()))
    try:
        _, report = run_vhr(tiny, inputs, VHR(layers=[2]), max_new_tokens=3)
    finally:
        pre.remove()
        post.remove()
    # forwards: VHR's 2-row scoring pass, the prefill, 2 decode steps
    assert [x.shape[:2] for x in o_proj_inputs][1:] == [(1, inputs["input_ids"].shape[1]), (1, 1), (1, 1)]
    h, pe = layer_inputs[1]
    plain = head_outputs(layer, h, pe)  # outside the session: unedited
    scale = torch.ones(4)
    scale[report["rows"][0]["layers"][2]["heads"]] = 2.0
    torch.testing.assert_close(o_proj_inputs[1].view(plain.shape), plain * scale[:, None], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_one_is_greedy(family):
    """alpha = 1: bit-identical scores; the prepare pass leaves the model, its config and state untouched."""
    tiny = tiny_model(family)
    model = tiny.model
    inputs = tiny.inputs(QUESTIONS + ["what"])
    before = snapshot(inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = len(model._forward_pre_hooks)
    ref = model.generate(**inputs, max_new_tokens=6, **GREEDY)
    ref_rope = getattr(model.model, "rope_deltas", None)
    out, report = run_vhr(tiny, inputs, VHR(alpha=1.0), max_new_tokens=6, **GREEDY)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        assert torch.equal(a, b)
    assert len(report["rows"]) == 3 and all(len(r["layers"][1]["heads"]) >= 1 for r in report["rows"])
    if ref_rope is not None:
        assert torch.equal(model.model.rope_deltas, ref_rope)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert len(model._forward_pre_hooks) == hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert_unchanged(inputs, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_equal_rows_alone(family):
    tiny = tiny_model(family)
    batch = tiny.inputs(QUESTIONS)  # different lengths: left padding
    assert (batch["attention_mask"] == 0).any()
    before = snapshot(batch)
    together, report = run_vhr(tiny, batch, VHR(), max_new_tokens=5, do_sample=False)
    width = batch["input_ids"].shape[1]
    for i, question in enumerate(QUESTIONS):
        alone_inputs = tiny.inputs([question], seed=i)
        alone, alone_report = run_vhr(tiny, alone_inputs, VHR(), max_new_tokens=5, do_sample=False)
        assert together[i, width:].tolist() == alone[0, alone_inputs["input_ids"].shape[1]:].tolist()
        for layer in report["layers"]:
            assert report["rows"][i]["layers"][layer]["heads"] == alone_report["rows"][0]["layers"][layer]["heads"]
    assert_unchanged(batch, before)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_kv_cache_equals_recomputation(family):
    """Cached generation with VHR equals recomputing every step without a cache under the frozen plan."""
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    # a random model may emit an image placeholder, which a recomputation would read as an image token
    kwargs = dict(max_new_tokens=5, suppress_tokens=[tiny.model.config.image_token_id], **GREEDY)
    cached, report = run_vhr(tiny, inputs, VHR(), **kwargs)
    scale = {
        layer: torch.tensor([[2.0 if h in row["layers"][layer]["heads"] else 1.0 for h in range(4)]
                             for row in report["rows"]])
        for layer in report["layers"]
    }
    frozen = PlannedEdits(lambda s, layer: [HeadScale(scale=scale[layer])], layers=report["layers"])
    recomputed = vlmfix.generate(tiny.model, **inputs, methods=[frozen], use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_beams_expand_the_plan_per_beam():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    _, single = run_vhr(tiny, inputs, VHR(), max_new_tokens=3, do_sample=False)
    out, beams = run_vhr(tiny, inputs, VHR(), max_new_tokens=3, num_beams=2, num_return_sequences=2,
                         do_sample=False)
    assert out.shape[0] == 4 and len(beams["rows"]) == 4
    for row in range(4):  # generate repeats each prompt row per beam: rows 0, 0, 1, 1
        for layer in beams["layers"]:
            assert beams["rows"][row]["layers"][layer]["heads"] == single["rows"][row // 2]["layers"][layer]["heads"]


def test_report_contents():
    tiny = tiny_model("llava_next")
    _, report = run_vhr(tiny, tiny.inputs(QUESTIONS), VHR(), max_new_tokens=1)
    assert set(report) == {"alpha", "selection", "layers", "layers_source", "rows", "applied"}
    assert report["layers_source"].startswith("rule R1")
    for row in report["rows"]:
        for layer in report["layers"]:
            entry = row["layers"][layer]
            assert set(entry) == {"heads", "outliers", "vhd", "vhd_median"}
            assert len(entry["vhd"]) == 4 and all(v >= 0 for v in entry["vhd"])
            assert not set(entry["heads"]) & set(entry["outliers"])  # zeroed outliers are never chosen
            # with fewer than half the heads zeroed and no ties, exactly half the heads are chosen
            if len(entry["outliers"]) < 2:
                assert len(entry["heads"]) == 2


def test_default_layers_rule():
    assert default_layers(32) == (1, *range(18, 32))  # LLaVA-1.5-7B, [P] Sec. 4.4
    assert default_layers(28) == (1, *range(14, 28))  # Qwen2-VL-7B, rule R1
    assert default_layers(40) == (1, *range(26, 40))  # LLaVA-1.5-13B, rule R1
    assert default_layers(6) == (0, 1, 2, 3, 4, 5)


# ---------------------------------------------------------------------------------------------
# composition and errors


def test_composes_with_other_edits():
    """VHR with a key-bias method in one session: each layer gets both methods' edits, VHR's plan unchanged."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    _, alone = run_vhr(tiny, inputs, VHR(layers=[1, 2]), max_new_tokens=3)
    bias = PlannedEdits(lambda s, layer: [KeyBias(abs_gain=s.spans.image[:, None].float() * 0.5, rows="last")],
                        layers=[2, 3])
    with vlmfix.apply(tiny.model, bias, VHR(layers=[1, 2])) as session:
        out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        kinds = {layer: [type(e).__name__ for e in session.edits_for(layer)] for layer in range(4)}
    assert kinds == {0: [], 1: ["HeadScale"], 2: ["KeyBias", "HeadScale"], 3: ["KeyBias"]}
    assert session.report()["vhr"]["rows"] == alone["rows"]  # scored without the other method's edits
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_composes_with_a_contrastive_method():
    """VHR on the clean stream of a contrastive call: with the contrast off (VCD alpha=0) it equals VHR alone."""
    from vlmfix.methods.vcd import VCD

    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    alone, report = run_vhr(tiny, inputs, VHR(), max_new_tokens=5, do_sample=False)
    paired = vlmfix.generate(tiny.model, **inputs, methods=[VHR(), VCD(alpha=0.0)], max_new_tokens=5,
                             do_sample=False)
    assert torch.equal(alone, paired)


def test_validation_errors():
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number > 0, got 0"):
        VHR(alpha=0)
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number > 0, got -1.0"):
        VHR(alpha=-1.0)
    with pytest.warns(UserWarning, match="above 3"):
        VHR(alpha=4.0)
    with pytest.raises(ValueError, match=r"`layers\[0\]` must be an int >= 0, got -1"):
        VHR(layers=[-1])
    with pytest.raises(ValueError, match=r"`distance` must be one of 'l2', 'sq_l2', got 'l1'"):
        VHR(distance="l1")
    with pytest.raises(ValueError, match=r"`selection` must be one of"):
        VHR(selection="twopass")
    with pytest.raises(ValueError, match=r"`outlier_filter` must be True or False"):
        VHR(outlier_filter="yes")
    tiny = tiny_model("llava")
    with pytest.raises(ValueError, match=r"`layers` holds \[7\], but the language model has 4 layers"):
        vlmfix.generate(tiny.model, **tiny.inputs(QUESTIONS[:1]), methods=[VHR(layers=[1, 7])], max_new_tokens=1)
    with pytest.raises(vlmfix.MissingImageError, match=r"vhr need an image in every prompt.*rows \[1\]"):
        vlmfix.generate(tiny.model, **tiny.inputs(QUESTIONS, with_image=[True, False]), methods=[VHR()],
                        max_new_tokens=1)


def test_registered_by_name():
    assert vlmfix.methods.get("vhr") is VHR
    assert isinstance(vlmfix.methods.create("vhr", alpha=1.5), VHR)
