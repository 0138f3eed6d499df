"""MiniMax M3 beyond the conformance suite (tests/test_conformance.py runs it in the torchvision lane, on rows of one
length): why vlmfix runs it on unpadded batches only, the refusal of a padded batch, and the block selection that
vlmfix's attention merges into the mask. These build the model without its processor (no torchvision needed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.decoding.attention import with_selected_blocks
from vlmfix.decoding.edits import KeyBias, Reweight

from .conftest import PlannedEdits

BLOCK = 2  # keys per block


def tiny_minimax_m3(layer_type: str = "minimax_m3_sparse", topk_blocks: int = 2, kv_groups: int = 1) -> nn.Module:
    """A 2-layer MiniMax M3 (dense MLPs, blocks of 2 keys) whose layers are all `layer_type`, with `kv_groups`
    key-value heads and as many indexer heads (one block selection per group), without a processor."""
    from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=32, dense_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=kv_groups, head_dim=16, rotary_dim=8,
                mlp_layer_types=["dense"] * 2, layer_types=[layer_type] * 2, index_n_heads=kv_groups, index_head_dim=8,
                index_block_size=BLOCK, index_topk_blocks=topk_blocks, index_local_blocks=1, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=2,
                  image_size=8)
    config = MiniMaxM3VLConfig(text_config=text, vision_config=vision, image_token_index=60, video_token_index=61)
    return MiniMaxM3SparseForConditionalGeneration(config).eval()


GREEDY = dict(max_new_tokens=3, do_sample=False, output_logits=True, output_scores=True, return_dict_in_generate=True,
              pad_token_id=0)


def padded_row_gap(model: nn.Module, pad: int = 5) -> float:
    """Largest logit gap, over 3 greedy steps of plain generate, between a row left-padded by `pad` tokens in a
    batch and the same row decoded alone."""
    generator = torch.Generator().manual_seed(1)
    row = torch.randint(3, 50, (1, 9), generator=generator)
    longer = torch.randint(3, 50, (1, 9 + pad), generator=generator)
    input_ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), row], 1), longer])  # [2, 9 + pad]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :pad] = 0
    alone = model.generate(row, attention_mask=torch.ones_like(row), **GREEDY).logits  # 3 x [1, vocab]
    batched = model.generate(input_ids, attention_mask=attention_mask, **GREEDY).logits  # 3 x [2, vocab]
    return max((a[0] - b[0]).abs().max().item() for a, b in zip(alone, batched))


def test_minimax_m3_runs_unpadded_only_while_a_left_padded_row_differs_from_the_row_alone():
    """vlmfix runs MiniMax M3 on unpadded batches only because transformers' own generate gives a left-padded row
    other logits than the row alone (its lightning indexer compares key slots with content positions). Once a
    transformers release fixes it, this fails: drop the rule (`Adapter.left_padding_changes_rows`) and let the
    conformance suite check MiniMax M3 on padded batches like every other family."""
    full = tiny_minimax_m3("full_attention", topk_blocks=64)
    # the same build with full attention keeps the padded row: the padding and positions here are right
    assert padded_row_gap(full) < 1e-5 and not get_adapter(full).left_padding_changes_rows
    top_2 = tiny_minimax_m3(topk_blocks=2)
    gaps = padded_row_gap(top_2), padded_row_gap(tiny_minimax_m3(topk_blocks=64))  # top 2 blocks, every block
    assert min(gaps) > 1e-2, (
        f"a left-padded row of MiniMax M3 now matches the row alone (gaps {gaps[0]:.2g}, {gaps[1]:.2g}): "
        "transformers fixed its indexer under left padding, so drop Adapter.left_padding_changes_rows")
    assert get_adapter(top_2).left_padding_changes_rows


def test_a_left_padded_batch_is_refused_before_any_forward():
    model = tiny_minimax_m3()
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    attention_mask = (input_ids != 0).long()
    attention_mask[1] = 1
    calls: list[int] = []
    handle = get_adapter(model).language_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(vlmfix.PaddedBatchError, match=r"runs minimax_m3_vl on unpadded batches only, and "
                                                          r"rows \[0\] of this prefill are left-padded: .*"
                                                          r"modeling_minimax_m3_vl.py:524.*"
                                                          r"Decode one prompt a call \(batch size 1\) or batch "
                                                          r"prompts of one token length\.") as refused:
            vlmfix.generate(model, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=1)
        assert not refused.value.by_engine
        with pytest.raises(vlmfix.UnsupportedModelError, match="unpadded batches only"), vlmfix.apply(model):
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=1)
    finally:
        handle.remove()
    assert calls == []
    assert issubclass(vlmfix.PaddedBatchError, vlmfix.UnsupportedModelError)  # callers' except clauses still catch it


@pytest.mark.parametrize("mask", ["none", "ones"])
def test_padding_only_the_two_stream_engine_added_is_named_as_such(mask):
    """ICD's disturbed instruction is longer than the prompt, so its engine left-pads the caller's one prompt: the
    refusal blames the method, with or without a caller mask, never the caller's batch ("batch size 1")."""
    model = tiny_minimax_m3()
    input_ids = torch.randint(3, 50, (1, 12), generator=torch.Generator().manual_seed(6))
    masks = {"none": {}, "ones": {"attention_mask": torch.ones_like(input_ids)}}
    spans = {"image": [[2, 3, 4, 5, 6]], "instruction": [[8, 9, 10]]}
    with pytest.raises(vlmfix.PaddedBatchError, match=r"left-padded by a two-stream method \(its second prompt is "
                                                      r"longer than the first\).*use a method whose second prompt "
                                                      r"has the first's length") as refused:
        with vlmfix.apply(model, vlmfix.ICD(), spans=spans, tokenizer=WordTokenizer()) as session:
            session.generate(input_ids=input_ids, max_new_tokens=1, do_sample=False, pad_token_id=0, **masks[mask])
    assert refused.value.by_engine and "batch size 1" not in str(refused.value)


def test_a_caller_padded_batch_is_the_callers_under_a_two_stream_method_too():
    model = tiny_minimax_m3()
    input_ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    spans = {"image": [[2, 3, 4, 5, 6]] * 2, "instruction": [[8, 9, 10]] * 2}
    with pytest.raises(vlmfix.PaddedBatchError, match=r"batch size 1") as refused:
        with vlmfix.apply(model, vlmfix.ICD(), spans=spans, tokenizer=WordTokenizer()) as session:
            session.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=1, do_sample=False,
                             pad_token_id=0)
    assert not refused.value.by_engine


def test_an_unpadded_batch_is_bit_identical_to_plain_generate():
    """Under vlmfix's attention name the sparse layers pass their block selection unmerged; vlmfix merges it as
    the model does under sdpa (without it every query would attend to every key: 0.36 off in the scores)."""
    model = tiny_minimax_m3()
    input_ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    reference = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **GREEDY)
    out = vlmfix.generate(model, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **GREEDY)
    assert torch.equal(reference.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(reference.scores, out.scores))


def reference_block_mask(block_indices: torch.Tensor, valid: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, heads, q_len, kv_len] bool, key by key: a query keeps a key when the key's block is one of its index
    head's selected blocks (-1: an unused slot) and `valid` ([batch, q_len, kv_len] bool) allows it."""
    batch, index_heads, q_len, _ = block_indices.shape
    kv_len = valid.shape[-1]
    keep = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            chosen = block_indices[b, h // (heads // index_heads)]  # [q_len, top-k]
            for q in range(q_len):
                blocks = {int(i) for i in chosen[q] if i >= 0}
                for k in range(kv_len):
                    keep[b, h, q, k] = (k // BLOCK) in blocks and bool(valid[b, q, k])
    return keep


def test_the_merged_block_selection_keeps_each_querys_selected_blocks_only():
    model = tiny_minimax_m3()
    attention = get_adapter(model).decoder_layers[1].self_attn
    batch, q_len, kv_len = 2, 3, 7
    generator = torch.Generator().manual_seed(0)
    block_indices = torch.randint(-1, 4, (batch, 1, q_len, 2), generator=generator)  # blocks 0..3 of 7 keys, or -1
    valid = torch.rand(batch, q_len, kv_len, generator=generator) > 0.2
    additive = torch.zeros(batch, 1, q_len, kv_len).masked_fill(~valid.unsqueeze(1), torch.finfo(torch.float32).min)
    query, key = torch.zeros(batch, 2, q_len, 16), torch.zeros(batch, 1, kv_len, 16)
    merged = with_selected_blocks(attention, additive, block_indices, query, key, None)  # [batch, heads, q, kv]
    assert torch.equal(merged == 0, reference_block_mask(block_indices, valid, heads=2))


def test_an_edit_cannot_reach_a_key_outside_the_selected_blocks():
    """With top-1 blocks of 2 keys every query attends to its own block only (the newest, always kept). A key bias
    of 30 on every block but the last shifts all the keys a query attends to alike, so the scores stay; the same
    edit on the full-attention build (every query sees older blocks too) changes them, so the edit is live."""
    input_ids = torch.randint(3, 50, (1, 10), generator=torch.Generator().manual_seed(4))  # even: a block ends there
    step = dict(max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)

    def bias_older_blocks(session, layer_idx):
        bias = torch.full((1, 1, 10), 30.0)  # [batch, heads, keys]
        bias[..., -BLOCK:] = 0.0  # the last block (keys 8, 9)
        return [KeyBias(bias=bias)]

    gaps = []
    for model in (tiny_minimax_m3(topk_blocks=1), tiny_minimax_m3("full_attention")):
        plain = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **step)
        edited = vlmfix.generate(model, methods=[PlannedEdits(bias_older_blocks)], input_ids=input_ids,
                                 attention_mask=torch.ones_like(input_ids), **step)
        gaps.append((plain.scores[0] - edited.scores[0]).abs().max().item())
    assert gaps[0] < 1e-5 < 1e-2 < gaps[1]


@pytest.mark.parametrize("kernel", ["never", "always"])
def test_an_edited_layer_keeps_each_key_value_groups_own_block_selection(kernel):
    """With two key-value groups the indexer selects blocks per group, so the merged mask differs across heads. An
    edited layer (here edits that change nothing) must keep each head's own selection, in the PyTorch path and in
    the grouped decode kernel (which takes one mask per row, so it must leave a per-head mask to the PyTorch path):
    the scores stay plain generate's."""
    model = tiny_minimax_m3(topk_blocks=2, kv_groups=2)
    selections: list[torch.Tensor] = []
    indexer = get_adapter(model).decoder_layers[1].self_attn.indexer
    handle = indexer.register_forward_hook(lambda module, args, out: selections.append(out))
    input_ids = torch.randint(3, 50, (1, 12), generator=torch.Generator().manual_seed(5))
    step = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)

    def unchanged(session, layer_idx):  # [batch, heads, keys]: a multiplier of 1 and a bias of 0 on every key
        return [Reweight(multiplier=torch.ones(1, 1, 16)), KeyBias(bias=torch.zeros(1, 1, 16))]

    try:
        plain = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **step)
        edited = vlmfix.generate(model, methods=[PlannedEdits(unchanged)], input_ids=input_ids,
                                 attention_mask=torch.ones_like(input_ids), kernel=kernel, **step)
    finally:
        handle.remove()
    decode = selections[-1]  # [batch, index heads, 1, top-k] at the last decode step
    assert not torch.equal(decode[:, 0].sort(-1).values, decode[:, 1].sort(-1).values)  # the groups differ
    assert torch.equal(plain.sequences, edited.sequences)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain.scores, edited.scores))


def test_pai_records_its_image_gain_under_a_mask_per_head():
    """PAI's recorded image-attention gain reads the layer's mask, one per head here (two key-value groups whose
    block selections differ). The reference recomputes it in plain PyTorch from the observed queries and keys and
    the indexer's block selection, key by key: per head, softmax of the scores under that head's mask, boosted
    (z + alpha * |z| on image keys) over plain, 1 for a key the head's mask hides; averaged over heads, then over
    the boosted (layer, step) calls."""
    model = tiny_minimax_m3(kv_groups=2)
    batch, alpha = 2, 0.5
    input_ids = torch.randint(3, 50, (batch, 12), generator=torch.Generator().manual_seed(6))
    image = torch.tensor([2, 3, 4, 5, 6])
    spans = {"image": [image.tolist()] * batch, "instruction": [[8, 9, 10]] * batch}
    selections: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    handles = [get_adapter(model).decoder_layers[layer].self_attn.indexer.register_forward_hook(
        lambda module, args, out, layer=layer: selections[layer].append(out[:batch])) for layer in selections]
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor, float]]] = {0: [], 1: []}

    def capture(call):  # the positive stream's newest query row and keys, [batch, heads, 1 | kv_len, head_dim]
        calls[call.layer_idx].append((call.query[:batch, :, -1:].clone(), call.key[:batch].clone(), call.scaling))

    try:
        with vlmfix.apply(model, vlmfix.PAI(alpha=alpha, layers=[0, 1]), spans=spans, record=True) as session:
            with session.observing(capture):
                session.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=2,
                                 do_sample=False, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
    gains = []
    for layer in calls:
        assert len(calls[layer]) == len(selections[layer]) == 2  # the prefill and one decode step
        for (query, key, scaling), selected in zip(calls[layer], selections[layer]):
            heads, kv_len = query.shape[1], key.shape[2]
            newest = torch.ones(batch, 1, kv_len, dtype=torch.bool)  # the newest query sees every earlier key
            keep = reference_block_mask(selected[:, :, -1:], newest, heads)  # [batch, heads, 1, kv_len]
            z = query.float() @ key.float().repeat_interleave(heads // key.shape[1], dim=1).transpose(-1, -2) * scaling
            boosted = z.clone()
            boosted[..., image] += alpha * z[..., image].abs()
            plain_p = z.masked_fill(~keep, -math.inf).softmax(-1)
            boosted_p = boosted.masked_fill(~keep, -math.inf).softmax(-1)
            ratio = torch.where(keep, boosted_p / plain_p, torch.ones_like(plain_p))
            gains.append(ratio[:, :, 0, image].mean(dim=1))  # [batch, image tokens]
    keep_first = reference_block_mask(selections[1][0][:, :, -1:], torch.ones(batch, 1, 12, dtype=torch.bool), 2)
    assert not torch.equal(keep_first[:, 0], keep_first[:, 1])  # the heads' masks differ
    expected = torch.stack(gains).mean(dim=0)  # [batch, image tokens]
    report = torch.tensor(session.report()["pai"]["image_gain"], dtype=torch.float32)
    torch.testing.assert_close(report, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, torch.ones_like(expected))  # the boost is live

class WordTokenizer:
    """Token i reads " w{i}": enough for GIFT to read an instruction (no assistant marker, no frame tokens)."""

    unk_token, unk_token_id = "<unk>", None

    def encode(self, text: str, **_) -> list[int]:
        return [int(w[1:]) if w[1:].isdigit() else 63 for w in text.split()]

    def decode(self, ids, **_) -> str:
        return "".join(f" w{int(i)}" for i in ids)

    def convert_tokens_to_ids(self, token: str) -> None:
        return None


def test_gift_saliency_reads_each_heads_own_block_selection():
    """GIFT's gaze shifts on a sparse layer whose two key-value groups select other key blocks: each head's
    probabilities must use its own group's selection. The reference is the model's own eager attention (which
    merges the selection per head), with GIFT's Steps 3-5 in plain PyTorch; both heads are kept (head_fraction=1),
    so a saliency read through group 0's blocks for every head would differ."""
    model = tiny_minimax_m3(topk_blocks=2, kv_groups=2)
    input_ids = torch.randint(3, 50, (1, 16), generator=torch.Generator().manual_seed(7))
    image, instruction = torch.arange(1, 9), torch.arange(10, 15)
    spans = {"image": [image.tolist()], "instruction": [instruction.tolist()]}
    selections: list[torch.Tensor] = []
    indexer = get_adapter(model).decoder_layers[1].self_attn.indexer
    handle = indexer.register_forward_hook(lambda module, args, out: selections.append(out))
    gift = vlmfix.GIFT(saliency_layers=[1], fusion_layers=[1], content_words="all", head_fraction=1.0)
    try:
        with vlmfix.apply(model, gift, spans=spans, tokenizer=WordTokenizer(), record=True) as session:
            session.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1,
                             do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    prefill = selections[0]  # [batch, index heads, seq, top-k]: the saliency pass's selection
    assert not torch.equal(prefill[:, 0].sort(-1).values, prefill[:, 1].sort(-1).values)  # the groups differ

    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model.model.language_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                           output_attentions=True).attentions[1][0].float()  # [heads, seq, seq]
    shifts = (probs[:, instruction][:, :, image] - probs[:, instruction - 1][:, :, image]).clamp_min(0)  # [heads, c, N]
    s_raw = shifts.mean(dim=(0, 1))  # [N]: every head kept
    mu, sd = s_raw.mean(), s_raw.std()
    s_raw = s_raw.clamp(float(mu - 3 * sd), float(mu + 3 * sd))
    expected = (s_raw - s_raw.min()) / (s_raw.max() - s_raw.min())
    row = session.report()["gift"]["rows"][0]
    assert row["saliency_heads"] == {1: [0, 1]}
    torch.testing.assert_close(torch.tensor(row["saliency"]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [lambda: vlmfix.PAI(), lambda: vlmfix.M3ID()], ids=["pai", "m3id"])
def test_a_shorter_image_free_stream_is_refused_before_any_forward(method):
    """PAI's refinement and M3ID decode a second stream without the image tokens: stacked under the unpadded
    prompt it is left-padded, which the model's indexer does not keep as the row alone, so the engine refuses the
    call before the stacked prefill runs; PAI without its second stream runs."""
    model = tiny_minimax_m3()
    input_ids = torch.randint(3, 50, (1, 12), generator=torch.Generator().manual_seed(6))
    with_image = input_ids.clone()
    with_image[0, 2:7] = model.config.image_token_index  # the image-free stream drops these 5 tokens
    spans = {"image": [[2, 3, 4, 5, 6]], "instruction": [[8, 9, 10]]}
    calls: list[int] = []
    handle = get_adapter(model).language_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(vlmfix.PaddedBatchError, match=r"second stream has another length than the prompt .*"
                                                          r"left-pads rows \[1\].*PAI with cfg=False") as refused:
            with vlmfix.apply(model, method(), spans=spans, tokenizer=WordTokenizer()) as session:
                session.generate(input_ids=with_image, max_new_tokens=1, do_sample=False, pad_token_id=0)
        assert refused.value.by_engine and calls == []  # no forward ran (the stacked prefill was refused)
        # the same spans on a prompt without image placeholders (no pixels needed): one stream, unpadded
        one_stream = vlmfix.PAI(cfg=False, layers=[0, 1])  # its default layers (2 .. L-1) are none of these 2
        with vlmfix.apply(model, one_stream, spans=spans, tokenizer=WordTokenizer()) as session:
            session.generate(input_ids=input_ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        assert calls and any(session.report()["pai"]["applied"].values())
    finally:
        handle.remove()
