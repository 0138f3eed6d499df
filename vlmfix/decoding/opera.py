"""OPERA's decoding loop: beam search with the over-trust penalty and per-item retrospection, run as
generate's public `custom_generate` callable (spec opera.md §3.6).

`generate` prepares everything as for its own beam search (beam expansion, image features, processors,
stopping criteria, an empty `DynamicCache`) and hands the B·K rows to `OperaSearch`, which runs:

- **One look-ahead forward per step.** Each beam's top-C candidates (by raw logit) are fed as one
  q_len = C chunk; a 4-D mask lets each candidate see its row's valid cache slots and itself only, at the
  row's next position. The last layer's attention rows of the candidates (read by an observer in
  vlmfix's attention function, never `output_attentions`) give the penalty, and the chunk's logits are
  the candidates' next-token logits. After the beams are chosen, each new beam keeps its chosen
  candidate's key/value slot and drops the C-1 others, so the chosen token is never fed again: a step
  costs one forward with C query rows, where plain beam search runs one with one query row.
- **Per-item rollback.** An item that rolls back restores its beams, scores, finished hypotheses and
  location histories from the step it goes back to. Its old generated cache slots become holes (masked
  in the row's validity mask); one catch-up forward re-feeds its restored prefixes (other rows feed
  masked pads), the position is re-decided, and the chosen tokens are fed. Other items do not move.

Positions continue those of the prefill (read from the decoder stack's input) by each row's generated
length, never from the cache slot. The 4-D masks need a backend
that honours arbitrary masks (sdpa, eager); `OPERA.check` refuses flash attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

from vlmfix.decoding.attention import AttentionCall
from vlmfix.decoding.edits import additive_mask, key_probabilities, repeat_kv
from vlmfix.decoding.prompt_inputs import FEATURES, image_tokens_encoded, repeat_image_groups
from vlmfix.errors import SessionError
from vlmfix.methods.opera_rules import RetrospectionRule, local_scores, mode, rollback_position

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session
    from vlmfix.methods.opera import OPERA

# generate() arguments the loop cannot honour, with the reason
UNSUPPORTED = {
    "custom_generate": "OPERA is itself the custom_generate of the call",
    "streamer": "the retrospection can take back tokens a streamer has already shown",
    "assistant_model": "assisted decoding proposes tokens from another model",
    "prefill_chunk_size": "OPERA runs the prefill itself",
    "cache": "OPERA keeps its own dynamic cache (it drops and regathers slots)",
    "past_key_values": "OPERA keeps its own dynamic cache (it drops and regathers slots)",
    "cache_implementation": "OPERA keeps its own dynamic cache (it drops and regathers slots)",
    "inputs_embeds": "OPERA feeds token ids",
    "stop_strings": "OPERA stops at max_new_tokens / max_length and at eos_token_id only",
    "max_time": "OPERA stops at max_new_tokens / max_length and at eos_token_id only",
    "stopping_criteria": "OPERA stops at max_new_tokens / max_length and at eos_token_id only",
    "output_logits": "the look-ahead logits are not generate's logits; use output_scores",
    "output_attentions": "OPERA reads one layer inside the attention function and returns no attention maps",
    "output_hidden_states": "OPERA returns no hidden states",
}
NEG = -1.0e9  # the score generate's beam search gives to a continuation it rules out


def check_beam_settings(num_beams: Any, do_sample: Any) -> None:
    """OPERA is a beam search: num_beams >= 2 and do_sample False (spec D10)."""
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 2 or do_sample:
        raise ValueError(
            f"OPERA is a beam-search method; set num_beams >= 2 and do_sample=False (got num_beams={num_beams!r}, "
            f"do_sample={do_sample!r}). The paper uses num_beams=5."
        )


def generate_opera(session: Session, **generate_kwargs: Any) -> Any:
    """`model.generate(**generate_kwargs)` with the session's OPERA method deciding every token; returns what
    generate's beam search returns (a tensor, or a `GenerateBeamDecoderOnlyOutput`)."""
    loops = [(i, m) for i, m in enumerate(session.methods) if m.owns_decoding]
    if len(loops) != 1:
        raise ValueError(f"one method with its own decoding loop per call, got {len(loops)}: "
                         f"{', '.join(m.name for _, m in loops)}.")
    index, method = loops[0]
    refused = [m.name for m in session.methods if m.contrastive]
    if refused:
        raise ValueError(f"OPERA cannot be combined with two-stream methods ({', '.join(refused)}): both decide "
                         f"the next token from their own logits. Run them in separate calls.")
    single = [m.name for m in session.methods if m.one_token_decode]
    if single:
        raise ValueError(f"OPERA cannot be combined with {', '.join(single)}: they assume one new token per decode "
                         f"forward, and OPERA feeds C candidate tokens per forward. VHR and PAI (without "
                         f"refinement) compose with OPERA.")
    for key, reason in UNSUPPORTED.items():
        if generate_kwargs.get(key) not in (None, False, []):
            raise ValueError(f"{key} cannot be used with OPERA: {reason}.")
    config = generate_kwargs.get("generation_config") or session.model.generation_config
    check_beam_settings(generate_kwargs.get("num_beams", config.num_beams),
                        generate_kwargs.get("do_sample", config.do_sample))
    ids = generate_kwargs.get("input_ids", generate_kwargs.get("inputs"))
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError(f"OPERA needs input_ids of shape [batch, seq] (the processor's output), got "
                         f"{type(ids).__name__}.")
    search = OperaSearch(session, index, cast("OPERA", method))
    session.loop = search
    try:
        return session.model.generate(**generate_kwargs, custom_generate=search)
    finally:
        session.loop = None


def require_loop(session: Session) -> OperaSearch:
    """The running OPERA loop of `session` (call from `OPERA.prepare`); a bare model.generate gets an error."""
    if not isinstance(session.loop, OperaSearch):
        raise SessionError(
            "OPERA runs its own beam search: call session.generate(**inputs, num_beams=5) inside vlmfix.apply, or "
            "vlmfix.generate(model, **inputs, methods=[vlmfix.OPERA()], num_beams=5). A bare model.generate "
            "cannot run it."
        )
    return session.loop


@dataclass
class OperaState:
    """What OPERA did in one call, per prompt item (the `report`)."""

    items: int
    bonus_steps: list[int] = field(default_factory=list)  # steps scored with the image-attention bonus
    penalty_steps: list[int] = field(default_factory=list)  # steps scored with the over-trust penalty
    rollbacks: list[int] = field(default_factory=list)
    rollback_positions: list[list[int]] = field(default_factory=list)  # generated positions re-decided
    vetoed_beams: list[int] = field(default_factory=list)  # beams whose every candidate had an infinite penalty
    lifted_vetoes: list[int] = field(default_factory=list)  # steps where every beam of the item was vetoed

    def __post_init__(self) -> None:
        for name in ("bonus_steps", "penalty_steps", "rollbacks", "vetoed_beams", "lifted_vetoes"):
            setattr(self, name, [0] * self.items)
        self.rollback_positions = [[] for _ in range(self.items)]


@dataclass
class _Snapshot:
    """One item's beam state just before it chose generated token `n` (what a rollback restores)."""

    tokens: Tensor  # [K, n]
    scores: Tensor  # [K]
    history: Tensor  # [K, n]
    finished: tuple[Tensor, Tensor, Tensor, Tensor]  # tokens [K, T], scores [K], flags [K], lengths [K]
    unsatisfied: Tensor  # [] bool
    chosen: tuple[Tensor, Tensor] | None = None  # (parents [K], tokens [K]) of the kept beams


class OperaSearch:
    """generate's `custom_generate` for one call: OPERA's beam search over B items × K beams."""

    def __init__(self, session: Session, index: int, method: OPERA) -> None:
        self.session = session
        self.index = index
        self.method = method
        self.state: OperaState | None = None
        self.watching = False  # inside one of the loop's own forwards
        self.seen: Tensor | None = None  # [R, q_len, kv_len]: last layer, max over heads, renormalised
        self.last_layer = session.adapter.num_layers - 1
        self.language_model_positions: Tensor | None = None  # what the prefill's decoder stack was given
        self.language_model_called = False

    # ------------------------------------------------------------------------------ the observer
    def observe(self, call: AttentionCall) -> None:
        """Read the last layer's post-softmax attention of the fed rows (fp32; the output is untouched)."""
        if not self.watching or call.layer_idx != self.last_layer:
            return None
        query = call.query.float()  # [R, heads, q_len, head_dim]
        key = repeat_kv(call.key, query.shape[1]).float()  # [R, heads, kv_len, head_dim]
        scaling = query.shape[-1] ** -0.5 if call.scaling is None else call.scaling
        z = (query @ key.transpose(-1, -2)) * scaling
        z = z + additive_mask(call.attention_mask, query.shape[0], query.shape[2], key.shape[2], z.device)
        top = key_probabilities(z, call.sinks).amax(dim=1)  # [R, q_len, kv_len]: max over query heads (sinks: out)
        self.seen = top / top.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        return None

    def read_positions(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        """Pre-hook on the decoder stack: keep the position ids of its latest call outside the loop's own
        forwards (after the prefill: the prefill's; None when the model let the stack number positions)."""
        if not self.watching:
            self.language_model_positions = kwargs.get("position_ids")
            self.language_model_called = True

    # ------------------------------------------------------------------------------ generate's hook
    @torch.no_grad()
    def __call__(self, model: Any, input_ids: Tensor, logits_processor: Any, stopping_criteria: Any,
                 generation_config: Any, **model_kwargs: Any) -> Any:
        check_beam_settings(generation_config.num_beams, generation_config.do_sample)
        known = (MaxLengthCriteria, EosTokenCriteria)
        other = [type(c).__name__ for c in stopping_criteria if not isinstance(c, known)]
        if other:
            raise ValueError(f"OPERA stops at max_new_tokens / max_length and at eos_token_id only; got "
                             f"{', '.join(other)} (from stop_strings, max_time or stopping_criteria). Leave them out.")
        cache = model_kwargs.get("cache")
        if not isinstance(cache, DynamicCache):
            raise ValueError(f"OPERA needs generate's DynamicCache, got {type(cache).__name__}; leave "
                             "cache_implementation unset.")
        check_cache_layers(cache)
        run = _Run(self, model, input_ids, logits_processor, generation_config, model_kwargs)
        return run.decode()


def check_cache_layers(cache: DynamicCache) -> None:
    """OPERA edits slots of plain dynamic layers only (no sliding-window, quantized or linear layers)."""
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise ValueError(f"OPERA needs plain dynamic cache layers, got {type(layer).__name__} (a sliding-window, "
                             f"quantized or linear-attention cache); OPERA supports full-attention decoders.")


def beam_image_features(kwargs: dict[str, Any], beams: int, image_mask: Tensor) -> dict[str, Any]:
    """generate's kwargs with the image features repeated for each item's beams where generate left them for
    the items only: it expands features held in `pooler_output`, not a family's `last_hidden_state` (Fuyu).
    `image_mask`: [items * beams, S] the prompt rows' image tokens, each item's rows together."""
    outputs = kwargs.get(FEATURES) or {}
    image = outputs.get("image")
    if image is None or image_tokens_encoded(image) == int(image_mask.sum()):
        return kwargs
    return {**kwargs, FEATURES: {**outputs, "image": repeat_image_groups(image, image_mask[::beams], beams)}}


class _Run:
    """The tensors of one OPERA beam search (R = B·K rows, T = max new tokens)."""

    def __init__(self, search: OperaSearch, model: Any, input_ids: Tensor, processors: Any, config: Any,
                 model_kwargs: dict[str, Any]) -> None:
        self.search, self.model, self.processors, self.config = search, model, processors, config
        self.method = search.method
        self.prompt = input_ids  # [R, S]
        self.kwargs = model_kwargs
        self.cache: DynamicCache = model_kwargs["cache"]
        rows, self.prompt_len = input_ids.shape
        self.beams = config.num_beams
        self.items = rows // self.beams
        self.max_new = config.max_length - self.prompt_len
        eos = config._eos_token_tensor
        self.keep = max(2, 1 + (0 if eos is None else eos.numel())) * self.beams  # generate's top-2K
        self.candidates = self.method.num_attn_candidates
        method = self.method
        self.rule = RetrospectionRule(method.threshold, self.candidates, method.window, method.min_location)
        device = input_ids.device
        self.device = device
        self.eos = None if eos is None else eos.to(device).flatten()
        pad = config._pad_token_tensor
        fill = (pad if pad is not None and bool(pad) else eos.flatten()[0]) if eos is not None else -1  # as generate
        self.fill = int(fill)
        T = max(self.max_new, 1)
        self.tokens = torch.full((rows, T), self.fill, dtype=torch.long, device=device)
        self.history = torch.full((rows, T), -1, dtype=torch.long, device=device)
        self.slot = torch.zeros(rows, T, dtype=torch.long, device=device)
        self.attn = torch.zeros(rows, T, T, device=device)  # row i: token i's attention over tokens 0..i
        self.length = [0] * self.items
        self.scores = torch.zeros(self.items, self.beams, device=device)
        self.scores[:, 1:] = NEG
        self.fin_tokens = torch.full((self.items, self.beams, T), self.fill, dtype=torch.long, device=device)
        self.fin_scores = torch.full((self.items, self.beams), NEG, device=device)
        self.fin_flags = torch.zeros(self.items, self.beams, dtype=torch.bool, device=device)
        self.fin_lengths = torch.zeros(self.items, self.beams, dtype=torch.long, device=device)
        self.unsatisfied = torch.ones(self.items, dtype=torch.bool, device=device)
        self.done = torch.zeros(self.items, dtype=torch.bool, device=device)
        self.vetoed = torch.zeros(self.items, dtype=torch.long, device=device)  # counted on the device
        self.lifted = torch.zeros(self.items, dtype=torch.long, device=device)
        self.snapshots: list[dict[int, _Snapshot]] = [{} for _ in range(self.items)]
        self.forbidden: list[dict[int, set[tuple[int, int]]]] = [{} for _ in range(self.items)]
        self.attempts: list[dict[int, int]] = [{} for _ in range(self.items)]
        self.top_mask = torch.arange(self.keep, device=device) < self.beams
        self.state = OperaState(self.items)
        search.state = self.state

    # ------------------------------------------------------------------------------ the loop
    def decode(self) -> Any:
        image_mask = self.search.session.adapter.image_mask(self.prompt)  # [R, S]
        kwargs = self.kwargs = beam_image_features(self.kwargs, self.beams, image_mask)
        inputs = self.model.prepare_inputs_for_generation(self.prompt, is_first_iteration=True, **kwargs)
        out = self.model(**inputs, return_dict=True)  # the prefill (the session prepares OPERA here)
        self.logits = out.logits[:, -1].float()  # [R, V]: each beam's next-token logits
        del out
        check_cache_layers(self.cache)
        mask = kwargs.get("attention_mask")
        self.valid = (torch.ones_like(self.prompt, dtype=torch.bool) if mask is None else mask.bool().clone())
        self.next_position = self.prefill_positions()[..., -1:] + 1  # [R, 1] or [sections, R, 1]
        self.image = self.search.session.spans.image.to(self.device)  # [R, S] bool
        try:
            while not bool(self.done.all()):
                self.step()
        finally:
            self.state.vetoed_beams = self.vetoed.tolist()
            self.state.lifted_vetoes = self.lifted.tolist()
        return self.output()

    def prefill_positions(self) -> Tensor:
        """The positions the prefill's decoder stack used, which the generated tokens continue. Given
        explicitly (generate's, from the padding mask; M-RoPE sections), or None where the model leaves the
        numbering to the stack (HyperCLOVA X Vision V2, EXAONE 4.5 drop generate's position ids): the stack
        then numbers by cache slot, so a left-padded row's pads count. Continuing from the padding mask there
        would shift a padded row's generated tokens against its prompt by its pad count."""
        if not self.search.language_model_called:
            raise SessionError("OPERA's hook on the language model saw no prefill; run OPERA through "
                               "session.generate or vlmfix.generate.")
        positions = self.search.language_model_positions
        if positions is None:
            return torch.arange(self.prompt_len, device=self.device).expand(self.prompt.shape[0], -1)  # [R, S]
        return positions

    def step(self) -> None:
        """One look-ahead forward for every row; the items not done choose their next token."""
        rows, C, K = self.prompt.shape[0], self.candidates, self.beams
        active = ~self.done
        items = active.nonzero().flatten().tolist()
        for b in items:
            n = self.length[b]
            if n >= self.method.min_location:  # a rollback lands at a position >= min_location
                self.snapshots[b][n] = self.snapshot(b)
        cand_logits, cand_ids = self.logits.topk(C, dim=-1)  # [R, C]: each beam's top-C raw logits
        kv0 = self.valid.shape[1]
        lengths = self.row_lengths()  # [R]
        next_logits, seen = self.look_ahead(cand_ids, lengths)  # [R, C, V], [R, C, kv0 + C]
        image_mass = (seen[..., : self.prompt_len] * self.image[:, None, :]).sum(dim=-1)  # [R, C]
        cand_rows = self.candidate_rows(seen, kv0, lengths)  # [R, C, T]
        penalty = torch.zeros(rows, C, device=self.device)
        locations = torch.full((rows,), -1, dtype=torch.long, device=self.device)  # per (parent) beam
        penalised = []
        for b in items:
            r, n = self.rows_of(b), self.length[b]
            if n + 1 <= self.method.image_bonus_steps:
                penalty[r] = -image_mass[r]  # the bonus: image-attention mass is added to the logit
                self.state.bonus_steps[b] += 1
                continue
            phi, where = local_scores(self.attn[r, None, :n, : n + 1].expand(K, C, n, n + 1), cand_rows[r, :, : n + 1],
                                      self.method.scale_factor, self.method.window, self.method.score_range)  # [K, C]
            penalty[r] = phi
            locations[r] = mode(where, n + 1)
            penalised.append(b)
            self.state.penalty_steps[b] += 1
        scores = self.candidate_log_probs(cand_logits, penalty, items)  # [R, C]
        log_probs = torch.full_like(self.logits, -torch.inf).scatter(1, cand_ids, scores)  # [R, V]
        parents, tokens = self.select(self.processed(log_probs), active)  # [B, K] each
        self.search.session.applied[self.search.index].decoding_steps += len(items)
        beam_idx = self.flat_parents(parents)  # [R]
        choice = (cand_ids[beam_idx] == tokens.flatten()[:, None]).float().argmax(dim=-1)  # [R]: 0 when none
        self.keep_chosen_slots(beam_idx, choice, kv0)
        self.valid[:, kv0] = self.row_active(active)
        self.logits = next_logits[beam_idx, choice]
        new_rows = cand_rows[beam_idx, choice]  # [R, T]
        self.reorder(beam_idx)
        beam_locations = locations if self.method.history == "slot" else locations[beam_idx]
        for b in items:
            r, n = self.rows_of(b), self.length[b]
            self.tokens[r, n] = tokens[b]
            self.attn[r, n] = new_rows[r]
            self.slot[r, n] = kv0
            self.history[r, n] = beam_locations[r]
            self.length[b] = n + 1
            if n in self.snapshots[b]:
                self.snapshots[b][n].chosen = (parents[b], tokens[b])
        self.retrospect(penalised, locations)

    # ------------------------------------------------------------------------------ the look-ahead
    def look_ahead(self, cand_ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Feed each row's C candidates [R, C] at the row's next position. Returns each candidate's next-token
        logits [R, C, V] and last-layer attention row [R, C, kv0 + C]; the cache then holds candidate c of each
        row at slot kv0 + c (`keep_chosen_slots` keeps the chosen one)."""
        if self.method.candidate_pass == "sequential":
            return self.sequential_pass(cand_ids, lengths)
        rows, C = cand_ids.shape
        logits = self.feed(cand_ids, torch.ones_like(cand_ids, dtype=torch.bool),
                           torch.eye(C, dtype=torch.bool, device=self.device), lengths[:, None].expand(rows, C), keep=0)
        return logits, self.seen_rows()

    def sequential_pass(self, cand_ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The look-ahead as C forwards of one query row each, every one followed by a cache crop (the official
        code's candidate forwards, spec D7). Each candidate's key/value slot is set aside before the crop and
        the C slots are appended at the end, so the cache and the results are laid out as after the tree pass."""
        rows, C = cand_ids.shape
        kv0 = self.valid.shape[1]
        layers = [cast(DynamicLayer, layer) for layer in self.cache.layers]  # checked by check_cache_layers
        one = torch.ones(rows, 1, dtype=torch.bool, device=self.device)
        logits, seen = [], torch.zeros(rows, C, kv0 + C, device=self.device)
        slots: list[list[tuple[Tensor, Tensor]]] = []  # per candidate, per layer: keys, values [R, kv_heads, 1, d]
        for c in range(C):
            logits.append(self.feed(cand_ids[:, c : c + 1], one, one[:1, :1], lengths[:, None], keep=0))  # [R, 1, V]
            row = self.seen_rows()[:, 0]  # [R, kv0 + 1]: the cache slots, then the candidate itself
            seen[:, c, :kv0] = row[:, :kv0]
            seen[:, c, kv0 + c] = row[:, kv0]
            slots.append([(cast(Tensor, layer.keys)[:, :, kv0:], cast(Tensor, layer.values)[:, :, kv0:])
                          for layer in layers])
            for layer in layers:
                layer.crop(-1)
            self.valid = self.valid[:, :kv0]
        for i, layer in enumerate(layers):
            keys, values = zip(*(slot[i] for slot in slots))
            layer.update(torch.cat(keys, dim=2), torch.cat(values, dim=2))  # [R, kv_heads, C, d] each
        self.valid = torch.cat([self.valid, one.expand(rows, C)], dim=-1)
        return torch.cat(logits, dim=1), seen

    # ------------------------------------------------------------------------------ scoring
    def candidate_rows(self, seen: Tensor, kv0: int, lengths: Tensor) -> Tensor:
        """[R, C, T]: each candidate's attention over its beam's generated tokens 0..n-1 and itself (col n)."""
        rows, C, _ = seen.shape
        T = self.attn.shape[-1]
        out = seen.gather(2, self.slot[:, None, :].expand(rows, C, T))  # [R, C, T] at the tokens' slots
        out = out * (torch.arange(T, device=self.device)[None, :] < lengths[:, None])[:, None, :]
        own = seen[:, :, kv0 : kv0 + C].diagonal(dim1=1, dim2=2)  # [R, C]: each candidate on itself
        column = lengths.clamp(max=T - 1)[:, None, None].expand(rows, C, 1)
        return out.scatter(2, column, own[..., None])

    def candidate_log_probs(self, logits: Tensor, penalty: Tensor, items: list[int]) -> Tensor:
        """[R, C] log-softmax over each beam's candidates of z - alpha * penalty (spec §3.4, D3 vetoes)."""
        alpha = self.method.penalty_weights
        term = alpha * penalty if alpha > 0 else torch.zeros_like(penalty)
        scores = logits - term  # an infinite penalty is a veto: -inf
        stepping = torch.zeros(self.items, dtype=torch.bool, device=self.device)
        stepping[items] = True
        vetoed = torch.isneginf(scores).all(dim=-1).view(self.items, self.beams) & stepping[:, None]  # [B, K]
        lifted = vetoed.all(dim=-1)  # [B]: every beam of the item vetoed: lift the veto for this step
        self.vetoed += vetoed.sum(dim=-1)
        self.lifted += lifted
        unvetoed = logits - term.masked_fill(torch.isinf(term), 0.0)
        scores = torch.where(self.row_active(lifted)[:, None], unvetoed, scores)
        out = scores.log_softmax(dim=-1)
        return out.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), -torch.inf)  # no NaN rows

    def processed(self, log_probs: Tensor) -> Tensor:
        """generate's logits processors on [R, V] log-probs, with each item's own sequences."""
        if len(set(self.length)) == 1:
            ids = torch.cat([self.prompt, self.tokens[:, : self.length[0]]], dim=-1)
            return cast(Tensor, self.processors(ids, log_probs))
        out = log_probs.clone()
        for b, n in enumerate(self.length):
            r = self.rows_of(b)
            out[r] = self.processors(torch.cat([self.prompt[r], self.tokens[r, :n]], dim=-1), log_probs[r])
        return out

    def select(self, log_probs: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """generate's beam step for the `active` items: the top 2K continuations, the K running beams and the
        finished hypotheses, with each item's own generated length. Returns (parents, tokens) [B, K]."""
        B, K, T = self.items, self.beams, self.tokens.shape[1]
        vocab = log_probs.shape[-1]
        config = self.config
        n = torch.tensor(self.length, device=self.device)  # [B]
        acc = (log_probs.view(B, K, vocab) + self.scores[:, :, None]).view(B, K * vocab)
        top, index = acc.topk(self.keep, dim=-1)  # [B, 2K]
        parent, token = index // vocab, index % vocab
        hits = (n + 1 >= self.max_new)[:, None].expand_as(token).clone()
        if self.eos is not None:
            hits |= torch.isin(token, self.eos)
        running = top + hits.float() * NEG
        kept = running.topk(K, dim=-1).indices  # [B, K]
        new_parent, new_token, new_scores = parent.gather(1, kept), token.gather(1, kept), running.gather(1, kept)

        penalty_power = config.length_penalty
        just = hits & self.top_mask
        finished = top / ((n + 1).double() ** penalty_power).float()[:, None]
        full = self.fin_flags.all(dim=-1, keepdim=True) & (config.early_stopping is True)
        finished = finished + full.float() * NEG + (~self.unsatisfied)[:, None].float() * NEG + (~just).float() * NEG
        parent_rows = (parent + torch.arange(B, device=self.device)[:, None] * K).flatten()
        cand_tokens = self.tokens[parent_rows].view(B, self.keep, T)
        at_n = n.clamp(max=T - 1)[:, None, None].expand(B, self.keep, 1)
        cand_tokens = cand_tokens.scatter(2, at_n, token[..., None])
        merged_scores = torch.cat([self.fin_scores, finished], dim=1)
        best = merged_scores.topk(K, dim=-1).indices  # [B, K]
        fin_tokens = torch.cat([self.fin_tokens, cand_tokens], dim=1).gather(1, best[..., None].expand(B, K, T))
        fin_scores = merged_scores.gather(1, best)
        fin_flags = torch.cat([self.fin_flags, just], dim=1).gather(1, best)
        fin_lengths = torch.cat([self.fin_lengths, (n + 1)[:, None].expand(B, self.keep)], dim=1).gather(1, best)

        never = config.early_stopping == "never" and penalty_power > 0
        best_length = torch.full_like(n, self.max_new) if never else n + 1
        best_running = new_scores[:, :1] / (best_length.double() ** penalty_power).float()[:, None]
        worst = torch.where(fin_flags, fin_scores.min(dim=-1, keepdim=True).values, NEG)
        unsatisfied = self.unsatisfied & (best_running > worst).any(dim=-1)
        done = ~unsatisfied | (fin_flags.all(dim=-1) & (config.early_stopping is True)) | hits.all(dim=-1)

        on = active[:, None]
        self.scores = torch.where(on, new_scores, self.scores)
        self.fin_tokens = torch.where(on[..., None], fin_tokens, self.fin_tokens)
        self.fin_scores = torch.where(on, fin_scores, self.fin_scores)
        self.fin_flags = torch.where(on, fin_flags, self.fin_flags)
        self.fin_lengths = torch.where(on, fin_lengths, self.fin_lengths)
        self.unsatisfied = torch.where(active, unsatisfied, self.unsatisfied)
        self.done = self.done | (active & done)
        same = torch.arange(K, device=self.device).expand(B, K)
        return torch.where(on, new_parent, same), torch.where(on, new_token, self.fill)

    # ------------------------------------------------------------------------------ retrospection
    def retrospect(self, penalised: list[int], locations: Tensor) -> None:
        """Roll back the items whose summary-token location triggers (spec §3.5), then re-decide them."""
        rolled = {}
        done = self.done.tolist()
        for b in penalised:
            if done[b]:
                continue
            r, n = self.rows_of(b), self.length[b]
            location = int(mode(locations[r], n))
            position = rollback_position(self.history[r, :n], location, n, self.attempts[b], self.rule)
            if position is not None:
                self.restore(b, position)
                rolled[b] = position
        if rolled:
            self.redecide(rolled)

    def snapshot(self, b: int) -> _Snapshot:
        r, n = self.rows_of(b), self.length[b]
        finished = (self.fin_tokens[b].clone(), self.fin_scores[b].clone(), self.fin_flags[b].clone(),
                    self.fin_lengths[b].clone())
        return _Snapshot(self.tokens[r, :n].clone(), self.scores[b].clone(), self.history[r, :n].clone(), finished,
                         self.unsatisfied[b].clone())

    def restore(self, b: int, position: int) -> None:
        """Item b's beam state from just before it chose token `position`; forbid that attempt's choices."""
        snap = self.snapshots[b][position]
        forbidden = self.forbidden[b]
        if snap.chosen is not None:
            forbidden.setdefault(position, set()).update(zip(snap.chosen[0].tolist(), snap.chosen[1].tolist()))
        for later in [q for q in forbidden if q > position]:
            del forbidden[later]
        for later in [q for q in self.snapshots[b] if q > position]:
            del self.snapshots[b][later]
        r = self.rows_of(b)
        self.tokens[r] = self.fill
        self.tokens[r, :position] = snap.tokens
        self.history[r] = -1
        self.history[r, :position] = snap.history
        self.attn[r] = 0.0
        self.scores[b] = snap.scores
        self.fin_tokens[b], self.fin_scores[b], self.fin_flags[b], self.fin_lengths[b] = snap.finished
        self.unsatisfied[b] = snap.unsatisfied
        self.length[b] = position
        self.state.rollbacks[b] += 1
        self.state.rollback_positions[b].append(position)

    def redecide(self, rolled: dict[int, int]) -> None:
        """Re-feed the rolled-back items' prefixes (their old slots become holes), re-decide each item's
        position from the plain logits without the forbidden pairs, and feed the chosen tokens."""
        rows, K = self.prompt.shape[0], self.beams
        width = max(rolled.values())
        ids = torch.full((rows, width), max(self.fill, 0), dtype=torch.long, device=self.device)
        fed = torch.zeros(rows, width, dtype=torch.bool, device=self.device)
        index = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        for b, pos in rolled.items():
            r = self.rows_of(b)
            ids[r, width - pos :] = self.tokens[r, :pos]
            fed[r, width - pos :] = True
            index[r, width - pos :] = torch.arange(pos, device=self.device)
            self.valid[r, self.prompt_len :] = False
        kv0 = self.valid.shape[1]
        logits = self.feed(ids, fed, torch.ones(width, width, dtype=torch.bool, device=self.device).tril(), index,
                           keep=1)[:, -1]
        seen = self.seen_rows()  # [R, width, kv0 + width]
        for b, pos in rolled.items():
            r = self.rows_of(b)
            self.slot[r, :pos] = kv0 + width - pos + torch.arange(pos, device=self.device)
            block = seen[r, width - pos :].gather(2, self.slot[r, None, :pos].expand(K, pos, pos))  # [K, pos, pos]
            self.attn[r, :pos, :pos] = block.tril()
            self.logits[r] = logits[r]

        active = torch.zeros(self.items, dtype=torch.bool, device=self.device)
        active[list(rolled)] = True
        log_probs = self.logits.log_softmax(dim=-1)
        if self.method.realloc == "candidates":
            outside = torch.ones_like(log_probs, dtype=torch.bool).scatter(
                1, self.logits.topk(self.candidates, dim=-1).indices, False)
            log_probs = log_probs.masked_fill(outside, -torch.inf)
        for b, pos in rolled.items():
            for parent, token in self.forbidden[b].get(pos, ()):
                log_probs[b * K + parent, token] = -torch.inf
        parents, tokens = self.select(self.processed(log_probs), active)
        beam_idx = self.flat_parents(parents)
        self.cache.reorder_cache(cast(torch.LongTensor, beam_idx))
        self.valid = self.valid[beam_idx]
        self.reorder(beam_idx)
        kv0 = self.valid.shape[1]
        logits = self.feed(tokens.flatten()[:, None].clamp_min(0), self.row_active(active)[:, None],
                           torch.ones(1, 1, dtype=torch.bool, device=self.device), self.row_lengths()[:, None],
                           keep=1)[:, -1]
        seen = self.seen_rows()  # [R, 1, kv0 + 1]
        for b, pos in rolled.items():
            r = self.rows_of(b)
            self.tokens[r, pos] = tokens[b]
            self.slot[r, pos] = kv0
            self.attn[r, pos, : pos + 1] = seen[r, 0].gather(1, self.slot[r, : pos + 1])
            self.history[r, pos] = -1
            self.logits[r] = logits[r]
            self.length[b] = pos + 1
            self.snapshots[b][pos].chosen = (parents[b], tokens[b])

    # ------------------------------------------------------------------------------ forwards and rows
    def feed(self, ids: Tensor, fed: Tensor, visible: Tensor, index: Tensor, keep: int) -> Tensor:
        """One forward of `ids` [R, w] at generated positions `index` [R, w]; query j of a row sees the row's
        valid cache slots and the chunk tokens `visible[j]` that are `fed`. Returns fp32 logits [R, keep or w, V]."""
        rows, width = ids.shape
        kv0 = self.valid.shape[1]
        chunk = visible.expand(rows, width, width) & fed[:, None, :]
        allowed = torch.cat([self.valid[:, None, :].expand(rows, width, kv0), chunk], dim=-1)  # [R, w, kv0 + w]
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, torch.finfo(dtype).min)
        self.search.watching = True
        try:
            out = self.model(input_ids=ids, attention_mask=mask[:, None], position_ids=self.next_position + index,
                             cache=self.cache, use_cache=True, logits_to_keep=keep, return_dict=True)
        finally:
            self.search.watching = False
        self.valid = torch.cat([self.valid, fed], dim=-1)
        return cast(Tensor, out.logits.float())

    def seen_rows(self) -> Tensor:
        seen, self.search.seen = self.search.seen, None
        if seen is None:
            raise SessionError("OPERA's attention observer saw no call of the last layer; the session's attention "
                               "function is not installed on this model.")
        return seen

    def keep_chosen_slots(self, beam_idx: Tensor, choice: Tensor, kv0: int) -> None:
        """Reorder the cache rows and keep each beam's chosen candidate slot at kv0 (the C-1 others dropped)."""
        self.cache.reorder_cache(cast(torch.LongTensor, beam_idx))
        rows = torch.arange(beam_idx.shape[0], device=self.device)
        for layer in self.cache.layers:
            dynamic = cast(DynamicLayer, layer)  # checked by check_cache_layers
            for states in (cast(Tensor, dynamic.keys), cast(Tensor, dynamic.values)):
                states[:, :, kv0] = states[rows, :, kv0 + choice]  # [R, kv_heads, head_dim]
            dynamic.crop(-(self.candidates - 1))
        self.valid = self.valid[beam_idx, : kv0 + 1]

    def reorder(self, beam_idx: Tensor) -> None:
        self.tokens, self.attn, self.slot = self.tokens[beam_idx], self.attn[beam_idx], self.slot[beam_idx]
        if self.method.history == "lineage":
            self.history = self.history[beam_idx]

    def flat_parents(self, parents: Tensor) -> Tensor:
        return (parents + torch.arange(self.items, device=self.device)[:, None] * self.beams).flatten()

    def rows_of(self, b: int) -> slice:
        return slice(b * self.beams, (b + 1) * self.beams)

    def row_lengths(self) -> Tensor:
        return torch.tensor(self.length, device=self.device).repeat_interleave(self.beams)

    def row_active(self, active: Tensor) -> Tensor:
        return active.repeat_interleave(self.beams)

    # ------------------------------------------------------------------------------ the result
    def output(self) -> Any:
        """What generate's beam search returns: the best `num_return_sequences` finished hypotheses per item."""
        config = self.config
        count, T = config.num_return_sequences, self.tokens.shape[1]
        tokens = self.fin_tokens[:, :count].reshape(-1, T)
        lengths = self.fin_lengths[:, :count].reshape(-1)
        tokens = tokens.masked_fill(torch.arange(T, device=self.device)[None] >= lengths[:, None], self.fill)
        prompt = self.prompt.view(self.items, self.beams, -1)[:, :count].reshape(tokens.shape[0], -1)
        sequences = torch.cat([prompt, tokens[:, : int(lengths.max())]], dim=-1)
        if not config.return_dict_in_generate:
            return sequences
        scores = self.fin_scores[:, :count].reshape(-1) if config.output_scores else None
        return GenerateBeamDecoderOnlyOutput(sequences=cast(torch.LongTensor, sequences), sequences_scores=scores,
                                             cache=self.cache)
