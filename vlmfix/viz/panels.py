"""What the pictures show, read from a session's report as plain data (no drawing here).

- image-token maps (one value per image token of the row, in prompt order): GIFT's saliency, DualStream's
  local and summary tokens, SID's and AvisC's kept tokens, VAR's visual sinks (share of its edited layers in
  which the token is a sink), PAI's image-attention gain (`record=True`);
- head maps ([layers, heads]): VHR's vision-aware head divergence and the heads it scaled, VAR's image-centric
  heads (share of the prompt's edited queries for which each head was selected);
- token traces (per generated token, `record=True`): each contrastive method's positive and negative
  log-probabilities of the chosen token and of the token the positive stream alone would have chosen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageMap:
    """One value per image token of a row (NaN: no value); `name` is "method.what" (the panels' gid prefix)."""

    name: str
    title: str
    values: np.ndarray  # [image tokens]
    binary: bool = False  # a set of tokens (1 = in the set), drawn with a two-colour scale
    unit: bool = False  # a share or a normalised score: the colour scale is [0, 1]


@dataclass(frozen=True)
class HeadMap:
    """One value per (layer, head); `layers` names the rows; `name` is "method.what". A layer with fewer heads than
    the widest (Dots3 Note's and Step 3.7's sliding layers have their own head count) is NaN past its last head."""

    name: str
    title: str
    layers: list[int]
    values: np.ndarray  # [len(layers), most heads of a layer]
    binary: bool = False
    unit: bool = False


@dataclass(frozen=True)
class TokenTrace:
    """Per generated token: the chosen and greedy tokens and both streams' log-probabilities of each."""

    method: str
    tokens: list[int]
    greedy_tokens: list[int]
    chosen_positive: list[float]
    chosen_negative: list[float]
    greedy_positive: list[float]
    greedy_negative: list[float]

    @property
    def flipped(self) -> list[int]:
        """Steps whose chosen token differs from the positive stream's greedy one."""
        return [t for t, (a, b) in enumerate(zip(self.tokens, self.greedy_tokens)) if a != b]


def _by_layer(mapping: Mapping[Any, Any]) -> dict[int, Any]:
    """A per-layer dict with int keys (a report read back from JSON has str keys)."""
    return {int(k): v for k, v in mapping.items()}


def _layer_rows(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """[layers, most heads] float: each layer's per-head values, NaN past the heads of a layer that has fewer."""
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), np.nan)
    for i, values in enumerate(rows):
        out[i, : len(values)] = np.asarray(values, dtype=float)
    return out


def _members(indices: Sequence[int] | None, count: int) -> np.ndarray:
    out = np.zeros(count)
    if indices:
        out[np.asarray(indices, dtype=int)] = 1.0
    return out


def image_maps(report: Mapping[str, Any], image_positions: Sequence[int], row: int) -> list[ImageMap]:
    """The image-token maps of batch row `row` (`image_positions`: the row's image-token positions)."""
    count = len(image_positions)
    maps: list[ImageMap] = []
    gift = report.get("gift", {}).get("rows")
    if gift and gift[row].get("saliency"):
        maps.append(ImageMap("gift.saliency", "GIFT saliency", np.asarray(gift[row]["saliency"], dtype=float),
                             unit=True))
    dual = report.get("dual_stream", {}).get("rows")
    if dual:
        maps.append(ImageMap("dual_stream.local", "DualStream local tokens", _members(dual[row]["local_tokens"], count),
                             binary=True))
        maps.append(ImageMap("dual_stream.summary", "DualStream summary tokens",
                             _members(dual[row]["summary_tokens"], count), binary=True))
    sid = report.get("sid", {}).get("rows")
    if sid and sid[row].get("kept_prefill") is not None:
        maps.append(ImageMap("sid.kept", "SID kept tokens (prefill)", _members(sid[row]["kept_prefill"], count),
                             binary=True))
    avisc = report.get("avisc", {}).get("rows")
    if avisc:
        maps.append(ImageMap("avisc.kept", "AvisC kept (blind) tokens", _members(avisc[row]["kept"], count),
                             binary=True))
    var = report.get("var", {}).get("rows")
    if var and var[row]["visual_sinks"]:
        index = {int(p): i for i, p in enumerate(image_positions)}
        per_layer = _by_layer(var[row]["visual_sinks"])
        share = np.zeros(count)
        for positions in per_layer.values():
            for p in positions:
                share[index[int(p)]] += 1.0 / len(per_layer)
        maps.append(ImageMap("var.visual_sinks", "VAR visual sinks (share of layers)", share, unit=True))
    pai = report.get("pai", {}).get("image_gain")
    if pai and pai[row]:
        maps.append(ImageMap("pai.image_gain", "PAI image-attention gain", np.asarray(pai[row], dtype=float)))
    return maps


def head_maps(report: Mapping[str, Any], row: int) -> list[HeadMap]:
    """The layer x head maps of batch row `row`."""
    maps: list[HeadMap] = []
    vhr = report.get("vhr", {}).get("rows")
    if vhr:
        layers = _by_layer(vhr[row]["layers"])
        order = sorted(layers)
        vhd = _layer_rows([layers[k]["vhd"] for k in order])  # [layers, heads]
        chosen = np.where(np.isnan(vhd), np.nan, 0.0)
        for i, k in enumerate(order):
            chosen[i, np.asarray(layers[k]["heads"], dtype=int)] = 1.0
        maps.append(HeadMap("vhr.vhd", "VHR vision-aware head divergence", order, vhd))
        maps.append(HeadMap("vhr.scaled", "VHR heads scaled", order, chosen, binary=True))
    var = report.get("var", {}).get("rows")
    if var and var[row].get("image_centric_heads"):
        heads = _by_layer(var[row]["image_centric_heads"])
        order = sorted(heads)
        maps.append(HeadMap("var.image_centric_heads", "VAR image-centric heads (share of queries)", order,
                            _layer_rows([heads[k] for k in order]), unit=True))
    return maps


def token_traces(report: Mapping[str, Any], row: int) -> list[TokenTrace]:
    """The contrast traces of batch row `row` (methods run with `record=True`)."""
    traces = []
    for method, entry in report.items():
        rows = (entry.get("record") or {}).get("contrast", {}).get("rows") if isinstance(entry, Mapping) else None
        if rows:
            traces.append(TokenTrace(method, **rows[row]))
    return traces
