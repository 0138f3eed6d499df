"""What vlmfix needs to know about a model family, as a small declarative class.

An adapter maps a closed vocabulary (`decoder_layers`, `attn`, `o_proj`, `input_layernorm`,
`image_token_id`, `projector`, `vision_tower`, `vision_layers`, `text_config`) to a model's modules
by attribute access, and finds each batch row's token spans from the prompt's structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from vlmfix.decoding.prompt_inputs import Splice, find_ids, left_padded_rows, padding_mask, text_positions, word_ids
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


@dataclass(frozen=True)
class Adapter:
    """Where things are in one model family. Subclasses set the class attributes and accessors."""

    model: nn.Module
    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    # text shown before the assistant's answer in this family's chat templates (ends the instruction)
    assistant_markers: ClassVar[tuple[str, ...]] = ()
    # text that opens the user's turn in this family's chat templates (a system text comes before it)
    user_markers: ClassVar[tuple[str, ...]] = ()

    # --- module vocabulary (attribute access only) ---
    @property
    def _hf(self) -> Any:
        """`model` for attribute access: each family's submodules and config fields are not typed on `nn.Module`."""
        return self.model

    @property
    def language_model(self) -> nn.Module:
        return self._hf.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.language_model.layers)

    def attn(self, layer_idx: int) -> nn.Module:
        return cast(nn.Module, self.decoder_layers[layer_idx].self_attn)

    def o_proj(self, layer_idx: int) -> nn.Linear:
        return cast(nn.Linear, self.attn(layer_idx).o_proj)

    def input_layernorm(self, layer_idx: int) -> nn.Module:
        return cast(nn.Module, self.decoder_layers[layer_idx].input_layernorm)

    @property
    def text_config(self) -> Any:
        return self._hf.config.text_config

    @property
    def projector(self) -> nn.Module:
        return self._hf.model.multi_modal_projector

    @property
    def vision_tower(self) -> nn.Module:
        return self._hf.model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower: Any = self.vision_tower  # CLIPVisionModel has `encoder` (older releases nest it in `vision_model`)
        return getattr(tower, "vision_model", tower).encoder.layers

    # --- shapes ---
    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads or self.num_heads

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
    def image_token_id(self) -> int:
        return self._hf.config.image_token_id

    # --- prompt structure ---
    def image_mask(self, input_ids: Tensor) -> Tensor:
        """[batch, seq] image placeholder tokens."""
        return input_ids == self.image_token_id

    def image_frame_mask(self, input_ids: Tensor) -> Tensor:
        """[batch, seq] tokens that wrap the image (none for LLaVA; vision start/end for Qwen)."""
        return torch.zeros_like(input_ids, dtype=torch.bool)

    def marker_ids(self, tokenizer: Any | None) -> list[list[int]]:
        """Token id sequences of the assistant markers, under this tokenizer's spellings."""
        if tokenizer is None:
            return []
        found = []
        for marker in self.assistant_markers:
            for text in (marker, " " + marker):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in found:
                    found.append(ids)
        return found

    def spans(self, input_ids: Tensor, attention_mask: Tensor | None = None, tokenizer: Any | None = None) -> Spans:
        """Find each row's spans from the prompt's structure.

        The instruction is the text after the row's last image token (or, without an image, the whole
        row) up to the first assistant marker after it ("ASSISTANT:", "<|im_end|>"...) found with `tokenizer`.
        Without a tokenizer the instruction runs to the end of the prompt, marker included.
        """
        # input_ids, attention_mask: [batch, seq]
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        image = self.image_mask(input_ids) & valid
        frame = self.image_frame_mask(input_ids)
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
        bos = getattr(tokenizer, "bos_token_id", None)
        start = 1 if row and bos is not None and row[0] == bos else 0
        markers = [tokenizer.encode(m, add_special_tokens=False) for m in self.user_markers]
        markers += [tokenizer.encode(" " + m, add_special_tokens=False) for m in self.user_markers]
        found = find_ids(row, markers, start)
        return Splice(start, found[0] if found else start, tuple(word_ids(tokenizer, text)))

    def after_image_splice(self, row: Sequence[int], text: str, tokenizer: Any) -> Splice:
        """Insert `text` right after the last image token of one prompt row (after Qwen's vision end)."""
        ids = torch.tensor([list(row)])
        marks = (self.image_mask(ids) | self.image_frame_mask(ids))[0].nonzero().flatten()
        if not len(marks):
            raise MissingImageError("the prompt row has no image token to place the text after; use a prompt with "
                                    "an image, or another placement.")
        anchor = int(marks[-1]) + 1
        return Splice(anchor, anchor, tuple(word_ids(tokenizer, text)))

    # --- the same prompt without its image ---
    # image tensors of the model inputs; generate may pass the vision encoder's output instead of pixels
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes", "mm_encoder_outputs")

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
        return self.text_positions(out)

    def text_positions(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Add position ids for a text-only left-padded batch, as `generate` computes them."""
        inputs["position_ids"] = text_positions(inputs["attention_mask"])
        return inputs

    # model attributes that a forward pass overwrites and an extra (prepare) pass must restore
    stateful_attributes: ClassVar[tuple[str, ...]] = ()

    def saved_state(self) -> dict[str, Any]:
        return {name: getattr(self.model.model, name) for name in self.stateful_attributes}

    def restore_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self.model.model, name, value)
