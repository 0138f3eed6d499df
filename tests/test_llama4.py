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
    inputs = tiny.inputs(QUESTIONS)  # 48- and 64-pixel images: one tile, and 2 x 2 tiles with a global view
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
    assert (ids[1] == tokens("<|tile_y_separator|>")).sum() == 2, "the 64-pixel image spans 2 x 2 tiles"


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
