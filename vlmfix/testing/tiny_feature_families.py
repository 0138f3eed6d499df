"""Tiny offline builds of the families whose image features are not a `pooler_output` (see `vlmfix.testing.tiny`).

Fuyu embeds raw patches with one linear layer and returns them in `last_hidden_state`; its processor writes
the prompt itself (no chat template), so `TinyVLM.prompt` gives it the bare question.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from vlmfix.testing.tiny import WORDS
from vlmfix.testing.tiny_families import Shape, token_ids

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
        (transformers 5.24's PIL backend reshapes them with numpy's `transpose` signature and fails)."""

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


# families whose processor pairs each prompt with one image
SINGLE_IMAGE = frozenset({"fuyu"})

FEATURE_BUILDERS: dict[str, Any] = {
    "fuyu": build_fuyu,
}
