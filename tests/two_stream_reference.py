"""Helpers of the SID and AvisC tests: one greedy vlmfix run that also records both streams' logits, the
inputs of a no-cache reference forward, and the contrast formula in plain PyTorch."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

import vlmfix


def extended(tiny: Any, inputs: dict, tokens: Tensor) -> dict:
    """The prompt batch followed by `tokens` [B, t], as one no-cache forward's inputs (generate's positions)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], dim=1)
    if tiny.family == "llava":
        out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return out


def run_two_streams(tiny: Any, inputs: dict, methods: list, steps: int = 4,
                    **kw: Any) -> tuple[Any, list[Tensor], Any]:
    """vlmfix greedy with `methods`; returns (generate output, the 2B-row logits of each step, report)."""
    seen: list[Tensor] = []
    rows = inputs["input_ids"].shape[0]

    def capture(module, args, output):
        if output.logits.shape[0] == 2 * rows:
            seen.append(output.logits[:, -1].float().clone())

    handle = tiny.model.register_forward_hook(capture)  # before the engine's hook: sees both streams
    try:
        with vlmfix.apply(tiny.model, *methods) as session:
            out = session.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True, **kw)
            report = session.report()
    finally:
        handle.remove()
    return out, seen, report


def formula(positive: Tensor, negative: Tensor, alpha: float, beta: float | None) -> Tensor:
    scores = (1 + alpha) * positive - alpha * negative
    if beta is not None:
        scores[positive < positive.max(-1, keepdim=True).values + math.log(beta)] = -math.inf
    return scores


def assert_scores_close(got: Tensor, want: Tensor) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)


def image_order_indices(kept: Tensor, image: Tensor, row: int) -> list[int]:
    return kept[row][image[row]].nonzero().flatten().tolist()


def last_logits(model: Any, inputs: dict, tokens: Tensor, **extra: Any) -> Tensor:
    """[batch, vocab] the plain model's next-token logits after the prompt and `tokens` ([batch, steps]), one
    forward without a cache; `extra`: the image inputs (and whatever else the model takes)."""
    ids = torch.cat([inputs["input_ids"], tokens], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, **extra).logits[:, -1]
