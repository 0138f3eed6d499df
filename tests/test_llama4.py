"""Llama 4 beyond the conformance suite (tests/test_conformance.py runs it in the torchvision lane): its parts on the
model itself, the tiled image block's tokens, and its chunked-attention layers (the tiny build's chunks: 8 tokens),
which PAI's boost cannot reach past and OPERA and SID refuse."""

from __future__ import annotations

import pytest
import torch

import vlmfix
from vlmfix.adapters import get_adapter

from .conftest import tiny_model

pytestmark = pytest.mark.torchvision

QUESTIONS = ["Describe this image in detail .", "is there a dog ?"]


def test_the_parts_sit_on_the_model_itself_and_the_tiled_image_block_is_image_or_frame():
    tiny = tiny_model("llama4")
    model, adapter = tiny.model, get_adapter(tiny.model)
    assert adapter.language_model is model.language_model.model  # looked through Llama4ForCausalLM
    assert adapter.vision_tower is model.vision_model and adapter.projector is model.multi_modal_projector
    assert adapter.image_token_ids == (model.config.image_token_index,)
    inputs = tiny.inputs(QUESTIONS)  # 48- and 64-pixel images: one 48-pixel tile, and 2 x 2 tiles with a global view
    ids = inputs["input_ids"]
    image = adapter.image_mask(ids)
    frame = adapter.frame_mask(ids, tiny.tokenizer)
    tokens = tiny.tokenizer.convert_tokens_to_ids
    for row in range(2):
        start = (ids[row] == tokens("<|image_start|>")).nonzero().item()
        end = (ids[row] == tokens("<|image_end|>")).nonzero().item()
        block = slice(start, end + 1)
        assert (image[row, block] ^ frame[row, block]).all(), "every token of the image block is image or frame"
        assert not image[row, :start].any() and not image[row, end + 1:].any()
    separators = torch.isin(ids, torch.tensor(tokens(["<|tile_x_separator|>", "<|tile_y_separator|>"])))
    assert not separators[0].any(), "the 48-pixel image is one tile"
    assert (ids[1] == tokens("<|tile_y_separator|>")).sum() == 2, "the 64-pixel image spans 2 x 2 tiles"
    assert image[1].sum() == 5 * image[0].sum(), "four tiles and the global view, each as many tokens as one tile"


def test_chunked_layers_count_as_windowed_so_opera_and_sid_refuse_them():
    tiny = tiny_model("llama4")
    config = tiny.model.config.text_config
    assert config.layer_types[:2] == ["chunked_attention", "full_attention"] and config.attention_chunk_size == 8
    assert get_adapter(tiny.model).has_sliding_window
    inputs = tiny.inputs(QUESTIONS)
    for method in (vlmfix.OPERA(), vlmfix.SID()):
        with pytest.raises(vlmfix.UnsupportedModelError, match=r"sliding-window \(or chunked\)"):
            with vlmfix.apply(tiny.model, method) as session:
                session.generate(**inputs, max_new_tokens=1)


def test_pai_cannot_reach_image_keys_outside_the_querys_chunk_but_boosts_them_on_a_nope_layer():
    """PAI's gain on each image key (boosted over plain attention) at the prefill's last query: on the chunked layer
    (0) every image key lies in an earlier chunk than that query (chunks counted from the row's first token, as
    transformers' chunked mask does under left padding), so its attention stays zero and its gain 1; on the
    full-attention NoPE layer (1) the same keys get the boost."""
    tiny = tiny_model("llama4")
    chunk = tiny.model.config.text_config.attention_chunk_size
    inputs = tiny.inputs(QUESTIONS)
    last = inputs["input_ids"].shape[1] - 1
    pads = (inputs["attention_mask"] == 0).sum(1)
    gains = {}
    for layer in (0, 1):
        with vlmfix.apply(tiny.model, vlmfix.PAI(0.5, layers=[layer], cfg=False), record=True) as session:
            session.generate(**inputs, max_new_tokens=1, do_sample=False)
        gains[layer] = session.report()["pai"]["image_gain"]
    for row in range(2):
        positions = (inputs["input_ids"][row] == tiny.model.config.image_token_index).nonzero().flatten()
        outside = (positions - pads[row]) // chunk != (last - pads[row]) // chunk
        assert outside.all(), "the image must lie before the last query's chunk for this check"
        chunked, nope = (torch.tensor(gains[layer][row], dtype=torch.float64) for layer in (0, 1))
        assert len(chunked) == len(positions) and (chunked == 1).all()
        assert (nope != 1).all()


def test_pai_on_the_chunked_layers_leaves_decoding_plain_while_the_image_lies_in_earlier_chunks():
    """12 decoding steps, crossing a chunk boundary: PAI (without CFG) on the chunked layers 0 and 2 leaves every
    score as plain generate's (every image key lies in an earlier chunk than the prompt's last query and each new
    token's, so the chunk mask hides what it would boost); on the NoPE layer 1 it changes them."""
    tiny = tiny_model("llama4")
    inputs = tiny.inputs(QUESTIONS)
    greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    plain = torch.stack(tiny.model.generate(**inputs, **greedy).logits)  # [steps, batch, vocab]

    def pai_scores(layers: list[int]) -> torch.Tensor:
        with vlmfix.apply(tiny.model, vlmfix.PAI(0.5, layers=layers, cfg=False)) as session:
            scores = torch.stack(session.generate(**inputs, **greedy).logits)
            assert session.report()["pai"]["applied"]["attention_calls"] > 0
        return scores

    torch.testing.assert_close(pai_scores([0, 2]), plain, rtol=0, atol=1e-5)
    assert (pai_scores([1]) - plain).abs().max() > 1e-3


def lower_floor_scale(model: torch.nn.Module, floor_scale: int) -> None:
    """Make the NoPE layers' query scaling start at `floor_scale` positions (Llama 4's is 8192)."""
    model.config.text_config.floor_scale = floor_scale
    for layer in model.language_model.model.layers:
        layer.self_attn.floor_scale = floor_scale


def test_transformers_own_padded_row_differs_from_the_row_alone_once_nope_scaling_starts():
    """Why vlmfix refuses a padded batch past `Adapter.padded_length_limit`: transformers' NoPE layers count a row's
    pads in the position that scales its queries. With the scaling moved to 16 positions a padded row's logits differ
    from the row alone's; with the checkpoints' 8192 they do not (this fails once a release counts real tokens)."""
    tiny = tiny_model("llama4")
    inputs = tiny.inputs(QUESTIONS)
    alone = tiny.inputs(QUESTIONS[:1])
    assert (inputs["attention_mask"][0] == 0).any(), "row 0 must be padded in the batch"
    gaps = []
    for floor_scale in (8192, 16):
        lower_floor_scale(tiny.model, floor_scale)
        with torch.no_grad():
            batched = tiny.model(**inputs).logits[0, -1]
            single = tiny.model(**alone).logits[0, -1]
        gaps.append((batched - single).abs().max().item())
    assert gaps[0] < 1e-5 < gaps[1]


def test_a_padded_batch_past_the_scaling_start_is_refused_and_an_unpadded_row_runs():
    tiny = tiny_model("llama4")
    inputs = tiny.inputs(QUESTIONS)
    length = inputs["input_ids"].shape[1]
    lower_floor_scale(tiny.model, length + 4)  # the limit, floor_scale - 1: 3 new tokens fit, 4 do not
    assert get_adapter(tiny.model).padded_length_limit == length + 3
    forwards = []  # the language model's completed forwards
    hook = tiny.model.language_model.model.register_forward_hook(lambda *_: forwards.append(1))
    with vlmfix.apply(tiny.model, vlmfix.PAI(cfg=False)) as session:
        with pytest.raises(vlmfix.UnsupportedModelError, match=rf"rows \[0\] of this batch are left-padded and its "
                                                                rf"sequence reaches {length + 4} positions"):
            session.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert not forwards, "refused before any forward"
        session.generate(**inputs, max_new_tokens=3, do_sample=False)
        forwards.clear()
        with pytest.raises(vlmfix.UnsupportedModelError, match="NoPE layers"):  # no max_new_tokens: at the step
            session.generate(**inputs, max_length=length + 6, do_sample=False)
        assert len(forwards) == 4, "the prefill and 3 steps ran; the step past the limit did not"
        alone = tiny.inputs(QUESTIONS[1:])  # row 1 is the longest: unpadded alone
        session.generate(**alone, max_new_tokens=8, do_sample=False)
    hook.remove()
