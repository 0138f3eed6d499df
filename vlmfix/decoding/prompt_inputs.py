"""The model inputs of a prompt batch, as the engine and the methods reshape them.

One helper per idea: the decoding-loop keys an extra pass must drop, the padding mask of any
attention-mask layout, the pad token to fill with, left padding, text-only positions, splicing text
tokens into prompts (positions, M-RoPE included, following the new sequence), and stacking two row
blocks (e.g. [image rows; the same prompts without their image]) into one forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# decoding-loop arguments of a prefill forward that an extra (analysis) pass must not reuse
LOOP_KEYS = ("cache", "past_key_values", "use_cache", "cache_position", "return_dict")
# keys whose last dimension runs along the prompt; the batch is dim 0 (dim 1 for 3-D M-RoPE positions)
# (moe_mm_token_type_ids: ERNIE 4.5 VL's expert routing, image frames counted as image)
SEQUENCE_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids",
                 "moe_mm_token_type_ids")
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")
# per-forward switches, always taken from the first block when two are stacked
CONTROL_KEYS = ("cache", "past_key_values", "use_cache", "logits_to_keep", "return_dict", "output_attentions",
                "output_hidden_states", "cache_position")
# a prompt's image inputs in the caller's layout (pixel_attention_mask: Idefics / Granite-Docling tiles;
# image_merge_sizes: VideoLLaMA 3; image_position_ids: Gemma 4's patch coordinates; pixel_mask: Aria's padding;
# high_res_pixel_values: DeepSeek-VL hybrid's second tower; image_token_pooling, image_grids, image_num_crops:
# Molmo2's pooling indices and crop layout; pixel_values_local, num_local_patches: Step 3.7's local crops): what
# the session records and the two-stream engine encodes
IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask", "image_merge_sizes",
              "image_position_ids", "pixel_mask", "high_res_pixel_values", "image_token_pooling", "image_grids",
              "image_num_crops", "pixel_values_local", "num_local_patches")
FEATURES = "mm_encoder_outputs"  # image features generate encodes before the first forward


def without_loop_keys(inputs: dict[str, Any]) -> dict[str, Any]:
    """A prefill's forward kwargs for an extra pass without a cache (the decoding loop's keys dropped)."""
    return {k: v for k, v in inputs.items() if k not in LOOP_KEYS}


def patch_grids(position_ids: Tensor) -> list[list[int]]:
    """[images, patches, 2] (x, y) patch positions, (-1, -1) on padding (Gemma 4's `image_position_ids`) -> each
    image's [patch rows, patch cols]: what places its pooled tokens (`vlmfix.viz`)."""
    real = (position_ids >= 0).all(-1, keepdim=True)  # [images, patches, 1]
    extent = torch.where(real, position_ids, -1).amax(1) + 1  # [images, 2]: (cols, rows)
    return [[int(rows), int(cols)] for cols, rows in extent.tolist()]


def image_layout(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The image inputs that place image tokens on patch grids, as lists: `image_sizes`, `image_grid_thw`,
    `image_merge_sizes`, and Gemma 4's `image_position_ids` [images, patches, 2] as `image_patch_grids`."""
    found: dict[str, Any] = {}
    for key in ("image_sizes", "image_grid_thw", "image_merge_sizes"):
        value = inputs.get(key)
        if value is not None:
            found[key] = value.tolist() if hasattr(value, "tolist") else value
    positions = inputs.get("image_position_ids")
    if isinstance(positions, Tensor) and positions.dim() == 3:
        found["image_patch_grids"] = patch_grids(positions)
    return found


def padding_mask(attention_mask: Tensor | dict[str, Tensor] | None, input_ids: Tensor) -> Tensor:
    """[batch, seq] bool, True on real tokens, from a prefill's mask in any layout.

    `None`: no padding. 2-D [batch, seq]: the tokenizer's mask. 4-D [batch, 1, q_len, kv_len] (what
    generate passes with a static cache, where kv_len is the cache's length): the last query row of a
    left-padded prompt is a real token, so its keys 0..seq-1 are exactly the row's real tokens. A dict of
    4-D masks per attention type (models with sliding layers): its full-attention mask.
    """
    batch, seq = input_ids.shape
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device)
    if attention_mask.dim() == 2:
        return attention_mask[:, -seq:].bool()
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be [batch, seq] or [batch, 1, q_len, kv_len], got shape "
                         f"{tuple(attention_mask.shape)}.")
    last = attention_mask[:, 0, -1, :seq]  # [batch, seq]
    if last.dtype == torch.bool:
        return last
    return last > torch.finfo(last.dtype).min / 2  # additive masks: 0 where attended, dtype-min where not


def pad_token_id(tokenizer: Any, model: Any, text_config: Any, avoid: int | None = None) -> int:
    """The id to fill padding with: the tokenizer's, the generation config's or the text config's pad id,
    else 0, skipping `avoid` (the image token, which the adapter would count as an image)."""
    candidates = (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
        getattr(text_config, "pad_token_id", None),
        0,
    )
    return next(int(c) for c in candidates if isinstance(c, int) and not isinstance(c, bool) and c != avoid)


def left_pad(tensor: Tensor, width: int, value: int | float) -> Tensor:
    """Pad the last dimension of `tensor` on the left to `width` with `value`."""
    missing = width - tensor.shape[-1]
    if missing <= 0:
        return tensor
    pad = tensor.new_full((*tensor.shape[:-1], missing), value)
    return torch.cat([pad, tensor], dim=-1)


def left_padded_rows(rows: Sequence[Tensor], pad_id: int, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Token rows of different lengths -> (input_ids, attention_mask), both [batch, width], left-padded."""
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.stack([left_pad(r, width, pad_id) for r in rows])
    mask = torch.stack([left_pad(torch.ones_like(r), width, 0) for r in rows])
    return ids, mask


def text_positions(mask: Tensor) -> Tensor:
    """[batch, seq] positions of a left-padded text batch, as `generate` computes them."""
    mask = mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def word_ids(tokenizer: Any, text: str) -> list[int]:
    """`text`'s token ids as a word inside a prompt (after a space), without special tokens: the ids of
    " " + text, or of `text` where the tokenizer makes the leading space a token of its own (SentencePiece's
    dummy prefix already starts the first word with its space marker)."""
    spaced = tokenizer.encode(" " + text, add_special_tokens=False)
    bare = tokenizer.encode(text, add_special_tokens=False)
    return bare if len(spaced) > len(bare) else spaced


def find_ids(row: Sequence[int], needles: Sequence[Sequence[int]], start: int = 0) -> tuple[int, int] | None:
    """(first index, length) of the earliest occurrence at or after `start` of any of `needles` in `row`."""
    hits = [(i, len(n)) for n in needles if n for i in range(start, len(row) - len(n) + 1)
            if list(row[i : i + len(n)]) == list(n)]
    return min(hits, default=None)


def after_bos(row: Sequence[int], tokenizer: Any) -> int:
    """Index of one prompt row's first token after its BOS: 1 when the row starts with the tokenizer's BOS, else 0
    (a tokenizer without one, or a row that does not start with it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return 1 if row and bos is not None and row[0] == bos else 0


@dataclass(frozen=True)
class Splice:
    """Replace the tokens [start, end) of one prompt row with `tokens` (indices count the row's real tokens
    only, padding excluded; start == end inserts)."""

    start: int
    end: int
    tokens: tuple[int, ...]


def splice_rows(inputs: dict[str, Any], splices: Sequence[Splice | None], pad_token_id: int) -> dict[str, Any]:
    """The prompts of `inputs` with one text splice per row (None: the row as it is), left-padded again.

    input_ids and the padding mask are rebuilt; token types (`token_type_ids`, `mm_token_type_ids`) get 0
    (text) on new tokens; `position_ids` follow the new sequence: unchanged before the splice, consecutive
    text positions for the new tokens, and shifted by the change in length after it (M-RoPE sections
    together, so image positions keep their grid). Other keys (image features, switches) are kept.
    """
    input_ids = inputs["input_ids"]  # [B, S]
    if len(splices) != input_ids.shape[0]:
        raise ValueError(f"splice_rows needs one splice (or None) per row: {input_ids.shape[0]} rows, got "
                         f"{len(splices)}.")
    valid = padding_mask(inputs.get("attention_mask"), input_ids)  # [B, S]
    spliced_keys = [key for key in ("input_ids", *TOKEN_TYPE_KEYS) if inputs.get(key) is not None]
    new_rows: dict[str, list[Tensor]] = {key: [] for key in spliced_keys}
    positions = inputs.get("position_ids")  # [B, S], [sections, B, S] or None
    new_positions: list[Tensor] = []
    for b, splice in enumerate(splices):
        keep = valid[b]
        real = {key: inputs[key][b][keep] for key in new_rows}  # [n] each
        if splice is not None and not 0 <= splice.start <= splice.end <= int(keep.sum()):
            raise ValueError(f"row {b}: splice [{splice.start}, {splice.end}) lies outside its "
                             f"{int(keep.sum())} tokens.")
        for key, row in real.items():
            if splice is None:
                new_rows[key].append(row)
                continue
            fill = torch.tensor(splice.tokens, dtype=row.dtype, device=row.device) if key == "input_ids" else \
                row.new_zeros(len(splice.tokens))
            new_rows[key].append(torch.cat([row[: splice.start], fill, row[splice.end :]]))
        if positions is not None:
            row_positions = positions[..., b, :][..., keep]  # [n] or [sections, n]
            new_positions.append(row_positions if splice is None else _spliced_positions(row_positions, splice))
    ids, mask = left_padded_rows(new_rows.pop("input_ids"), pad_token_id)
    out = {k: v for k, v in inputs.items() if k not in SEQUENCE_KEYS}
    out.update(input_ids=ids, attention_mask=mask)
    width = ids.shape[1]
    for key, rows in new_rows.items():
        out[key] = torch.stack([left_pad(r, width, 0) for r in rows])
    if positions is not None:
        out["position_ids"] = torch.stack([left_pad(p, width, 0) for p in new_positions], dim=-2)
    return out


def _spliced_positions(positions: Tensor, splice: Splice) -> Tensor:
    """One row's positions ([n] or [sections, n]) after `splice`. Sections are spliced as groups: M-RoPE's
    (temporal, height, width) share one text position (the next one after an image is the largest of the
    three plus 1); with four sections (transformers >= 5 Qwen: text positions, then M-RoPE) the first is a
    group of its own."""
    if positions.dim() == 1:
        return _spliced_group(positions[None], splice)[0]
    groups = [positions[:1], positions[1:]] if positions.shape[0] == 4 else [positions]
    return torch.cat([_spliced_group(g, splice) for g in groups])


def _spliced_group(positions: Tensor, splice: Splice) -> Tensor:
    # positions: [sections, n] that share text positions
    def next_after(count: int) -> Tensor:  # the position of a text token following the first `count` tokens
        return positions[:, :count].max() + 1 if count else positions.new_zeros(())

    base = next_after(splice.start)
    new = (base + torch.arange(len(splice.tokens), device=positions.device))[None].expand(positions.shape[0], -1)
    shift = base + len(splice.tokens) - next_after(splice.end)
    return torch.cat([positions[:, : splice.start], new, positions[:, splice.end :] + shift], dim=1)


def _mask(inputs: dict[str, Any]) -> Tensor:
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"]) if mask is None else mask


def _positions_like(template: Tensor, positions: Tensor | None, mask: Tensor) -> Tensor:
    """The second block's positions in the first block's layout ([B, S] or [sections, B, S]).

    Text-only rows have equal positions in every M-RoPE section, so a missing section (Qwen's
    generate-time text row) or a missing tensor is filled from the mask.
    """
    if positions is None:
        positions = text_positions(mask)
    if positions.dim() == template.dim() and positions.shape[:-2] == template.shape[:-2]:
        return positions
    if template.dim() == 3 and positions.dim() == 2:
        return positions[None].expand(template.shape[0], -1, -1)
    if template.dim() == 3 and positions.dim() == 3 and positions.shape[0] == template.shape[0] - 1:
        return torch.cat([text_positions(mask)[None], positions])
    raise ValueError(f"the second block's position_ids of shape {tuple(positions.shape)} do not fit the first "
                     f"block's {tuple(template.shape)}; give them in the same layout or leave them out.")


def stack_row_blocks(first: dict[str, Any], second: dict[str, Any], *, pad_token_id: int) -> dict[str, Any]:
    """One forward's kwargs for [first rows; second rows], both left-padded to one width.

    Sequence tensors (ids, mask, positions, token types) are padded and stacked; image features
    (`mm_encoder_outputs`) are concatenated image by image (the first block's images first); other
    tensors along dim 0; switches (cache, use_cache, ...) come from `first`. A key the second block
    lacks is taken from the first when both have the same prompt tokens; otherwise mask and positions are
    derived from the second block's mask. Without positions in the first block, the stacked forward has
    none either (the model derives them).
    """
    first_ids, second_ids = first["input_ids"], second["input_ids"]  # [B, S_1], [B, S_2]
    batch = first_ids.shape[0]
    if second_ids.shape[0] != batch:
        raise ValueError(f"the second block must have the same B = {batch} rows as the first, got input_ids of "
                         f"shape {tuple(second_ids.shape)}.")
    same_prompt = second_ids.shape == first_ids.shape and bool(torch.equal(second_ids, first_ids))
    first_mask = _mask(first)
    second_mask = _mask(second) if second.get("attention_mask") is not None or not same_prompt else first_mask
    width = max(first_ids.shape[1], second_ids.shape[1])
    out = {k: v for k, v in first.items() if k not in SEQUENCE_KEYS and k != FEATURES}
    out["input_ids"] = torch.cat([left_pad(first_ids, width, pad_token_id), left_pad(second_ids, width, pad_token_id)])
    out["attention_mask"] = torch.cat([left_pad(first_mask, width, 0), left_pad(second_mask, width, 0)])

    first_positions = first.get("position_ids")
    if first_positions is not None:  # else the model derives every row's positions itself
        second_positions = second.get("position_ids")
        if second_positions is None and same_prompt and torch.equal(second_mask, first_mask):
            second_positions = first_positions
        second_positions = _positions_like(first_positions, second_positions, second_mask)
        out["position_ids"] = torch.cat(
            [left_pad(first_positions, width, 0), left_pad(second_positions, width, 0)], dim=-2
        )
    for key in TOKEN_TYPE_KEYS:
        first_types, second_types = first.get(key), second.get(key)
        if first_types is None and second_types is None:
            continue
        if second_types is None:
            assert first_types is not None  # not both missing (skipped above)
            second_types = first_types if same_prompt else torch.zeros_like(second_ids, dtype=first_types.dtype)
        elif first_types is None:
            first_types = torch.zeros_like(first_ids, dtype=second_types.dtype)
        out[key] = torch.cat([left_pad(first_types, width, 0), left_pad(second_types, width, 0)])

    features = _stack_features(first.get(FEATURES), second.get(FEATURES))
    if features:
        out[FEATURES] = features
    for key in set(first) | set(second):
        if key in SEQUENCE_KEYS or key in CONTROL_KEYS or key == FEATURES:
            continue
        first_value, second_value = first.get(key), second.get(key)
        if isinstance(first_value, Tensor) and isinstance(second_value, Tensor):
            out[key] = torch.cat([first_value, second_value.to(first_value.device)])
        elif second_value is not None and first_value is None:
            out[key] = second_value
    return out


def _stack_features(first: dict | None, second: dict | None) -> dict[str, Any]:
    """Per modality: an encoder output whose image features list the first block's images, then the second's."""
    first, second = first or {}, second or {}
    out = {}
    for modality in set(first) | set(second):
        a, b = first.get(modality), second.get(modality)
        if a is None or b is None:
            out[modality] = a if a is not None else b
            continue
        out[modality] = join_images(a, b)
    return out


def image_field(output: Any) -> str | None:
    """The field of an image-encoder output that holds the features placed at the image placeholders:
    `pooler_output`, or `last_hidden_state` where the family leaves `pooler_output` empty (Fuyu's patch
    embeddings: one [tokens, dim] run for all images of the batch, which the model scatters in order); None where
    the features are only added inside decoder layers (Granite 4 Vision's `deepstack_features`)."""
    for name in ("pooler_output", "last_hidden_state"):
        if output.get(name) is not None:
            return name
    return None


def _is_layer_pair(level: Any) -> bool:
    """A DeepStack level given as (decoder layer, per-image features), as Granite 4 Vision gives them."""
    return isinstance(level, tuple) and len(level) == 2 and isinstance(level[0], int) and \
        isinstance(level[1], (list, tuple))


def _level_images(level: Any) -> Any:
    """The per-image features of one DeepStack level ([image] or (layer, [image]))."""
    return level[1] if _is_layer_pair(level) else level


def _level_with(level: Any, images: list[Tensor]) -> Any:
    """`images` in `level`'s layout (with its decoder layer where the level names one)."""
    return (level[0], images) if _is_layer_pair(level) else images


def image_features(output: Any) -> Any:
    """The per-image features of an image-encoder output (see `image_field`): a list with one [tokens, dim] tensor
    per image, one [images, tokens, dim] tensor, or one [tokens, dim] run, which the helpers below take token by
    token (each token then counts as an image of one token); where the features are only added inside decoder
    layers, those of the first DeepStack level (every level holds the same tokens)."""
    field = image_field(output)
    if field is not None:
        return output[field]
    levels = output.get("deepstack_features")
    if not levels:
        raise ValueError(f"{type(output).__name__} holds no image features (pooler_output, last_hidden_state or "
                         "deepstack_features); vlmfix cannot re-encode this family's images.")
    return _level_images(levels[0])


def with_features(output: Any, features: Sequence[Tensor]) -> Any:
    """A copy of an image-encoder output with its image features replaced (the original is not modified)."""
    field = image_field(output)
    if field is None:
        raise ValueError(f"{type(output).__name__} places no features at the image placeholders (they are added "
                         "inside decoder layers); replace its deepstack_features levels instead.")
    return type(output)(**{**output, field: list(features)})


def _nested_image_fields(output: Any) -> list[str]:
    """Fields of an image-encoder output that hold, per level, one tensor per image like its image features
    (Qwen3-VL's `deepstack_features`: [vision level][image] features added in early decoder layers; Granite 4
    Vision's: [(decoder layer, [image])])."""
    field = image_field(output)
    images = len(image_features(output))
    return [key for key, value in output.items()
            if key != field and isinstance(value, (list, tuple)) and value
            and all(isinstance(_level_images(level), (list, tuple)) and len(_level_images(level)) == images
                    for level in value)]


def _like(template: Any, images: list[Tensor]) -> Any:
    """`images` in `template`'s layout: a list, or one tensor (Gemma 3's [images, tokens, dim] projector output,
    Fuyu's [tokens, dim] patch embeddings)."""
    return torch.stack(images) if isinstance(template, Tensor) else images


def select_images(output: Any, indices: Sequence[int]) -> Any:
    """A copy of an image-encoder output holding images `indices` (in that order, repeats allowed) in its
    image features and in every per-image field (the original is not modified)."""
    field = image_field(output)
    updates: dict[str, Any] = {}
    if field is not None:
        images = list(output[field])
        updates[field] = _like(output[field], [images[i] for i in indices])
    for key in _nested_image_fields(output):
        updates[key] = [_level_with(level, [_level_images(level)[i] for i in indices]) for level in output[key]]
    return type(output)(**{**output, **updates})


def join_images(first: Any, second: Any) -> Any:
    """One image-encoder output listing `first`'s images, then `second`'s, in its image features and in every
    per-image field both hold."""
    field = image_field(first)
    if image_field(second) != field:
        raise ValueError(f"cannot join image features held in `{field}` with ones held in `{image_field(second)}`; "
                         "encode both blocks' images with the same model.")
    updates: dict[str, Any] = {}
    if field is not None:
        updates[field] = _like(first[field], [*first[field], *second[field]])
    for key in set(_nested_image_fields(first)) & set(_nested_image_fields(second)):
        updates[key] = [_level_with(a, [*_level_images(a), *_level_images(b)]) for a, b in zip(first[key], second[key])]
    return type(first)(**{**first, **updates})


def repeat_image_groups(output: Any, image_mask: Tensor, times: int) -> Any:
    """A copy of an image-encoder output of B0 prompts for B0 * `times` rows, each prompt's image group repeated
    `times` times in a row (as generate expands them for beams and return sequences); `image_mask`: [B0, S] the
    prompts' image tokens, which say where each prompt's group ends."""
    if times == 1:
        return output
    features = list(image_features(output))
    indices, start = [], 0
    for tokens in image_mask.sum(dim=1).tolist():  # image tokens of each prompt
        group, seen = [], 0
        while seen < tokens:
            group.append(start)
            seen += features[start].reshape(-1, features[start].shape[-1]).shape[0]
            start += 1
        indices.extend(group * times)
    return select_images(output, indices)


def image_tokens_encoded(output: Any) -> int:
    """How many image-token feature vectors an image-encoder output holds (all images, all tiles)."""
    return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in image_features(output))
