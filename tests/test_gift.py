"""GIFT against a slow reference: eager attention (full matrices), the spec's Steps 3-6 applied literally."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import Tensor

import vlmfix
from vlmfix.decoding.edits import HeadScale
from vlmfix.methods.content_words import rule_content_words, token_char_ranges
from vlmfix.methods.gift import GIFT, gift_defaults
from vlmfix.methods.pai import PAI
from vlmfix.testing import random_image

from .conftest import PlannedEdits, tiny_model
from .reference_decoding import (
    QUESTIONS,
    assert_batch_rows_equal_rows_alone,
    assert_unchanged,
    keys_of,
    plain_softmax,
    reference_greedy,
    snapshot,
)

# content words of QUESTIONS under the dependency-free rule (function words out), written by hand
CONTENT = [["describe", "image"], ["dog", "table"]]
SUFFIX = {
    "llava": 2,
    "qwen2_vl": 3,
    "qwen2_5_vl": 3,
    "llava_next": 2,
}  # "ASSISTANT :" / "<|im_end|> <|im_start|> assistant"


def query_positions(tiny, inputs, b: int, question: str) -> list[int]:
    """The question's token positions, from the known prompt layout (independent of vlmfix's spans)."""
    seq = inputs["input_ids"].shape[1]
    n = len(tiny.tokenizer.tokenize(question))
    end = seq - SUFFIX[tiny.family]
    return list(range(end - n, end))


def content_positions(tiny, inputs, b: int) -> list[int]:
    q = query_positions(tiny, inputs, b, QUESTIONS[b])
    words = tiny.tokenizer.convert_ids_to_tokens(inputs["input_ids"][b, q].tolist())
    return [p for p, w in zip(q, words) if w in CONTENT[b]]


def reference_saliency(tiny, inputs, layer: int, alpha: float) -> tuple[list, list[list[int]], list]:
    """Spec Steps 3-5 from eager attention probabilities: per row (S_hat, kept heads, M); S_hat and M are
    None for a flat map (the guard: no edit)."""
    eager = tiny_model(tiny.family, attn="eager", **SHAPE)
    with torch.no_grad():
        att = eager.model(**inputs, output_attentions=True).attentions[layer]  # [batch, heads, seq, seq]
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    heads = att.shape[1]
    out_s, out_h, out_m = [], [], []
    for b in range(att.shape[0]):
        cols = image[b].nonzero().flatten()
        rows = content_positions(tiny, inputs, b)
        d = torch.stack([(att[b, :, i, cols] - att[b, :, i - 1, cols]).clamp_min(0) for i in rows], dim=1)
        score = d.sum(dim=(1, 2))  # [heads]
        kept = sorted(score.argsort(descending=True)[: heads // 2].tolist())
        s_raw = d[kept].mean(dim=(0, 1))
        mu, sd = s_raw.mean(), s_raw.std()
        s_c = torch.minimum(torch.maximum(s_raw, mu - 3 * sd), mu + 3 * sd)
        flat = bool(s_c.max() == s_c.min())
        s_hat = None if flat else (s_c - s_c.min()) / (s_c.max() - s_c.min())
        out_s.append(s_hat)
        out_h.append(kept)
        out_m.append(None if flat else torch.exp(alpha * s_hat))
    return out_s, out_h, out_m


def gift_row_edit(
    image: Tensor, query: Tensor, multipliers: list[Tensor], beta: float, per_head: bool = False
):
    """Spec Step 6 on one unedited probability row p: [heads, kv_len]."""

    def edit(layer_idx, b, z, allowed):
        p = plain_softmax(z, allowed)
        if multipliers[b] is None:  # flat map: the row is not edited
            return p
        heads, kv = p.shape
        img, qry = keys_of(image[b], kv), keys_of(query[b], kv)
        m = torch.ones(kv)
        m[img] = multipliers[b]
        vis, q = p[:, img], p[:, qry]
        k = heads // 2
        h_ov = vis.sum(1).argsort(descending=True)[:k].tolist()
        h_ot = q.sum(1).argsort(descending=True)[:k].tolist()
        o = sum(float(vis[h].sum()) for h in h_ov)
        e = sum(float((vis[h] * m[img]).sum()) for h in h_ov)
        r = e / o if o > 0 else 1.0
        new = p.clone()
        for h in h_ov:
            new[h, img] = p[h, img] * m[img]
        for h in h_ot:
            r_h = float((vis[h] * m[img]).sum() / vis[h].sum()) if per_head else r
            new[h, qry] = new[h, qry] * beta * r_h
        for h in set(h_ov) | set(h_ot):
            new[h] = new[h] / new[h].sum()
        return new

    return edit


SHAPE = dict(layers=5, heads=4)


def masks(tiny, inputs, informative: bool = False) -> tuple[Tensor, Tensor]:
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    query = torch.zeros_like(image)
    for b, q in enumerate(QUESTIONS):
        query[
            b, content_positions(tiny, inputs, b) if informative else query_positions(tiny, inputs, b, q)
        ] = True
    return image, query


@pytest.mark.filterwarnings("ignore:GIFT leaves a prompt row unedited")
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("ratio", ["pooled", "per_head"])
def test_gift_matches_slow_reference(family, ratio):
    tiny = tiny_model(family, **SHAPE)
    inputs = tiny.inputs(QUESTIONS)
    assert (inputs["attention_mask"] == 0).any(), "the batch must exercise left padding"
    before = snapshot(inputs)
    alpha, beta = 5.0, 1.5
    method = GIFT(
        alpha=alpha, beta=beta, saliency_layers=[1], fusion_layers=[2, 3], content_words="rule", ratio=ratio
    )
    with vlmfix.apply(tiny.model, method, tokenizer=tiny.processor) as session:
        out = tiny.model.generate(
            **inputs,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    report = session.report()["gift"]
    s_hat, heads, mults = reference_saliency(tiny, inputs, layer=1, alpha=alpha)
    for b in range(2):
        row = report["rows"][b]
        assert row["content_words"] == CONTENT[b]
        assert row["content_positions"] == content_positions(tiny, inputs, b)
        assert row["query_positions"] == query_positions(tiny, inputs, b, QUESTIONS[b])
        if s_hat[b] is None:  # the random qwen2_vl gives row 0 no positive shift at all
            assert not row["edited"] and row["skipped"].startswith("flat saliency map")
            continue
        assert row["saliency_heads"] == {1: heads[b]}
        torch.testing.assert_close(torch.tensor(row["saliency"]), s_hat[b], atol=1e-5, rtol=1e-5)
        assert row["edited"] and row["skipped"] is None
    assert sum(m is not None for m in mults) >= 1
    image, query = masks(tiny, inputs)
    ref_tokens, ref_logits = reference_greedy(
        tiny.model, inputs, {2, 3}, gift_row_edit(image, query, mults, beta, ratio == "per_head"), steps=4
    )
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, prompt_len:], ref_tokens)
    torch.testing.assert_close(torch.stack(out.logits), ref_logits, atol=1e-4, rtol=1e-4)
    plain = tiny.model(**inputs).logits[:, -1]
    assert (out.logits[0] - plain).abs().max() > 1e-3  # the edit changes the logits
    assert_unchanged(inputs, before)


def test_informative_query_scaling_and_auto_layer():
    tiny = tiny_model("llava", **SHAPE)
    inputs = tiny.inputs(QUESTIONS)
    method = GIFT(
        alpha=4.0,
        beta=2.0,
        saliency_layers="auto",
        fusion_layers=[3],
        content_words="rule",
        scale_query_tokens="informative",
    )
    with vlmfix.apply(tiny.model, method, tokenizer=tiny.processor) as session:
        out = tiny.model.generate(
            **inputs,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    report = session.report()["gift"]
    # auto: per row, the layer with the largest total positive shift (all heads, content rows, image columns)
    eager = tiny_model("llava", attn="eager", **SHAPE)
    with torch.no_grad():
        att = eager.model(**inputs, output_attentions=True).attentions
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    mults = []
    for b in range(2):
        cols, rows = image[b].nonzero().flatten(), content_positions(tiny, inputs, b)
        totals = [
            sum(float((a[b, :, i, cols] - a[b, :, i - 1, cols]).clamp_min(0).sum()) for i in rows)
            for a in att
        ]
        best = max(range(len(att)), key=lambda layer: totals[layer])
        assert report["rows"][b]["saliency_layers"] == [best]
        mults.append(torch.exp(4.0 * torch.tensor(report["rows"][b]["saliency"])))
    s_best = [
        reference_saliency(tiny, inputs, report["rows"][b]["saliency_layers"][0], 4.0)[0][b] for b in range(2)
    ]
    for b in range(2):
        torch.testing.assert_close(
            torch.tensor(report["rows"][b]["saliency"]), s_best[b], atol=1e-5, rtol=1e-5
        )
    image, query = masks(tiny, inputs, informative=True)
    _, ref_logits = reference_greedy(
        tiny.model, inputs, {3}, gift_row_edit(image, query, mults, 2.0), steps=3
    )
    torch.testing.assert_close(torch.stack(out.logits), ref_logits, atol=1e-4, rtol=1e-4)


def test_alpha_zero_is_greedy(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    ref = tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    out = vlmfix.generate(
        tiny.model,
        **inputs,
        methods=[GIFT(alpha=0.0, content_words="rule")],
        tokenizer=tiny.processor,
        max_new_tokens=6,
        do_sample=False,
    )
    assert torch.equal(ref, out)
    assert_unchanged(inputs, before)


def test_batch_rows_equal_rows_alone(family):
    tiny = tiny_model(family)
    method = GIFT(alpha=5.0, content_words="rule")
    assert_batch_rows_equal_rows_alone(tiny, tiny.inputs(QUESTIONS), [method], tokenizer=tiny.processor)


def test_only_last_row_of_fusion_layers_changes():
    """Attention outputs: every row but the last and every layer outside the fusion band equal plain SDPA."""
    tiny = tiny_model("llava", **SHAPE)
    inputs = tiny.inputs(QUESTIONS)
    seen: dict[int, tuple[bool, bool]] = {}

    def compare(call):
        if call.query.shape[2] == 1:
            return None
        key = call.key.repeat_interleave(call.query.shape[1] // call.key.shape[1], dim=1)
        value = call.value.repeat_interleave(call.query.shape[1] // call.value.shape[1], dim=1)
        plain = torch.nn.functional.scaled_dot_product_attention(
            call.query, key, value, attn_mask=call.attention_mask, scale=call.scaling
        ).transpose(1, 2)
        others_same = torch.allclose(call.output[:, :-1], plain[:, :-1], atol=1e-6, equal_nan=True)
        last_same = torch.allclose(call.output[:, -1], plain[:, -1], atol=1e-6, equal_nan=True)
        seen[call.layer_idx] = (others_same, last_same)
        return None

    with vlmfix.apply(
        tiny.model,
        GIFT(alpha=5.0, saliency_layers=[1], fusion_layers=[2, 3], content_words="rule"),
        tokenizer=tiny.processor,
    ) as session:
        with session.observing(compare):
            tiny.model.generate(**inputs, max_new_tokens=1)
    assert seen == {0: (True, True), 1: (True, True), 2: (True, False), 3: (True, False), 4: (True, True)}


def test_saliency_pass_stops_after_its_layer():
    tiny = tiny_model("llava", **SHAPE)
    inputs = tiny.inputs(QUESTIONS)
    adapter = vlmfix.get_adapter(tiny.model)
    calls = {layer: 0 for layer in range(5)}
    hooks = [
        adapter.decoder_layers[layer].register_forward_pre_hook(
            lambda m, a, layer=layer: calls.__setitem__(layer, calls[layer] + 1)
        )
        for layer in range(5)
    ]
    try:
        vlmfix.generate(
            tiny.model,
            **inputs,
            methods=[GIFT(saliency_layers=[1], fusion_layers=[2], content_words="rule")],
            tokenizer=tiny.processor,
            max_new_tokens=1,
        )
    finally:
        for h in hooks:
            h.remove()
    assert calls == {0: 2, 1: 2, 2: 1, 3: 1, 4: 1}  # saliency pass up to layer 1, then the real prefill
    assert not getattr(tiny.model.config, "output_attentions", False)


def test_no_content_word_leaves_row_unedited_with_warning():
    tiny = tiny_model("llava")
    questions = ["is it there ?", "is there a dog on the table ?"]
    inputs = tiny.inputs(questions)
    method = GIFT(alpha=5.0, content_words="rule")
    with pytest.warns(UserWarning, match=r"unedited: no content word in the instruction 'is it there \?'"):
        with vlmfix.apply(tiny.model, method, tokenizer=tiny.processor) as session:
            out = tiny.model.generate(
                **inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True
            )
    rows = session.report()["gift"]["rows"]
    assert (
        rows[0]["edited"] is False and "no content word" in rows[0]["skipped"] and rows[0]["saliency"] == []
    )
    assert rows[1]["edited"] is True
    plain = tiny.model(**inputs).logits[:, -1]
    torch.testing.assert_close(out.logits[0][0], plain[0], atol=1e-6, rtol=1e-6)  # row 0: exactly unedited
    # every row without content: no edit at all, tokens identical to greedy
    only = tiny.inputs(["is it there ?"])
    with pytest.warns(UserWarning, match="no content word"):
        got = vlmfix.generate(
            tiny.model, **only, methods=[method], tokenizer=tiny.processor, max_new_tokens=5, do_sample=False
        )
    assert torch.equal(got, tiny.model.generate(**only, max_new_tokens=5, do_sample=False))


def test_flat_map_is_reported(monkeypatch):
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["describe this image ."])
    # a saliency pass that sees no shift at all: every image column gets the same probability increment
    method = GIFT(alpha=5.0, content_words="rule")
    monkeypatch.setattr(
        GIFT,
        "_gaze_shifts",
        lambda self, session, rows, layers: [{layers[0]: torch.zeros(4, len(rows[0].content_positions), 16)}],
    )
    with pytest.warns(UserWarning, match="flat saliency map"):
        with vlmfix.apply(tiny.model, method, tokenizer=tiny.processor) as session:
            tiny.model.generate(**inputs, max_new_tokens=1)
    assert session.report()["gift"]["rows"][0]["skipped"].startswith("flat saliency map")


def test_custom_system_prompt_gives_same_query():
    tiny = tiny_model("llava")
    plain = tiny.inputs(["is there a dog on the table ?"])
    prompt = "the assistant is a small model . " + tiny.prompt("is there a dog on the table ?")
    custom = dict(tiny.processor(text=[prompt], images=[random_image(48, 0)], return_tensors="pt"))
    reports = []
    for inputs in (plain, custom):
        with vlmfix.apply(tiny.model, GIFT(content_words="rule"), tokenizer=tiny.processor) as session:
            tiny.model.generate(**inputs, max_new_tokens=1)
        row = session.report()["gift"]["rows"][0]
        ids = inputs["input_ids"][0]
        reports.append(
            (tiny.tokenizer.convert_ids_to_tokens(ids[row["query_positions"]].tolist()), row["content_words"])
        )
    assert (
        reports[0] == reports[1] == (["is", "there", "a", "dog", "on", "the", "table", "?"], ["dog", "table"])
    )


def test_empty_query_raises():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["what"])
    with pytest.raises(vlmfix.SpanError, match="GIFT needs a text query after the image"):
        vlmfix.generate(
            tiny.model,
            **inputs,
            methods=[GIFT()],
            tokenizer=tiny.processor,
            spans={"instruction": [[]]},
            max_new_tokens=1,
        )


def test_missing_spacy_raises_documented_error(monkeypatch):
    from vlmfix.methods import content_words as _content_words

    _content_words._spacy_pipeline.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    try:
        with pytest.raises(
            ImportError, match=r"pip install spacy && python -m spacy download en_core_web_sm"
        ):
            GIFT(content_words="spacy")
        # "pos" falls back to the rule, and says so
        tiny = tiny_model("llava")
        with vlmfix.apply(tiny.model, GIFT(), tokenizer=tiny.processor) as session:
            tiny.model.generate(**tiny.inputs(["is there a dog on the table ?"]), max_new_tokens=1)
        assert session.report()["gift"]["tagger"] == "rule"
    finally:
        _content_words._spacy_pipeline.cache_clear()


def test_needs_tokenizer():
    tiny = tiny_model("llava")
    with pytest.raises(ValueError, match="gift need the tokenizer"):
        vlmfix.generate(tiny.model, **tiny.inputs(["what"]), methods=[GIFT()], max_new_tokens=1)


def test_content_word_rule_and_offsets():
    text = "How many dogs aren't on the red table? Describe 2 of them."
    words = [text[s:e] for s, e in rule_content_words(text)]
    assert words == ["many", "dogs", "red", "table", "Describe", "2"]
    tiny = tiny_model("llava")
    ids = tiny.tokenizer.encode("is there a dog ?", add_special_tokens=False)
    decoded, ranges = token_char_ranges(tiny.tokenizer, ids)
    assert [decoded[s:e].strip() for s, e in ranges] == ["is", "there", "a", "dog", "?"]
    callable_gift = GIFT(content_words=lambda text: [(text.index("table"), text.index("table") + 5)])
    with vlmfix.apply(tiny.model, callable_gift, tokenizer=tiny.processor) as session:
        tiny.model.generate(**tiny.inputs(["is there a dog on the table ?"]), max_new_tokens=1)
    assert session.report()["gift"]["rows"][0]["content_words"] == ["table"]
    assert session.report()["gift"]["tagger"] == "callable"


def test_defaults_per_model():
    class Fake:
        def __init__(self, family, layers, heads):
            self.family, self.num_layers, self.num_heads = family, layers, heads

    def values(family, layers, heads):
        d = gift_defaults(Fake(family, layers, heads))
        return d.saliency_layers, d.fusion_layers, d.alpha

    assert values("llava", 32, 32) == ((11,), tuple(range(12, 23)), 5.0)
    assert values("llava", 40, 40) == ((10,), tuple(range(14, 21)), 5.0)
    assert values("qwen2_vl", 28, 28) == ((14,), tuple(range(5, 19)), 4.0)
    assert values("llava", 16, 8) == ((6,), tuple(range(6, 12)), 5.0)  # depth rule: 11/32, 12/32 .. 22/32
    assert values("qwen2_vl", 14, 8) == ((7,), tuple(range(2, 10)), 4.0)  # 14/28, 5/28 .. 18/28
    assert "not published" in gift_defaults(Fake("llava", 16, 8)).source


def test_composes_with_pai_and_planned_edits():
    tiny = tiny_model("llava", **SHAPE)
    inputs = tiny.inputs(QUESTIONS)
    scale = PlannedEdits(lambda s, layer: [HeadScale(scale=torch.full((2, 4), 0.5))], layers=[0, 3])
    methods = [
        GIFT(saliency_layers=[1], fusion_layers=[2, 3], content_words="rule"),
        PAI(alpha=0.2, cfg=False),
        scale,
    ]
    with vlmfix.apply(tiny.model, *methods, tokenizer=tiny.processor) as session:
        tiny.model.generate(**inputs, max_new_tokens=3)
        kinds = {layer: [type(e).__name__ for e in session.edits_for(layer)] for layer in range(5)}
    assert kinds == {
        0: ["HeadScale"],
        1: [],
        2: ["FusionReweight", "KeyBias"],
        3: ["FusionReweight", "KeyBias", "HeadScale"],
        4: ["KeyBias"],
    }
    assert set(session.report()) == {"gift", "pai", "planned-edits-test"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=-1.0), r"`alpha` must be None or a finite number >= 0, got -1.0"),
        (dict(beta=0.0), r"`beta` must be a finite number > 0, got 0.0"),
        (dict(head_fraction=0.0), r"`head_fraction` must be a finite number in \(0, 1\], got 0.0"),
        (dict(ratio="mean"), r"`ratio` must be one of 'pooled', 'per_head', got 'mean'"),
        (dict(scale_query_tokens="some"), r"`scale_query_tokens` must be one of 'all', 'informative'"),
        (dict(content_words="nouns"),
         r"`content_words` must be one of 'pos', 'spacy', 'rule', 'all'.*Or pass a callable"),
        (dict(saliency_layers=[]), r"`saliency_layers` must be None or a non-empty list of 0-based layer indices"),
        (dict(fusion_layers=[-1]), r"`fusion_layers\[0\]` must be an int >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GIFT(**kwargs)


def test_layers_beyond_depth():
    tiny = tiny_model("llava")
    with pytest.raises(ValueError, match=r"`fusion_layers` holds \[9\], but the language model has 4 layers"):
        vlmfix.generate(
            tiny.model,
            **tiny.inputs(["what"]),
            methods=[GIFT(fusion_layers=[9])],
            tokenizer=tiny.processor,
            max_new_tokens=1,
        )
