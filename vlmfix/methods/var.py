"""VAR: move attention from sink tokens to the other image tokens in image-centric heads.

Paper: Kang, Kim, Kim, Hwang, "See What You Are Told: Visual Attention Sink in Large Multimodal
Models", ICLR 2025, arXiv 2503.03321, Sec. 4.1 (sink tokens), Sec. 5.1-5.2 (VAR). Spec:
shared/specs/var.md.

Sinks: during the prompt's prefill a forward pre-hook on `input_layernorm` of every edited layer reads
the layer input x and marks the prompt tokens whose RMS-normalised activation in the backbone's sink
dimensions D_sink reaches `tau` (`vlmfix.methods.sink_dims`). D_sink is fixed per model: given, or the
published entry of `SINK_DIMS`; a model with neither is refused (calibrate once with
`calibrate_sink_dims`); detection on every prompt batch is an explicit opt-in (`detect_per_prompt`).
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlmfix import validation
from vlmfix.adapters import Adapter
from vlmfix.decoding.attention import AttentionCall
from vlmfix.decoding.edits import (
    Edit,
    Transfer,
    additive_mask,
    fit_keys,
    key_probabilities,
    repeat_kv,
    transfer_gate,
)
from vlmfix.decoding.method import Method, register_method
from vlmfix.errors import VlmfixError
from vlmfix.methods.sink_dims import CALIBRATE_COMMAND, find_sink_dims, sink_ratio, table_sink_dims

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session


class SinkDimsError(VlmfixError, ValueError):
    """VAR has no sink dimensions for the model (none given, none published) or found none."""


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
    head_share: dict[int, Tensor] = field(default_factory=dict)  # layer -> [batch, heads] fp32 (prefill)

    @property
    def batch(self) -> int:
        return self.image.shape[0]

    @property
    def seq_len(self) -> int:
        return self.image.shape[1]


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
        sink_dims (Sequence[int] | None, default None): the backbone's sink dimensions D_sink. None: the
            published `SINK_DIMS` entry of the model; a model without one is refused when the session is
            created (run `vlmfix.methods.sink_dims.calibrate_sink_dims` once, or its command line).
        detect_per_prompt (bool, default False): opt-in: without given or published dimensions, detect them
            on every prompt batch (one extra forward each; they may differ between batches of one run, and a
            batch where none is found raises).
        exclude_last_layer (bool, default True): edit layers 2..L-2 (paper); False: 2..L-1 (code).
        require_visual_sink (bool, default True): leave a row untouched in a layer without visual sinks.
        decode_sinks (bool, default False): also test each generated token's layer inputs, so generated
            tokens can become sinks. Sink flags of generated tokens follow the batch row, so use it with
            greedy or sampling, not beam search.

    Example (toy model). Its 128-wide decoder has no massive activations (|x_d| / rms(x) stays below
    about 5, far from tau=20), so it needs dimensions and a threshold of its own scale:
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> with vlmfix.apply(model, vlmfix.VAR(sink_dims=[31, 88], tau=2.0)) as session:
        ...     out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        >>> sinks = session.report()["var"]["rows"][0]["sinks"]  # sink positions per layer
    """

    name = "var"
    one_token_decode = True  # its sink hook takes a forward of neither 1 nor prompt-length rows for another pass
    needs_image = True

    def __init__(
        self,
        p: float = 0.6,
        rho: float = 0.5,
        summ: float = 0.2,
        tau: float = 20.0,
        sink_dims: Sequence[int] | None = None,
        detect_per_prompt: bool = False,
        exclude_last_layer: bool = True,
        require_visual_sink: bool = True,
        decode_sinks: bool = False,
    ) -> None:
        self.p = validation.number(p, "p", low=0, high=1, meaning="the fraction of the sink mass moved (0.6 in "
                                   "the paper, 0.4 reproduces the official code)")
        self.rho = validation.number(rho, "rho", low=0, high=1, low_open=True, meaning="the minimum non-sink "
                                     "share of a head's image attention (0.5 for hallucination benchmarks)")
        self.summ = validation.number(summ, "summ", low=0, high=1, meaning="the minimum image attention mass of "
                                      "an edited head (0.2 in the paper)")
        self.tau = validation.number(tau, "tau", low=0, low_open=True, meaning="the sink threshold on "
                                     "|x_d| / rms(x) (20 in the paper)")
        dims = validation.indices(sink_dims, "sink_dims", what="0-based hidden dimensions",
                                  meaning="None uses the published dimensions of the model")
        self.sink_dims = None if dims is None else tuple(sorted(dims))
        self.detect_per_prompt = validation.boolean(detect_per_prompt, "detect_per_prompt")
        self.exclude_last_layer = validation.boolean(exclude_last_layer, "exclude_last_layer")
        self.require_visual_sink = validation.boolean(require_visual_sink, "require_visual_sink")
        self.decode_sinks = validation.boolean(decode_sinks, "decode_sinks")

    # ------------------------------------------------------------------ the model's sink dimensions
    def check(self, adapter: Adapter) -> None:
        """Refuse a model without sink dimensions (none given, none published) unless detection is on."""
        hidden = adapter.text_config.hidden_size
        if self.sink_dims is not None:
            if max(self.sink_dims) >= hidden:
                raise SinkDimsError(f"`sink_dims` holds dimension {max(self.sink_dims)}, but the language model's "
                                    f"hidden size is {hidden}; pass 0-based dimensions below {hidden}.")
            return
        if self.detect_per_prompt or table_sink_dims(adapter.model) is not None:
            return
        raise SinkDimsError(
            f"VAR needs the sink dimensions of {type(adapter.model).__name__} (hidden size {hidden}, "
            f"{adapter.num_layers} layers), and none are published for it. Find them once with "
            f"vlmfix.methods.sink_dims.calibrate_sink_dims(model, batches) or `{CALIBRATE_COMMAND}`, then pass "
            f"VAR(sink_dims=[...]) (benchmark app: the model preset's var_sink_dims); or opt in to detection on "
            f"every prompt batch with VAR(detect_per_prompt=True)."
        )

    def resolve_sink_dims(self, session: Session) -> tuple[tuple[int, ...], str]:
        """D_sink for this model and where it comes from."""
        if self.sink_dims is not None:
            return self.sink_dims, "given"
        entry = table_sink_dims(session.model)
        if entry is not None:
            return entry.dims, f"table: {entry.checkpoint} ({entry.source})"
        dims = find_sink_dims(session.model, session.inputs, tau=self.tau,
                              forward=lambda inputs: session.forward(inputs, with_edits=False))
        if not dims:
            raise SinkDimsError(
                f"VAR(detect_per_prompt=True) found no sink dimension in this prompt batch at tau={self.tau:g}, "
                f"so it would edit nothing. Calibrate the model once (`{CALIBRATE_COMMAND}`) and pass "
                f"sink_dims=[...], or lower tau."
            )
        return tuple(dims), "detected on this prompt batch (detect_per_prompt=True)"

    # ------------------------------------------------------------------ prepare
    def edited_layers(self, adapter: Adapter) -> tuple[int, ...]:
        """Layers 2..L-2 (or 2..L-1 with `exclude_last_layer=False`)."""
        end = adapter.num_layers - 1 if self.exclude_last_layer else adapter.num_layers
        return tuple(range(2, end))

    def prepare(self, session: Session) -> VARState:
        adapter, spans = session.adapter, session.spans
        layers = self.edited_layers(adapter)
        dims, source = self.resolve_sink_dims(session)
        positions = torch.arange(spans.seq_len, device=spans.image.device)
        last_image = torch.where(spans.image, positions, -1).amax(dim=1)  # [batch]
        state = VARState(layers=layers, dims=dims, dims_source=source, image=spans.image, valid=spans.valid,
                         start=last_image + 1)
        for layer in layers:
            session.hook_for_prompt(adapter.input_layernorm(layer), self._sink_hook(session, state, layer))
        session.observe_for_prompt(self._stats_observer(session, state))
        return state

    # ------------------------------------------------------------------ during forwards
    def _sink_hook(self, session: Session, state: VARState, layer: int) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = session.rows_of_prompt(args[0] if args else kwargs["hidden_states"])
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
        image = fit_keys(image.to(sinks.device), sinks.shape[1], sinks.shape[0], False)  # generated tokens: text
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
        """Per layer and row at the prompt's prefill: share of (head, edited query) pairs selected, mass moved,
        from the edit's own gate (`transfer_gate`) on the layer's unedited probabilities."""

        def observe(call: AttentionCall) -> None:
            edit = None if call.layer_idx in state.inactive else state.edits.get(call.layer_idx)
            query = session.rows_of_prompt(call.query)  # [batch, heads, q_len, head_dim]
            if edit is None or query.shape[0] != state.batch or query.shape[2] != state.seq_len:
                return None
            key = session.rows_of_prompt(call.key)
            mask = call.attention_mask
            if mask is not None:
                mask = session.rows_of_prompt(mask)
            batch, heads, q_len, head_dim = query.shape
            first = int(state.start.min().clamp(max=q_len - 1))
            key = repeat_kv(key, heads).float()
            scaling = head_dim**-0.5 if call.scaling is None else call.scaling
            z = torch.matmul(query[:, :, first:].float(), key.transpose(-1, -2)) * scaling
            mask = additive_mask(mask, batch, q_len, key.shape[2], query.device)[:, :, first:]
            p = key_probabilities(z + mask, call.sinks)  # [batch, heads, rows, keys], unedited
            gate = transfer_gate(p, edit)
            rows = torch.arange(first, q_len, device=query.device)
            rows = (rows[None, :] >= state.start[:, None].to(query.device)) & state.valid[:, first:].to(query.device)
            picked = gate.selected & rows[:, None, :]  # [batch, heads, rows]
            pairs = rows[:, None, :].expand_as(picked).float().sum((1, 2)).clamp_min(1)
            state.selected_share[call.layer_idx] = picked.float().sum((1, 2)) / pairs
            # per head: the share of the row's edited queries for which the head was image-centric
            state.head_share[call.layer_idx] = picked.float().sum(2) / rows.float().sum(1, keepdim=True).clamp_min(1)
            moved = (gate.moved * picked).sum((1, 2)) / picked.float().sum((1, 2)).clamp_min(1)
            state.mass_moved[call.layer_idx] = moved
            return None

        return observe

    # ------------------------------------------------------------------ report
    def report(self, state: VARState) -> dict[str, Any]:
        """Sink dims and their source, and per row and layer: sink positions, selected share, mass moved, and
        `image_centric_heads` (per head, the share of the prompt's edited queries whose head was selected)."""
        rows = []
        for b in range(state.batch):
            image = state.image[b]
            row: dict[str, Any] = {"sinks": {}, "visual_sinks": {}, "text_sinks": {}, "selected_head_share": {},
                                   "mean_mass_moved": {}, "image_centric_heads": {}}
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
                if layer in state.head_share:
                    row["image_centric_heads"][layer] = state.head_share[layer][b].tolist()
            rows.append(row)
        return {"p": self.p, "rho": self.rho, "summ": self.summ, "tau": self.tau, "sink_dims": list(state.dims),
                "sink_dims_source": state.dims_source, "layers": list(state.layers), "rows": rows}
