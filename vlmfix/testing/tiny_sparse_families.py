"""Tiny offline builds of the families whose language model selects keys per query (see `vlmfix.testing.tiny`).

Mistral Large 4's layers are DeepSeek-V3.2-style sparse attention: a small "lightning indexer" scores every
key for each query and the layer attends to the top `index_topk` keys only. The indexer's score of a key is
a weighted sum over its heads of ReLU(query . key), so a key that every indexer head scores below zero gets
exactly 0. With few indexer heads such exact ties are common, and `torch.topk` breaks them by storage
position, which left padding shifts: a padded row then keeps other keys than the row alone (measured on a
2-head build: plain `generate`'s scores of the padded row off by 0.08 to 0.15). The builds below keep the
family's 32 indexer heads (its config default), where a key scoring 0 on every head is as rare as on the
real model (the padded row's scores then match the row alone to 1e-7). Dots3 Note's indexed layers are the
same indexer; its build keeps the checkpoint's 64 heads, measured the same way: a row left-padded by 6 tokens off by
0.006 in plain `generate`'s first scores with 2 indexer heads, to 1e-7 with 32; with 32, under dots.ocr's shorter
prompt layout, its second decode step still picked other keys (scores off by 0.38), with 64 it matches.

HY V4 VL's indexer is the same (its build keeps 32 heads too); there a second tie showed: the pad token's
embedding row starts at zero, so a random build that generates the pad token gives the first layer's indexer a
zero query and every key the score 0 (measured: a row left-padded by 7 tokens off by 0.15 from its third token
on); its build draws that row, as a checkpoint's is trained.

vlmfix merges the selection into the mask (`vlmfix.decoding.attention.with_selected_keys`), so its edits act
on each query's selected keys only: a key the indexer dropped stays out of every method's reach.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from vlmfix.testing.tiny import WORDS, word_tokenizer
from vlmfix.testing.tiny_families import (
    CHATML_SPECIALS,
    MISTRAL_SPECIALS,
    MISTRAL_TEMPLATE,
    Builder,
    PixtralLayoutProcessor,
    Shape,
    chatml_template,
    chatml_tokenizer,
    image_only,
    mistral_tokenizer,
    randomise,
    token_ids,
)

# the family's default indexer width (MistralLarge4TextConfig.index_n_heads): ReLU ties stay rare
INDEXER_HEADS = 32
# Dots3 Note's checkpoint indexer width (index_n_heads)
DOTS3_INDEXER_HEADS = 64


def build_mistral_large4(shape: Shape, *, index_topk: int = 8) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Mistral Large 4: Mistral 3's Pixtral vision and prompt layout with a DeepSeek-V3.2-style language model:
    multi-head latent attention (the cache holds latents; keys 16 wide, values 32), an indexer that keeps each
    query's top `index_topk` keys (the prompt is longer, so it selects), layer 2 reusing layer 1's latents and
    top-k (shared-KV layer), MoE layers after the first."""
    from transformers import MistralLarge4Config, MistralLarge4ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = mistral_tokenizer()
    ids = token_ids(tokenizer, MISTRAL_SPECIALS)
    sources = list(range(shape.layers))
    sources[2] = 1  # layer 2 reads layer 1's latents
    text = dict(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=2 * shape.hidden,
        moe_intermediate_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
        qk_rope_head_dim=shape.head_dim // 2, qk_nope_head_dim=shape.head_dim // 2, v_head_dim=2 * shape.head_dim,
        index_topk=index_topk, index_head_dim=8, index_n_heads=INDEXER_HEADS, max_position_embeddings=2048,
        kv_source_layers=sources, index_topk_pattern="FFS" + "F" * (shape.layers - 3), pad_token_id=ids["<pad>"],
        eos_token_id=ids["</s>"], bos_token_id=ids["<s>"],
    )
    config = MistralLarge4Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, head_dim=8, image_size=32, patch_size=8),
        text_config=text, image_token_index=ids["[IMG]"], spatial_merge_size=2, vision_feature_layer=-1,
    )
    model = MistralLarge4ForConditionalGeneration(config)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=16)
    return model, PixtralLayoutProcessor(image_processor, tokenizer, token_patch=16, chat_template=MISTRAL_TEMPLATE)


# Dots3 Note's image tokens (<|imgpad|>, <|video_pad|>, <|audio_comp_pad|>: its processor) and dots.ocr's frames and
# turn tokens (dots.ocr's template, the family's earlier model: `DOTS3_TEMPLATE`)
DOTS3_TOKENS = ("<|img|>", "<|imgpad|>", "<|endofimg|>", "<|video_pad|>", "<|audio_comp_pad|>", "<|system|>",
                "<|endofsystem|>", "<|user|>", "<|endofuser|>", "<|assistant|>", "<|endofassistant|>")
# dots.ocr's chat template: `<|user|><|img|><|imgpad|><|endofimg|>{question}<|endofuser|><|assistant|>`, a system
# turn `<|system|>{text}<|endofsystem|>\n` only when given, answers closed by <|endofassistant|> (ms-swift's
# `dots_ocr` template; the rendered prompts pinned by the Relax project's tests of dots.ocr's chat_template.jinja).
# Dots3 Note's own template was not found: a read-only check of its checkpoint (tokenspeed's Dots3 Note tests) shows
# that a rendered assistant turn ends with <|endofassistant|> and that <|im_end|> is a special token too, which fits
# this layout but does not pin the user turn; `enable_thinking` (its README) is not reproduced here.
DOTS3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}<|system|>{{ message['content'][0]['text'] }}"
    "<|endofsystem|>{{ '\\n' }}{% elif message['role'] == 'user' %}<|user|>{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|img|><|imgpad|><|endofimg|>{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|endofuser|>{% else %}<|assistant|>{% for item in message['content'] %}{{ item['text'] }}"
    "{% endfor %}<|endofassistant|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_dots3_note(shape: Shape, *, index_topk: int = 8, sliding_window: int = 16) -> tuple[PreTrainedModel,
                                                                                               ProcessorMixin]:
    """Dots3 Note: a Qwen2-VL-style vision tower (8-pixel patches, 2x2 merge, one MoE block) with a DeepSeek-V3.2-
    style language model in which the family's layer pattern mixes indexed layers (layers 0, 1: MLA latents, an
    indexer keeping each query's top `index_topk` keys) with sliding-window MLA layers of their own head count
    and latent ranks (per_layer_config: half the heads, as 64 against 128 on the real model), each head's output
    scaled by a sigmoid gate; MoE layers after the first; a one-layer audio tower beside the vision one, unused.
    Prompts in dots.ocr's layout (`DOTS3_TEMPLATE`; Dots3 Note's own template is unverified)."""
    from transformers import (
        Dots3NoteConfig,
        Dots3NoteFeatureExtractor,
        Dots3NoteForConditionalGeneration,
        Dots3NoteProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = chatml_tokenizer(*DOTS3_TOKENS)
    ids = token_ids(tokenizer, (*CHATML_SPECIALS, *DOTS3_TOKENS))
    hidden = shape.hidden
    sliding_heads = max(1, shape.heads // 2)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
        shared_experts_intermediate_size=hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=32,
        kv_lora_rank=16, qk_rope_head_dim=shape.head_dim // 2, qk_nope_head_dim=shape.head_dim // 2,
        v_head_dim=shape.head_dim, head_dim=shape.head_dim, index_topk=index_topk, index_head_dim=8,
        index_n_heads=DOTS3_INDEXER_HEADS, max_position_embeddings=2048, sliding_window=sliding_window,
        # the sliding layers' own shape (the checkpoint's swa_* aliases, normalised into per_layer_config)
        swa_num_attention_heads=sliding_heads, swa_num_key_value_heads=sliding_heads, swa_q_lora_rank=24,
        swa_kv_lora_rank=24, swa_head_dim=shape.head_dim, swa_qk_nope_head_dim=shape.head_dim // 2,
        swa_v_head_dim=2 * shape.head_dim, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endofassistant|>"],
        bos_token_id=ids["<|endoftext|>"],
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  spatial_merge_size=2, adapter_in_dim=32, adapter_out_dim=hidden, adapter_merge_size=2,
                  pyramid_num_routed=[-1, 4], moe_intermediate_size=32, num_experts_per_tok=2)
    audio = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, feature_size=16,
                 downsample_hidden_size=8, adapter_input_size=32, adapter_out_dim=hidden)
    config = Dots3NoteConfig(text_config=text, vision_config=vision, audio_config=audio,
                             image_token_id=ids["<|imgpad|>"], video_token_id=ids["<|video_pad|>"],
                             audio_token_id=ids["<|audio_comp_pad|>"])
    model = Dots3NoteForConditionalGeneration(config)
    # one frame a patch: the tower's patch embedding is 2-D (no temporal patch)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2,
                                               temporal_patch_size=1)
    # the audio feature extractor at the tiny tower's 16 mel bins (unused: the prompts carry no audio)
    processor = image_only(Dots3NoteProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                               feature_extractor=Dots3NoteFeatureExtractor(feature_size=16),
                                               chat_template=DOTS3_TEMPLATE)
    return model, processor


# MiniMax M3's turn layout as MiniMax M2's chat template writes it (M3's own template not checked): the begin of
# the conversation, a role header, the end of a turn; the processor's image tokens
MINIMAX_TURNS = ("]~!b[", "]~b]", "[e~[")
MINIMAX_IMAGE = ("]<]start of image[>[", "]<]image[>[", "]<]end of image[>[", "]<]video[>[")
MINIMAX_TEMPLATE = (
    "]~!b[{% for message in messages %}]~b]{{ 'ai' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}]<]image[>["
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}[e~[\n{% endfor %}"
    "{% if add_generation_prompt %}]~b]ai\n{% endif %}"
)


def build_minimax_m3_vl(shape: Shape, *, block_size: int = 4, topk_blocks: int = 2) -> tuple[PreTrainedModel,
                                                                                               ProcessorMixin]:
    """MiniMax M3: a Qwen2-VL-style vision tower (8-pixel patches, 2x2 merge) with a patch-merging projector, and a
    language model whose layers after the first are block-sparse (minimax_m3_sparse): a lightning indexer with one
    head per key-value group scores every key, max-pools the scores over blocks of `block_size` keys, and each
    query attends to its top `topk_blocks` blocks plus its newest one (blocks of 4 on a prompt of about 30 tokens,
    so it selects; 128 on the checkpoint); Gemma-style q/k norms, partial RoPE, MoE layers after the first. The
    processor needs torchvision. Its rows must not be left-padded: transformers 5.25's own generate gives a padded
    row other logits than the row alone (vlmfix.adapters.base.Adapter.left_padding_changes_rows)."""
    from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig, MiniMaxM3VLProcessor
    from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import MiniMaxM3VLImageProcessor

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(("<pad>", "<unk>", *MINIMAX_TURNS, *MINIMAX_IMAGE, "user", "ai", "system"),
                                        WORDS),
        eos_token="[e~[", unk_token="<unk>", pad_token="<pad>", padding_side="left")
    tokenizer.add_tokens([*MINIMAX_TURNS, *MINIMAX_IMAGE], special_tokens=True)  # not split by the pre-tokenizer
    ids = token_ids(tokenizer, ("<pad>", "]~!b[", "[e~[", *MINIMAX_IMAGE))
    text = shape.text(
        len(tokenizer), dense_intermediate_size=2 * shape.hidden, shared_intermediate_size=shape.hidden,
        rotary_dim=shape.head_dim // 2, num_local_experts=4, num_experts_per_tok=2,
        mlp_layer_types=["dense"] + ["sparse"] * (shape.layers - 1),
        layer_types=["full_attention"] + ["minimax_m3_sparse"] * (shape.layers - 1),
        index_n_heads=shape.kv_heads, index_head_dim=shape.head_dim, index_block_size=block_size,
        index_topk_blocks=topk_blocks, index_local_blocks=1, pad_token_id=ids["<pad>"], eos_token_id=ids["[e~["],
        bos_token_id=ids["]~!b["],
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = MiniMaxM3VLConfig(text_config=text, vision_config=vision, image_token_index=ids["]<]image[>["],
                               video_token_index=ids["]<]video[>["], projector_hidden_size=shape.hidden)
    model = MiniMaxM3SparseForConditionalGeneration(config)
    image_processor = MiniMaxM3VLImageProcessor(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2,
                                                temporal_patch_size=2)
    processor = image_only(MiniMaxM3VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                 chat_template=MINIMAX_TEMPLATE)
    return model, processor


# HY V4 VL's image token (its processor's default); the ChatML template is a stand-in, not checked against a checkpoint
HY_V4_TOKENS = ("<|image_pad|>", "<|video_pad|>")


def build_hy_v4_vl(shape: Shape, *, index_topk: int = 8) -> tuple[PreTrainedModel, ProcessorMixin]:
    """HY V4 VL: a Qwen2-VL-style vision tower (8-pixel patches, 2x2 convolutional merge, one newline token per
    merged row, all written as image tokens) with a DeepSeek-V3.2-style language model: MLA, an indexer keeping each
    query's top `index_topk` keys (layer 0 its own, the next ones their own or the previous one's, as the family's
    `indexer_types` pattern says), a learned sink logit per head in the softmax (drawn at random here: a checkpoint
    holds trained ones, transformers initialises them to 0), four hyper-connection streams mixed into each layer's
    input and back, a sigmoid gate per head, MoE layers after the first; eager attention only."""
    from transformers import HYV4VLConfig, HYV4VLForConditionalGeneration, HYV4VLProcessor
    from transformers.models.hy_v4_vl.image_processing_pil_hy_v4_vl import HYV4VLImageProcessorPil

    tokenizer = chatml_tokenizer(*HY_V4_TOKENS)
    ids = token_ids(tokenizer, (*CHATML_SPECIALS, *HY_V4_TOKENS))
    hidden = shape.hidden
    half = shape.head_dim // 2  # rope and no-rope halves of each query/key head
    rotary = half // 2  # M-RoPE sections (time, height, width) cover the rope half's frequency pairs
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, n_routed_experts=4, num_experts_per_tok=2,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=half, qk_nope_head_dim=half, v_head_dim=shape.head_dim,
        index_topk=index_topk, index_head_dim=8, index_n_heads=INDEXER_HEADS, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [rotary - 2 * (rotary // 4), rotary // 4, rotary // 4]},
        pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  spatial_merge_size=2, out_hidden_size=hidden, max_image_size=64)
    config = HYV4VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                          video_token_id=ids["<|video_pad|>"])
    model = HYV4VLForConditionalGeneration(config)
    language_model = model.model.language_model
    for layer in language_model.layers:
        randomise(layer.self_attn.sinks, std=1.0)  # trained sinks differ per head; zeros would hide a dropped sink
    # the pad token's embedding row starts at zero (padding_idx); a random build that generates the pad token would
    # then give its indexer a zero query, every key the same score, and top-k ties broken by storage position,
    # which left padding shifts (measured: the padded row's scores off by 0.15); a checkpoint's row is trained
    randomise(language_model.embed_tokens.weight[text["pad_token_id"]])
    image_processor = HYV4VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2)
    processor = image_only(HYV4VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=chatml_template("<|image_pad|>"))
    return model, processor


NESTED_IMAGES: frozenset[str] = frozenset()

BUILDERS: dict[str, Builder] = {
    "mistral_large4": build_mistral_large4,
    "dots3_note": build_dots3_note,
    "minimax_m3_vl": build_minimax_m3_vl,
    "hy_v4_vl": build_hy_v4_vl,
}
