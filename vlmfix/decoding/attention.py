"""vlmfix's attention function: a thin layer over the model's own backend (sdpa, eager, flash).

Registered with transformers' `AttentionInterface` (and a mask builder with
`AttentionMaskInterface`, bound to the wrapped backend's builder) under a per-session name. Layers
without edits call the wrapped backend with the exact arguments they got. In a two-stream forward the
rows split into blocks by the edits' `stream` (`vlmfix.decoding.edits.stream_blocks`); blocks without
edits call the backend too. Edited layers run the PyTorch edit path (`edited_attention`); one query row
edited by key biases only (PAI) runs SDPA with the biases as an additive mask (`vlmfix.decoding.key_bias`);
with kernel="always" the grouped Triton kernel (`vlmfix.decoding.grouped`) serves the decode-step edits it
can express. A layer with learned attention sinks (HY V4 VL's `s_aux`: one logit per head
in the softmax's denominator, with no value) takes neither: its edits run on the PyTorch path, which adds the
sink column, and its unedited calls go to the model's own eager attention, which adds it too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from vlmfix.decoding.edits import (
    Edit,
    HeadScale,
    additive_mask,
    edited_attention,
    scale_heads,
    stream_blocks,
    windowed_mask,
)
from vlmfix.decoding.grouped import KeyGroupCache, grouped_decode_output
from vlmfix.decoding.key_bias import KeyBiasPlans, key_bias_blocks_output, key_bias_row_output

AttentionFn = Callable[..., tuple[Tensor, Tensor | None]]


@dataclass
class AttentionCall:
    """One layer's attention call, as seen by observers (read the tensors, never modify them)."""

    module: nn.Module
    layer_idx: int
    query: Tensor  # [batch, heads, q_len, head_dim]
    key: Tensor  # [batch, kv_heads, kv_len, head_dim]
    value: Tensor  # [batch, kv_heads, kv_len, head_dim]
    attention_mask: Tensor | None
    scaling: float | None
    output: Tensor  # [batch, q_len, heads, head_dim], before o_proj
    softcap: float | None = None  # the layer's logit softcap (Gemma 2), applied before the mask
    sinks: Tensor | None = None  # [heads] the layer's learned sink logits (HY V4 VL), in the softmax's denominator


# An observer may return a replacement output (same shape) or None to keep it.
Observer = Callable[[AttentionCall], Tensor | None]


def wrapped_backend(implementation: str, module: nn.Module) -> AttentionFn:
    """The function `implementation` names for `module` (eager is each model file's own)."""
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return cast(AttentionFn, AttentionInterface._global_mapping[implementation])


def _only_last_row(edits: Sequence[Edit]) -> bool:
    return all(e.rows == "last" for e in edits if not isinstance(e, HeadScale))


class AttentionHost(Protocol):
    """What the attention function needs from a session (`vlmfix.decoding.session.Session` is one)."""

    edited_rows: int | None  # a two-stream forward edits its first `edited_rows` rows only
    key_groups: KeyGroupCache
    key_bias_plans: KeyBiasPlans
    sequence_length: int | None  # tokens of the running forward's sequence so far (cache + new), when known

    def owns_thread(self) -> bool: ...

    def negative_start(self) -> int | None: ...

    def edits_for(self, layer_idx: int) -> list[Edit]: ...

    def use_kernel(self) -> bool: ...

    @property
    def observed(self) -> bool: ...

    def observe(self, call: AttentionCall) -> Tensor: ...


def make_attention_function(host: AttentionHost, implementation: str) -> AttentionFn:
    """Build the session's attention function around the backend named `implementation`.

    Calls from threads other than the session's go to the backend untouched."""
    backends: dict[type, AttentionFn] = {}

    def vlmfix_attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        backend = backends.get(type(module))
        if backend is None:
            backend = backends.setdefault(type(module), wrapped_backend(implementation, module))
        if kwargs.get("indices") is not None and implementation in MERGES_SELECTION:
            # sparse attention leaves its top-k key selection to a backend of another name: merge it here
            attention_mask = with_selected_keys(attention_mask, kwargs["indices"], key.shape[2])
            kwargs["indices"] = None
        if kwargs.get("block_indices") is not None and implementation in MERGES_SELECTION:
            # MiniMax M3's block selection: merged into the mask as its own indexer does for eager/sdpa
            attention_mask = with_selected_blocks(module, attention_mask, kwargs["block_indices"], query, key,
                                                  kwargs.get("position_ids"))
            kwargs["block_indices"] = None
        if not host.owns_thread():
            return backend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        layer_idx = cast(int, module.layer_idx)  # every decoder attention module holds its index
        edits = host.edits_for(layer_idx)
        weights = None
        if edits and host.sequence_length is not None and key.shape[2] < host.sequence_length:
            # a sliding-window cache holds the last keys only: edits address keys by sequence position
            key, value, attention_mask = uncropped(key, value, attention_mask, host.sequence_length, query.shape[2])
        blocks = stream_blocks(edits, query.shape[0], host.edited_rows, host.negative_start()) if edits else []
        if len(blocks) == 1 and blocks[0][1]:  # every row gets the same edits
            out = edited_output(query, key, value, attention_mask, scaling, blocks[0][1], backend, module,
                                use_kernel=host.use_kernel(), group_cache=host.key_groups,
                                bias_plans=host.key_bias_plans, **kwargs)
        elif any(block_edits for _, block_edits in blocks):
            # contrastive layout [positive stream; negative stream]: each row block gets its own edits
            merged = one_sdpa_for_blocks(query, key, value, attention_mask, scaling, blocks, host, implementation,
                                         kwargs)
            if merged is not None:
                out = merged
            else:
                mask_of = (lambda part: attention_mask[part]) if attention_mask is not None else (lambda part: None)
                parts = []
                for part, block_edits in blocks:
                    if block_edits:
                        parts.append(edited_output(query[part], key[part], value[part], mask_of(part), scaling,
                                                   block_edits, backend, module, use_kernel=host.use_kernel(),
                                                   group_cache=host.key_groups, bias_plans=host.key_bias_plans,
                                                   **kwargs))
                    else:
                        parts.append(backend(module, query[part], key[part], value[part], mask_of(part),
                                             dropout=dropout, scaling=scaling, **kwargs)[0])
                out = torch.cat(parts, dim=0)
        else:
            out, weights = backend(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if host.observed:
            mask = observed_mask(attention_mask, query.shape[2], key.shape[2], kwargs.get("sliding_window"),
                                 query.device)
            out = host.observe(AttentionCall(module, layer_idx, query, key, value, mask, scaling, out,
                                             softcap=kwargs.get("softcap"), sinks=kwargs.get(SINKS)))
        return out, weights

    return vlmfix_attention


# the keyword under which a layer passes its learned attention-sink logits ([heads]; HY V4 VL,
# modeling_hy_v4_vl.py:428; gpt-oss's name): each head's sink joins the softmax's denominator and carries no value
SINKS = "s_aux"


def fast_paths_fit(kwargs: dict[str, Any]) -> bool:
    """Whether SDPA and the grouped kernel can compute this layer's softmax: no logit softcap (Gemma 2) and no
    attention sinks (HY V4 VL), which only the PyTorch edit path adds. kwargs: the layer's attention kwargs, or
    the edit path's layer kwargs (`sinks` under its own name there)."""
    return kwargs.get("softcap") is None and kwargs.get(SINKS) is None and kwargs.get("sinks") is None

# Backends into whose mask a sparse-attention layer (DeepSeek-V3.2's indexer: Mistral Large 4, Dots3 Note,
# HY V4 VL) merges its top-k selection itself; under any other name, vlmfix's included, it passes the selection
# as `indices` instead (modeling_mistral_large4.py:468-480), which these backends would ignore. MiniMax M3's
# block-sparse layers do the same with `block_indices` (modeling_minimax_m3_vl.py:468-486).
MERGES_SELECTION = ("eager", "sdpa")


def with_selected_keys(attention_mask: Tensor | None, indices: Tensor, kv_len: int) -> Tensor:
    """`attention_mask` [batch, 1, q_len, kv_len] with every key outside each query's selected ones masked, as
    the sparse-attention layers do for eager and sdpa (the same bool or additive minimum, so bit for bit).

    indices: [batch, q_len, top_k] the keys each query keeps."""
    if attention_mask is None:
        raise ValueError("a sparse-attention layer passed a key selection (`indices`) without an attention mask; "
                         "its model builds one for every layer, so this model is not one vlmfix has checked.")
    batch, q_len = indices.shape[:2]
    dropped = (indices.new_ones((batch, q_len, kv_len), dtype=torch.bool)
               .scatter(-1, indices.long(), False).unsqueeze(1))  # [batch, 1, q_len, kv_len]
    if attention_mask.dtype == torch.bool:
        return attention_mask & ~dropped
    return attention_mask.masked_fill(dropped, torch.finfo(attention_mask.dtype).min)


def with_selected_blocks(module: nn.Module, attention_mask: Tensor | None, block_indices: Tensor, query: Tensor,
                         key: Tensor, position_ids: Tensor | None) -> Tensor:
    """The [batch, heads, q_len, kv_len] additive mask of a block-sparse layer (MiniMax M3's lightning indexer):
    `attention_mask` with every key outside each query's selected key blocks masked, built by the layer's own
    indexer (`build_block_mask`, which the layer calls itself under eager and sdpa), so bit for bit.

    block_indices: [batch, index heads, q_len, top-k blocks], -1 for an unused slot."""
    indexer = getattr(module, "indexer", None)
    if indexer is None or not hasattr(indexer, "build_block_mask"):
        raise ValueError(f"{type(module).__name__} passed a block selection (`block_indices`) but has no indexer "
                         "with build_block_mask; this model is not one vlmfix has checked.")
    if position_ids is None:  # the layer's own fallback: the newest q_len of kv_len positions
        position_ids = torch.arange(key.shape[2] - query.shape[2], key.shape[2], device=query.device)
    positions = position_ids if position_ids.dim() > 1 else position_ids.unsqueeze(0)  # [batch or 1, q_len]
    return cast(Tensor, indexer.build_block_mask(block_indices, attention_mask, key.shape[2], query.dtype,
                                                 query.device, positions))


def one_sdpa_for_blocks(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                        scaling: float | None, blocks: list[tuple[slice, list[Edit]]], host: AttentionHost,
                        implementation: str, kwargs: dict[str, Any]) -> Tensor | None:
    """A two-stream decode row whose edited blocks hold key biases only, as one SDPA call over every row (the
    unedited stream's rows with their mask alone, as its SDPA backend would run them); None when this does not
    apply (another backend, the Triton kernel, a logit softcap, prefill rows, other edits)."""
    if implementation != "sdpa" or not fast_paths_fit(kwargs) or host.use_kernel():
        return None
    return key_bias_blocks_output(query, key, value, attention_mask, scaling, blocks, host.key_bias_plans,
                                  sliding_window=kwargs.get("sliding_window"))


def uncropped(key: Tensor, value: Tensor, attention_mask: Tensor | None, length: int, q_len: int
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keys, values and mask of a sliding-window cache (the last kv_len positions of the sequence) laid out over
    the whole sequence of `length` positions: the dropped positions hold zeros and are masked out, so the
    attention is unchanged and key-indexed edits (planned over prompt positions) meet their keys."""
    # key, value: [batch, kv_heads, kv_len, head_dim] -> [batch, kv_heads, length, head_dim]; MLA values
    # (Dots3 Note's sliding layers) are another width than the keys
    batch, kv_heads, kv_len, _ = key.shape
    missing = length - kv_len
    key = torch.cat([key.new_zeros(batch, kv_heads, missing, key.shape[-1]), key], dim=2)
    value = torch.cat([value.new_zeros(batch, kv_heads, missing, value.shape[-1]), value], dim=2)
    if attention_mask is None:
        full = additive_mask(None, 1, q_len, length, key.device)  # [1, 1, q_len, length] causal
        return key, value, full.masked_fill(torch.arange(length, device=key.device) < missing, float("-inf"))
    if attention_mask.dim() == 2:  # [batch, kv_len] padding mask (flash)
        return key, value, torch.cat([attention_mask.new_zeros(attention_mask.shape[0], missing), attention_mask], 1)
    mask = attention_mask[..., -kv_len:]
    blocked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    return key, value, torch.cat([mask.new_full((*mask.shape[:-1], missing), blocked), mask], dim=-1)


def observed_mask(attention_mask: Tensor | None, q_len: int, kv_len: int, sliding_window: int | None,
                  device: torch.device) -> Tensor | None:
    """The mask observers see: the backend's, or, for a sliding-window layer that got none (or a 2-D padding
    mask), the [batch or 1, 1, q_len, kv_len] additive mask with the window in it, so that an observer that
    recomputes attention honours the window the backend applied."""
    if sliding_window is None or (attention_mask is not None and attention_mask.dim() == 4):
        return attention_mask
    batch = attention_mask.shape[0] if attention_mask is not None else 1
    return windowed_mask(attention_mask, batch, q_len, kv_len, sliding_window, device)


def edited_output(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    edits: Sequence[Edit],
    backend: AttentionFn,
    module: nn.Module,
    use_kernel: bool = False,
    group_cache: KeyGroupCache | None = None,
    bias_plans: KeyBiasPlans | None = None,
    **kwargs: Any,
) -> Tensor:
    """Output of an edited layer: the grouped Triton kernel at decode steps when `use_kernel` and the
    edits fit it; for one row edited by key biases only (PAI), SDPA with the biases as an additive mask
    (`vlmfix.decoding.key_bias`, plans from `bias_plans`); else the PyTorch path.

    At prefill, when every probability edit touches only the last row, the backend computes all rows
    and only the last row is recomputed with edits (cost O(kv_len), not O(q_len * kv_len)).
    """
    if all(isinstance(e, HeadScale) for e in edits):
        out, _ = backend(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return scale_heads(out, edits, key.shape[2])
    q_len = query.shape[2]
    # the layer's own logit softcap and sliding window (Gemma 2 / 3) and attention sinks (HY V4 VL), honoured by the
    # PyTorch edit path; neither the grouped kernel nor SDPA adds a softcap or a sink column
    layer_kwargs = {"softcap": kwargs.get("softcap"), "sliding_window": kwargs.get("sliding_window"),
                    "sinks": kwargs.get(SINKS)}
    if q_len == 1 and use_kernel and fast_paths_fit(layer_kwargs):
        kernel_out = grouped_decode_output(query, key, value, attention_mask, scaling, edits, group_cache)
        if kernel_out is not None:
            return kernel_out
    if q_len == 1:
        row_out = single_row_output(query, key, value, attention_mask, scaling, edits, bias_plans, layer_kwargs)
        if row_out is not None:
            return row_out
    if q_len > 1 and _only_last_row(edits):
        out, _ = backend(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        mask = attention_mask[..., -1:, :] if attention_mask is not None and attention_mask.dim() == 4 else None
        if mask is None and attention_mask is not None:  # 2-D padding mask (flash): keep it
            mask = attention_mask
        last = single_row_output(query[:, :, -1:], key, value, mask, scaling, edits, bias_plans, layer_kwargs)
        if last is None:
            last = edited_attention(query[:, :, -1:], key, value, mask, scaling, edits, **layer_kwargs)
        out = out.clone()
        out[:, -1:] = last
        return out
    return edited_attention(query, key, value, attention_mask, scaling, edits, **layer_kwargs)


def single_row_output(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      scaling: float | None, edits: Sequence[Edit], bias_plans: KeyBiasPlans | None,
                      layer_kwargs: dict[str, Any]) -> Tensor | None:
    """One query row's edited output through SDPA when its edits are key biases only and the layer has no
    logit softcap and no attention sinks, else None."""
    if not fast_paths_fit(layer_kwargs):
        return None
    return key_bias_row_output(query, key, value, attention_mask, scaling, edits, bias_plans,
                               sliding_window=layer_kwargs["sliding_window"])


def register(name: str, function: AttentionFn, implementation: str) -> None:
    """Register `function` and a mask builder (the wrapped backend's) under `name`."""
    builder = mask_builder_for(implementation)
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, builder)


def unregister(name: str) -> None:
    AttentionInterface._global_mapping.pop(name, None)
    ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


def mask_builder_for(implementation: str) -> Callable[..., Any]:
    if implementation not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(
            f"vlmfix cannot wrap attention implementation {implementation!r}: it has no mask builder in "
            f"transformers' AttentionMaskInterface. Load the model with attn_implementation='sdpa' or 'eager'."
        )
    return cast(Callable[..., Any], ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[implementation])

