"""What vlmfix needs to know about a model family, as a small declarative class.

An adapter maps a closed vocabulary (`decoder_layers`, `attn`, `o_proj`, `input_layernorm`,
`image_token_id`, `projector`, `vision_tower`, `vision_layers`, `text_config`) to a model's modules
by attribute access, and finds each batch row's token spans from the prompt's structure.

The base class finds these parts where transformers' image-text-to-text models keep them (the common
layout below): image placeholder and frame token ids from the config, the language model, vision tower
and projector by their common attribute names, heads and head_dim from the language model's config,
M-RoPE from its rotary parameters. A family module holds only what differs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from vlmfix.decoding.prompt_inputs import (
    FEATURES,
    IMAGE_KEYS,
    TOKEN_TYPE_KEYS,
    Splice,
    after_bos,
    find_ids,
    left_padded_rows,
    padding_mask,
    text_positions,
    word_ids,
)
from vlmfix.errors import MissingImageError, SpanError


@dataclass(frozen=True)
class Spans:
    """Per-row token sets of a left-padded prompt batch, as boolean masks over positions.

    Attributes:
        image: [batch, seq] image placeholder tokens (all images of the row).
        instruction: [batch, seq] the user's instruction (query) tokens.
        valid: [batch, seq] non-padding tokens.
    """

    image: Tensor
    instruction: Tensor
    valid: Tensor

    @property
    def other(self) -> Tensor:
        """[batch, seq] every non-pad token that is neither image nor instruction."""
        return self.valid & ~self.image & ~self.instruction

    @property
    def has_image(self) -> Tensor:
        """[batch] whether each row holds at least one image token."""
        return self.image.any(dim=1)

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]

    @property
    def seq_len(self) -> int:
        return self.image.shape[1]

    def first_image_position(self) -> Tensor:
        """[batch] index of each row's first image token (seq_len where the row has none)."""
        positions = torch.arange(self.seq_len, device=self.image.device).expand_as(self.image)
        return torch.where(self.image, positions, self.seq_len).min(dim=1).values

    def repeat_rows(self, times: int) -> Spans:
        """Spans for a batch whose rows were each repeated `times` times (beam search, sampling)."""
        if times == 1:
            return self
        return Spans(*(t.repeat_interleave(times, dim=0) for t in (self.image, self.instruction, self.valid)))

    @classmethod
    def from_positions(
        cls,
        seq_len: int,
        image: Sequence[Sequence[int]],
        instruction: Sequence[Sequence[int]],
        valid: Tensor,
    ) -> Spans:
        """Build spans from per-row position lists (the caller-override path); positions are checked."""
        batch = valid.shape[0]
        if len(image) != batch or len(instruction) != batch:
            raise SpanError(
                f"spans must give one position list per batch row: batch has {batch} rows, got "
                f"{len(image)} image lists and {len(instruction)} instruction lists."
            )
        masks = []
        for name, rows in (("image", image), ("instruction", instruction)):
            mask = torch.zeros(batch, seq_len, dtype=torch.bool, device=valid.device)
            for b, positions in enumerate(rows):
                bad = [p for p in positions if not 0 <= int(p) < seq_len or not bool(valid[b, int(p)])]
                if bad:
                    raise SpanError(
                        f"{name} span of row {b} has positions {bad[:5]} outside the row's tokens "
                        f"(prompt length {seq_len}, padding excluded); give positions in the padded "
                        f"input_ids coordinates."
                    )
                mask[b, list(map(int, positions))] = True
            masks.append(mask)
        if (masks[0] & masks[1]).any():
            raise SpanError("image and instruction spans overlap; a token belongs to one span only.")
        return cls(image=masks[0], instruction=masks[1], valid=valid.bool())


# The common layout of transformers' image-text-to-text models, searched in this order by attribute name.
# the model holding the parts (LlavaForConditionalGeneration.model; Llama 4 holds them itself)
BASE_MODEL_NAMES = ("model",)
LANGUAGE_MODEL_NAMES = ("language_model", "text_model", "llm")
VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_tower")
# on the base model first, then inside the vision tower (Qwen's `visual.merger`)
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "mm_projector", "vision_projection", "aligner", "merger",
                   "projector", "patch_merger", "embed_vision", "resampler_model")
# config fields of the image placeholder ids (a list where a family has several)
IMAGE_TOKEN_FIELDS = ("image_token_ids", "image_token_id", "image_token_index")
# config fields of the tokens that wrap an image (vision start/end, begin/end of image)
FRAME_TOKEN_FIELDS = (
    "vision_start_token_id", "vision_end_token_id", "image_start_token_id", "image_end_token_id",
    "boi_token_id", "eoi_token_id", "boi_token_index", "eoi_token_index",
    "visual_indicator_token_ids",  # Ovis2's image start / grid / column / row / end
)
# keys of the model inputs that carry images; generate may pass the vision encoder's output instead of pixels
IMAGE_INPUT_KEYS = (*IMAGE_KEYS, "image_attention_mask", FEATURES)
# model attributes a forward overwrites (M-RoPE's cached offsets) and an extra pass must restore
STATEFUL_ATTRIBUTES = ("rope_deltas",)


def first_attribute(owner: Any, names: Sequence[str], what: str) -> Any:
    """The first of `names` that `owner` has (not None); an AttributeError listing them otherwise."""
    for name in names:
        value = getattr(owner, name, None)
        if value is not None:
            return value
    raise AttributeError(f"{type(owner).__name__} has no {what} under any of the names {', '.join(names)}.")


def config_ids(config: Any, fields: Sequence[str]) -> tuple[int, ...]:
    """The token ids that `config` holds under `fields` (ints or lists of ints), in field order, deduplicated."""
    found: list[int] = []
    for name in fields:
        value = getattr(config, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        found.extend(int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and int(v) not in found)
    return tuple(found)


def spellings(tokenizer: Any, marker: str) -> list[list[int]]:
    """Token ids of `marker` as a prompt may spell it: alone, after a space and after a line break, without
    duplicates or empty spellings (a SentencePiece tokenizer with a dummy prefix starts a text's first word with
    its space marker, which the same word after a line break lacks: ERNIE 4.5 VL puts "Assistant: " on a new
    line after the question)."""
    found: list[list[int]] = []
    candidates = [tokenizer.encode(text, add_special_tokens=False) for text in (marker, " " + marker)]
    line_break = tokenizer.encode("\n", add_special_tokens=False)
    after_break = tokenizer.encode("\n" + marker, add_special_tokens=False)
    if line_break and after_break[: len(line_break)] == line_break:
        candidates.append(after_break[len(line_break):])
    for ids in candidates:
        if ids and ids not in found:
            found.append(ids)
    return found


@dataclass(frozen=True)
class Adapter:
    """Where things are in one model family.

    The base class finds what the common layout holds (see the *_NAMES and *_FIELDS tuples): a family
    that follows it sets only `family`, `model_classes` and `assistant_markers`; a family module
    overrides what differs.
    """

    model: nn.Module
    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    # text shown before the assistant's answer in this family's chat templates (ends the instruction)
    assistant_markers: ClassVar[tuple[str, ...]] = ()
    # tokens that wrap an image but have no config id (InternVL's <img> and </img>), found with the tokenizer
    frame_tokens: ClassVar[tuple[str, ...]] = ()
    # text that opens the user's turn in this family's chat templates (a system text comes before it)
    user_markers: ClassVar[tuple[str, ...]] = ()

    # --- module vocabulary (attribute access only) ---
    @property
    def _hf(self) -> Any:
        """`model` for attribute access: each family's submodules and config fields are not typed on `nn.Module`."""
        return self.model

    @property
    def base(self) -> Any:
        """The module that holds the vision tower, projector and language model (`model.model`, or `model`)."""
        for name in BASE_MODEL_NAMES:
            inner = getattr(self._hf, name, None)
            if isinstance(inner, nn.Module):
                return inner
        return self._hf

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (a `...Model` whose `layers` are the decoder layers; a nested `...ForCausalLM`
        is looked through)."""
        found = first_attribute(self.base, LANGUAGE_MODEL_NAMES, "language model")
        if not hasattr(found, "layers") and hasattr(getattr(found, "model", None), "layers"):
            return cast(nn.Module, found.model)
        return cast(nn.Module, found)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.language_model.layers)

    def attn(self, layer_idx: int) -> nn.Module:
        return cast(nn.Module, self.decoder_layers[layer_idx].self_attn)

    def o_proj(self, layer_idx: int) -> nn.Linear:
        return cast(nn.Linear, self.attn(layer_idx).o_proj)

    def input_layernorm(self, layer_idx: int) -> nn.Module:
        """The module whose input is the layer's residual stream: its input layer norm, or, in post-norm layers
        without one (EXAONE 4), the decoder layer itself. In hyper-connected layers (`stream_collapse`: HY V4 VL)
        its input is the layer's learned mix of its streams, the one hidden state its attention reads."""
        layer = self.decoder_layers[layer_idx]
        return cast(nn.Module, getattr(layer, "input_layernorm", None) or layer)

    @property
    def text_config(self) -> Any:
        """The language model's own config (the object its attention layers read)."""
        config = getattr(self.language_model, "config", None)
        return config if config is not None else self._hf.config.get_text_config(decoder=True)

    @property
    def has_sliding_window(self) -> bool:
        """Whether some decoder layers attend over a sliding window (their cache keeps the last keys only; any
        sliding kind: Unlimited OCR's "reference_sliding_attention" also keeps the prompt), or over chunks (Llama 4's
        "chunked_attention": transformers caches them in sliding-window layers of the chunk's size)."""
        config = self.text_config
        layer_types = getattr(config, "layer_types", None) or ()
        if getattr(config, "attention_chunk_size", None) is not None and "chunked_attention" in layer_types:
            return True
        return getattr(config, "sliding_window", None) is not None and (
            not layer_types or any("sliding" in str(kind) for kind in layer_types))

    @property
    def has_indexed_attention(self) -> bool:
        """Whether decoder layers attend to each query's top-k keys (DeepSeek-V3.2's sparse attention: Mistral
        Large 4) or key blocks (MiniMax M3) chosen by a learned indexer; their cache layers keep the indexer's
        keys beside the model's."""
        config = self.text_config
        return getattr(config, "index_topk", None) is not None or getattr(config, "index_topk_blocks", None) is not None

    @property
    def left_padding_changes_rows(self) -> bool:
        """Whether the model itself (plain `generate`) gives a left-padded row other logits than the row alone
        (`left_padding_cause` says why); vlmfix then runs it on unpadded batches only (`Session` and the
        two-stream engine refuse a padded prefill before its forward)."""
        return self.left_padding_cause is not None

    @property
    def left_padding_cause(self) -> str | None:
        """What in transformers 5.25's model file makes a left-padded row differ from the row alone, or None."""
        layer_types = getattr(self.text_config, "layer_types", None) or ()
        if "minimax_m3_sparse" in layer_types:
            return ("its block-sparse indexer masks the key slots past each query's content position and anchors "
                    "blocks to slots: modeling_minimax_m3_vl.py:524, :578, :586")
        return None

    @property
    def padded_length_limit(self) -> int | None:
        """The longest sequence (pads, prompt and new tokens) over which the model itself keeps a left-padded row's
        logits equal to the row alone's, or None where length does not matter. Llama 4's NoPE layers scale each query
        by its position counted from the cache's first slot, pads included, from `floor_scale` - 1 on
        (modeling_llama4.py:363): a padded row keeps its logits while the sequence holds at most floor_scale - 1
        positions (`Session` refuses a padded batch past it)."""
        config = self.text_config
        if getattr(config, "attn_temperature_tuning", False) and 0 in (getattr(config, "no_rope_layers", None) or ()):
            return int(config.floor_scale) - 1
        return None

    @property
    def stream_collapse(self) -> nn.Module | None:
        """The module that collapses hyper-connected residual streams into one hidden state before the final norm
        (HY V4 VL's `hc_head`: its decoder layers pass [batch, seq, streams, hidden] from one to the next), or None
        where the decoder layers pass one residual stream [batch, seq, hidden]."""
        head = getattr(self.language_model, "hc_head", None)
        return head if isinstance(head, nn.Module) else None

    @property
    def vision_tower(self) -> nn.Module:
        return cast(nn.Module, first_attribute(self.base, VISION_TOWER_NAMES, "vision tower"))

    @property
    def projector(self) -> nn.Module:
        for owner in self._projector_owners():
            for name in PROJECTOR_NAMES:
                found = getattr(owner, name, None)
                if isinstance(found, nn.Module):
                    return found
        raise AttributeError(f"{type(self.model).__name__} has no image projector under any of the names "
                             f"{', '.join(PROJECTOR_NAMES)}.")

    def _projector_owners(self) -> Iterator[nn.Module]:
        """The base model, then its vision tower: looked up only when the base has no projector (an encoder-free
        model such as Gemma 4 Unified has no tower)."""
        yield self.base
        yield self.vision_tower

    @property
    def has_projector(self) -> bool:
        try:
            return isinstance(self.projector, nn.Module)
        except AttributeError:
            return False

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower: Any = self.vision_tower  # CLIPVisionModel has `encoder` (older releases nest it in `vision_model`)
        tower = getattr(tower, "vision_model", tower)
        for path in (("encoder", "layers"), ("encoder", "layer"), ("blocks",), ("layers",)):
            found = tower
            for name in path:
                found = getattr(found, name, None)
            if isinstance(found, nn.ModuleList):
                return found
        raise AttributeError(f"{type(tower).__name__} has no encoder layers (encoder.layers, blocks, layers).")

    # --- shapes ---
    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.text_config, "num_key_value_heads", None) or self.num_heads  # None: no GQA (Persimmon)

    def resolve_layers(self, layers: Sequence[int] | None, name: str = "layers",
                       default: Sequence[int] = ()) -> tuple[int, ...]:
        """`layers` (sorted) checked against the language model's depth, or `default` when None."""
        if layers is None:
            return tuple(default)
        bad = [x for x in layers if x >= self.num_layers]
        if bad:
            raise ValueError(
                f"`{name}` holds {bad}, but the language model has {self.num_layers} layers "
                f"(0 .. {self.num_layers - 1}); pass indices below {self.num_layers} or None for the default."
            )
        return tuple(sorted(layers))

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_heads

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        """Every image placeholder id (from the config's `image_token_id` / `image_token_index`, or a list)."""
        ids = config_ids(self._hf.config, IMAGE_TOKEN_FIELDS)
        if not ids:
            raise AttributeError(f"{type(self._hf.config).__name__} names no image placeholder token "
                                 f"({', '.join(IMAGE_TOKEN_FIELDS)}).")
        return ids

    @property
    def image_token_id(self) -> int:
        """The (first) image placeholder id."""
        return self.image_token_ids[0]

    @property
    def frame_token_ids(self) -> tuple[int, ...]:
        """Ids of the tokens that wrap an image (vision start/end, begin/end of image), from the config."""
        return config_ids(self._hf.config, FRAME_TOKEN_FIELDS)

    def patch_grid(self, input_ids: Tensor) -> Tensor | None:
        """[images, 3] (1, 1, patches) of each image in a flattened patch tensor that comes without
        `image_grid_thw` (Fuyu's), so per-image work on the pixels (VCD's noise) can split it; None where the
        processor gives a grid or one tensor per image. `input_ids`: [batch, seq] the caller's prompts."""
        return None

    def pixel_extents(self, inputs: dict[str, Any]) -> list[tuple[int, int]] | None:
        """(height, width) of each image's own pixels in a [images, C, H, W] tensor that the processor pads to the
        batch's largest image (the model crops the padding away), so per-image work on the pixels (VCD's noise)
        does not depend on the batch; None where the pixels are not padded per batch. `inputs`: the model inputs."""
        return None

    # --- prompt structure ---
    def image_mask(self, input_ids: Tensor) -> Tensor:
        """[batch, seq] image placeholder tokens."""
        ids = self.image_token_ids
        if len(ids) == 1:
            return input_ids == ids[0]
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    def image_frame_mask(self, input_ids: Tensor) -> Tensor:
        """[batch, seq] tokens that wrap the image (none for LLaVA; vision start/end for Qwen)."""
        ids = self.frame_token_ids
        if not ids:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    def marker_ids(self, tokenizer: Any | None) -> list[list[int]]:
        """Token id sequences of the assistant markers as this tokenizer spells them in a prompt (`spellings`)."""
        if tokenizer is None:
            return []
        found: list[list[int]] = []
        for marker in self.assistant_markers:
            found += [ids for ids in spellings(tokenizer, marker) if ids not in found]
        return found

    def named_frame_ids(self, tokenizer: Any | None) -> list[int]:
        """Ids of `frame_tokens` in this tokenizer's vocabulary (a checkpoint whose tokenizer lacks one wraps its
        images otherwise: the missing token is skipped, never read as the unknown token)."""
        if tokenizer is None:
            return []
        unknown = getattr(tokenizer, "unk_token_id", None)
        found = [(t, tokenizer.convert_tokens_to_ids(t)) for t in self.frame_tokens]
        return [int(i) for t, i in found if i is not None and (i != unknown or t == tokenizer.unk_token)]

    def frame_mask(self, input_ids: Tensor, tokenizer: Any | None) -> Tensor:
        """[batch, seq] tokens that wrap the image: those the config names (`image_frame_mask`) and the
        `frame_tokens` this tokenizer has (`named_frame_ids`)."""
        frame = self.image_frame_mask(input_ids)
        named = self.named_frame_ids(tokenizer)
        if named:
            frame = frame | torch.isin(input_ids, torch.tensor(named, device=input_ids.device))
        return frame

    def spans(self, input_ids: Tensor, attention_mask: Tensor | None = None, tokenizer: Any | None = None) -> Spans:
        """Find each row's spans from the prompt's structure.

        The instruction is the text after the row's last image token (or, without an image, the whole
        row) up to the first assistant marker after it ("ASSISTANT:", "<|im_end|>"...) found with `tokenizer`.
        Without a tokenizer the instruction runs to the end of the prompt, marker included.
        """
        # input_ids, attention_mask: [batch, seq]
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        image = self.image_mask(input_ids) & valid
        frame = self.frame_mask(input_ids, tokenizer)
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device)
        instruction = torch.zeros_like(image)
        markers = self.marker_ids(tokenizer)
        for b in range(batch):
            row = input_ids[b].tolist()
            image_positions = positions[image[b]]
            first_valid = int(valid[b].nonzero()[0]) if valid[b].any() else seq
            start = int(image_positions[-1]) + 1 if len(image_positions) else first_valid
            ends = [s for ids in markers for s in range(start, seq - len(ids) + 1) if row[s : s + len(ids)] == ids]
            instruction[b, start : min(ends, default=seq)] = True
        instruction &= valid & ~image & ~frame
        return Spans(image=image, instruction=instruction, valid=valid)

    # --- the same prompt with other text (ICD's disturbed instruction) ---
    def system_splice(self, row: Sequence[int], text: str, tokenizer: Any) -> Splice:
        """Put `text` in the system slot of one prompt row (its real token ids): after BOS and before the
        first user marker, replacing any system text there (LLaVA: `[<s>] text USER: <image>...`)."""
        start = after_bos(row, tokenizer)
        markers = [ids for marker in self.user_markers for ids in spellings(tokenizer, marker)]
        found = find_ids(row, markers, start)
        return Splice(start, found[0] if found else start, tuple(word_ids(tokenizer, text)))

    def after_image_splice(self, row: Sequence[int], text: str, tokenizer: Any) -> Splice:
        """Insert `text` right after the last image token of one prompt row (after the tokens that close the image:
        Qwen's vision end, InternVL's </img> found with the tokenizer)."""
        ids = torch.tensor([list(row)])
        marks = (self.image_mask(ids) | self.frame_mask(ids, tokenizer))[0].nonzero().flatten()
        if not len(marks):
            raise MissingImageError("the prompt row has no image token to place the text after; use a prompt with "
                                    "an image, or another placement.")
        anchor = int(marks[-1]) + 1
        return Splice(anchor, anchor, tuple(word_ids(tokenizer, text)))

    # --- the same prompt without its image ---
    # image tensors of the model inputs; generate may pass the vision encoder's output instead of pixels
    image_input_keys: ClassVar[tuple[str, ...]] = IMAGE_INPUT_KEYS

    def without_image(self, inputs: dict[str, Any], pad_token_id: int, *, drop_frames: bool = True,
                      width: int | None = None) -> dict[str, Any]:
        """Model inputs for the same prompts with their image tokens removed, left-padded again (to `width`,
        default the longest remaining row). `drop_frames` also removes the tokens that wrap each image
        (Qwen's vision start/end). Image tensors are dropped; positions follow from the new attention mask
        as in `generate`."""
        input_ids = inputs["input_ids"]
        drop = self.image_mask(input_ids)
        if drop_frames:
            drop = drop | self.image_frame_mask(input_ids)
        keep = ~drop & padding_mask(inputs.get("attention_mask"), input_ids)
        new_ids, new_mask = left_padded_rows([input_ids[b][keep[b]] for b in range(input_ids.shape[0])],
                                             pad_token_id, width)
        out = {k: v for k, v in inputs.items() if k not in (*self.image_input_keys, "input_ids", "attention_mask")}
        out.update(input_ids=new_ids, attention_mask=new_mask)
        for key in TOKEN_TYPE_KEYS:  # text-only rows: every token is text (type 0)
            if isinstance(out.get(key), Tensor):
                out[key] = torch.zeros_like(new_ids, dtype=out[key].dtype)
        return self.text_positions(out)

    @property
    def rope_sections(self) -> int:
        """How many position rows the language model's rotary embedding takes (M-RoPE: one per section, 3 for
        Qwen's, 4 for HunYuanVL's 4-axis form; else 1)."""
        rope = getattr(self.text_config, "rope_parameters", None) or {}
        # one dict, or one per layer type (Cohere Compass: {"sliding_attention": {...}, "full_attention": {...}})
        nested = [v for v in rope.values() if isinstance(v, dict)] if isinstance(rope, dict) else []
        sections = [r["mrope_section"] for r in (rope, *nested) if isinstance(r, dict) and r.get("mrope_section")]
        return len(sections[0]) if sections else 1

    def text_positions(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Add position ids for a text-only left-padded batch, as `generate` computes them (M-RoPE: the
        rotary sections share the 1-D text position)."""
        positions = text_positions(inputs["attention_mask"])
        sections = self.rope_sections
        inputs["position_ids"] = positions if sections == 1 else positions[None].expand(sections, -1, -1)
        return inputs

    # model attributes that a forward pass overwrites and an extra (prepare) pass must restore
    stateful_attributes: ClassVar[tuple[str, ...]] = STATEFUL_ATTRIBUTES

    def saved_state(self) -> dict[str, Any]:
        base = self.base
        return {name: getattr(base, name) for name in self.stateful_attributes if hasattr(base, name)}

    def restore_state(self, state: dict[str, Any]) -> None:
        base = self.base
        for name, value in state.items():
            setattr(base, name, value)
