"""DoLa: contrast the final layer's next-token distribution with an earlier ("premature") layer's.

Paper: Chuang, Xie, Luo, Kim, Glass, He, "DoLa: Decoding by Contrasting Layers Improves Factuality in Large
Language Models", ICLR 2024, arXiv 2309.03883. Spec: shared/specs/dola.md.

DoLa is a text-LLM method: it never looks at the image, so for a VLM it is a **baseline** for the
visual-grounding methods, applied to the language model alone.

Hidden indices j (as in `output_hidden_states`): 0 is the language model's input embeddings (after the image
merge), j in [1, N) the output of decoder layer j-1, N the final layer after the final norm (the mature one).
At every step, for the newest position of every row:

1. early exit: z_j = lm_head(h_j) for every candidate j in J (no final norm, as the official code); in a
   hyper-connected language model (HY V4 VL: each layer passes 4 residual streams on) h_j is first collapsed into
   one hidden state by the model's own readout of its last layer's streams (`Adapter.stream_collapse`), as the
   final layer's is, since `lm_head` reads one hidden state;
2. selection: j* = the candidate whose distribution diverges most from the final one (per row by default);
3. contrast: F = log_softmax(z_N) - log_softmax(z_j*) on the plausible tokens
   {x : p_N(x) >= relative_top * max p_N}, -inf elsewhere.

How (public extension points only): forward pre-hooks on the candidate decoder layers keep the newest
position of their input hidden states ([batch, hidden] each; the input of decoder layer j is h_j), and a
forward hook on the output head replaces the newest position's logits with F. The hook sits on `lm_head`, not
in a `LogitsProcessor`: `generate` runs its own processors (repetition penalty) before user processors, and DoLa
applies the penalty to the contrasted scores, so F must exist before any processor runs. No second stream, no
attention edit, no `output_hidden_states` (which would keep every layer at every prefill position).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from vlmfix import validation
from vlmfix.adapters import Adapter
from vlmfix.decoding.method import Method, register_method
from vlmfix.errors import SessionError, UnsupportedModelError

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session

Bucket = Literal["low", "high"]
Divergence = Literal["dola_code", "jsd"]
Selection = Literal["per_row", "batch_mean"]

BUCKETS: tuple[Bucket, ...] = ("low", "high")
DIVERGENCES: tuple[Divergence, ...] = ("dola_code", "jsd")
SELECTIONS: tuple[Selection, ...] = ("per_row", "batch_mean")
BUCKET_SPAN = 20  # beyond 40 layers a bucket holds 20 hidden indices (10 candidates), as transformers' DoLa
RECOMMENDED_PENALTY = 1.2  # the repetition penalty of every DoLa result in the paper's code (tfqa_eval.py)
LAYERS_HELP = (
    "the candidate premature layers: 'high' (the upper half of the layers, even indices; for short answers "
    "such as POPE's yes/no), 'low' (the lower half; for long answers such as CHAIR captions), or a list of "
    "hidden indices (0 = the embeddings, j = the output of decoder layer j-1; one index gives DoLa-static). "
    "There is no default: the paper picks the bucket per task"
)


# ---------------------------------------------------------------------------------------------
# the rule, on plain tensors


def candidate_layers(layers: Bucket | Sequence[int], num_layers: int, tied: bool) -> tuple[int, ...]:
    """The candidate premature hidden indices J of a language model with `num_layers` decoder layers.

    A bucket follows transformers' DoLa: it starts at 0, or at 2 (1 for a 2-layer model) when the word
    embeddings are tied to the output head (their early exit is trivial); "low" is the even indices below
    N // 2, "high" the even indices from N // 2 up to N - 1; beyond 40 layers "low" stops at 20 and "high"
    starts at N - 20. A list is returned as given (`DoLa.check` refuses indices >= N).
    """
    if not isinstance(layers, str):
        return tuple(layers)
    start = (2 if num_layers > 2 else 1 if num_layers == 2 else 0) if tied else 0
    half = num_layers // 2
    if layers == "high":
        return tuple(range(half if num_layers <= 2 * BUCKET_SPAN else num_layers - BUCKET_SPAN, num_layers, 2))
    if start == half:
        return (start,)
    return tuple(range(start, half if num_layers <= 2 * BUCKET_SPAN else BUCKET_SPAN, 2))


def layer_divergence(mature: Tensor, premature: Tensor, kind: Divergence = "dola_code") -> Tensor:
    """[layers, batch] divergence of each premature next-token distribution from the mature one.

    Args:
        mature: [batch, vocab] final-layer logits z_N.
        premature: [layers, batch, vocab] early-exit logits z_j.
        kind: "dola_code": 1/2 [KL(M || p_N) + KL(M || p_j)] / vocab, the official code's and transformers'
            formula (the KL arguments reversed, averaged over the vocabulary); "jsd": the paper's Jensen-Shannon
            divergence 1/2 [KL(p_N || M) + KL(p_j || M)]. M = (p_N + p_j) / 2 in both.
    """
    log_n = mature.float().log_softmax(-1)[None]  # [1, batch, vocab]
    log_j = premature.float().log_softmax(-1)  # [layers, batch, vocab]
    log_m = torch.logaddexp(log_n, log_j) - math.log(2.0)  # log M: [layers, batch, vocab]
    if kind == "jsd":
        to_m_n = (log_n.exp() * (log_n - log_m)).sum(-1)  # KL(p_N || M)
        to_m_j = (log_j.exp() * (log_j - log_m)).sum(-1)  # KL(p_j || M)
        return 0.5 * (to_m_n + to_m_j)
    m = log_m.exp()
    from_m_n = (m * (log_m - log_n)).mean(-1)  # KL(M || p_N) / vocab
    from_m_j = (m * (log_m - log_j)).mean(-1)  # KL(M || p_j) / vocab
    return 0.5 * (from_m_n + from_m_j)


def select_premature(divergence: Tensor, selection: Selection = "per_row") -> Tensor:
    """[batch] index into the candidates of each row's premature layer, from [layers, batch] divergences:
    each row's most divergent candidate ("per_row"), or the candidate with the largest batch mean for every
    row ("batch_mean", the official code's and transformers' choice)."""
    if selection == "batch_mean":
        return divergence.mean(dim=1).argmax().expand(divergence.shape[1])
    return divergence.argmax(dim=0)


def dola_scores(mature: Tensor, premature: Tensor, relative_top: float = 0.1) -> Tensor:
    """[batch, vocab] fp32 DoLa scores: log_softmax(z_N) - log_softmax(z_j*) on the tokens with
    p_N >= relative_top * max p_N (the top token always), -inf elsewhere.

    Args:
        mature: [batch, vocab] final-layer logits z_N.
        premature: [batch, vocab] logits z_j* of each row's chosen premature layer.
        relative_top: the plausibility ratio, in (0, 1]; 1 keeps only the top token (plain greedy).
    """
    log_n = mature.float().log_softmax(-1)
    log_j = premature.float().log_softmax(-1)
    plausible = log_n >= log_n.max(dim=-1, keepdim=True).values + math.log(relative_top)
    return (log_n - log_j).masked_fill(~plausible, float("-inf"))


# ---------------------------------------------------------------------------------------------
# where the model keeps its output head and final norm


def output_head(model: nn.Module) -> nn.Module:
    """The model's output head (`lm_head`, else `get_output_embeddings()`); refuses a model without one."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        raise UnsupportedModelError(
            f"DoLa needs the model's output head to early-exit the premature layers, but "
            f"{type(model).__name__} has no `lm_head` and get_output_embeddings() gives none. Use a model with a "
            f"language-modelling head (a ...ForConditionalGeneration class)."
        )
    return head


def final_norm(adapter: Adapter) -> nn.Module:
    """The language model's final norm (`norm`); refuses a model without one."""
    norm = getattr(adapter.language_model, "norm", None)
    if not isinstance(norm, nn.Module):
        raise UnsupportedModelError(
            f"DoLa(early_exit_norm=True) applies the language model's final norm to the premature layers, but "
            f"{type(adapter.language_model).__name__} has no `norm` module. Use early_exit_norm=False (the "
            f"official DoLa, without the norm)."
        )
    return norm


def tied_embeddings(model: nn.Module, head: nn.Module) -> bool:
    """Whether the output head shares its weight with the input word embeddings."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    weight, shared = getattr(head, "weight", None), getattr(embeddings, "weight", None)
    return isinstance(weight, Tensor) and isinstance(shared, Tensor) and (
        weight is shared or weight.data_ptr() == shared.data_ptr())


# ---------------------------------------------------------------------------------------------
# the method


@dataclass
class DoLaState:
    """Per prompt batch: the candidates, the newest hidden states of the forward running now, the picks."""

    candidates: tuple[int, ...]
    mature_layer: int
    index: int  # the method's position in the session (its `applied` counters)
    hidden: dict[int, Tensor] = field(default_factory=dict)  # hidden index -> [batch, hidden], newest position
    picks: list[Tensor] = field(default_factory=list)  # per step: [batch] long, index into `candidates`
    early_exiting: bool = False  # the contrast hook's own calls of the output head

    def chosen_layers(self) -> list[list[int]]:
        """Per row, the premature hidden index chosen at each step."""
        if not self.picks:
            return []
        picks = torch.stack([p.cpu() for p in self.picks], dim=1)  # [batch, steps]
        return [[self.candidates[i] for i in row] for row in picks.tolist()]


@register_method
class DoLa(Method):
    """Decoding by Contrasting Layers: score each token by log p_N - log p_j*, where p_j* is the early-exit
    distribution of the candidate layer that diverges most from the final one, among the tokens the final
    layer finds plausible. A text-LM method: for VLMs a baseline that never looks at the image.

    Use it with `repetition_penalty=1.2` (every DoLa result in the paper used it; vlmfix does not set it, and
    warns below 1.2 when it sees the call's arguments), and compare with greedy at the same penalty, so the
    penalty's own effect is not credited to DoLa. Greedy and sampling decode from the DoLa scores (generate's
    processors, warpers and token choice run on them unchanged). Beam search is refused where the call's
    arguments are visible (`session.generate`, `vlmfix.generate`, or the model's generation config); a bare
    `model.generate(num_beams=...)` inside `vlmfix.apply` hides them.

    Args:
        layers ("low" | "high" | list[int], required): the candidate premature layers. "high": the upper half of
            the language model's layers, even hidden indices (Vicuna-7B: 16, 18, ..., 30; for short answers:
            POPE); "low": the lower half (0, 2, ..., 14; for long answers: CHAIR); beyond 40 layers each bucket
            spans 20 indices; with tied word embeddings "low" starts at 2. A list gives hidden indices
            explicitly: 0 = the embeddings, j = the output of decoder layer j-1, each below the depth N (checked
            when the session is made); one index is DoLa-static.
        relative_top (float, default 0.1): plausibility ratio in (0, 1]: only tokens with
            p_N >= relative_top * max p_N keep a score; 1.0 keeps the top token only (plain greedy).
        divergence ("dola_code" | "jsd", default "dola_code"): the layer-selection divergence: the official
            code's (KL(M || .) averaged over the vocabulary; it reproduces the official layer picks) or the
            paper's Jensen-Shannon divergence.
        layer_selection ("per_row" | "batch_mean", default "per_row"): pick the premature layer per batch row
            (a batch of 2 decodes like two batches of 1), or once per step from the batch-mean divergence (the
            official code and transformers).
        early_exit_norm (bool, default False): apply the language model's final norm to premature hidden states
            before the output head (the "logit lens"); False is the official DoLa.

    Paper: Chuang et al., "DoLa: Decoding by Contrasting Layers Improves Factuality in Large Language Models",
    ICLR 2024, arXiv 2309.03883 (dynamic premature layer selection, contrast, adaptive plausibility constraint).
    Departs from the official code (voidism/DoLa, a fork of transformers 4.28) and from transformers' former
    built-in DoLa (now Hub code that needs network access and trust_remote_code, never loaded here): the
    premature layer is chosen per row (they average the divergence over the batch: `layer_selection=
    "batch_mean"` reproduces it) and the plausibility mask is per row (the official code used row 0's for every
    row); the bucket has no silent default; list entries beyond the depth are refused (transformers dropped
    them); the hidden states come from hooks at the newest position only, not from `output_hidden_states`.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> with vlmfix.apply(model, vlmfix.DoLa(layers="high")) as session:
        ...     out = session.generate(**inputs, max_new_tokens=16, repetition_penalty=1.2)
        >>> counts = session.report()["dola"]["rows"][0]["counts"]  # premature layer -> steps that chose it
    """

    name = "dola"
    needs_image = False
    single_stream = True

    def __init__(
        self,
        layers: Bucket | Sequence[int] | None = None,
        relative_top: float = 0.1,
        divergence: Divergence = "dola_code",
        layer_selection: Selection = "per_row",
        early_exit_norm: bool = False,
    ) -> None:
        self.layers = self._checked_layers(layers)
        self.relative_top = validation.number(relative_top, "relative_top", low=0, high=1, low_open=True,
                                              meaning="the plausibility ratio of the final layer's top token "
                                              "(0.1 in the paper; 1.0 keeps the top token only)")
        self.divergence = validation.choice(divergence, "divergence", DIVERGENCES,
                                            "'dola_code' reproduces the official layer picks, 'jsd' is the paper's")
        self.layer_selection = validation.choice(layer_selection, "layer_selection", SELECTIONS,
                                                 "'batch_mean' reproduces the official code")
        self.early_exit_norm = validation.boolean(early_exit_norm, "early_exit_norm",
                                                  "whether premature layers go through the final norm")

    @staticmethod
    def _checked_layers(layers: Any) -> Bucket | tuple[int, ...]:
        if layers is None:
            raise ValueError(f"DoLa needs `layers`, {LAYERS_HELP}: DoLa(layers='high').")
        if isinstance(layers, str):
            if layers not in BUCKETS:
                raise ValueError(f"`layers` must be 'low', 'high' or a list of hidden indices, got {layers!r}; "
                                 f"layers is {LAYERS_HELP}.")
            return layers  # type: ignore[return-value]  # one of BUCKETS
        checked = validation.indices(layers, "layers", allow_none=False, what="hidden indices",
                                     meaning=f"layers is {LAYERS_HELP}")
        return tuple(sorted(checked or ()))

    # ------------------------------------------------------------------ the model
    def candidates(self, adapter: Adapter) -> tuple[int, ...]:
        """The candidate premature hidden indices J for this model (checked against its depth)."""
        depth = adapter.num_layers
        if not isinstance(self.layers, str):
            bad = [j for j in self.layers if j >= depth]
            if bad:
                raise ValueError(
                    f"`layers` holds {bad}, but the language model has {depth} layers: premature hidden indices "
                    f"run from 0 (the embeddings) to {depth - 1} (the output of decoder layer {depth - 2}), and "
                    f"{depth} is the final (mature) layer. Pass indices below {depth}, or 'low' / 'high'."
                )
            return self.layers
        tied = tied_embeddings(adapter.model, output_head(adapter.model))
        found = candidate_layers(self.layers, depth, tied)
        if not found:
            raise ValueError(f"layers={self.layers!r} gives no candidate layer for this {depth}-layer language model "
                             f"(tied word embeddings: {tied}); pass a list of hidden indices below {depth}.")
        return found

    def check(self, adapter: Adapter) -> None:
        """Refuse layers beyond the model's depth, and a model without an output head (or final norm)."""
        output_head(adapter.model)
        if self.early_exit_norm:
            final_norm(adapter)
        self.candidates(adapter)

    # ------------------------------------------------------------------ per prompt
    def prepare(self, session: Session) -> DoLaState:
        self._check_call(session)
        adapter = session.adapter
        index = next(i for i, m in enumerate(session.methods) if m is self)
        state = DoLaState(candidates=self.candidates(adapter), mature_layer=adapter.num_layers, index=index)
        for j in state.candidates:
            session.hook_for_prompt(adapter.decoder_layers[j], self._capture(session, state, j))
        norm = final_norm(adapter) if self.early_exit_norm else None
        contrast = self._contrast(session, state, norm, adapter.stream_collapse)
        session.hook_for_prompt(output_head(session.model), contrast, after=True)
        return state

    def _check_call(self, session: Session) -> None:
        """Refuse a second DoLa and beam search; warn about a repetition penalty below 1.2.

        The generate arguments are visible through `session.generate` / `vlmfix.generate`; a bare
        `model.generate` inside `vlmfix.apply` hides them, so only the model's generation config is checked."""
        dolas = [m for m in session.methods if isinstance(m, DoLa)]
        if len(dolas) > 1:
            raise ValueError(f"DoLa can be applied once per call, got {len(dolas)} DoLa methods; pass one.")
        call = session.call_inputs
        config = call.get("generation_config") or getattr(session.model, "generation_config", None)

        def setting(key: str, default: Any) -> Any:
            value = call.get(key)
            value = getattr(config, key, None) if value is None else value
            return default if value is None else value

        beams = setting("num_beams", 1)
        if beams > 1:
            raise ValueError(f"DoLa decodes greedily or by sampling, not by beam search (num_beams={beams}): its "
                             f"scores log p_N - log p_j are not log-probabilities to add up along a beam, and the "
                             f"official DoLa refuses beams too. Set num_beams=1.")
        penalty = setting("repetition_penalty", 1.0)
        if call and penalty < RECOMMENDED_PENALTY:
            warnings.warn(f"DoLa runs with repetition_penalty={penalty}; the paper's DoLa results all use "
                          f"{RECOMMENDED_PENALTY} (pass repetition_penalty={RECOMMENDED_PENALTY}, and compare with "
                          f"greedy at the same penalty).", stacklevel=2)

    def _capture(self, session: Session, state: DoLaState, j: int) -> Any:
        """Pre-hook of decoder layer j: keep h_j, its input hidden states at the newest position."""

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if session.in_extra_pass:
                return
            hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, (streams,) hidden]
            state.hidden[j] = hidden[:, -1].detach()

        return hook

    def _contrast(self, session: Session, state: DoLaState, norm: nn.Module | None,
                  collapse: nn.Module | None = None) -> Any:
        """Forward hook of the output head: the newest position's logits become the DoLa scores (`collapse`: the
        readout of hyper-connected streams, applied before the norm and the head)."""

        def hook(module: nn.Module, args: tuple, logits: Tensor) -> Tensor | None:
            if session.in_extra_pass or state.early_exiting:
                return None
            missing = [j for j in state.candidates if j not in state.hidden]
            if missing:
                raise SessionError(
                    f"DoLa's output-head hook ran without the hidden states of layers {missing}: the language "
                    f"model's decoder layers did not run before it. Call the whole model (generate or forward), "
                    f"not its output head alone."
                )
            hidden = torch.stack([state.hidden.pop(j) for j in state.candidates])  # [layers, batch, (streams,) hidden]
            state.hidden.clear()
            if collapse is not None:
                hidden = collapse(hidden)  # [layers, batch, streams, hidden] -> [layers, batch, hidden]
            if norm is not None:
                hidden = norm(hidden)
            state.early_exiting = True
            try:
                premature = module(hidden)  # [layers, batch, vocab]
            finally:
                state.early_exiting = False
            # logits: [batch, q_len, vocab]; only the newest position has premature hidden states
            if logits.dim() != 3 or premature.shape[1] != logits.shape[0]:
                raise SessionError(f"DoLa captured hidden states of {premature.shape[1]} rows for logits of shape "
                                   f"{tuple(logits.shape)}; it needs [batch, q_len, vocab] logits of the same rows.")
            mature = logits[:, -1].float()  # [batch, vocab]
            picks = select_premature(layer_divergence(mature, premature, self.divergence), self.layer_selection)
            base = premature[picks, torch.arange(picks.shape[0], device=picks.device)]  # [batch, vocab]
            scores = logits.to(torch.float32, copy=True)
            scores[:, -1] = dola_scores(mature, base, self.relative_top)
            state.picks.append(picks)
            session.applied[state.index].contrast_steps += 1
            return scores

        return hook

    def report(self, state: DoLaState) -> dict[str, Any]:
        """The candidates, and per row the premature layer chosen at each step with its counts."""
        chosen = state.chosen_layers()
        rows = [{"premature_layers": steps, "counts": dict(sorted(Counter(steps).items()))} for steps in chosen]
        return {"layers": self.layers if isinstance(self.layers, str) else list(self.layers),
                "candidates": list(state.candidates), "mature_layer": state.mature_layer,
                "divergence": self.divergence, "layer_selection": self.layer_selection,
                "relative_top": self.relative_top, "steps": len(state.picks), "rows": rows}
