"""Gemma 4's shared-KV layers: an edit acts on one layer's own attention call, never on the keys and values
that a later layer reuses.

Gemma 4's last layers attend with the keys and values of the last earlier layer of their type (the
producer stores them, the sharing layer receives the same tensors). vlmfix's edits change scores,
probabilities and head outputs inside one attention call; these tests record what every attention call
receives (a recording backend that vlmfix wraps) and check both directions: an edit at the producer
leaves the keys and values the sharing layer reads unchanged, and an edit at a sharing layer changes
that layer's output only, not the layers before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import vlmfix
from vlmfix.methods.pai import PAI
from vlmfix.testing import build_tiny

RECORDING = "test_recording_sdpa"


@contextmanager
def recorded_attention(model: Any) -> Iterator[dict[int, list[tuple[Tensor, Tensor]]]]:
    """Run `model` on a backend that records each decoder layer's (key, value) per call, then restore sdpa."""
    calls: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def recording(module: Any, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        if hasattr(module, "is_kv_shared_layer"):  # a decoder layer (the vision tower's layers are not)
            calls.setdefault(module.layer_idx, []).append((key.clone(), value.clone()))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(RECORDING, recording)
    AttentionMaskInterface.register(RECORDING, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # sdpa's masks
    model.set_attn_implementation(RECORDING)
    try:
        yield calls
    finally:
        model.set_attn_implementation("sdpa")
        del AttentionInterface._global_mapping[RECORDING]
        del ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[RECORDING]


def layer_outputs(model: Any, inputs: dict[str, Any], method: Any | None) -> list[Tensor]:
    """Each decoder layer's output hidden states on the prompt (one forward, inside a session with `method`)."""
    layers = model.model.language_model.layers
    seen: list[Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
               for layer in layers]
    try:
        with vlmfix.apply(model, *([method] if method else [])) as session:
            session.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen[: len(layers)]


def test_the_tiny_build_has_producer_and_sharing_layers():
    modes = build_tiny("gemma4").model.config.text_config.kv_sharing_modes
    assert modes == ["store", "store", "reuse", "reuse"]


def test_an_edit_at_the_producer_leaves_the_shared_keys_and_values_unchanged():
    tiny = build_tiny("gemma4")
    inputs = tiny.inputs(["is there a dog ?"])
    with recorded_attention(tiny.model) as calls:
        plain = layer_outputs(tiny.model, inputs, None)
        reference = {i: calls[i][0] for i in (1, 3)}
        calls.clear()
        edited = layer_outputs(tiny.model, inputs, PAI(alpha=2.0, layers=[1], cfg=False))
    assert not torch.equal(plain[1], edited[1])  # the edit changed the producer's output ...
    for layer in (1, 3):  # ... but not the keys and values it stores and layer 3 reads
        assert torch.equal(calls[layer][0][0], reference[layer][0])
        assert torch.equal(calls[layer][0][1], reference[layer][1])
    assert torch.equal(calls[3][0][0], calls[1][0][0])  # layer 3 reads layer 1's keys (shared, not recomputed)


def test_an_edit_at_a_sharing_layer_changes_that_layer_only():
    tiny = build_tiny("gemma4")
    inputs = tiny.inputs(["is there a dog ?"])
    plain = layer_outputs(tiny.model, inputs, None)
    edited = layer_outputs(tiny.model, inputs, PAI(alpha=2.0, layers=[3], cfg=False))
    for layer in (0, 1, 2):
        assert torch.equal(plain[layer], edited[layer])
    assert not torch.equal(plain[3], edited[3])



def test_an_edit_at_a_sharing_layer_leaves_the_stored_cache_unchanged():
    """The sharing layer's edit must not write back into the producers' cache, which the next steps read: after
    two new tokens, every stored layer holds the prompt's keys and values (all but its last slot, the first new
    token, which the edit may change; a sliding layer keeps its window's last slots) exactly as without the edit."""
    tiny = build_tiny("gemma4")
    inputs = tiny.inputs(["is there a dog ?"])
    caches = []
    for method in (None, PAI(alpha=2.0, layers=[3], cfg=False)):
        with vlmfix.apply(tiny.model, *([method] if method else [])) as session:
            out = session.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        caches.append(out.past_key_values)
    plain, edited = caches
    stored = [i for i, layer in enumerate(plain.layers) if layer.keys is not None and layer.keys.numel()]
    assert stored  # the producers' layers hold the cache
    for i in stored:
        assert torch.equal(plain.layers[i].keys[..., :-1, :], edited.layers[i].keys[..., :-1, :])
        assert torch.equal(plain.layers[i].values[..., :-1, :], edited.layers[i].values[..., :-1, :])
