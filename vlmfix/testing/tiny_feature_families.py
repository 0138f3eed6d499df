"""Tiny offline builds of the families whose image features are not a `pooler_output` (see `vlmfix.testing.tiny`).

Fuyu embeds raw patches with one linear layer and returns them in `last_hidden_state`; its processor writes
the prompt itself (no chat template), so `TinyVLM.prompt` gives it the bare question. Granite 4 Vision zeroes
its image placeholders at the input and adds Window Q-Former features inside chosen decoder layers, given as
`deepstack_features` of (decoder layer, per-image features) pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from vlmfix.testing.tiny import WORDS, word_tokenizer
from vlmfix.testing.tiny_families import GRANITE_SPECIALS, GRANITE_TEMPLATE, Shape, token_ids

FUYU_SPECIALS = ("<pad>", "<s>", "|ENDOFTEXT|", "<unk>", "<0x04>")
# plain vocabulary words, as in Fuyu's SentencePiece vocabulary: image placeholder, patch-row end, word start
FUYU_WORDS = ("|SPEAKER|", "|NEWLINE|", "\u2581")


def fuyu_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that behaves like Fuyu's SentencePiece one where the processor relies on it: every
    encoded text starts with a word-start token `▁` (the processor strips it from the image placeholders), and
    `|SPEAKER|` / `|NEWLINE|` are vocabulary words (split out of runs like `|SPEAKER||SPEAKER|`)."""
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*FUYU_SPECIALS, *FUYU_WORDS, *WORDS]))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Prepend("\u2581 ")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"\|[A-Z]+\||\w+|[^\w\s]"), behavior="isolated"),
    ])
    tokenizer.add_special_tokens(list(FUYU_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="|ENDOFTEXT|",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="left")


def build_fuyu(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Fuyu: 8-pixel patches of images fitted into 32 x 32 pixels (16 image tokens in 4 rows), a Persimmon
    language model (no grouped-query attention: `shape.kv_heads` is not used)."""
    from transformers import FuyuConfig, FuyuForCausalLM, FuyuProcessor
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    class TensorPatchesFuyuImageProcessor(FuyuImageProcessorPil):
        """The PIL image processor with `patchify_image` taking the torch tensors the processor hands it
        (transformers 5.25's PIL backend reshapes them with numpy's `transpose` signature and fails)."""

        def patchify_image(self, image: Any, patch_size: Any = None) -> Any:
            patches = super().patchify_image(np.asarray(image), patch_size)
            return torch.from_numpy(np.ascontiguousarray(patches))

    class PixelValuesFuyuProcessor(FuyuProcessor):
        """The stock processor returning `pixel_values` (not the legacy `image_patches`) by default."""

        def __call__(self, *args: Any, return_legacy_image_output: bool = False, **kwargs: Any) -> Any:
            return super().__call__(*args, return_legacy_image_output=return_legacy_image_output, **kwargs)

    tokenizer = fuyu_tokenizer()
    ids = token_ids(tokenizer, (*FUYU_SPECIALS, *FUYU_WORDS))
    config = FuyuConfig(
        text_config=dict(
            model_type="persimmon", vocab_size=len(tokenizer), hidden_size=shape.hidden,
            intermediate_size=2 * shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
            max_position_embeddings=2048, qk_layernorm=True, hidden_act="relu2", partial_rotary_factor=0.5,
            pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["|ENDOFTEXT|"],
        ),
        image_token_id=ids["|SPEAKER|"], image_size=32, patch_size=8, num_channels=3,
    )
    image_processor = TensorPatchesFuyuImageProcessor(size={"height": 32, "width": 32},
                                                      patch_size={"height": 8, "width": 8})
    return FuyuForCausalLM(config), PixelValuesFuyuProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_granite4_vision(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Granite 4 Vision: LLaVA-NeXT tiles (a 64-channel CLIP tower: the Q-Former takes one head per 64 channels)
    downsampled 1/2 by Window Q-Formers, so a 32-pixel tile gives 2 x 2 tokens; the features of vision layer 1
    join decoder layer 0 and the four spatial offset groups of the last vision layer join decoder layers 1-4
    (a language model of at least 5 layers, so every group has a layer of its own)."""
    from transformers import Granite4VisionConfig, Granite4VisionForConditionalGeneration, Granite4VisionProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(GRANITE_SPECIALS, WORDS), eos_token="<|end_of_text|>", unk_token="<unk>",
        pad_token="<|pad|>", padding_side="left",
    )
    tokenizer.image_token = "<image>"
    ids = token_ids(tokenizer, GRANITE_SPECIALS)
    layers = max(shape.layers, 5)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = Granite4VisionConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(shape.text(len(tokenizer), pad_token_id=ids["<|pad|>"], eos_token_id=ids["<|end_of_text|>"],
                                    bos_token_id=ids["<|end_of_text|>"]), num_hidden_layers=layers),
        image_token_index=ids["<image>"], vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints, downsample_rate="1/2", deepstack_layer_map=[[1, 0]], spatial_vision_layer=-1,
        spatial_target_layers=[1, 2, 3, 4], projector_dropout=0.0,
    )
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    processor = Granite4VisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        chat_template=GRANITE_TEMPLATE, num_additional_image_tokens=1, downsample_rate="1/2",
    )
    return Granite4VisionForConditionalGeneration(config), processor


# families whose processor pairs each prompt with one image
SINGLE_IMAGE = frozenset({"fuyu"})

BUILDERS: dict[str, Any] = {
    "fuyu": build_fuyu,
    "granite4_vision": build_granite4_vision,
}
NESTED_IMAGES: frozenset[str] = frozenset()
