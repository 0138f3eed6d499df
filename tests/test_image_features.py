"""Image-encoder outputs keep every per-image field when the contrastive engine selects or joins images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from vlmfix.decoding.prompt_inputs import join_images, select_images


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
