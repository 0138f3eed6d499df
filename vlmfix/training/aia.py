"""AIA: pull each decoder layer's answer -> image attention mass toward a stage-wise target (a training loss).

Per layer l and sample b, the interaction intensity is the softmax attention mass that the answer
tokens put on the image tokens, summed over image keys, averaged over answer rows and over query heads:

    I[l, b] = mean_h mean_{q in answer rows} sum_{k in image keys} A_l[b, h, q, k]

and the loss is a Huber loss toward stage constants T_l with per-stage thresholds delta_l:

    L_AIA = 1 / (layers * batch) * sum_l sum_b m_b * huber_{delta_l}(I[l, b] - T_l)

Nothing is computed with eager attention or `output_attentions`. The training forward runs inside a
vlmfix session, and an observer receives each layer's post-RoPE query and key. For the answer rows
only, it recomputes the scores `Q_R K^T * scale + mask`, takes their softmax, and sums it over the
image keys. That sum equals `exp(logsumexp(scores over image keys) - logsumexp(scores over all keys))`,
the spec's form, where "all keys" includes the head's learned sink logit on a layer that has one (HY V4
VL: the sink takes its share of the mass and carries no value), but keeps one [batch, heads, rows, keys]
tensor for backward instead of two. This costs
O(batch * heads * answer rows * keys) memory per layer, never O(keys^2). The observer differentiates
through q and k and returns None, so the model's output does not change.

```python
aia = AIALoss(targets="r4", lambda_=10.0)
with vlmfix.apply(model) as session, aia.observe(session) as record:
    out = model(**batch, use_cache=False)          # batch holds labels (answer tokens != -100)
loss = out.loss + aia.lambda_ * aia.loss(record)
```

Paper: Zheng et al., "AIA: Rethinking Architecture Decoupling Strategy In Unified Multimodal Model"
(first titled "Architecture Decoupling Is Not All You Need For Unified Multimodal Model"),
arXiv 2511.22663, Eq. 1-2 and Tables 2, S4-S5. vlmfix departs from the official code in three ways.
It recomputes only the answer rows inside its attention hook, where the official code uses eager
attention with `output_attentions`. Its spans are exact, taken from `input_ids` and labels. Its targets
are stage tables by relative depth, not indices hard-coded for a 30-layer model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlmfix.decoding.attention import AttentionCall
from vlmfix.decoding.edits import with_sink_column
from vlmfix.decoding.session import Session, apply
from vlmfix.errors import SessionError
from vlmfix.registry import Registry
from vlmfix.validation import choice, number, optional_number, sequence

IGNORE_INDEX = -100
Normalize = Literal["all", "valid"]
AnswerRows = Literal["all_turns", "last_turn"]
_NORMALIZE = ("all", "valid")
_ANSWER_ROWS = ("all_turns", "last_turn")


# ---------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Stage:
    """Layers from the previous stage's stop up to `stop` (exclusive) share one target and one delta.

    Args:
        stop: exclusive end of the stage: a layer index (absolute tables) or a fraction of depth in
            (0, 1] (relative tables; layer boundary ceil(stop * num_layers)). None: to the last layer.
        target: the target intensity T in [0, 1].
        delta: the Huber threshold delta > 0.
    """

    stop: float | None
    target: float
    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", optional_number(self.stop, "stop", low=0, low_open=True,
                                                         meaning="the stage's exclusive end (None: the last layer)"))
        object.__setattr__(self, "target", number(self.target, "target", low=0, high=1,
                                                  meaning="an attention mass the stage's layers are pulled toward"))
        object.__setattr__(self, "delta", number(self.delta, "delta", low=0, low_open=True,
                                                 meaning="the stage's Huber threshold"))


@dataclass(frozen=True)
class LayerTargets:
    """One target and one Huber threshold per decoder layer, and the rule that produced them."""

    target: tuple[float, ...]
    delta: tuple[float, ...]
    rule: str = "custom"

    def __post_init__(self) -> None:
        target = sequence(self.target, "target", lambda v, n: number(v, n, low=0, high=1), min_length=1,
                          what="attention masses in [0, 1], one per layer")
        delta = sequence(self.delta, "delta", lambda v, n: number(v, n, low=0, low_open=True), min_length=1,
                         what="Huber thresholds > 0, one per layer")
        if len(target) != len(delta):
            raise ValueError(
                f"LayerTargets needs one target and one delta per layer, got {len(target)} targets "
                f"and {len(delta)} deltas."
            )
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "delta", delta)

    @property
    def num_layers(self) -> int:
        return len(self.target)

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "target": list(self.target), "delta": list(self.delta)}


# a stage as given: a `Stage` or its (stop, target, delta) triple
StageSpec = Stage | tuple[float | None, float, float]


@dataclass(frozen=True, init=False)
class StageTable:
    """Stage-wise constant targets, resolved per model with `resolve(num_layers)`.

    Args:
        stages: the stages in order (`Stage`s or (stop, target, delta) triples); stops increase; the last
            stop may be None (the remaining layers).
        relative: stops are fractions of depth (True) or layer indices (False).
        rule: where the table comes from; written into the run config.
    """

    stages: tuple[Stage, ...]
    relative: bool = False
    rule: str = "custom"

    # written out (not generated) so that `stages` may be given as triples yet is typed as the `Stage`s it holds
    def __init__(self, stages: Sequence[StageSpec], relative: bool = False, rule: str = "custom") -> None:
        object.__setattr__(self, "stages", sequence(stages, "stages", _stage, min_length=1, what="stages"))
        object.__setattr__(self, "relative", relative)
        object.__setattr__(self, "rule", rule)
        stops = [s.stop for s in self.stages]
        if any(stop is None for stop in stops[:-1]):
            raise ValueError(
                f"only the last stage may have stop=None (to the last layer), got stops {stops}."
            )
        given = [stop for stop in stops if stop is not None]
        if any(b <= a for a, b in zip(given, given[1:])) or any(stop <= 0 for stop in given):
            raise ValueError(f"stage stops must be positive and increasing, got {stops}.")
        if self.relative and any(stop > 1 for stop in given):
            raise ValueError(f"relative stage stops are fractions of depth in (0, 1], got {stops}.")

    def boundaries(self, num_layers: int) -> list[int]:
        """The exclusive layer stop of each stage for a model of `num_layers` layers."""
        bounds = []
        for stage in self.stages:
            if stage.stop is None:
                bounds.append(num_layers)
            elif self.relative:
                bounds.append(math.ceil(round(stage.stop * num_layers, 9)))
            else:
                bounds.append(int(stage.stop))
        return bounds

    def resolve(self, num_layers: int) -> LayerTargets:
        """Per-layer targets and deltas for a model with `num_layers` decoder layers."""
        num_layers = number(num_layers, "num_layers", low=1, integer=True)
        bounds = self.boundaries(num_layers)
        target, delta = [], []
        for layer in range(num_layers):
            index = next((i for i, stop in enumerate(bounds) if layer < stop), None)
            if index is None:
                raise ValueError(
                    f"the AIA stage table {self.rule!r} ends at layer {bounds[-1]} but the model has "
                    f"{num_layers} "
                    f"layers; end the table with a stage of stop=None (or 1.0 for relative tables)."
                )
            target.append(self.stages[index].target)
            delta.append(self.stages[index].delta)
        return LayerTargets(tuple(target), tuple(delta), rule=self.rule)


def _stage(value: Any, name: str) -> Stage:
    """A `Stage`, or a (stop, target, delta) triple made into one (errors name the stage)."""
    if isinstance(value, Stage):
        return value
    triple = sequence(value, name, lambda item, _: item, length=3, what="values (stop, target, delta)")
    try:
        return Stage(*triple)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def rule_r4(delta: float = 0.05) -> StageTable:
    """Rule R4: the published understanding stages mapped by relative depth (not published; the default).

    f = l / L: f < 1/3 -> 0.10, 1/3 <= f < 2/3 -> 0.15, f >= 2/3 -> 0.30, with boundaries ceil(L/3) and
    ceil(2L/3) (Janus-Pro's 10 / 20 split at 30 layers).
    """
    return StageTable(
        ((1 / 3, 0.10, delta), (2 / 3, 0.15, delta), (1.0, 0.30, delta)), relative=True, rule="R4"
    )


STAGE_PRESETS: Registry[StageTable] = Registry("AIA stage preset")
for _name, _table in {
    "r4": rule_r4(),
    # Janus-Pro understanding as in the official code (0.15 up to and including layer 20; decision D3)
    "janus_pro_und": StageTable(
        ((10, 0.10, 0.05), (21, 0.15, 0.05), (30, 0.30, 0.05), (None, 0.20, 0.05)),
        rule="janus_pro_und (official code)",
    ),
    # the paper's table (arXiv 2511.22663 v5 Table 2), L = 29 for Janus-Pro and 30 for Emu3
    "janus_pro_und_paper": StageTable(
        ((10, 0.10, 0.05), (20, 0.15, 0.05), (30, 0.30, 0.05), (None, 0.20, 0.05)),
        rule="janus_pro_und_paper (paper Table 2)",
    ),
    "emu3_und": StageTable(
        ((10, 0.10, 0.05), (20, 0.15, 0.05), (31, 0.30, 0.05), (None, 0.20, 0.05)),
        rule="emu3_und (paper Table 2)",
    ),
    "janus_pro_gen": StageTable(
        ((10, 0.4, 0.2), (20, 0.4, 0.1), (25, 0.4, 0.1), (30, 0.2, 0.05), (None, 0.2, 0.05)),
        rule="janus_pro_gen (paper Table 2)",
    ),
    "emu3_gen": StageTable(
        ((10, 0.4, 0.2), (20, 0.4, 0.1), (25, 0.4, 0.1), (31, 0.2, 0.05), (None, 0.2, 0.05)),
        rule="emu3_gen (paper Table 2)",
    ),
}.items():
    STAGE_PRESETS.register(_name)(_table)

TargetsSpec = str | StageTable | LayerTargets | Sequence[tuple[float | None, float, float]]


def resolve_targets(targets: TargetsSpec, num_layers: int) -> LayerTargets:
    """Per-layer targets from a preset name, `StageTable`, `LayerTargets` or (stop_layer, T, delta) tuples."""
    if isinstance(targets, str):
        targets = STAGE_PRESETS.get(targets)
    elif not isinstance(targets, StageTable | LayerTargets):
        targets = StageTable(tuple(targets))
    if isinstance(targets, LayerTargets):
        if targets.num_layers != num_layers:
            raise ValueError(
                f"the per-layer AIA targets have {targets.num_layers} layers but the model has {num_layers}; "
                f"give a StageTable (relative=True maps any depth) or a table for this model."
            )
        return targets
    return targets.resolve(num_layers)


# ---------------------------------------------------------------------------------------------- the mass
def huber(error: Tensor, delta: Tensor) -> Tensor:
    """Elementwise Huber loss (same as `torch.nn.HuberLoss(delta)`) with a delta per element.

    0.5 * e^2 where |e| <= delta, delta * (|e| - 0.5 * delta) elsewhere.
    """
    absolute = error.abs()
    return torch.where(absolute <= delta, 0.5 * error**2, delta * (absolute - 0.5 * delta))


def _allowed_keys(
    attention_mask: Tensor | None, row_index: Tensor, q_len: int, kv_len: int, heads: int
) -> tuple[Tensor | None, Tensor | None]:
    """(bool mask, additive mask) of the selected rows, one of them None; each [batch, heads|1, rows, kv_len].

    A None mask means causal without padding; a 2-D mask [batch, kv_len] is a padding mask (flash).
    """
    batch, rows = row_index.shape
    device = row_index.device
    if attention_mask is None or attention_mask.dim() == 2:
        offset = kv_len - q_len  # queries are the last q_len positions
        keys = torch.arange(kv_len, device=device)
        allowed = (
            keys[None, None, None, :] <= (row_index + offset)[:, None, :, None]
        )  # [batch, 1, rows, kv_len]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
        return allowed, None
    if attention_mask.dim() != 4:
        raise ValueError(f"AIA expects a 2-D or 4-D attention mask, got shape {tuple(attention_mask.shape)}.")
    mask = attention_mask[..., -kv_len:].expand(batch, -1, q_len, kv_len)
    index = row_index[:, None, :, None].expand(batch, mask.shape[1], rows, kv_len)
    picked = mask.gather(2, index)  # [batch, heads|1, rows, kv_len]
    if picked.dtype == torch.bool:
        return picked, None
    return None, picked


def key_subset_mass(
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    row_index: Tensor,
    row_valid: Tensor,
    key_subset: Tensor,
    sinks: Tensor | None = None,
) -> Tensor:
    """Softmax attention mass that selected query rows put on a subset of keys, without the full map.

    Args:
        query: [batch, heads, q_len, head_dim], post-RoPE, as the attention function receives it.
        key: [batch, kv_heads, kv_len, head_dim] (GQA: heads is a multiple of kv_heads).
        attention_mask: None (causal), [batch, kv_len] padding, or [batch, 1|heads, q_len, kv_len] bool
            (True = attend) or additive float.
        scaling: the score scale (None: head_dim ** -0.5).
        row_index: [batch, rows] query positions (in q coordinates) to score.
        row_valid: [batch, rows] which entries of row_index are real (the rest is padding).
        key_subset: [batch, kv_len] the keys whose mass is summed (e.g. image tokens).
        sinks: [heads] the layer's learned attention-sink logits (HY V4 VL), in the softmax's denominator and in
            no subset, or None.

    Returns:
        mass: [batch, heads, rows] in [0, 1], float32 (float64 for float64 inputs); 0 for invalid rows
        and rows that see no subset key.
        Differentiable through query and key.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads}).")
    rows = row_index.shape[1]
    group = heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    index = row_index[:, None, :, None].expand(batch, heads, rows, head_dim)
    dtype = torch.promote_types(query.dtype, torch.float32)  # fp32, or fp64 for float64 models
    q_rows = query.gather(2, index).to(dtype).view(batch, kv_heads, group, rows, head_dim)
    # scores: [batch, heads, rows, kv_len]; a fresh tensor, so the masking below may work in place
    scores = (
        torch.einsum("bkgrd,bksd->bkgrs", q_rows, key.to(dtype)).reshape(batch, heads, rows, kv_len) * scale
    )
    allowed, additive = _allowed_keys(attention_mask, row_index, q_len, kv_len, heads)
    if additive is not None:
        scores.add_(additive.to(dtype))
    else:
        assert allowed is not None  # _allowed_keys returns exactly one of the two
        scores.masked_fill_(~allowed, float("-inf"))
    live = row_valid[:, None, :, None]  # [batch, 1, rows, 1]
    scores.masked_fill_(~live, 0.0)  # padded row slots: finite (uniform), zeroed below
    # the only [batch, heads, rows, kv_len (+ 1 sink)] tensor kept for backward
    probs = torch.softmax(with_sink_column(scores, sinks), dim=-1)[..., :kv_len]
    del scores
    # mass = probs @ 1_subset, which equals exp(logsumexp(scores on subset) - logsumexp(scores)); rows that
    # see no subset key get exactly 0 (and a zero gradient, never NaN)
    mass = torch.matmul(probs, key_subset[:, None, :, None].to(dtype)).squeeze(-1)
    return mass * row_valid[:, None, :]


def answer_mask(labels: Tensor, attention_mask: Tensor | None, which: AnswerRows = "all_turns") -> Tensor:
    """[batch, seq] answer positions: labels != -100 and not padding; "last_turn" keeps the last run only."""
    mask = labels != IGNORE_INDEX
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    if which == "last_turn":
        seq = mask.shape[1]
        positions = torch.arange(seq, device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).max(dim=1, keepdim=True).values  # [batch, 1]
        # the last run starts after the last non-answer position before `last`
        gaps = torch.where(~mask & (positions < last), positions, -1).max(dim=1, keepdim=True).values
        mask = mask & (positions > gaps)
    return mask


def select_rows(
    answers: Tensor, max_rows: int | None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Row indices of each sample's answer positions, padded: (row_index, row_valid), each [batch, rows].

    Samples with more than `max_rows` answer positions keep a uniform random subset of `max_rows` of
    them (the mean over the subset is an unbiased estimate of the mean over all answer rows).
    """
    per_sample = []
    for row in answers:
        positions = row.nonzero().flatten()
        if max_rows is not None and len(positions) > max_rows:
            pick = torch.randperm(len(positions), generator=generator)[:max_rows].sort().values
            positions = positions[pick.to(positions.device)]
        per_sample.append(positions)
    width = max(1, max(len(p) for p in per_sample))
    row_index = torch.zeros(len(per_sample), width, dtype=torch.long, device=answers.device)
    row_valid = torch.zeros(len(per_sample), width, dtype=torch.bool, device=answers.device)
    for b, positions in enumerate(per_sample):
        row_index[b, : len(positions)] = positions
        row_valid[b, : len(positions)] = True
    return row_index, row_valid


# ---------------------------------------------------------------------------------------------- the record
@dataclass
class AIARecord:
    """The training context of one forward: per-layer intensities filled in by the observer.

    Attributes:
        targets: the per-layer targets resolved for the observed model.
        intensity: layer index -> [batch] I[l, b] (float32 or wider; differentiable during training).
        sample_mask: [batch] m_b (image present, answer rows present, not masked by the caller).
        rows: [batch] answer rows scored per sample (after subsampling).
        forward_id: which forward of the session filled the record.
        row_index, row_valid: [batch, rows] the scored answer positions (see `select_rows`).
        image: [batch, seq] the image keys.
    """

    targets: LayerTargets
    intensity: dict[int, Tensor] = field(default_factory=dict)
    sample_mask: Tensor | None = None
    rows: Tensor | None = None
    forward_id: int | None = None
    row_index: Tensor | None = None
    row_valid: Tensor | None = None
    image: Tensor | None = None

    def stacked(self) -> Tensor:
        """[layers, batch] intensities of every layer; raises if the forward did not reach them all."""
        missing = [layer for layer in range(self.targets.num_layers) if layer not in self.intensity]
        if missing:
            raise SessionError(
                f"AIA has no intensity for layers {missing[:8]}: run exactly one training forward "
                f"(model(**batch)) inside `with aia.observe(session) as record:` before reading the loss."
            )
        return torch.stack([self.intensity[layer] for layer in range(self.targets.num_layers)])


@dataclass(frozen=True)
class AIALoss:
    """Huber loss pulling each layer's answer -> image attention mass toward stage-wise targets.

    Args:
        targets: a preset name from `STAGE_PRESETS` ("r4" default, "janus_pro_und", ...), a `StageTable`,
            a `LayerTargets`, or (stop_layer, T, delta) tuples (stop None for the remaining layers).
        lambda_: weight of the term in L = L_NTP + lambda_ * L_AIA (default 10, the official code's value
            for understanding batches; the paper's text says 40).
        normalize: "all" divides by layers * batch, masked samples included (the official code);
            "valid" divides by layers * unmasked samples.
        answer_rows: "all_turns" scores every answer token; "last_turn" only the last answer.
        aia_rows: samples with more answer rows than this score a uniform random subset of that many
            (an unbiased estimate); None never subsamples.

    Paper: "AIA: Rethinking Architecture Decoupling Strategy In Unified Multimodal Model", arXiv 2511.22663,
    Eq. 1-2. vlmfix recomputes only answer rows inside its attention hook, where the official code
    forces eager attention and `output_attentions`.

    Example (toy model):

        import vlmfix
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from vlmfix.toy import build_toy
        from vlmfix.training.aia import AIALoss
        from vlmfix.training.aia_data import SFTCollator, coco_rows

        paths = build_toy(fast=True)
        model = AutoModelForImageTextToText.from_pretrained(paths.model_dir)
        collate = SFTCollator(AutoProcessor.from_pretrained(paths.model_dir))
        batch = collate(coco_rows(paths.data_dir, limit=4))  # labels mark the answer tokens
        aia = AIALoss(targets="r4")
        mask = batch.pop("aia_mask")
        with vlmfix.apply(model) as session, aia.observe(session, sample_mask=mask) as record:
            out = model(**batch, use_cache=False)
        (out.loss + aia.lambda_ * aia.loss(record)).backward()
    """

    targets: TargetsSpec = "r4"
    lambda_: float = 10.0
    normalize: Normalize = "all"
    answer_rows: AnswerRows = "all_turns"
    aia_rows: int | None = 256

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            STAGE_PRESETS.get(self.targets)  # unknown names fail here, listing the presets
        elif not isinstance(self.targets, StageTable | LayerTargets):
            object.__setattr__(self, "targets", StageTable(tuple(self.targets)))
        object.__setattr__(self, "lambda_", number(self.lambda_, "lambda_", low=0, meaning="the weight of L_AIA"))
        choice(self.normalize, "normalize", _NORMALIZE, meaning="the denominator of the aggregation (D2)")
        choice(self.answer_rows, "answer_rows", _ANSWER_ROWS, meaning="which answer turns are scored")
        object.__setattr__(self, "aia_rows", optional_number(self.aia_rows, "aia_rows", low=1, integer=True,
                                                             meaning="the most answer rows scored per sample"))

    # ------------------------------------------------------------------ observing a forward
    @contextmanager
    def observe(
        self,
        session: Session,
        *,
        labels: Tensor | None = None,
        sample_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[AIARecord]:
        """Record the intensities of the one forward run inside the block.

        Args:
            session: an active `vlmfix.apply(model)` session on the model.
            labels: [batch, seq] (-100 outside answers); default: the forward's `labels` argument.
            sample_mask: [batch] bool, False for samples the caller excludes (e.g. truncated ones).
            generator: random generator for answer-row subsampling.
        """
        record = AIARecord(targets=resolve_targets(self.targets, session.adapter.num_layers))

        def observer(call: AttentionCall) -> None:
            self._observe(session, record, call, labels, sample_mask, generator)
            return None

        with session.observing(observer):
            yield record

    def _observe(
        self,
        session: Session,
        record: AIARecord,
        call: AttentionCall,
        labels: Tensor | None,
        sample_mask: Tensor | None,
        generator: torch.Generator | None,
    ) -> None:
        if record.forward_id is None:
            self._begin(session, record, labels, sample_mask, generator)
        elif record.forward_id != session.prompts_seen:
            raise SessionError(
                "AIA observed a second forward inside one `observe` block; open one `aia.observe(session)` "
                "block per training forward."
            )
        # _begin filled the record's prompt fields
        assert record.image is not None and record.row_index is not None and record.row_valid is not None
        assert record.rows is not None and record.sample_mask is not None
        if call.query.shape[2] != record.image.shape[1]:
            raise SessionError(
                f"AIA needs a full training forward without cache (query length {call.query.shape[2]}, "
                f"prompt length {record.image.shape[1]}); call model(**batch, use_cache=False)."
            )
        mass = key_subset_mass(
            call.query,
            call.key,
            call.attention_mask,
            call.scaling,
            record.row_index,
            record.row_valid,
            record.image,
            sinks=call.sinks,
        )  # [batch, heads, rows]
        rows = record.rows.clamp(min=1).to(mass.dtype)
        intensity = mass.mean(dim=1).sum(dim=1) / rows  # [batch]
        record.intensity[call.layer_idx] = intensity * record.sample_mask

    def _begin(
        self,
        session: Session,
        record: AIARecord,
        labels: Tensor | None,
        sample_mask: Tensor | None,
        generator: torch.Generator | None,
    ) -> None:
        inputs = session.inputs
        labels = inputs.get("labels") if labels is None else labels
        if labels is None:
            raise ValueError(
                "AIA needs `labels` (answer tokens, -100 elsewhere) to find the answer rows: pass them to "
                "the forward (model(**batch) with batch['labels']) or to aia.observe(session, labels=...)."
            )
        spans = session.spans
        if labels.shape != spans.image.shape:
            raise ValueError(
                f"labels must match input_ids: got labels {tuple(labels.shape)} and input_ids "
                f"{tuple(spans.image.shape)}."
            )
        answers = answer_mask(labels.to(spans.image.device), spans.valid, self.answer_rows)
        row_index, row_valid = select_rows(answers, self.aia_rows, generator)
        mask = spans.has_image & answers.any(dim=1)
        if sample_mask is not None:
            if sample_mask.shape != mask.shape:
                raise ValueError(
                    f"sample_mask must have shape {tuple(mask.shape)} (one flag per sample), "
                    f"got {tuple(sample_mask.shape)}."
                )
            mask = mask & sample_mask.to(mask.device).bool()
        record.forward_id = session.prompts_seen
        record.sample_mask = mask
        record.rows = row_valid.sum(dim=1)
        record.row_index, record.row_valid, record.image = row_index, row_valid, spans.image

    # ------------------------------------------------------------------ the loss
    def terms(self, record: AIARecord) -> Tensor:
        """[layers, batch] m_b * huber_{delta_l}(I[l, b] - T_l)."""
        intensity = record.stacked()
        assert record.sample_mask is not None  # filled with the intensities by the observed forward
        target = torch.tensor(record.targets.target, dtype=intensity.dtype, device=intensity.device)[:, None]
        delta = torch.tensor(record.targets.delta, dtype=intensity.dtype, device=intensity.device)[:, None]
        return huber(intensity - target, delta) * record.sample_mask[None].to(intensity.dtype)

    def loss(self, record: AIARecord) -> Tensor:
        """L_AIA, a scalar (unweighted: multiply by `lambda_`)."""
        terms = self.terms(record)
        assert record.sample_mask is not None  # terms checked that the forward filled the record
        layers, batch = terms.shape
        count = batch if self.normalize == "all" else int(record.sample_mask.sum())
        return terms.sum() / (layers * max(count, 1))


# ---------------------------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class IntensityCurve:
    """A model's per-layer answer -> image intensity over a data set.

    Attributes:
        mean: [layers] mean intensity over the scored samples.
        std: [layers] standard deviation over the samples.
        samples: how many samples were scored (those with an image and answer rows).
    """

    mean: Tensor
    std: Tensor
    samples: int

    def stages(self, num_stages: int = 3, delta: float = 0.05) -> StageTable:
        """Bin the curve into `num_stages` constants by relative depth (a table for any model depth).

        Stage k covers the layers ceil(k L / n) <= l < ceil((k + 1) L / n) of this curve; its target is
        their mean intensity; in another model it covers the same fraction of depth.
        """
        layers = len(self.mean)
        num_stages = number(num_stages, "num_stages", low=1, high=layers, integer=True,
                            meaning="how many constants the curve's layers are binned into")
        bounds = [math.ceil(round(k * layers / num_stages, 9)) for k in range(num_stages + 1)]
        stages = tuple(
            Stage((k + 1) / num_stages, round(float(self.mean[bounds[k] : bounds[k + 1]].mean()), 4), delta)
            for k in range(num_stages)
        )
        return StageTable(
            stages, relative=True, rule=f"measured ({self.samples} samples, {num_stages} stages)"
        )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft / DDP / FSDP wrapper (the object `vlmfix.apply` needs)."""
    for _ in range(8):
        wrapper: Any = model  # what a wrapper holds is an untyped attribute
        if hasattr(wrapper, "get_base_model") and wrapper.get_base_model() is not model:
            model = wrapper.get_base_model()
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in _FSDP:
            model = wrapper.module
        else:
            break
    return model


_FSDP = ("FullyShardedDataParallel", "FSDPModule")


@torch.no_grad()
def measure_intensity(
    model: nn.Module,
    dataset: Iterable[Mapping[str, Any]],
    *,
    answer_rows: AnswerRows = "all_turns",
    aia_rows: int | None = None,
    max_batches: int | None = None,
) -> IntensityCurve:
    """Measure a (teacher) model's per-layer answer -> image intensity, e.g. to derive AIA targets.

    Args:
        model: a supported VLM (a peft or DDP wrapper works too).
        dataset: batches of model inputs with `labels` (answer tokens, -100 elsewhere), e.g. from
            `vlmfix.training.aia_trainer.SFTCollator`; an optional `aia_mask` [batch] excludes samples.
        answer_rows, aia_rows: as in `AIALoss`.
        max_batches: stop after this many batches.

    Returns:
        `IntensityCurve`; `curve.stages(3)` bins it into a relative-depth `StageTable`.
    """
    base = unwrap_model(model)
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    per_sample: list[Tensor] = []
    try:
        for index, batch in enumerate(dataset):
            if max_batches is not None and index >= max_batches:
                break
            inputs = {
                k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items() if k != "aia_mask"
            }
            with apply(base) as session:
                layers = session.adapter.num_layers
                probe = AIALoss(
                    LayerTargets((0.0,) * layers, (1.0,) * layers), answer_rows=answer_rows, aia_rows=aia_rows
                )
                with probe.observe(session, sample_mask=batch.get("aia_mask")) as record:
                    base(**inputs, use_cache=False)
            per_sample.append(record.stacked()[:, record.sample_mask].float().cpu())  # [layers, scored]
    finally:
        base.train(was_training)
    values = torch.cat(per_sample, dim=1) if per_sample else torch.empty(0, 0)
    if values.numel() == 0:
        raise ValueError(
            "measure_intensity scored no sample: every batch lacked images or answer tokens (labels)."
        )
    std = values.std(dim=1) if values.shape[1] > 1 else torch.zeros(values.shape[0])
    return IntensityCurve(mean=values.mean(dim=1), std=std, samples=values.shape[1])


__all__ = [
    "AIALoss",
    "AIARecord",
    "IntensityCurve",
    "LayerTargets",
    "STAGE_PRESETS",
    "Stage",
    "StageTable",
    "answer_mask",
    "huber",
    "key_subset_mass",
    "measure_intensity",
    "resolve_targets",
    "rule_r4",
    "select_rows",
    "unwrap_model",
]
