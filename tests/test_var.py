"""VAR against plain-PyTorch references written from the spec (var.md Steps 1-4), on tiny models.

A "planted" tiny model carries massive activations in hidden dimensions 17 and 90 on chosen tokens:
the embedding rows of the first template token and of "." are set by hand, and a forward hook on the
projector writes them into chosen image tokens. Its decoder is 128 wide, so the ratio |x_d| / rms(x) of
a planted token is about sqrt(128 / 2) = 8 and of any other token below 4: tau = 5 separates them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import (
    AttentionInterface,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import vlmfix
from vlmfix.decoding.edits import KeyBias, Transfer, apply_transfer
from vlmfix.methods.sink_dims import calibrate_sink_dims, find_sink_dims, table_sink_dims
from vlmfix.methods.var import VAR, SinkDimsError
from vlmfix.methods.vhr import VHR
from vlmfix.testing import FAMILIES, TinyVLM, build_tiny

from .conftest import PlannedEdits, tiny_model

QUESTIONS = ["describe this image .", "what"]
GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)
DIMS = [17, 90]
MASSIVE = 40.0
PICKS = {0: [3, 7], 1: [1]}  # batch row -> indices (within the row's image tokens) planted as visual sinks
ACTIVE = dict(sink_dims=[0, 5, 9, 13], tau=2.0)  # on the ordinary tiny models: a few sinks per layer


# ---------------------------------------------------------------------------------------------
# the planted model


@dataclass
class Planted:
    tiny: TinyVLM
    first_token: int
    dot: int
    image_indices: list[int]  # global image-token indices (batch order) the projector hook plants

    def inputs(self) -> dict:
        inputs = self.tiny.inputs(QUESTIONS)
        ids = inputs["input_ids"]
        counts = (ids == self.tiny.model.config.image_token_id).sum(1).tolist()
        self.image_indices = [sum(counts[:row]) + j for row, picks in PICKS.items() for j in picks]
        return inputs

    def expected(self, inputs: dict) -> tuple[list[list[int]], list[list[int]]]:
        """Per row: the planted text positions and the planted image positions."""
        ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
        image = ids == self.tiny.model.config.image_token_id
        text, visual = [], []
        for row in range(ids.shape[0]):
            planted = ((ids[row] == self.first_token) | (ids[row] == self.dot)) & valid[row]
            text.append(planted.nonzero().flatten().tolist())
            positions = image[row].nonzero().flatten().tolist()
            visual.append([positions[j] for j in PICKS[row]])
        return text, visual


def build_planted(family: str) -> Planted:
    tiny = build_tiny(family, layers=5, heads=8, kv_heads=2, head_dim=16)  # hidden size 128
    tok = tiny.tokenizer
    first = tok.convert_tokens_to_ids("USER" if family.startswith("llava") else "<|im_start|>")
    planted = Planted(tiny, first, tok.convert_tokens_to_ids("."), [])
    with torch.no_grad():
        embedding = tiny.model.get_input_embeddings().weight
        embedding[first, DIMS] = MASSIVE
        embedding[planted.dot, DIMS] = MASSIVE

    def plant(module, args, out):  # projector output: [images, tokens, hidden] or [tokens, hidden]
        out = out.clone()
        flat = out.view(-1, out.shape[-1])
        for index in planted.image_indices:
            flat[index, DIMS] = MASSIVE
        return out

    vlmfix.get_adapter(tiny.model).projector.register_forward_hook(plant)
    return planted


_PLANTED: dict[str, Planted] = {}


def planted_model(family: str) -> Planted:
    if family not in _PLANTED:
        _PLANTED[family] = build_planted(family)
    return _PLANTED[family]


# ---------------------------------------------------------------------------------------------
# references


def ratio(hidden: Tensor) -> Tensor:
    """Spec Step 1: phi = max_{d in D_sink} |x_d| / sqrt(mean_d x_d^2 + 1e-6)."""
    x = hidden.double()
    return x[..., DIMS].abs().max(-1).values / (x.pow(2).mean(-1) + 1e-6).sqrt()


def spec_redistribution(probs: Tensor, sinks: Tensor, image: Tensor, start: list[int], valid: Tensor, p: float,
                        summ: float, rho: float) -> tuple[Tensor, Tensor]:
    """Spec Steps 2-3, one (row, head, query) at a time: (P', selected [batch, heads, q])."""
    batch, heads, q_len, _ = probs.shape
    out = probs.clone()
    selected = torch.zeros(batch, heads, q_len, dtype=torch.bool)
    for b in range(batch):
        vis, s = image[b], sinks[b]
        vs, ts, vn = s & vis, s & ~vis, vis & ~s
        for i in range(start[b], q_len):
            if not valid[b, i]:
                continue
            for h in range(heads):
                row = probs[b, h, i]
                m_vis, m_vs, m_ts = float(row[vis].sum()), float(row[vs].sum()), float(row[ts].sum())
                m_vn = m_vis - m_vs
                r = m_vn / m_vis if m_vis > 0 else 0.0
                if m_vis >= summ and r >= rho and bool(vs.any()):
                    omega = p * (m_vs + m_ts)
                    new = row.clone()
                    new[s] = (1 - p) * row[s]
                    new[vn] = row[vn] * (1 + omega / m_vn)
                    out[b, h, i] = new
                    selected[b, h, i] = True
    return out, selected


def attention_probs(layer, hidden: Tensor, position_embeddings: Any, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Unedited P [batch, heads, T, T] (float64) and V [batch, heads, T, head_dim] from the layer's weights."""
    attn = layer.self_attn
    heads, head_dim = attn.config.num_attention_heads, attn.head_dim
    batch, length, _ = hidden.shape
    with torch.no_grad():
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = rotary(q, k, *position_embeddings)
    k, v = (t.repeat_interleave(heads // t.shape[1], dim=1).double() for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(head_dim)
    allowed = torch.ones(length, length).tril().bool()[None] & valid[:, None, :]  # causal, padding keys
    scores = scores.masked_fill(~allowed[:, None], -math.inf)
    return torch.softmax(scores, -1).nan_to_num(0.0), v


def run_var(tiny, inputs: dict, method: VAR, **kwargs: Any) -> tuple[Any, dict]:
    with vlmfix.apply(tiny.model, method) as session:
        out = tiny.model.generate(**inputs, **kwargs)
    return out, session.report()["var"]


def after_image(inputs: dict, image_token_id: int) -> list[int]:
    ids = inputs["input_ids"]
    return [int((ids[b] == image_token_id).nonzero().max()) + 1 for b in range(ids.shape[0])]


def snapshot(inputs: dict) -> dict:
    return {k: v.clone() for k, v in inputs.items() if isinstance(v, Tensor)}


def assert_unchanged(inputs: dict, before: dict) -> None:
    for key, value in before.items():
        assert torch.equal(inputs[key], value), f"input {key} was modified in place"


# ---------------------------------------------------------------------------------------------
# sinks and redistribution against the references


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sinks_found_where_planted(family):
    planted = planted_model(family)
    inputs = planted.inputs()
    before = snapshot(inputs)
    assert find_sink_dims(planted.tiny.model, inputs, tau=5.0) == DIMS
    assert find_sink_dims(planted.tiny.model, inputs) == []  # tau = 20 > sqrt(128): out of reach here
    _, report = run_var(planted.tiny, inputs, VAR(tau=5.0, detect_per_prompt=True), max_new_tokens=2,
                        do_sample=False)
    assert report["sink_dims"] == DIMS
    assert report["sink_dims_source"] == "detected on this prompt batch (detect_per_prompt=True)"
    assert report["applied"]["attention_calls"] > 0
    assert report["layers"] == [2, 3]  # 2 .. L-2 for L = 5
    text, visual = planted.expected(inputs)
    for row in range(2):
        for layer in (2, 3):
            assert report["rows"][row]["text_sinks"][layer] == text[row]
            assert report["rows"][row]["visual_sinks"][layer] == visual[row]
            assert report["rows"][row]["sinks"][layer] == sorted(text[row] + visual[row])
    assert_unchanged(inputs, before)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_redistributed_rows_equal_spec_formula(family):
    """The prefill's o_proj input in every edited layer equals P' V, P' from the spec's step-by-step formula."""
    planted = planted_model(family)
    model = planted.tiny.model
    inputs = planted.inputs()
    valid = inputs["attention_mask"].bool()
    layers = model.model.language_model.layers
    captured: dict[int, dict[str, Any]] = {2: {}, 3: {}}
    handles = []
    for index in captured:
        def grab_input(module, args, kwargs, index=index):
            if "hidden" not in captured[index]:
                captured[index]["hidden"] = (args[0] if args else kwargs["hidden_states"]).clone()
                captured[index]["pe"] = kwargs["position_embeddings"]

        def grab_output(module, args, index=index):
            captured[index].setdefault("out", args[0].clone())

        handles.append(layers[index].register_forward_pre_hook(grab_input, with_kwargs=True))
        handles.append(layers[index].self_attn.o_proj.register_forward_pre_hook(grab_output))
    method = VAR(sink_dims=DIMS, tau=5.0, summ=0.3, rho=0.6)
    try:
        _, report = run_var(planted.tiny, inputs, method, max_new_tokens=1, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    image = inputs["input_ids"] == model.config.image_token_id
    start = after_image(inputs, model.config.image_token_id)
    for index, seen in captured.items():
        sinks = (ratio(seen["hidden"]) >= 5.0) & valid
        assert [sinks[b].nonzero().flatten().tolist() for b in range(2)] == [r["sinks"][index] for r in report["rows"]]
        probs, v = attention_probs(layers[index], seen["hidden"], seen["pe"], valid)
        edited, selected = spec_redistribution(probs, sinks, image, start, valid, 0.6, 0.3, 0.6)
        ok = valid[:, None, :].expand(-1, probs.shape[1], -1)
        torch.testing.assert_close(edited.sum(-1)[ok], torch.ones_like(edited.sum(-1)[ok]))  # mass conserved
        assert selected.any() and (~selected[ok]).any(), "the case must hold selected and unselected rows"
        expected = (edited @ v).transpose(1, 2).flatten(-2)  # [batch, T, heads * head_dim]
        torch.testing.assert_close(seen["out"][valid].double(), expected[valid], atol=1e-5, rtol=1e-4)
        unedited = (probs @ v).transpose(1, 2).flatten(-2)
        assert not torch.allclose(seen["out"][valid].double(), unedited[valid], atol=1e-4)
        for b in range(2):  # the report's share of (head, edited row) pairs selected, and the mass moved
            rows = [i for i in range(start[b], probs.shape[2]) if valid[b, i]]
            share = selected[b][:, rows].double().mean()
            assert report["rows"][b]["selected_head_share"][index] == pytest.approx(float(share), abs=1e-6)
            moved = [0.6 * float(probs[b, h, i][sinks[b]].sum()) for h in range(8) for i in rows if selected[b, h, i]]
            mean_moved = sum(moved) / max(len(moved), 1)
            assert report["rows"][b]["mean_mass_moved"][index] == pytest.approx(mean_moved, abs=1e-5)


def test_golden_values():
    """1 head, 8 keys: text sink, 2 image sinks, 3 image non-sinks, 2 text; p = 0.6 (spec section 9)."""
    probs = torch.tensor([[[[0.20, 0.10, 0.05, 0.15, 0.20, 0.10, 0.10, 0.10]]]])
    sinks = torch.tensor([[True, True, True, False, False, False, False, False]])
    image = torch.tensor([[False, True, True, True, True, True, False, False]])
    edit = VAR().plan_edit(sinks, image, torch.tensor([0]))
    moved = apply_transfer(probs, edit, torch.ones(1, 1, 1, dtype=torch.bool))
    # m_vis = 0.60, m_vs = 0.15, m_vn = 0.45, m_ts = 0.20; Omega = 0.6 * 0.35 = 0.21; gain = 1 + 0.21 / 0.45
    expected = torch.tensor([[[[0.08, 0.04, 0.02, 0.22, 0.88 / 3, 0.44 / 3, 0.10, 0.10]]]])
    torch.testing.assert_close(moved, expected)
    assert float(moved.sum()) == pytest.approx(1.0)
    # the non-sink share 0.75 is below rho = 0.8: untouched
    strict = VAR(rho=0.8).plan_edit(sinks, image, torch.tensor([0]))
    assert torch.equal(apply_transfer(probs, strict, torch.ones(1, 1, 1, dtype=torch.bool)), probs)
    # no visual sink: no edit at all (D6); with require_visual_sink=False the text sink mass moves
    text_only = torch.tensor([[True, False, False, False, False, False, False, False]])
    assert VAR().plan_edit(text_only, image, torch.tensor([0])) is None
    loose = VAR(require_visual_sink=False).plan_edit(text_only, image, torch.tensor([0]))
    moved = apply_transfer(probs, loose, torch.ones(1, 1, 1, dtype=torch.bool))
    assert float(moved[0, 0, 0, 0]) == pytest.approx(0.08) and float(moved.sum()) == pytest.approx(1.0)


def test_planned_edit_conserves_mass_on_random_rows():
    """Row sums stay 1, non-sink text keys keep their weight, and only selected rows change."""
    g = torch.Generator().manual_seed(3)
    batch, heads, q_len, keys = 3, 4, 6, 12
    probs = torch.softmax(torch.randn(batch, heads, q_len, keys, generator=g) * 2, dim=-1)
    image = torch.zeros(batch, keys, dtype=torch.bool)
    image[:, 3:9] = True
    sinks = torch.rand(batch, keys, generator=g) < 0.3
    sinks[:, 4] = True  # at least one visual sink per row
    edit = VAR(summ=0.3).plan_edit(sinks, image, torch.zeros(batch, dtype=torch.long))
    moved = apply_transfer(probs, edit, torch.ones(batch, heads, q_len, dtype=torch.bool))
    torch.testing.assert_close(moved.sum(-1), torch.ones(batch, heads, q_len))
    text = (~image & ~sinks)[:, None, None, :].expand_as(probs)
    assert torch.equal(moved[text], probs[text])
    m_vis = (probs * image[:, None, None]).sum(-1)
    m_vn = (probs * (image & ~sinks)[:, None, None]).sum(-1)
    selected = (m_vis >= 0.3) & (m_vn / m_vis >= 0.5)
    assert selected.any() and (~selected).any()
    changed = (moved != probs).any(-1)
    assert torch.equal(changed, selected)


# ---------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("family", FAMILIES)
def test_p_zero_is_greedy(family):
    """p = 0 runs the whole path (sinks, gate, edit on the PyTorch path) and keeps every token."""
    tiny = tiny_model(family, layers=5)
    inputs = tiny.inputs(QUESTIONS + ["is there a dog in the picture ?"])
    before = snapshot(inputs)
    ref = tiny.model.generate(**inputs, max_new_tokens=6, **GREEDY)
    out, report = run_var(tiny, inputs, VAR(p=0.0, summ=0.0, **ACTIVE), max_new_tokens=6, **GREEDY)
    reached = any(row["visual_sinks"][layer] for row in report["rows"] for layer in report["layers"])
    assert reached, "the edit path was not reached"
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert_unchanged(inputs, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_equal_rows_alone(family):
    tiny = tiny_model(family, layers=5)
    batch = tiny.inputs(QUESTIONS)
    assert (batch["attention_mask"] == 0).any()
    method = VAR(summ=0.0, **ACTIVE)
    together, report = run_var(tiny, batch, method, max_new_tokens=5, do_sample=False)
    width = batch["input_ids"].shape[1]
    for i, question in enumerate(QUESTIONS):
        alone_inputs = tiny.inputs([question], seed=i)
        alone, alone_report = run_var(tiny, alone_inputs, method, max_new_tokens=5, do_sample=False)
        assert together[i, width:].tolist() == alone[0, alone_inputs["input_ids"].shape[1]:].tolist()
        shift = width - alone_inputs["input_ids"].shape[1]  # left padding of row i in the batch
        for layer in report["layers"]:
            assert report["rows"][i]["sinks"][layer] == [p + shift for p in alone_report["rows"][0]["sinks"][layer]]
    assert any(row["visual_sinks"][layer] for row in report["rows"] for layer in report["layers"])


def frozen_var(report: dict, inputs: dict, image_token_id: int, p: float, summ: float) -> PlannedEdits:
    """VAR's edits rebuilt by hand from a report's sinks (no detection): for a recomputation without cache."""
    seq = inputs["input_ids"].shape[1]
    image = inputs["input_ids"] == image_token_id
    start = torch.tensor(after_image(inputs, image_token_id))

    def make(session, layer):
        sinks = torch.zeros(len(report["rows"]), seq, dtype=torch.bool)
        for b, row in enumerate(report["rows"]):
            sinks[b, row["sinks"][layer]] = True
        return [Transfer(source=sinks, receivers=image & ~sinks, gate_keys=image, fraction=p, min_gate_mass=summ,
                         min_receiver_share=0.5, require_gate_source=True, from_position=start)]

    return PlannedEdits(make, layers=report["layers"])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_kv_cache_equals_recomputation(family):
    tiny = tiny_model(family, layers=5)
    inputs = tiny.inputs(QUESTIONS)
    image_token_id = tiny.model.config.image_token_id
    # a random model may emit an image placeholder, which a recomputation would read as an image token
    kwargs = dict(max_new_tokens=5, suppress_tokens=[image_token_id], **GREEDY)
    # sinks among prompt tokens only (default): recompute under the prefill's sinks
    cached, report = run_var(tiny, inputs, VAR(summ=0.0, **ACTIVE), **kwargs)
    frozen = frozen_var(report, inputs, image_token_id, 0.6, 0.0)
    recomputed = vlmfix.generate(tiny.model, **inputs, methods=[frozen], use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # decode_sinks=True tests generated tokens too: it equals VAR recomputed on each whole prefix
    method = VAR(summ=0.0, decode_sinks=True, **ACTIVE)
    cached, report = run_var(tiny, inputs, method, **kwargs)
    recomputed, _ = run_var(tiny, inputs, method, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert set(report["rows"][0]) >= {"generated_sinks"}


def test_beams_find_each_rows_sinks_per_beam():
    tiny = tiny_model("llava_next", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    method = VAR(summ=0.0, **ACTIVE)
    _, single = run_var(tiny, inputs, method, max_new_tokens=3, do_sample=False)
    out, beams = run_var(tiny, inputs, method, max_new_tokens=3, num_beams=2, num_return_sequences=2,
                         do_sample=False)
    assert out.shape[0] == 4 and len(beams["rows"]) == 4
    for row in range(4):  # generate repeats each prompt row per beam: rows 0, 0, 1, 1
        assert beams["rows"][row]["sinks"] == single["rows"][row // 2]["sinks"]


def test_unedited_layers_keep_sdpa(monkeypatch):
    """Layers without an edit call transformers' SDPA function itself; edited layers never do."""
    tiny = tiny_model("llava", layers=6)
    calls: list[int] = []
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def spy(module, *args, **kwargs):
        if getattr(module, "layer_idx", None) is not None:  # language-model layers (not the vision tower)
            calls.append(module.layer_idx)
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)
    _, report = run_var(tiny, tiny.inputs(QUESTIONS), VAR(summ=0.0, **ACTIVE), max_new_tokens=3, do_sample=False)
    edited = {layer for layer in report["layers"] if any(row["visual_sinks"][layer] for row in report["rows"])}
    assert edited and report["layers"] == [2, 3, 4]
    forwards = 3  # prefill + 2 decode steps
    assert sorted(calls) == sorted([layer for layer in range(6) if layer not in edited] * forwards)


def test_report_contents():
    tiny = tiny_model("qwen2_5_vl", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    _, report = run_var(tiny, inputs, VAR(p=0.4, **ACTIVE), max_new_tokens=2, do_sample=False)
    assert {k: report[k] for k in ("p", "rho", "summ", "tau", "sink_dims", "sink_dims_source", "layers")} == {
        "p": 0.4, "rho": 0.5, "summ": 0.2, "tau": 2.0, "sink_dims": [0, 5, 9, 13], "sink_dims_source": "given",
        "layers": [2, 3],
    }
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    valid = inputs["attention_mask"].bool()
    for b, row in enumerate(report["rows"]):
        assert set(row) == {"sinks", "visual_sinks", "text_sinks", "selected_head_share", "mean_mass_moved",
                            "image_centric_heads"}
        for layer in report["layers"]:
            assert all(valid[b, p] for p in row["sinks"][layer])
            assert all(image[b, p] for p in row["visual_sinks"][layer])
            assert not any(image[b, p] for p in row["text_sinks"][layer])
            assert 0.0 <= row["selected_head_share"][layer] <= 1.0
            assert 0.0 <= row["mean_mass_moved"][layer] <= 1.0
            # per head: the share of the row's edited queries that selected it; their mean is the layer's share
            heads = row["image_centric_heads"].get(layer)
            if heads is None:  # a layer the prefill did not edit
                assert row["selected_head_share"][layer] == 0.0
                continue
            assert len(heads) == tiny.model.config.text_config.num_attention_heads
            assert sum(heads) / len(heads) == pytest.approx(row["selected_head_share"][layer], abs=1e-6)


def test_sinks_recomputed_for_every_prompt():
    """Two generate calls in one session find the sinks of fresh single calls (the official code's bug)."""
    tiny = tiny_model("llava", layers=5)
    first, second = tiny.inputs(QUESTIONS[:1], seed=0), tiny.inputs(QUESTIONS[1:], seed=1)
    method = VAR(**ACTIVE)
    _, fresh_first = run_var(tiny, first, method, max_new_tokens=2, do_sample=False)
    _, fresh_second = run_var(tiny, second, method, max_new_tokens=2, do_sample=False)
    assert fresh_first["rows"][0]["sinks"] != fresh_second["rows"][0]["sinks"]
    with vlmfix.apply(tiny.model, method) as session:
        tiny.model.generate(**first, max_new_tokens=2, do_sample=False)
        assert session.report()["var"] == fresh_first
        tiny.model.generate(**second, max_new_tokens=2, do_sample=False)
        assert session.report()["var"] == fresh_second


def test_a_model_without_sink_dims_is_refused_before_any_work():
    """Spec var.md §5: no published and no given D_sink -> a refusal naming the calibration, not a silent no-op."""
    tiny = tiny_model("llava", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    calls = []
    handle = tiny.model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(SinkDimsError, match=r"VAR needs the sink dimensions of LlavaForConditionalGeneration "
                                            r"\(hidden size 64, 5 layers\).*calibrate_sink_dims"):
        vlmfix.apply(tiny.model, VAR())
    assert not calls  # refused when the session is made, before any forward
    # the opt-in per-prompt detection refuses a batch where it finds nothing (it would edit nothing)
    with pytest.raises(SinkDimsError, match=r"found no sink dimension in this prompt batch at tau=20"):
        vlmfix.generate(tiny.model, **inputs, methods=[VAR(detect_per_prompt=True)], max_new_tokens=2)
    handle.remove()


def test_calibration_finds_the_planted_dims_once_for_many_batches():
    planted = planted_model("llava")
    batches = [planted.inputs(), planted.inputs()]
    found = calibrate_sink_dims(planted.tiny.model, batches, tau=5.0)
    assert found.dims == tuple(DIMS) and found.prompts == 4
    # the candidates list the planted dims first, with the share of (layer, prompt) pairs above tau
    assert {d for d, _, _ in found.candidates[: len(DIMS)]} == set(DIMS)
    assert all(share == 1.0 for d, share, _ in found.candidates if d in DIMS)
    nothing = calibrate_sink_dims(planted.tiny.model, batches)  # tau = 20 > sqrt(128): out of reach
    assert nothing.dims == () and "no sink dimension at tau=20" in nothing.describe()


def test_table_entries_match_published_backbones():
    """LLaVA-1.5-7B and Qwen2-VL-7B shapes (built on the meta device) find their published D_sink."""
    llava = LlavaConfig(text_config=dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                                         intermediate_size=11008, num_attention_heads=32))
    qwen = Qwen2VLConfig(text_config=dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                                          num_attention_heads=28, num_key_value_heads=4))
    small = LlavaConfig(text_config=dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                                         intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8))
    with torch.device("meta"):
        found = [table_sink_dims(cls(config)) for cls, config in
                 ((LlavaForConditionalGeneration, llava), (Qwen2VLForConditionalGeneration, qwen),
                  (LlavaForConditionalGeneration, small))]
    assert found[0].dims == (1415, 2533) and found[0].checkpoint == "llava-hf/llava-1.5-7b-hf"
    assert found[1].dims == (458, 2570)
    assert found[2] is None  # a Mistral-shaped LLaVA has no published entry: find_sink_dims is used


def test_layers_knob():
    tiny = tiny_model("llava", layers=5)
    adapter = vlmfix.get_adapter(tiny.model)
    assert VAR().edited_layers(adapter) == (2, 3)
    assert VAR(exclude_last_layer=False).edited_layers(adapter) == (2, 3, 4)


# ---------------------------------------------------------------------------------------------
# composition and errors


def test_composes_with_vhr_and_other_edits():
    tiny = tiny_model("llava", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    with vlmfix.apply(tiny.model, VHR(layers=[1, 3])) as session:
        tiny.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    vhr_alone = session.report()["vhr"]
    bias = PlannedEdits(lambda s, layer: [KeyBias(abs_gain=s.spans.image[:, None].float() * 0.2, rows="last")],
                        layers=[3, 4])
    for methods in ([VAR(summ=0.0, **ACTIVE), VHR(layers=[1, 3]), bias], [VHR(layers=[1, 3]), bias,
                                                                          VAR(summ=0.0, **ACTIVE)]):
        with vlmfix.apply(tiny.model, *methods) as session:
            out = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
            kinds = {layer: sorted(type(e).__name__ for e in session.edits_for(layer)) for layer in range(5)}
        report = session.report()
        var_layers = {layer for layer in (2, 3) if any(r["visual_sinks"][layer] for r in report["var"]["rows"])}
        assert var_layers == {2, 3}
        assert kinds == {0: [], 1: ["HeadScale"], 2: ["Transfer"], 3: ["HeadScale", "KeyBias", "Transfer"],
                         4: ["KeyBias"]}
        assert report["vhr"]["rows"] == vhr_alone["rows"]  # VHR scores without the other methods' edits
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_composes_with_a_contrastive_method():
    """VAR on the clean stream of a contrastive call: with the contrast off (VCD alpha=0) it equals VAR alone."""
    from vlmfix.methods.vcd import VCD

    tiny = tiny_model("qwen2_vl", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    method = VAR(summ=0.0, **ACTIVE)
    alone, report = run_var(tiny, inputs, method, max_new_tokens=5, do_sample=False)
    with vlmfix.apply(tiny.model, method, VCD(alpha=0.0)) as session:
        paired = session.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(alone, paired)
    assert session.report()["var"] == report


def test_validation_errors():
    with pytest.raises(ValueError, match=r"`p` must be a finite number in \[0, 1\], got 1.4; p is the fraction of "
                                         r"the sink mass"):
        VAR(p=1.4)
    with pytest.raises(ValueError, match=r"`rho` must be a finite number in \(0, 1\], got 0"):
        VAR(rho=0)
    with pytest.raises(ValueError, match=r"`summ` must be a finite number in \[0, 1\], got -0.1"):
        VAR(summ=-0.1)
    with pytest.raises(ValueError, match=r"`tau` must be a finite number > 0, got 0"):
        VAR(tau=0)
    with pytest.raises(ValueError, match=r"`p` must be a finite number in \[0, 1\], got '0.4' \(a str\)"):
        VAR(p="0.4")
    with pytest.raises(ValueError, match=r"`sink_dims` must be None or a non-empty list"):
        VAR(sink_dims=[])
    with pytest.raises(ValueError, match=r"`sink_dims` must be None or a non-empty list of 0-based hidden "
                                         r"dimensions, got 5 \(an int\)"):
        VAR(sink_dims=5)
    with pytest.raises(ValueError, match=r"`decode_sinks` must be True or False"):
        VAR(decode_sinks=1)
    tiny = tiny_model("llava", layers=5)
    with pytest.raises(ValueError, match=r"`sink_dims` holds dimension 64, but the language model's hidden size is 64"):
        vlmfix.generate(tiny.model, **tiny.inputs(QUESTIONS), methods=[VAR(sink_dims=[3, 64])], max_new_tokens=1)
    with pytest.raises(vlmfix.MissingImageError, match=r"var need an image in every prompt"):
        vlmfix.generate(tiny.model, **tiny.inputs(QUESTIONS, with_image=[False, True]), methods=[VAR(**ACTIVE)],
                        max_new_tokens=1)


def test_registered_by_name():
    assert vlmfix.methods.get("var") is VAR
    assert vlmfix.methods.create("var", p=0.4).p == 0.4
