"""Per-image-token scores from the vision tower's own attention, for DualStream's token selection.

Forward pre-hooks on chosen vision layers recompute only what is needed from the layer's input and
its own projections (the tower keeps its fast attention backend, no `output_attentions`):

- CLIP towers (LLaVA, LLaVA-NeXT): the [CLS] row, `cls[j] = sum_h softmax(q_cls k^T / sqrt(d))[h, 1 + j]`,
  and optionally the attention each patch *receives*, `received[j] = mean_h sum_i P[h, i, 1 + j]` (the
  spatial set, column sums).
- Qwen2-VL / Qwen2.5-VL towers (no CLS token): the CLS-free substitute (vlmfix reading): the attention
  each patch receives, averaged over its attention segment's query patches and the heads, then averaged
  over each 2x2 merge group (one score per language-model image token), in the tower's patch order
  (Qwen2.5's window permutation undone).

Scores come per *unit*: an image (LLaVA-1.5, Qwen) or a crop (LLaVA-NeXT, where the base view and each
tile have their own CLS); `UnitScores.tokens` maps a unit's patches to the image's token order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

QUERY_CHUNK = 256  # query rows per step when summing received attention (bounds memory)
# add_pre_hook(module, hook): registers hook(module, args, kwargs) as a forward pre-hook
PreHookRegistrar = Callable[[nn.Module, Callable[..., None]], None]


@dataclass
class LayerCapture:
    """What one hooked vision layer saw in the latest tower forward."""

    cls: Tensor | None = None  # [units, patches] CLIP: CLS-row attention summed over heads
    received: Tensor | None = None  # CLIP: [units, patches]; Qwen: [seq] in the tower's order


@dataclass
class VisionProbe:
    """Hooks on the vision layers `layers`; fills `captures` at every vision tower forward."""

    layers: tuple[int, ...]
    want_received: frozenset[int]  # CLIP layers whose received (column-sum) score is needed
    qwen: bool
    captures: dict[int, LayerCapture] = field(default_factory=dict)
    grid_thw: Tensor | None = None  # Qwen: the latest tower call's grid
    calls: int = 0

    def install(self, tower: nn.Module, vision_layers: nn.ModuleList, add_pre_hook: PreHookRegistrar) -> None:
        """Put the probe's pre-hooks on the tower and its chosen layers through `add_pre_hook(module, hook)`
        (a session's `hook_for_prompt`, which removes them at the next prompt)."""
        for layer_idx in self.layers:
            layer: Any = vision_layers[layer_idx]  # a CLIP or Qwen vision block: attention under its own name
            attn = layer.attn if self.qwen else layer.self_attn
            hook = self._qwen_hook(layer_idx, attn) if self.qwen else self._clip_hook(layer_idx, attn)
            add_pre_hook(attn, hook)
        add_pre_hook(tower, self._tower_hook)

    def _tower_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        self.captures = {}
        if self.qwen:
            self.grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def _clip_hook(self, layer_idx: int, attn: Any) -> Callable[..., None]:
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = kwargs.get("hidden_states", args[0] if args else None)  # [units, 1 + patches, dim]
            assert h is not None  # an attention layer is always called with its hidden states
            units, tokens, _ = h.shape
            heads = attn.num_heads
            q = (
                attn.q_proj(h).view(units, tokens, heads, -1).transpose(1, 2).float()
            )  # [units, heads, tokens, d]
            k = attn.k_proj(h).view(units, tokens, heads, -1).transpose(1, 2).float()
            scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
            cls = ((q[:, :, :1] @ k.transpose(-1, -2)) * scale).softmax(-1)[:, :, 0]  # [units, heads, tokens]
            capture = LayerCapture(cls=cls.sum(1)[:, 1:])
            if layer_idx in self.want_received:
                received = torch.zeros(units, heads, tokens, device=h.device)
                for start in range(0, tokens, QUERY_CHUNK):
                    part = (q[:, :, start : start + QUERY_CHUNK] @ k.transpose(-1, -2)) * scale
                    received += part.softmax(-1).sum(2)
                capture.received = received.mean(1)[:, 1:]  # [units, patches]
            self.captures[layer_idx] = capture

        return hook

    def _qwen_hook(self, layer_idx: int, attn: Any) -> Callable[..., None]:
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = kwargs.get("hidden_states", args[0] if args else None)  # [seq, dim]
            cu_seqlens = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            assert h is not None and cu_seqlens is not None  # Qwen vision attention always gets both
            cos, sin = kwargs["position_embeddings"]  # [seq, head_dim] each
            seq = h.shape[0]
            heads = attn.num_heads
            q, k, _ = attn.qkv(h).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # [seq, heads, d]
            cos, sin = cos[:, None].float(), sin[:, None].float()
            q = q.float() * cos + _rotate_half(q.float()) * sin
            k = k.float() * cos + _rotate_half(k.float()) * sin
            scale = getattr(attn, "scaling", q.shape[-1] ** -0.5)
            received = torch.zeros(seq, device=h.device)
            bounds = cu_seqlens.tolist()
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                qs, ks = q[lo:hi].transpose(0, 1), k[lo:hi].transpose(0, 1)  # [heads, n, d]
                total = torch.zeros(heads, hi - lo, device=h.device)
                for start in range(0, hi - lo, QUERY_CHUNK):
                    part = (qs[:, start : start + QUERY_CHUNK] @ ks.transpose(-1, -2)) * scale
                    total += part.softmax(-1).sum(1)
                received[lo:hi] = total.mean(0) / (hi - lo)  # mean over heads and query patches
            self.captures[layer_idx] = LayerCapture(received=received)

        return hook


def vision_layers_of(adapter: Any) -> nn.ModuleList:
    """The adapter's `vision_layers`; CLIPVisionModel in transformers 5 holds them at `encoder.layers`
    (no `vision_model` level), which the adapter does not know yet."""
    try:
        return adapter.vision_layers
    except AttributeError:
        return adapter.vision_tower.encoder.layers


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class UnitScores:
    """One unit's per-token scores (an image, or a LLaVA-NeXT crop)."""

    local: Tensor  # [tokens]
    summary: Tensor  # [tokens]
    spatial: Tensor | None  # [tokens]


def clip_units(probe: VisionProbe, local_layer: int, summary_layer: int, spatial: bool) -> list[UnitScores]:
    """Per image (or crop) of the latest CLIP tower forward: CLS-row and received scores per patch."""
    local, summary = probe.captures[local_layer].cls, probe.captures[summary_layer].cls
    received = probe.captures[local_layer].received if spatial else None
    assert local is not None and summary is not None  # the CLIP hooks always capture the CLS row
    assert received is not None or not spatial  # captured for the local layer when spatial (want_received)
    return [
        UnitScores(local=local[u], summary=summary[u], spatial=received[u] if received is not None else None)
        for u in range(local.shape[0])
    ]


def qwen_units(
    probe: VisionProbe, tower: Any, local_layer: int, summary_layer: int
) -> list[UnitScores]:
    """Per image of the latest Qwen tower forward: received scores per merged (language-model) token.
    `tower` is the Qwen vision transformer (its merge and window sizes are plain attributes)."""
    grid = probe.grid_thw
    assert grid is not None  # the tower hook records grid_thw, an argument of every Qwen tower forward
    merge = tower.spatial_merge_size**2
    order = _window_order(tower, grid)  # block position of each merged token, or None (identity)

    def per_token(layer_idx: int) -> Tensor:
        received = probe.captures[layer_idx].received  # [seq] in block order
        assert received is not None  # the Qwen hooks always capture it
        merged = received.view(-1, merge).mean(-1)  # [seq / 4]
        if order is not None:
            merged = merged[torch.argsort(order)]  # back to the language model's token order
        return merged

    local, summary = per_token(local_layer), per_token(summary_layer)
    counts = (grid.prod(-1) // merge).tolist()
    return [
        UnitScores(local=lo, summary=su, spatial=lo)
        for lo, su in zip(local.split(counts), summary.split(counts))
    ]


def _window_order(tower: Any, grid: Tensor) -> Tensor | None:
    """Qwen2.5-VL: the window permutation of merged tokens (`window_index`); None for Qwen2-VL."""
    if not getattr(tower, "fullatt_block_indexes", None):
        return None
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(
        grid,
        spatial_merge_size=tower.spatial_merge_size,
        window_size=tower.window_size,
        patch_size=tower.patch_size,
    )
    return window_index.to(grid.device)
