"""VAR: move attention from sink tokens to the other image tokens in image-centric heads.

Paper: Kang, Kim, Kim, Hwang, "See What You Are Told: Visual Attention Sink in Large Multimodal
Models", ICLR 2025, arXiv 2503.03321, Sec. 4.1 (sink tokens), Sec. 5.1-5.2 (VAR). Spec:
shared/specs/var.md.

Sinks: during the prompt's prefill a forward pre-hook on `input_layernorm` of every edited layer reads
the layer input x and marks the prompt tokens whose RMS-normalised activation in the backbone's sink
dimensions D_sink reaches `tau`: phi(x) = max_{d in D_sink} |x_d| / sqrt(mean(x^2) + 1e-6) >= tau.
Redistribution (a mass-conserving `Transfer` edit, per row, head and query, on layers 2..L-2): where
the query puts at least `summ` of its attention on the image and the non-sink share of that image mass
is at least `rho`, take fraction `p` of the mass on every sink (visual and text) and give it to the
non-sink image tokens in proportion to their attention. Edited query rows: the prompt's text after
the image at prefill, and every generated token. No extra forward pass when D_sink is known.

Departs from the official code (seilk/VisAttnSink): p is the fraction moved (the code moves 1 - p;
`p=0.4` reproduces it), the non-sink ratio test is >= rho (the code tests sink share <= rho, the same
only at 0.5), the last layer is excluded, sinks are found again for every prompt batch and row, and
no eager attention or `output_attentions` is used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlmfix.adapters import Adapter, get_adapter
from vlmfix.decoding.attention import AttentionCall
from vlmfix.decoding.edits import Edit, Transfer, additive_mask, repeat_kv
from vlmfix.decoding.method import Method, register_method

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session

RMS_EPS = 1e-6
_LOOP_KEYS = ("cache", "past_key_values", "use_cache", "cache_position", "return_dict")


# ---------------------------------------------------------------------------------------------
# sink dimensions


@dataclass(frozen=True)
class SinkDims:
    """Published massive-activation dimensions of one backbone, matched by its language-model shape."""

    checkpoint: str
    family: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    dims: tuple[int, ...]
    source: str


SINK_DIMS: tuple[SinkDims, ...] = (
    SinkDims("llava-hf/llava-1.5-7b-hf", "llava", 4096, 32, 11008, (1415, 2533),
             "[P] Sec. 4.1 and the official code's constants (LLaMA-2-7B / Vicuna-7B)"),
    SinkDims("llava-hf/llava-1.5-13b-hf", "llava", 5120, 40, 13824, (2100, 4743),
             "official code's constants only, never exercised there (LLaMA-2-13B / Vicuna-13B)"),
    SinkDims("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", 3584, 28, 18944, (458, 2570),
             "[P] App. A.1 (secondary source, no released code) (Qwen2-7B)"),
)


def table_sink_dims(model: nn.Module) -> SinkDims | None:
    """The `SINK_DIMS` entry whose family and language-model shape match `model`, if any."""
    adapter = get_adapter(model)
    config = adapter.text_config
    for entry in SINK_DIMS:
        if (entry.family, entry.hidden_size, entry.num_layers, entry.intermediate_size) == (
            adapter.family, config.hidden_size, adapter.num_layers, getattr(config, "intermediate_size", None)
        ):
            return entry
    return None


def sink_ratio(hidden: Tensor, dims: Sequence[int]) -> Tensor:
    """phi = max_{d in dims} |x_d| / rms(x) (no learned weight) in fp32: [..., hidden] -> [...]."""
    x = hidden.float()
    rms = x.square().mean(-1).add(RMS_EPS).sqrt()
    return x[..., list(dims)].abs().amax(-1) / rms


def find_sink_dims(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    tau: float = 20.0,
    min_share: float = 0.5,
    forward: Callable[[dict[str, Any]], Any] | None = None,
) -> list[int]:
    """Find a backbone's massive-activation dimensions D_sink from one prompt batch (spec rule R2).

    For layers 2..L-1 the layer input of each row's first non-pad token (BOS, or Qwen's first template
    token) is RMS-normalised; a dimension is a sink dimension when |x_d| / rms(x) >= `tau` in more than
    `min_share` of these (layer, row) pairs.

    Args:
        model: a supported VLM.
        inputs: a processor batch (input_ids, attention_mask, image tensors), or a prompt's forward kwargs.
        tau: the activation threshold (VAR's tau).
        min_share: the share of (layer, row) pairs a dimension must exceed `tau` in.
        forward: runs the model on the inputs (default: `model(**inputs)` without gradients); inside a
            vlmfix session pass `session.forward`.

    Returns:
        Sorted 0-based hidden dimensions (empty when none qualifies, e.g. in a small random model, whose
        ratio cannot exceed sqrt(hidden_size)).

    Example:
        >>> import vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example(images=2)
        >>> dims = find_sink_dims(model, inputs)  # the toy has none: []
    """
    adapter = get_adapter(model)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    first = valid.int().argmax(dim=1)  # [batch] first non-pad position
    layers = range(2, adapter.num_layers) if adapter.num_layers > 2 else range(adapter.num_layers)
    ratios: list[Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
        x = hidden[torch.arange(hidden.shape[0]), first].float()  # [batch, hidden]
        ratios.append(x.abs() / x.square().mean(-1, keepdim=True).add(RMS_EPS).sqrt())

    handles = [adapter.input_layernorm(layer).register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        clean = {k: v for k, v in inputs.items() if k not in _LOOP_KEYS}
        if forward is None:
            with torch.no_grad():
                model(**clean)
        else:
            forward(clean)
    finally:
        for handle in handles:
            handle.remove()
    if not ratios:
        return []
    share = (torch.stack(ratios) >= tau).float().flatten(0, 1).mean(0)  # [hidden]
    return (share > min_share).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------
# the method


@dataclass
class VARState:
    """Per prompt batch. Sinks are filled lazily by the prefill's `input_layernorm` pre-hooks."""

    layers: tuple[int, ...]
    dims: tuple[int, ...]
    dims_source: str
    image: Tensor  # [batch, seq] bool, image placeholders
    valid: Tensor  # [batch, seq] bool
    start: Tensor  # [batch] long: first edited prefill row (after the row's last image token)
    sinks: dict[int, Tensor] = field(default_factory=dict)  # layer -> [batch, seq (+ generated)] bool
    edits: dict[int, Transfer | None] = field(default_factory=dict)
    inactive: set[int] = field(default_factory=set)  # layers whose current forward is not this prompt's
    selected_share: dict[int, Tensor] = field(default_factory=dict)  # layer -> [batch] fp32 (prefill)
    mass_moved: dict[int, Tensor] = field(default_factory=dict)  # layer -> [batch] fp32 (prefill)

    @property
    def batch(self) -> int:
        return self.image.shape[0]

    @property
    def seq_len(self) -> int:
        return self.image.shape[1]


def own_rows(session: Session, state: VARState, tensor: Tensor) -> Tensor:
    """The prompt's rows of a forward's tensor: all of them, or the first `batch` rows of a contrastive
    forward (layout [edited stream; other stream], `session.edited_rows`)."""
    if tensor.shape[0] > state.batch and session.edited_rows == state.batch:
        return tensor[: state.batch]
    return tensor


class _ObserverHandle:
    """Removes an observer from a session at the next prompt (a handle for `session.add_prompt_hook`)."""

    def __init__(self, observers: list, observer: Callable) -> None:
        self.observers, self.observer = observers, observer

    def remove(self) -> None:
        if self.observer in self.observers:
            self.observers.remove(self.observer)


@register_method
class VAR(Method):
    """Move fraction `p` of the attention on sink tokens to the non-sink image tokens, in image-centric heads.

    Args:
        p (float, default 0.6): fraction of the sink mass moved, in [0, 1] (the paper's meaning; the
            official code's p=0.6 moves 40%: set p=0.4 to reproduce it). p=0 leaves attention unchanged.
        rho (float, default 0.5): minimum non-sink share of the image mass, in (0, 1] (0.5 for
            hallucination benchmarks; the code's "sink share <= rho'" is rho = 1 - rho').
        summ (float, default 0.2): minimum image mass of a (head, query) to be edited, in [0, 1].
        tau (float, default 20.0): sink threshold on the RMS-normalised activation, > 0.
        sink_dims (Sequence[int] | None, default None): D_sink override. None: the `SINK_DIMS` entry of the
            model, else `find_sink_dims` on the prompt batch (one extra forward; said in the report).
        exclude_last_layer (bool, default True): edit layers 2..L-2 (paper); False: 2..L-1 (code).
        require_visual_sink (bool, default True): leave a row untouched in a layer without visual sinks.
        decode_sinks (bool, default False): also test each generated token's layer inputs, so generated
            tokens can become sinks. Sink flags of generated tokens follow the batch row, so use it with
            greedy or sampling, not beam search.

    Example (toy model). Its 128-wide decoder has no massive activations (|x_d| / rms(x) stays below
    about 5, far from tau=20), so `VAR()` finds no sink dimensions there and changes nothing; to watch
    the mechanism, name dimensions and a low threshold:
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> with vlmfix.apply(model, vlmfix.VAR(sink_dims=[31, 88], tau=2.0)) as session:
        ...     out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        >>> sinks = session.report()["var"]["rows"][0]["sinks"]  # sink positions per layer
    """

    name = "var"
    needs_image = True

    def __init__(
        self,
        p: float = 0.6,
        rho: float = 0.5,
        summ: float = 0.2,
        tau: float = 20.0,
        sink_dims: Sequence[int] | None = None,
        exclude_last_layer: bool = True,
        require_visual_sink: bool = True,
        decode_sinks: bool = False,
    ) -> None:
        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not number(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"`p` must be in [0, 1], got {p!r}; p is the fraction of the sink mass moved "
                             f"(0.6 in the paper, 0.4 reproduces the official code).")
        if not number(rho) or not 0.0 < rho <= 1.0:
            raise ValueError(f"`rho` must be in (0, 1], got {rho!r}; rho is the minimum non-sink share of a "
                             f"head's image attention (0.5 for hallucination benchmarks).")
        if not number(summ) or not 0.0 <= summ <= 1.0:
            raise ValueError(f"`summ` must be in [0, 1], got {summ!r}; summ is the minimum image attention mass "
                             f"of an edited head (0.2 in the paper).")
        if not number(tau) or tau <= 0:
            raise ValueError(f"`tau` must be a number > 0, got {tau!r}; tau is the sink threshold on "
                             f"|x_d| / rms(x) (20 in the paper).")
        if sink_dims is not None:
            if isinstance(sink_dims, (str, bytes)) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in sink_dims
            ) or not sink_dims:
                raise ValueError(f"`sink_dims` must be a non-empty list of 0-based hidden dimensions or None, got "
                                 f"{sink_dims!r}; None looks the model up in SINK_DIMS or runs find_sink_dims.")
        for arg, value in (("exclude_last_layer", exclude_last_layer), ("require_visual_sink", require_visual_sink),
                           ("decode_sinks", decode_sinks)):
            if not isinstance(value, bool):
                raise ValueError(f"`{arg}` must be True or False, got {value!r}.")
        self.p = float(p)
        self.rho = float(rho)
        self.summ = float(summ)
        self.tau = float(tau)
        self.sink_dims = None if sink_dims is None else tuple(sorted(set(sink_dims)))
        self.exclude_last_layer = exclude_last_layer
        self.require_visual_sink = require_visual_sink
        self.decode_sinks = decode_sinks

    # ------------------------------------------------------------------ prepare
    def edited_layers(self, adapter: Adapter) -> tuple[int, ...]:
        """Layers 2..L-2 (or 2..L-1 with `exclude_last_layer=False`)."""
        end = adapter.num_layers - 1 if self.exclude_last_layer else adapter.num_layers
        return tuple(range(2, end))

    def resolve_sink_dims(self, session: Session) -> tuple[tuple[int, ...], str]:
        """D_sink for this model and where it comes from."""
        hidden = session.adapter.text_config.hidden_size
        if self.sink_dims is not None:
            if max(self.sink_dims) >= hidden:
                raise ValueError(f"`sink_dims` holds dimension {max(self.sink_dims)}, but the language model's "
                                 f"hidden size is {hidden}; pass 0-based dimensions below {hidden}.")
            return self.sink_dims, "given"
        entry = table_sink_dims(session.model)
        if entry is not None:
            return entry.dims, f"table: {entry.checkpoint} ({entry.source})"
        dims = find_sink_dims(session.model, session.inputs, tau=self.tau,
                              forward=lambda inputs: session.forward(inputs, with_edits=False))
        source = (f"find_sink_dims on this prompt batch: no SINK_DIMS entry for {type(session.model).__name__} "
                  f"(hidden {hidden}, {session.adapter.num_layers} layers)")
        if not dims:
            warnings.warn(f"VAR found no sink dimensions in {type(session.model).__name__} (hidden size {hidden}) "
                          f"at tau={self.tau}, so it edits nothing; pass sink_dims=[...] or a lower tau.",
                          stacklevel=3)
        return tuple(dims), source

    def prepare(self, session: Session) -> VARState:
        adapter, spans = session.adapter, session.spans
        layers = self.edited_layers(adapter)
        dims, source = self.resolve_sink_dims(session)
        positions = torch.arange(spans.seq_len, device=spans.image.device)
        last_image = torch.where(spans.image, positions, -1).amax(dim=1)  # [batch]
        state = VARState(layers=layers, dims=dims, dims_source=source, image=spans.image, valid=spans.valid,
                         start=last_image + 1)
        if not dims:
            return state
        for layer in layers:
            hook = adapter.input_layernorm(layer).register_forward_pre_hook(
                self._sink_hook(session, state, layer), with_kwargs=True
            )
            session.add_prompt_hook(hook)
        observer = self._stats_observer(session, state)
        session.observers.append(observer)
        session.add_prompt_hook(_ObserverHandle(session.observers, observer))  # type: ignore[arg-type]
        return state

    # ------------------------------------------------------------------ during forwards
    def _sink_hook(self, session: Session, state: VARState, layer: int) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = own_rows(session, state, args[0] if args else kwargs["hidden_states"])
            # hidden: [batch, q_len, hidden], the layer's input
            batch, q_len = hidden.shape[:2]
            if batch != state.batch or q_len not in (1, state.seq_len):
                state.inactive.add(layer)  # a pass over other inputs (e.g. another method's analysis)
                return
            state.inactive.discard(layer)
            if q_len == state.seq_len:  # the prompt (prefill or a same-shaped extra pass)
                state.sinks[layer] = (sink_ratio(hidden, state.dims) >= self.tau) & state.valid.to(hidden.device)
                state.edits[layer] = self.plan_edit(state.sinks[layer], state.image, state.start)
            elif self.decode_sinks and layer in state.sinks:  # a decode step: test the new token
                new = sink_ratio(hidden[:, 0], state.dims) >= self.tau  # [batch]
                state.sinks[layer] = torch.cat([state.sinks[layer], new[:, None]], dim=1)
                state.edits[layer] = self.plan_edit(state.sinks[layer], state.image, state.start)

        return record

    def plan_edit(self, sinks: Tensor, image: Tensor, start: Tensor) -> Transfer | None:
        """The layer's redistribution edit, or None when no row has anything to move.

        Args:
            sinks: [batch, keys] bool, the layer's sink tokens S (prompt, then generated tokens).
            image: [batch, prompt_len] bool, the image placeholders I_vis.
            start: [batch] long, the first edited prefill row of each row.
        """
        image = image.to(sinks.device)
        if sinks.shape[1] > image.shape[1]:  # generated tokens are text
            image = torch.cat([image, image.new_zeros(image.shape[0], sinks.shape[1] - image.shape[1])], dim=1)
        needed = sinks & image if self.require_visual_sink else sinks
        if not bool(needed.any()):
            return None
        return Transfer(source=sinks, receivers=image & ~sinks, gate_keys=image, fraction=self.p,
                        min_gate_mass=self.summ, min_receiver_share=self.rho,
                        require_gate_source=self.require_visual_sink, from_position=start.to(sinks.device))

    def edits(self, state: VARState, layer_idx: int) -> Sequence[Edit]:
        edit = None if layer_idx in state.inactive else state.edits.get(layer_idx)
        return (edit,) if edit is not None else ()

    def _stats_observer(self, session: Session, state: VARState) -> Callable[[AttentionCall], None]:
        """Per layer and row at the prompt's prefill: share of (head, edited query) pairs selected, mass moved."""

        def observe(call: AttentionCall) -> None:
            edit = None if call.layer_idx in state.inactive else state.edits.get(call.layer_idx)
            query = own_rows(session, state, call.query)  # [batch, heads, q_len, head_dim]
            if edit is None or query.shape[0] != state.batch or query.shape[2] != state.seq_len:
                return None
            key = own_rows(session, state, call.key)
            mask = call.attention_mask
            if mask is not None and mask.shape[0] > state.batch:
                mask = own_rows(session, state, mask)
            batch, heads, q_len, head_dim = query.shape
            first = int(state.start.min().clamp(max=q_len - 1))
            key = repeat_kv(key, heads).float()
            scaling = head_dim**-0.5 if call.scaling is None else call.scaling
            z = torch.matmul(query[:, :, first:].float(), key.transpose(-1, -2)) * scaling
            mask = additive_mask(mask, batch, q_len, q_len, query.device)[:, :, first:]
            p = torch.softmax(z + mask, dim=-1).nan_to_num(0.0)  # [batch, heads, rows, keys], unedited
            sinks, image = edit.source[:, None, None, :], edit.gate_keys[:, None, None, :]
            m_vis = (p * image).sum(-1)
            m_vn = (p * (image & ~sinks)).sum(-1)
            m_sink = (p * sinks).sum(-1)
            ratio = torch.where(m_vis > 0, m_vn / m_vis.clamp_min(1e-30), torch.zeros_like(m_vis))
            chosen = (m_vis >= self.summ) & (ratio >= self.rho) & (m_vn > 0)
            if self.require_visual_sink:
                chosen &= (edit.source & edit.gate_keys).any(-1)[:, None, None]
            rows = torch.arange(first, q_len, device=query.device)
            rows = (rows[None, :] >= state.start[:, None].to(query.device)) & state.valid[:, first:].to(query.device)
            pairs = (rows[:, None, :].expand_as(chosen)).float().sum((1, 2)).clamp_min(1)
            picked = chosen & rows[:, None, :]
            state.selected_share[call.layer_idx] = picked.float().sum((1, 2)) / pairs
            moved = (self.p * m_sink * picked).sum((1, 2)) / picked.float().sum((1, 2)).clamp_min(1)
            state.mass_moved[call.layer_idx] = moved
            return None

        return observe

    # ------------------------------------------------------------------ report
    def report(self, state: VARState) -> dict[str, Any]:
        """Sink dims and their source, and per row and layer: sink positions, selected share, mass moved."""
        rows = []
        for b in range(state.batch):
            image = state.image[b]
            row: dict[str, Any] = {"sinks": {}, "visual_sinks": {}, "text_sinks": {}, "selected_head_share": {},
                                   "mean_mass_moved": {}}
            for layer in state.layers:
                if layer not in state.sinks:
                    continue
                sinks = state.sinks[layer][b].cpu()
                prompt, generated = sinks[: state.seq_len], sinks[state.seq_len :]
                row["sinks"][layer] = prompt.nonzero().flatten().tolist()
                row["visual_sinks"][layer] = (prompt & image.cpu()).nonzero().flatten().tolist()
                row["text_sinks"][layer] = (prompt & ~image.cpu()).nonzero().flatten().tolist()
                if self.decode_sinks:
                    row.setdefault("generated_sinks", {})[layer] = (
                        (generated.nonzero().flatten() + state.seq_len).tolist()
                    )
                row["selected_head_share"][layer] = float(state.selected_share[layer][b]) \
                    if layer in state.selected_share else 0.0
                row["mean_mass_moved"][layer] = float(state.mass_moved[layer][b]) \
                    if layer in state.mass_moved else 0.0
            rows.append(row)
        return {"p": self.p, "rho": self.rho, "summ": self.summ, "tau": self.tau, "sink_dims": list(state.dims),
                "sink_dims_source": state.dims_source, "layers": list(state.layers), "rows": rows}
