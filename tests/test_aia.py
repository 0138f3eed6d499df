"""The AIA loss: golden values, the row-restricted mass against full eager attention maps, masks, gradients.

Every reference below is written from the spec (/work/shared/specs/aia.md) in plain PyTorch: the model
is run with attn_implementation="eager" and output_attentions=True (here only), and the intensity is read
off the full probability maps.
"""

from __future__ import annotations

import math

import pytest
import torch

import vlmfix
from vlmfix.decoding.edits import KeyBias
from vlmfix.errors import SessionError, UnknownNameError
from vlmfix.testing import build_tiny, random_image
from vlmfix.training.aia import (
    STAGE_PRESETS,
    AIALoss,
    AIARecord,
    IntensityCurve,
    LayerTargets,
    Stage,
    StageTable,
    answer_mask,
    huber,
    key_subset_mass,
    measure_intensity,
    resolve_targets,
    select_rows,
)

from .conftest import PlannedEdits, tiny_model

# (question, answer, image seed or None); the answer is appended to the chat prompt and labelled
SAMPLES = [
    ("is there a dog ?", "yes , a dog .", 0),
    ("describe this image .", "a red car near a tree", 1),
    ("what is this ?", "a cat", 2),
]
NO_IMAGE = ("what is this ?", "a cat", None)
NO_ANSWER = ("describe this image .", "", 3)


# ---------------------------------------------------------------------------------------------- helpers
def answer_batch(tiny, samples) -> tuple[dict, torch.Tensor]:
    """A left-padded processor batch of prompt + answer, and labels marking the answer tokens."""
    texts = [tiny.prompt(q, with_image=seed is not None) + " " + a for q, a, seed in samples]
    images = [random_image(48 + 16 * (seed % 2), seed) for _, _, seed in samples if seed is not None]
    kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
    if images:
        kwargs["images"] = images
    batch = dict(tiny.processor(**kwargs))
    labels = torch.full_like(batch["input_ids"], -100)
    for b, (_, answer, _) in enumerate(samples):
        n = len(tiny.tokenizer(" " + answer, add_special_tokens=False).input_ids) if answer else 0
        if n:
            labels[b, -n:] = batch["input_ids"][b, -n:]
    return batch, labels


def reference_intensity(eager_model, tiny, samples, dtype=torch.float64, rows=None) -> torch.Tensor:
    """[layers, batch] I[l, b] from full eager attention maps, each sample run alone (no padding).

    rows: optional per-sample answer positions (unpadded coordinates) instead of all answer tokens.
    """
    columns = []
    for b, sample in enumerate(samples):
        batch, labels = answer_batch(tiny, [sample])
        batch = as_dtype(batch, dtype)
        out = eager_model(**batch, output_attentions=True, use_cache=False)
        image = batch["input_ids"][0] == eager_model.config.image_token_id
        answer = labels[0] != -100
        if rows is not None:
            answer = torch.zeros_like(answer)
            answer[rows[b]] = True
        per_layer = []
        for probs in out.attentions:  # probs: [1, heads, seq, seq]
            if image.any() and answer.any():
                per_layer.append(
                    probs[0][:, answer][:, :, image].sum(-1).mean()
                )  # sum keys, mean rows, heads
            else:
                per_layer.append(probs.new_zeros(()))
        columns.append(torch.stack(per_layer))
    return torch.stack(columns, dim=1)


def reference_loss(
    intensity: torch.Tensor,
    mask: torch.Tensor,
    target: list[float],
    delta: list[float],
    normalize: str = "all",
) -> torch.Tensor:
    """Eq. 2 and the aggregation of spec Step 5, written out term by term."""
    layers, batch = intensity.shape
    total = intensity.new_zeros(())
    for layer in range(layers):
        for b in range(batch):
            if mask[b]:
                e = intensity[layer, b] - target[layer]
                d = delta[layer]
                total = total + (0.5 * e**2 if e.abs() <= d else d * (e.abs() - 0.5 * d))
    count = batch if normalize == "all" else int(mask.sum())
    return total / (layers * count)


def efficient(model, batch, labels, aia: AIALoss, **observe):
    with vlmfix.apply(model) as session, aia.observe(session, **observe) as record:
        out = model(**batch, labels=labels, use_cache=False)
    return out, record


def pair(family: str, dtype=torch.float64, **shape):
    """The same random weights under sdpa (the code under test) and eager (the reference)."""
    fast = build_tiny(family, attn_implementation="sdpa", **shape)
    slow = build_tiny(family, attn_implementation="eager", **shape)
    return fast, slow, fast.model.to(dtype), slow.model.to(dtype)


def as_dtype(batch: dict, dtype) -> dict:
    return {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- golden values
def golden_qk():
    """1 layer, 2 heads, 4 tokens, head_dim 1, scale 1.

    Head 0: q = 0 (uniform). Head 1: q = 1, k = log w with w = 1..4 (probabilities proportional to w).
    """
    query = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 4, 1).contiguous()
    key = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).view(1, 1, 4, 1).expand(1, 2, 4, 1).contiguous()
    image = torch.tensor([[False, True, True, False]])
    rows = torch.tensor([[2, 3]])
    return query, key, image, rows


def test_golden_mass_causal_without_mask():
    query, key, image, rows = golden_qk()
    mass = key_subset_mass(query, key, None, 1.0, rows, torch.ones_like(rows, dtype=torch.bool), image)
    # head 0, row 2 sees keys 0..2 uniformly: 2/3 on {1, 2}; row 3: 2/4. head 1: (2+3)/(1+2+3), (2+3)/10
    expected = torch.tensor([[[2 / 3, 1 / 2], [5 / 6, 1 / 2]]])
    torch.testing.assert_close(mass, expected)
    intensity = mass.mean(dim=1).mean(dim=1)
    torch.testing.assert_close(intensity, torch.tensor([0.625]))


def test_golden_mass_with_bool_additive_and_padding_masks():
    query, key, image, rows = golden_qk()
    valid = torch.ones_like(rows, dtype=torch.bool)
    causal = torch.ones(4, 4).tril().bool()
    padded = causal & torch.tensor([False, True, True, True])  # key 0 is padding
    bool_mask = padded.view(1, 1, 4, 4)
    additive = torch.zeros(1, 1, 4, 4).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    # without key 0: head 0 row 2 -> 2/2, row 3 -> 2/3; head 1 row 2 -> 5/5, row 3 -> 5/9
    expected = torch.tensor([[[1.0, 2 / 3], [1.0, 5 / 9]]])
    for mask in (bool_mask, additive, torch.tensor([[0, 1, 1, 1]])):  # 4-D bool, 4-D additive, 2-D padding
        mass = key_subset_mass(query, key, mask, 1.0, rows, valid, image)
        torch.testing.assert_close(mass, expected)


def test_golden_mass_invalid_rows_and_rows_before_the_image_are_zero_without_nan():
    query, key, _, rows = golden_qk()
    query.requires_grad_(True)
    image = torch.tensor([[False, False, False, True]])  # only key 3: rows 0..2 cannot see it
    rows = torch.tensor([[1, 3, 0]])
    valid = torch.tensor([[True, True, False]])
    mass = key_subset_mass(query, key, None, 1.0, rows, valid, image)
    assert mass[0, :, 0].eq(0).all() and mass[0, :, 2].eq(0).all()
    torch.testing.assert_close(mass[0, :, 1], torch.tensor([1 / 4, 4 / 10]))
    mass.sum().backward()
    assert torch.isfinite(query.grad).all()


def test_huber_matches_torch_on_both_sides_of_delta():
    errors = torch.tensor([-0.2, -0.05, -0.01, 0.0, 0.03, 0.05, 0.1, 0.7])
    for delta in (0.05, 0.2):
        ours = huber(errors, torch.full_like(errors, delta))
        torch.testing.assert_close(
            ours, torch.nn.HuberLoss(reduction="none", delta=delta)(errors, torch.zeros(8))
        )
    # literal: 0.5 * 0.03^2 inside, 0.05 * (0.1 - 0.025) outside
    torch.testing.assert_close(
        huber(torch.tensor([0.03, 0.1]), torch.tensor(0.05)), torch.tensor([0.00045, 0.00375])
    )


def test_aggregation_denominators_follow_d2():
    targets = LayerTargets(target=(0.1, 0.3), delta=(0.05, 0.05))
    record = AIARecord(
        targets=targets,
        intensity={0: torch.tensor([0.1, 0.9, 0.2]), 1: torch.tensor([0.3, 0.0, 0.35])},
        sample_mask=torch.tensor([True, False, True]),
    )
    # sample 2: layer 0 e = 0.1 > delta -> 0.05 * 0.075; layer 1 e = 0.05 -> 0.5 * 0.05^2. Sample 1 is masked.
    total = 0.00375 + 0.00125
    assert math.isclose(float(AIALoss(normalize="all").loss(record)), total / 6, rel_tol=1e-6)
    assert math.isclose(float(AIALoss(normalize="valid").loss(record)), total / 4, rel_tol=1e-6)
    assert AIALoss().terms(record)[:, 1].eq(0).all()


# ---------------------------------------------------------------------------------------------- targets
def r4_reference(layers: int) -> list[float]:
    """The spec's R4 table, written from its text: < ceil(L/3): 0.10; < ceil(2L/3): 0.15; else 0.30."""
    first, second = math.ceil(layers / 3), math.ceil(2 * layers / 3)
    return [0.10 if layer < first else 0.15 if layer < second else 0.30 for layer in range(layers)]


def test_rule_r4_reproduces_the_spec_tables():
    expected = {  # spec §4: LLaVA-1.5-7B / 13B, Qwen2-VL-7B, and Janus-Pro's 10 / 20 split
        32: [0.10] * 11 + [0.15] * 11 + [0.30] * 10,
        40: [0.10] * 14 + [0.15] * 13 + [0.30] * 13,
        28: [0.10] * 10 + [0.15] * 9 + [0.30] * 9,
        30: [0.10] * 10 + [0.15] * 10 + [0.30] * 10,
    }
    for layers, table in expected.items():
        resolved = resolve_targets("r4", layers)
        assert list(resolved.target) == table == r4_reference(layers)
        assert set(resolved.delta) == {0.05}
        assert resolved.rule == "R4"


def test_presets_follow_the_code_and_paper_boundaries():
    code = resolve_targets("janus_pro_und", 30)
    assert (
        code.target[9] == 0.10
        and code.target[10] == 0.15
        and code.target[20] == 0.15
        and code.target[21] == 0.30
    )
    paper = resolve_targets("janus_pro_und_paper", 32)
    assert (
        paper.target[19] == 0.15
        and paper.target[20] == 0.30
        and paper.target[29] == 0.30
        and paper.target[30] == 0.20
    )
    gen = resolve_targets("janus_pro_gen", 30)
    assert (gen.target[0], gen.delta[0], gen.delta[10], gen.target[25], gen.delta[25]) == (
        0.4,
        0.2,
        0.1,
        0.2,
        0.05,
    )
    with pytest.raises(UnknownNameError, match="Unknown AIA stage preset 'r5'. Available: emu3_gen"):
        resolve_targets("r5", 4)
    assert "r4" in STAGE_PRESETS


def test_custom_tables_and_their_errors():
    table = resolve_targets([(2, 0.2, 0.1), (None, 0.4, 0.05)], 5)
    assert table.target == (0.2, 0.2, 0.4, 0.4, 0.4) and table.delta == (0.1, 0.1, 0.05, 0.05, 0.05)
    with pytest.raises(ValueError, match=r"stages\[0\]: `target` must be a finite number in \[0, 1\], got 1.5; target "
                                         r"is an attention mass"):
        StageTable(((None, 1.5, 0.05),))
    with pytest.raises(ValueError, match=r"stages\[1\]: `delta` must be a finite number > 0, got 0.0"):
        StageTable(((2, 0.5, 0.1), (None, 0.5, 0.0)))
    with pytest.raises(ValueError, match=r"`stop` must be None or a finite number > 0, got '3' \(a str\)"):
        Stage("3", 0.5, 0.1)
    with pytest.raises(ValueError, match=r"`stages\[0\]` must be a list of 3 values \(stop, target, delta\), got "
                                         r"\[0.5, 0.1\]"):
        StageTable(([0.5, 0.1],))
    with pytest.raises(ValueError, match=r"`target\[1\]` must be a finite number in \[0, 1\], got -0.1"):
        LayerTargets((0.1, -0.1), (0.05, 0.05))
    with pytest.raises(ValueError, match="stops must be positive and increasing, got \\[4.0, 2.0, None\\]"):
        StageTable(((4, 0.1, 0.05), (2, 0.2, 0.05), (None, 0.3, 0.05)))
    with pytest.raises(ValueError, match="ends at layer 3 but the model has 5 layers"):
        resolve_targets([(3, 0.2, 0.1)], 5)
    with pytest.raises(ValueError, match="per-layer AIA targets have 2 layers but the model has 4"):
        resolve_targets(LayerTargets((0.1, 0.2), (0.05, 0.05)), 4)


def test_curve_stages_bin_by_relative_depth():
    curve = IntensityCurve(mean=torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), std=torch.zeros(6), samples=10)
    table = curve.stages(3, delta=0.02)
    assert [s.target for s in table.stages] == [0.15, 0.35, 0.55]
    # a 9-layer student gets the same thirds
    assert resolve_targets(table, 9).target == (0.15,) * 3 + (0.35,) * 3 + (0.55,) * 3
    assert resolve_targets(table, 9).delta == (0.02,) * 9
    with pytest.raises(ValueError, match=r"`num_stages` must be an int in \[1, 6\], got 7"):
        curve.stages(7)


def test_loss_argument_errors():
    with pytest.raises(ValueError, match="`lambda_` must be a finite number >= 0, got -1; lambda_ is the weight"):
        AIALoss(lambda_=-1)
    with pytest.raises(ValueError, match=r"`lambda_` must be a finite number >= 0, got '10' \(a str\)"):
        AIALoss(lambda_="10")
    with pytest.raises(ValueError, match="`normalize` must be one of 'all', 'valid', got 'mean'"):
        AIALoss(normalize="mean")
    with pytest.raises(ValueError, match="`answer_rows` must be one of 'all_turns', 'last_turn', got 'first_turn'"):
        AIALoss(answer_rows="first_turn")
    with pytest.raises(ValueError, match="`aia_rows` must be None or an int >= 1, got 0"):
        AIALoss(aia_rows=0)
    with pytest.raises(ValueError, match=r"`aia_rows` must be None or an int >= 1, got '64' \(a str\)"):
        AIALoss(aia_rows="64")
    with pytest.raises(UnknownNameError, match="Unknown AIA stage preset"):
        AIALoss(targets="janus")


# ---------------------------------------------------------------------------------------------- rows
def test_answer_rows_all_turns_and_last_turn():
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, 8, -100], [-100, -100, 3, 4, 5, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 1]])
    assert answer_mask(labels, mask).int().tolist() == [[0, 1, 1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
    assert answer_mask(labels, mask, "last_turn").int().tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1, 0, 0, 0],
    ]


def test_row_subsampling_keeps_a_subset_of_answer_rows():
    answers = torch.zeros(2, 10, dtype=torch.bool)
    answers[0, 2:9] = True
    answers[1, 5:7] = True
    index, valid = select_rows(answers, 3, torch.Generator().manual_seed(0))
    assert valid.sum(1).tolist() == [3, 2]
    picked = index[0][valid[0]].tolist()
    assert len(set(picked)) == 3 and all(2 <= p < 9 for p in picked) and picked == sorted(picked)
    assert index[1][valid[1]].tolist() == [5, 6]
    # every answer row is drawn about equally often (uniform subsets, so the subset mean is unbiased)
    counts = torch.zeros(10)
    generator = torch.Generator().manual_seed(1)
    for _ in range(700):
        i, v = select_rows(answers[:1], 3, generator)
        counts[i[0][v[0]]] += 1
    assert counts[2:9].min() > 220 and counts[2:9].max() < 380  # expectation 300 each


# ---------------------------------------------------------------------------------------------- vs eager maps
@pytest.mark.parametrize(
    ("family", "kv_heads"), [("llava", 2), ("qwen2_vl", 4), ("llava_next", 2)]
)  # GQA, MHA
def test_loss_and_gradients_equal_the_eager_reference(family, kv_heads):
    """MHA and GQA, left padding, all answer rows: value and every parameter gradient (float64)."""
    fast, slow, model, ref_model = pair(family, kv_heads=kv_heads)
    batch, labels = answer_batch(fast, SAMPLES)
    batch = as_dtype(batch, torch.float64)
    assert batch["attention_mask"].eq(0).any()  # left padding is exercised
    before = {k: v.clone() for k, v in batch.items()}
    aia = AIALoss(targets="r4")
    out, record = efficient(model, batch, labels, aia)
    loss = aia.loss(record)
    loss.backward()

    intensity = reference_intensity(ref_model, fast, SAMPLES)
    torch.testing.assert_close(record.stacked(), intensity, atol=1e-7, rtol=1e-6)  # RoPE runs in fp32
    layers = intensity.shape[0]
    target = resolve_targets("r4", layers)
    ref = reference_loss(
        intensity, torch.ones(len(SAMPLES), dtype=torch.bool), list(target.target), list(target.delta)
    )
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-9, rtol=1e-6)
    compared = 0
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        if q.grad is None or q.grad.abs().max() == 0:
            assert p.grad is None or p.grad.abs().max() < 1e-12, name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-8, rtol=1e-5, msg=name)
        compared += 1
    assert compared > 4 * layers  # q/k of every layer and everything before them
    for k, v in batch.items():  # inputs were not modified in place
        assert torch.equal(v, before[k]), k


def test_gradcheck_float64_mha_gqa_left_padding():
    torch.manual_seed(0)
    batch, heads, kv_heads, seq, dim = 2, 2, 1, 6, 2
    query = torch.randn(batch, heads, seq, dim, dtype=torch.float64, requires_grad=True)
    key = torch.randn(batch, kv_heads, seq, dim, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()
    mask = (torch.ones(seq, seq).tril().bool()[None] & valid[:, None, :])[:, None]  # [batch, 1, seq, seq]
    image = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]]).bool()
    rows = torch.tensor([[4, 5, 0], [3, 4, 5]])
    row_valid = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    for heads_kv, m in ((kv_heads, mask), (heads, None)):  # GQA with left padding; MHA, causal
        k = key if heads_kv == kv_heads else key.repeat_interleave(heads, dim=1).detach().requires_grad_(True)

        def fn(q, kk, m=m):
            return key_subset_mass(q, kk, m, 0.7, rows, row_valid, image)

        assert torch.autograd.gradcheck(fn, (query, k))


def test_masked_samples_contribute_nothing():
    fast, _, model, _ = pair("llava", dtype=torch.float32)
    samples = [SAMPLES[0], NO_IMAGE, NO_ANSWER]
    batch, labels = answer_batch(fast, samples)
    assert labels[2].eq(-100).all()  # no answer
    aia = AIALoss(targets="r4")
    _, record = efficient(model, batch, labels, aia)
    assert record.sample_mask.tolist() == [True, False, False]
    loss = aia.loss(record)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    alone_batch, alone_labels = answer_batch(fast, samples[:1])
    _, alone = efficient(model, alone_batch, alone_labels, aia)
    alone_loss = aia.loss(alone)
    torch.testing.assert_close(
        loss, alone_loss / 3, rtol=1e-5, atol=1e-8
    )  # masked samples stay in the denominator
    valid_loss = AIALoss(targets="r4", normalize="valid").loss(record)
    torch.testing.assert_close(valid_loss, alone_loss, rtol=1e-5, atol=1e-8)
    (alone_loss / 3).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(grads[name]).all(), name
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-8, msg=name)
    # a caller's sample_mask (e.g. truncated rows) removes a sample the same way
    model.zero_grad(set_to_none=True)
    two, two_labels = answer_batch(fast, [SAMPLES[0], SAMPLES[1]])
    _, masked = efficient(model, two, two_labels, aia, sample_mask=torch.tensor([True, False]))
    torch.testing.assert_close(aia.loss(masked), alone_loss / 2, rtol=1e-5, atol=1e-8)


def test_last_layer_term_reaches_only_q_and_k_of_that_layer():
    fast, _, model, _ = pair("llava", dtype=torch.float32, layers=3)
    batch, labels = answer_batch(fast, SAMPLES)
    aia = AIALoss(targets="r4")
    _, record = efficient(model, batch, labels, aia)
    aia.terms(record)[-1].sum().backward()
    last = model.model.language_model.layers[-1]

    def grad_size(module) -> float:
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert grad_size(last.self_attn.v_proj) == 0 and grad_size(last.self_attn.o_proj) == 0
    assert grad_size(last.mlp) == 0 and grad_size(last.post_attention_layernorm) == 0
    assert grad_size(model.lm_head) == 0
    assert grad_size(last.self_attn.q_proj) > 0 and grad_size(last.self_attn.k_proj) > 0
    # through the residual stream, earlier layers' V/O and MLP do get gradient (spec §2)
    first = model.model.language_model.layers[0]
    assert grad_size(first.self_attn.v_proj) > 0 and grad_size(first.mlp) > 0
    # the whole loss gives the last layer's V/O/MLP nothing either
    model.zero_grad(set_to_none=True)
    _, record = efficient(model, batch, labels, aia)
    aia.loss(record).backward()
    assert grad_size(last.self_attn.v_proj) == grad_size(last.self_attn.o_proj) == grad_size(last.mlp) == 0


def test_observer_leaves_the_forward_unchanged():
    tiny = tiny_model("qwen2_vl")
    batch, labels = answer_batch(tiny, SAMPLES)
    with torch.no_grad():
        plain = tiny.model(**batch, labels=labels, use_cache=False)
        out, record = efficient(tiny.model, batch, labels, AIALoss())
    assert torch.equal(plain.logits, out.logits) and torch.equal(plain.loss, out.loss)
    assert record.stacked().shape == (4, 3)


def test_composes_with_an_attention_edit():
    tiny = tiny_model("llava")
    batch, labels = answer_batch(tiny, SAMPLES)
    bias = PlannedEdits(lambda s, layer: [KeyBias(bias=s.spans.image[:, None].float() * 2.0)], layers=[2])
    aia = AIALoss()
    with torch.no_grad():
        with vlmfix.apply(tiny.model, bias) as session:
            edited_only = tiny.model(**batch, use_cache=False)
        with vlmfix.apply(tiny.model, bias) as session, aia.observe(session, labels=labels) as record:
            edited = tiny.model(**batch, use_cache=False)
        _, plain = efficient(tiny.model, batch, labels, aia)
    assert torch.equal(edited.logits, edited_only.logits)
    ours, ref = record.stacked(), plain.stacked()
    # layers 0-2 see the same queries and keys (the edit changes layer 2's probabilities, not its q/k)
    torch.testing.assert_close(ours[:3], ref[:3])
    assert not torch.allclose(ours[3], ref[3])


def test_row_subsampling_matches_the_reference_on_the_chosen_rows():
    fast, slow, model, ref_model = pair("llava", dtype=torch.float64)
    batch, labels = answer_batch(fast, SAMPLES)
    batch = as_dtype(batch, torch.float64)
    aia = AIALoss(aia_rows=2)
    _, record = efficient(model, batch, labels, aia, generator=torch.Generator().manual_seed(3))
    assert record.rows.tolist() == [2, 2, 2]
    chosen = []
    for b in range(labels.shape[0]):
        rows = record.row_index[b][record.row_valid[b]]
        assert labels[b, rows].ne(-100).all()
        chosen.append((rows - batch["attention_mask"][b].eq(0).sum()).tolist())  # unpadded positions
    ref = reference_intensity(ref_model, fast, SAMPLES, rows=chosen)
    torch.testing.assert_close(record.stacked(), ref, atol=1e-7, rtol=1e-6)


def test_one_forward_per_observe_block_and_labels_needed():
    tiny = tiny_model("llava")
    batch, labels = answer_batch(tiny, SAMPLES[:2])
    aia = AIALoss()
    with torch.no_grad(), vlmfix.apply(tiny.model) as session:
        with pytest.raises(SessionError, match="second forward inside one `observe` block"):
            with aia.observe(session) as record:
                tiny.model(**batch, labels=labels, use_cache=False)
                tiny.model(**batch, labels=labels, use_cache=False)
        with pytest.raises(ValueError, match="AIA needs `labels`"):
            with aia.observe(session):
                tiny.model(**batch, use_cache=False)
        with pytest.raises(ValueError, match=r"labels must match input_ids"):
            with aia.observe(session, labels=labels[:, 1:]):
                tiny.model(**batch, use_cache=False)
        with aia.observe(session) as record:
            pass
        with pytest.raises(SessionError, match="no intensity for layers \\[0, 1, 2, 3\\]"):
            aia.loss(record)
        assert not session.observed  # each block removes its observer


def test_measure_intensity_equals_the_reference_average():
    fast, slow, model, ref_model = pair("qwen2_vl", dtype=torch.float64)
    first, first_labels = answer_batch(fast, SAMPLES[:2])
    second, second_labels = answer_batch(fast, [SAMPLES[2], NO_IMAGE])
    batches = [
        as_dtype({**first, "labels": first_labels}, torch.float64),
        as_dtype({**second, "labels": second_labels}, torch.float64),
    ]
    curve = measure_intensity(model, batches)
    with torch.no_grad():
        ref = reference_intensity(ref_model, fast, SAMPLES)  # the image-less sample is not scored
    assert curve.samples == 3
    torch.testing.assert_close(curve.mean.double(), ref.mean(dim=1))
    torch.testing.assert_close(curve.std.double(), ref.std(dim=1))
    assert not model.training
    with pytest.raises(ValueError, match="scored no sample"):
        measure_intensity(
            model, [as_dtype({**second, "labels": torch.full_like(second_labels, -100)}, torch.float64)]
        )
