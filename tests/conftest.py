"""Shared fixtures: tiny offline models of every supported family (built once per session)."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET once, at its first import (transformers imports it). Without a GPU the
# kernel tests run the Triton kernels in the interpreter on the CPU, so set it before anything loads it.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from vlmfix.decoding.edits import Edit  # noqa: E402
from vlmfix.decoding.method import Method  # noqa: E402
from vlmfix.testing import FAMILIES, TORCHVISION_FAMILIES, TinyVLM, build_tiny, require_torchvision  # noqa: E402

# one greedy decoding step with its scores
GREEDY_STEP = dict(max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)


def tiny_model(family: str, attn: str = "sdpa", **shape: Any) -> TinyVLM:
    """A fresh tiny model (built in milliseconds; never shared, so no test sees another's changes)."""
    return build_tiny(family, attn_implementation=attn, **shape)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


class PlannedEdits(Method):
    """A test method: fixed edits from a function of (session, layer_idx), on chosen layers."""

    name = "planned-edits-test"
    needs_image = False

    def __init__(self, make: Callable[[Any, int], Sequence[Edit]], layers: Sequence[int] | None = None) -> None:
        self.make = make
        self.layers = layers

    def prepare(self, session: Any) -> Any:
        return session

    def edits(self, state: Any, layer_idx: int) -> Sequence[Edit]:
        if self.layers is not None and layer_idx not in self.layers:
            return ()
        return self.make(state, layer_idx)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: the marks added here count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test run on a family of `TORCHVISION_FAMILIES` (its `family` parameter) gets the `torchvision` mark.

    `VLMFIX_TEST_SHARD=K/N` keeps every N-th collected test from the K-th (0-based), so N processes share
    the suite (`.ci/run` runs two, one thread each); unset: every test."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("family") in TORCHVISION_FAMILIES:
            item.add_marker(pytest.mark.torchvision)
    shard = os.environ.get("VLMFIX_TEST_SHARD")
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    if not 0 <= index < count:
        raise pytest.UsageError(f"VLMFIX_TEST_SHARD={shard!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    kept = items[index::count]
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
    items[:] = kept


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A `torchvision` test fails (never skips) where torchvision is missing, naming the fix."""
    if item.get_closest_marker("torchvision") is not None:
        try:
            require_torchvision(f"{item.nodeid} (marked torchvision)")
        except RuntimeError as error:
            pytest.fail(str(error), pytrace=False)


def assert_top_k_selection_matters(family: str) -> TinyVLM:
    """The tiny build of an indexed-attention `family` (DeepSeek-V3.2-style top-k) gets prompts longer than its
    top-k, and the selection matters: the same weights keeping every key give other next-token scores. Returns
    the build."""
    from vlmfix.testing import conformance as suite

    tiny = build_tiny(family)
    inputs = tiny.inputs(list(suite.QUESTIONS))
    assert bool((inputs["attention_mask"].sum(dim=1) > tiny.model.config.text_config.index_topk).all())
    every_key = build_tiny(family, options={"index_topk": 256})
    weights = every_key.model.state_dict()
    assert all(torch.equal(value, weights[name]) for name, value in tiny.model.state_dict().items())
    selected = tiny.model.generate(**inputs, **GREEDY_STEP).scores[0]
    unselected = every_key.model.generate(**inputs, **GREEDY_STEP).scores[0]
    assert (selected - unselected).abs().max() > 1e-3
    return tiny


def zero_bias_everywhere(tiny: TinyVLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token scores on `suite.QUESTIONS` with a zero key bias in every layer (vlmfix's attention runs in each
    one, which the report's count checks) and plain generate's: ([batch, vocab], [batch, vocab])."""
    import vlmfix
    from vlmfix.adapters import get_adapter
    from vlmfix.decoding.edits import KeyBias
    from vlmfix.testing import conformance as suite

    inputs = tiny.inputs(list(suite.QUESTIONS))
    zero_bias = PlannedEdits(lambda state, layer: [KeyBias(bias=torch.zeros_like(state.spans.image[:, None],
                                                                                  dtype=torch.float32))])
    with vlmfix.apply(tiny.model, zero_bias, tokenizer=tiny.processor) as session:
        scores = session.generate(**inputs, **GREEDY_STEP).scores[0]
    assert session.report()[zero_bias.name]["applied"]["attention_calls"] == get_adapter(tiny.model).num_layers
    return scores, tiny.model.generate(**inputs, **GREEDY_STEP).scores[0]
