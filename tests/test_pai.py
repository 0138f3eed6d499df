"""PAI against plain-PyTorch references: the z + alpha*|z| rule, the image-free refinement, batching."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import vlmfix
from vlmfix.decoding.edits import HeadScale, KeyBias, edited_attention
from vlmfix.decoding.pai import PAI

from .conftest import PlannedEdits, tiny_model

# ---------------------------------------------------------------------------------------------
# A slow reference forward, shared with test_gift.py and test_dual_stream.py: the model runs without
# cache on the whole sequence; in the chosen layers, every query row at a position >= `edit_from[b]`
# is recomputed here from the layer's own q/k/v projections (RoPE applied by hand, fp32 softmax) with
# its probabilities produced by `edit_row`, and fed to o_proj in place of the model's own row.
# A row recomputed this way is what an incremental decode would have produced for that row, because
# each generated token was once "the last row" of its own forward.

# edit_row(layer_idx, batch_row, z, allowed) -> probabilities; z: [heads, kv_len] scaled scores (no
# mask), allowed: [kv_len] bool (causal and padding); returns [heads, kv_len].
RowEdit = Callable[[int, int, Tensor, Tensor], Tensor]


def plain_softmax(z: Tensor, allowed: Tensor) -> Tensor:
    return torch.softmax(z.masked_fill(~allowed, -math.inf), dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_logits(model: Any, inputs: dict, layers: set[int], edit_row: RowEdit, edit_from: int) -> Tensor:
    """Logits [batch, seq, vocab] of one no-cache forward with the reference edit on rows >= edit_from."""
    adapter = vlmfix.get_adapter(model)
    captured: dict[int, dict[str, Any]] = {}
    handles = []
    padding = inputs["attention_mask"].bool()  # [batch, seq]

    def capture(layer_idx):
        def hook(module, args, kwargs):
            captured[layer_idx] = {
                "h": kwargs.get("hidden_states", args[0] if args else None),
                "pe": kwargs["position_embeddings"],
            }

        return hook

    def replace(layer_idx):
        attn = adapter.attn(layer_idx)

        def hook(module, args):
            x = args[0].clone()  # [batch, seq, heads * head_dim]
            h, (cos, sin) = captured[layer_idx]["h"], captured[layer_idx]["pe"]
            batch, seq, _ = h.shape
            hd = adapter.head_dim
            q = attn.q_proj(h).view(batch, seq, -1, hd).transpose(1, 2).float()
            k = attn.k_proj(h).view(batch, seq, -1, hd).transpose(1, 2).float()
            v = attn.v_proj(h).view(batch, seq, -1, hd).transpose(1, 2).float()
            cos, sin = cos[:, None].float(), sin[:, None].float()
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            heads = q.shape[1]
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
            for b in range(batch):
                for i in range(edit_from, seq):
                    allowed = padding[b].clone()
                    allowed[i + 1 :] = False
                    z = torch.einsum("hd,hjd->hj", q[b, :, i], k[b]) * hd**-0.5  # [heads, seq]
                    p = edit_row(layer_idx, b, z, allowed)
                    x[b, i] = torch.einsum("hj,hjd->hd", p, v[b]).reshape(-1).to(x.dtype)
            return (x,)

        return hook

    try:
        for layer_idx in layers:
            handles.append(
                adapter.attn(layer_idx).register_forward_pre_hook(capture(layer_idx), with_kwargs=True)
            )
            handles.append(adapter.o_proj(layer_idx).register_forward_pre_hook(replace(layer_idx)))
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def reference_greedy(
    model: Any, inputs: dict, layers: set[int], edit_row: RowEdit, steps: int, skip_first: bool = False
) -> tuple[Tensor, Tensor]:
    """Greedy decoding with the reference: (new tokens [batch, steps], logits [steps, batch, vocab]).

    Rows from the prompt's last one on are edited (from the first generated one with `skip_first`)."""
    current = {k: v for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    tokens, logits = [], []
    for _ in range(steps):
        step = reference_logits(model, current, layers, edit_row, prompt_len - 1 + int(skip_first))[:, -1]
        nxt = step.argmax(-1)
        tokens.append(nxt)
        logits.append(step)
        current["input_ids"] = torch.cat([current["input_ids"], nxt[:, None]], dim=1)
        current["attention_mask"] = torch.cat(
            [current["attention_mask"], torch.ones_like(nxt[:, None])], dim=1
        )
        if "mm_token_type_ids" in current:
            current["mm_token_type_ids"] = torch.cat(
                [current["mm_token_type_ids"], torch.zeros_like(nxt[:, None])], dim=1
            )
    return torch.stack(tokens, dim=1), torch.stack(logits)


def vlmfix_greedy(model: Any, inputs: dict, methods: list, steps: int, **kw: Any) -> tuple[Tensor, Tensor]:
    out = vlmfix.generate(
        model,
        **inputs,
        methods=methods,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kw,
    )
    prompt_len = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt_len:], torch.stack(out.logits)


def image_free_logits(model: Any, inputs: dict) -> Tensor:
    """Next-token logits [batch, vocab] of the same prompts without image tokens (and Qwen's vision
    start/end), re-left-padded, with plain attention: PAI's image-free stream, built by hand."""
    config = model.config
    drop = {
        config.image_token_id,
        getattr(config, "vision_start_token_id", -1),
        getattr(config, "vision_end_token_id", -1),
    }
    rows = [
        ids[(m == 1) & ~torch.isin(ids, torch.tensor(sorted(drop)))]
        for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])
    ]
    width = max(len(r) for r in rows)
    pad = model.generation_config.pad_token_id
    ids = torch.stack([torch.cat([r.new_full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack(
        [torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones_like(r)]) for r in rows]
    )
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if "mm_token_type_ids" in inputs:  # Qwen: text-only rows, M-RoPE positions from the mask
        kwargs["mm_token_type_ids"] = torch.zeros_like(ids)
    else:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**kwargs).logits[:, -1]


def refined_reference(positive: Tensor, negative: Tensor, gamma: float, cutoff: float = 0.1) -> Tensor:
    """The spec's rule written out: gamma * (log p_img - log p_noimg) + log p_noimg, -inf below the cutoff."""
    log_img, log_free = positive.log_softmax(-1), negative.log_softmax(-1)
    want = gamma * (log_img - log_free) + log_free
    want[log_img < math.log(cutoff) + log_img.max(-1, keepdim=True).values] = -math.inf
    return want


def grown(inputs: dict, tokens: Tensor) -> dict:
    """The prompt batch followed by `tokens` [batch, n] (mask and Qwen token types extended)."""
    out = {
        **inputs,
        "input_ids": torch.cat([inputs["input_ids"], tokens], 1),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1),
    }
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], 1)
    return out


def snapshot(inputs: dict) -> dict:
    return {k: v.clone() for k, v in inputs.items() if isinstance(v, Tensor)}


def assert_unchanged(inputs: dict, before: dict) -> None:
    for k, v in before.items():
        assert torch.equal(inputs[k], v), f"input {k} was modified in place"


def image_positions(tiny, inputs) -> Tensor:
    return inputs["input_ids"] == tiny.model.config.image_token_id  # [batch, seq]


QUESTIONS = ["describe this image .", "is there a dog on the table ?"]


# ---------------------------------------------------------------------------------------------
# the rule on hand-checkable numbers


def test_golden_boost_on_one_row():
    """z = [2, -1, 0.5, -3] with image keys 1 and 2, alpha 0.5: z' = [2, -0.5, 0.75, -3] (a negative
    logit moves up, by the factor 1 - alpha; a positive one by 1 + alpha)."""
    d = 4
    z = torch.tensor([2.0, -1.0, 0.5, -3.0])
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 4, d)
    k[0, 0, :, 0] = z * math.sqrt(d)  # scores q.k / sqrt(d) = z
    v = torch.eye(4)[None, None]  # output = the probabilities
    image = torch.tensor([[False, True, True, False]])
    edit = KeyBias(abs_gain=image[:, None].float() * 0.5, rows="last")
    out = edited_attention(q, k, v, None, None, [edit])[0, 0, 0]
    expected = torch.softmax(torch.tensor([2.0, -0.5, 0.75, -3.0]), dim=-1)
    torch.testing.assert_close(out, expected)
    # what PAI plans: the same gain on image keys only
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["what"])
    with vlmfix.apply(tiny.model, PAI(alpha=0.5, cfg=False)) as session:
        tiny.model(**inputs)
        planned = session.edits_for(2)[0].abs_gain
    assert torch.equal(planned, image_positions(tiny, inputs)[:, None].float() * 0.5)


def test_refinement_scores_golden_and_gamma_one():
    from vlmfix.decoding._boost import image_free_scores

    pos = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.05), math.log(0.05)]])
    neg = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.125), math.log(0.125)]])
    scores = image_free_scores(pos, neg, gamma=2.0, cutoff=0.1)
    # 2*(log .6 - log .25) + log .25, 2*(log .3 - log .5) + log .5; .05 < 0.1 * .6 -> -inf
    expected = torch.tensor(
        [
            [
                2 * math.log(0.6 / 0.25) + math.log(0.25),
                2 * math.log(0.3 / 0.5) + math.log(0.5),
                -math.inf,
                -math.inf,
            ]
        ]
    )
    torch.testing.assert_close(scores, expected)
    # gamma 1: exactly log p_img where plausible; the cutoff only removes tokens
    same = image_free_scores(pos, neg, gamma=1.0, cutoff=0.01)
    assert torch.equal(same, torch.log_softmax(pos, -1))
    cut = image_free_scores(pos, neg, gamma=1.0, cutoff=0.1)
    assert torch.equal(cut[:, :2], torch.log_softmax(pos, -1)[:, :2]) and cut[:, 2:].isinf().all()


# ---------------------------------------------------------------------------------------------
# on tiny models


def keys_of(mask: Tensor, kv_len: int) -> Tensor:
    """A prompt key set [seq] extended to kv_len keys (generated tokens belong to no set)."""
    return torch.cat([mask, mask.new_zeros(kv_len - mask.shape[0])])


def pai_row_edit(alpha: float, image: Tensor) -> RowEdit:
    """PAI's rule from the spec: z + alpha*|z| on image columns, then softmax."""

    def edit(layer_idx, b, z, allowed):
        boosted = keys_of(image[b], z.shape[-1])[None]
        return plain_softmax(torch.where(boosted, z + alpha * z.abs(), z), allowed)

    return edit


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pai_matches_reference_over_decode_steps(family):
    tiny = tiny_model(family, layers=5)
    inputs = tiny.inputs(QUESTIONS)
    assert (inputs["attention_mask"] == 0).any(), "the batch must exercise left padding"
    before = snapshot(inputs)
    alpha = 4.0  # large, so the edit moves the logits far beyond the comparison tolerance
    tokens, logits = vlmfix_greedy(tiny.model, inputs, [PAI(alpha=alpha, cfg=False)], steps=4)
    ref_tokens, ref_logits = reference_greedy(
        tiny.model, inputs, {2, 3, 4}, pai_row_edit(alpha, image_positions(tiny, inputs)), steps=4
    )
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    # and the edit really changes the logits (by far more than the tolerance)
    plain = tiny.model(**inputs).logits[:, -1]
    assert (logits[0] - plain).abs().max() > 2e-3
    assert_unchanged(inputs, before)


def test_alpha_zero_is_greedy(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    ref = tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    out = vlmfix.generate(
        tiny.model, **inputs, methods=[PAI(alpha=0.0, cfg=False)], max_new_tokens=6, do_sample=False
    )
    assert torch.equal(ref, out)
    assert_unchanged(inputs, before)


def test_batch_rows_equal_rows_alone(family):
    tiny = tiny_model(family)
    method = PAI(alpha=1.0, cfg=False)
    batch = tiny.inputs(QUESTIONS)
    assert (batch["attention_mask"] == 0).any()
    _, logits = vlmfix_greedy(tiny.model, batch, [method], steps=3)
    for i, q in enumerate(QUESTIONS):
        alone = tiny.inputs([q], seed=i)
        _, row_logits = vlmfix_greedy(tiny.model, alone, [method], steps=3)
        torch.testing.assert_close(logits[:, i], row_logits[:, 0], atol=1e-4, rtol=1e-4)


def test_skip_first_token_boost_leaves_first_step_alone():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    plain = tiny.model(**inputs).logits[:, -1]
    _, boosted = vlmfix_greedy(tiny.model, inputs, [PAI(alpha=4.0, cfg=False)], steps=3)
    _, skipped = vlmfix_greedy(
        tiny.model, inputs, [PAI(alpha=4.0, cfg=False, skip_first_token_boost=True)], steps=3
    )
    torch.testing.assert_close(skipped[0], plain, atol=1e-6, rtol=1e-6)
    assert (boosted[0] - plain).abs().max() > 2e-3  # the first token *is* boosted by default
    # later steps are boosted: a reference that edits generated rows only
    _, ref_logits = reference_greedy(
        tiny.model, inputs, {2, 3}, pai_row_edit(4.0, image_positions(tiny, inputs)), steps=3, skip_first=True
    )
    torch.testing.assert_close(skipped, ref_logits, atol=1e-5, rtol=1e-5)


def test_report_and_custom_layers():
    tiny = tiny_model("llava", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    with vlmfix.apply(tiny.model, PAI(alpha=0.3, layers=[1, 3], cfg=False)) as session:
        tiny.model.generate(**inputs, max_new_tokens=2)
        per_layer = {layer: session.edits_for(layer) for layer in range(5)}
    report = session.report()["pai"]
    assert report["layers"] == [1, 3]
    assert report["image_tokens"] == image_positions(tiny, inputs).sum(1).tolist()
    assert report["first_token_boosted"] is True and report["refinement"] is None
    assert [layer for layer, e in per_layer.items() if e] == [1, 3]


def test_composes_with_other_edits():
    tiny = tiny_model("llava", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    scale = PlannedEdits(lambda s, layer: [HeadScale(scale=torch.full((2, 4), 0.5))], layers=[1, 2])
    with vlmfix.apply(tiny.model, PAI(alpha=0.3, cfg=False), scale) as session:
        out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        kinds = {layer: [type(e).__name__ for e in session.edits_for(layer)] for layer in range(5)}
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert kinds == {0: [], 1: ["HeadScale"], 2: ["KeyBias", "HeadScale"], 3: ["KeyBias"], 4: ["KeyBias"]}


# ---------------------------------------------------------------------------------------------
# the image-free refinement (a batched second stream in the contrastive engine)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_refinement_matches_two_separate_streams(family):
    tiny = tiny_model(family, layers=5)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    alpha, gamma = 4.0, 1.6
    out = vlmfix.generate(
        tiny.model,
        **inputs,
        methods=[PAI(alpha=alpha, gamma=gamma)],
        tokenizer=tiny.processor,
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[:, prompt_len:]
    edit = pai_row_edit(alpha, image_positions(tiny, inputs))
    for step in range(3):
        current = grown(inputs, tokens[:, :step])
        positive = reference_logits(tiny.model, current, {2, 3, 4}, edit, prompt_len - 1)[:, -1]
        want = refined_reference(positive, image_free_logits(tiny.model, current), gamma)
        got = out.logits[step]
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got[~torch.isinf(want)], want[~torch.isinf(want)], atol=1e-4, rtol=1e-4)
        assert torch.equal(want.argmax(-1), tokens[:, step])
    assert_unchanged(inputs, before)


def test_gamma_one_scores_are_log_p_img_and_tokens_are_shared():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    seen: list[Tensor] = []
    handle = tiny.model.get_input_embeddings().register_forward_pre_hook(
        lambda m, args: seen.append(args[0].clone())
    )
    try:
        out = vlmfix.generate(
            tiny.model,
            **inputs,
            methods=[PAI(alpha=0.0, gamma=1.0)],
            tokenizer=tiny.processor,
            max_new_tokens=4,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    finally:
        handle.remove()
    plain = tiny.model.generate(
        **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    assert torch.equal(out.sequences, plain.sequences)  # alpha 0 and gamma 1: greedy tokens
    for got, logits in zip(out.logits, plain.logits):
        log_p = logits.log_softmax(-1)
        keep = log_p >= math.log(0.1) + log_p.max(-1, keepdim=True).values  # the cutoff only removes tokens
        torch.testing.assert_close(got[keep], log_p[keep], atol=1e-5, rtol=1e-5)
        assert got[~keep].isinf().all()
    decode = [ids for ids in seen if ids.shape[1] == 1]
    assert decode and all(
        ids.shape[0] == 4 and torch.equal(ids[:2], ids[2:]) for ids in decode
    )  # [B image; B free]


def test_refinement_batch_rows_equal_rows_alone():
    tiny = tiny_model("qwen2_vl")
    method = PAI(alpha=1.0, gamma=1.4)
    batch = tiny.inputs(QUESTIONS)
    _, logits = vlmfix_greedy(tiny.model, batch, [method], steps=3, tokenizer=tiny.processor)
    for i, q in enumerate(QUESTIONS):
        _, alone = vlmfix_greedy(
            tiny.model, tiny.inputs([q], seed=i), [method], steps=3, tokenizer=tiny.processor
        )
        finite = torch.isfinite(alone[:, 0])
        assert torch.equal(finite, torch.isfinite(logits[:, i]))
        torch.testing.assert_close(logits[:, i][finite], alone[:, 0][finite], atol=1e-4, rtol=1e-4)


def test_refinement_needs_the_engine_and_matching_streams():
    tiny = tiny_model("llava")
    with pytest.raises(vlmfix.SessionError, match="PAI is a contrastive method"):
        with vlmfix.apply(tiny.model, PAI()):
            tiny.model.generate(**tiny.inputs(["what"]), max_new_tokens=1)
    assert PAI().contrastive and not PAI(cfg=False).contrastive
    with pytest.raises(ValueError, match=r"must have the same shape \[batch, vocab\]"):
        PAI().combine(None, torch.zeros(2, 5), torch.zeros(4, 5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=-0.1), r"`alpha` must be a finite number >= 0, got -0.1"),
        (dict(gamma=0.5), r"`gamma` must be a finite number >= 1, got 0.5"),
        (dict(plausibility=0.0), r"`plausibility` must be in \(0, 1\], got 0.0"),
        (dict(layers=[2, 2]), r"`layers` must hold distinct non-negative layer indices"),
        (dict(layers="2-5"), r"`layers` must be a list of layer indices"),
        (dict(cfg="yes"), r"`cfg` must be True or False"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PAI(**kwargs)


def test_layer_out_of_range_names_the_model_depth():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["what"])
    with pytest.raises(ValueError, match=r"`layers` holds \[7\], but the language model has 4 layers"):
        vlmfix.generate(tiny.model, **inputs, methods=[PAI(layers=[1, 7], cfg=False)], max_new_tokens=1)
