"""Image-encoder outputs keep every per-image field when the contrastive engine selects or joins images."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers.utils import ModelOutput

from vlmfix.decoding.prompt_inputs import (
    image_features,
    image_field,
    image_tokens_encoded,
    join_images,
    repeat_image_groups,
    select_images,
)


@dataclass
class Output(ModelOutput):
    """Like Qwen3-VL's encoder output: per-image features and, per DeepStack level, per-image features."""

    pooler_output: list | torch.Tensor | None = None
    deepstack_features: list | None = None


def features(*values: float) -> list[torch.Tensor]:
    return [torch.full((2, 3), v) for v in values]


def test_select_repeats_images_in_every_per_image_field():
    out = Output(pooler_output=features(1, 2), deepstack_features=[features(10, 20), features(100, 200)])
    picked = select_images(out, [0, 0, 1])
    assert [float(t[0, 0]) for t in picked.pooler_output] == [1, 1, 2]
    assert [[float(t[0, 0]) for t in level] for level in picked.deepstack_features] == [[10, 10, 20],
                                                                                        [100, 100, 200]]
    assert [float(t[0, 0]) for t in out.pooler_output] == [1, 2]  # the original is not modified


def test_join_lists_the_first_block_then_the_second():
    a = Output(pooler_output=features(1), deepstack_features=[features(10)])
    b = Output(pooler_output=features(2), deepstack_features=[features(20)])
    joined = join_images(a, b)
    assert [float(t[0, 0]) for t in joined.pooler_output] == [1, 2]
    assert [[float(t[0, 0]) for t in level] for level in joined.deepstack_features] == [[10, 20]]


def test_a_tensor_of_images_stays_a_tensor():
    """Gemma 3's projector returns one [images, tokens, dim] tensor."""
    out = Output(pooler_output=torch.arange(6.0).reshape(3, 2, 1))
    picked = select_images(out, [2, 0])
    assert isinstance(picked.pooler_output, torch.Tensor)
    assert picked.pooler_output.flatten().tolist() == [4.0, 5.0, 0.0, 1.0]


@dataclass
class PatchOutput(ModelOutput):
    """Like Fuyu's encoder output: the patch embeddings of every image in one [tokens, dim] run, no pooler."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None


def test_features_without_a_pooler_output_are_read_from_last_hidden_state():
    out = PatchOutput(last_hidden_state=torch.arange(4.0)[:, None].expand(4, 2))
    assert image_field(out) == "last_hidden_state"
    assert image_field(Output(pooler_output=features(1))) == "pooler_output"
    picked = select_images(out, [3, 0])  # a [tokens, dim] run is taken token by token
    assert picked.pooler_output is None
    assert picked.last_hidden_state[:, 0].tolist() == [3.0, 0.0]
    joined = join_images(out, PatchOutput(last_hidden_state=torch.full((1, 2), 9.0)))
    assert joined.last_hidden_state[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 9.0]
    assert image_tokens_encoded(out) == 4


def test_joining_features_held_in_different_fields_is_refused():
    with pytest.raises(ValueError, match="same model"):
        join_images(PatchOutput(last_hidden_state=torch.zeros(1, 2)), Output(pooler_output=features(1)))


def test_each_prompt_image_group_is_repeated_in_a_row():
    """Prompt 0 holds 2 image tokens, prompt 1 holds 1: [t0, t1, t2] for 2 beams is [t0, t1, t0, t1, t2, t2]."""
    out = PatchOutput(last_hidden_state=torch.arange(3.0)[:, None])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    repeated = repeat_image_groups(out, mask, 2)
    assert repeated.last_hidden_state.flatten().tolist() == [0.0, 1.0, 0.0, 1.0, 2.0, 2.0]
    per_image = repeat_image_groups(Output(pooler_output=[torch.zeros(2, 1), torch.ones(1, 1)]), mask, 2)
    assert [float(t.sum()) for t in per_image.pooler_output] == [0.0, 0.0, 1.0, 1.0]
    assert repeat_image_groups(out, mask, 1) is out


@dataclass
class LayerPairOutput(ModelOutput):
    """Like Granite 4 Vision's encoder output: no features at the placeholders, only (decoder layer, per-image
    features) pairs added inside the decoder."""

    deepstack_features: list | None = None


def test_layer_pairs_are_selected_and_joined_with_their_decoder_layer():
    out = LayerPairOutput(deepstack_features=[(0, features(1, 2)), (3, features(10, 20))])
    assert image_field(out) is None
    assert image_tokens_encoded(out) == 4  # two images of 2 tokens, counted on the first level
    picked = select_images(out, [1, 1, 0])
    assert [(layer, [float(t[0, 0]) for t in images]) for layer, images in picked.deepstack_features] == [
        (0, [2, 2, 1]), (3, [20, 20, 10])]
    joined = join_images(out, LayerPairOutput(deepstack_features=[(0, features(5)), (3, features(50))]))
    assert [(layer, [float(t[0, 0]) for t in images]) for layer, images in joined.deepstack_features] == [
        (0, [1, 2, 5]), (3, [10, 20, 50])]
    with pytest.raises(ValueError, match="no image features"):
        image_features(LayerPairOutput())
