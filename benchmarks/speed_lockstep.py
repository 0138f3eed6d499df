"""The lockstep clock: variants take turns token by token, and each decode step is compared with the baseline's
step of the same round, taken milliseconds apart under the same machine load.

On a small shared machine (other tenants on the same L3 cache and memory bandwidth) whole-run timings move
10-30% from run to run, so medians over interleaved runs (benchmarks/speed_timing.py) cannot settle a 10%
target. Here every variant runs its own `generate` call in its own thread, and the variants take turns: a
variant computes only while it holds the turn, and passes it on, round robin, at each streamer `put`
(generate calls `put` once with the prompt before prefill, then once per generated step). Only one variant
computes at any moment, and each round starts one place further along the rotation. Each variant's call splits
into units of work, from receiving the turn to passing it:
- unit 0: set-up (entering the session, spans, the methods' prepare passes);
- unit 1: prefill and the first token;
- units 2..: one decode step each (a token for every row of the batch); only these are compared.
Figures per variant, over every (round, step) pair: the median of step / baseline step at the same step index
(the baseline is the first variant, greedy), the interquartile range of those paired ratios, the ratio of the
summed step times, and the mean decode step.

Each variant runs on its own copy of the model (`copy.deepcopy`, made before any session: a vlmfix session owns
its model, and a second session on the same model is refused), with its methods built on that copy (DCD's
stand-in projectors read the copy's weights). With the copies no variant finds its weights warm in cache from
its own previous step, since the other variants' steps ran in between: every step streams its weights from
memory, as a real model larger than the cache does. This is why the lockstep figures can differ from the
interleaved-runs clock, where a variant's steps follow one another and a small model stays in cache. Wall time
per call is not read (the turns interleave the calls).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from benchmarks.speed_setup import build_methods, is_two_stream
from benchmarks.speed_timing import (
    FLOOR,
    GREEDY,
    WARM_UP_TOKENS,
    GenerateFn,
    generate_variants,
    rotated,
    synchronize,
    unedited,
)
from vlmfix.testing import TinyVLM

Clock = Callable[[], float]  # seconds, e.g. time.perf_counter
FIRST_DECODE_UNIT = 2  # units 0 (set-up) and 1 (prefill + first token) are not decode steps


class Turns:
    """A turn passed round robin among named participants: only its holder works, the others wait."""

    def __init__(self, labels: Sequence[str]) -> None:
        self._order = list(labels)  # participants still in the rotation
        self._holder = 0  # index into _order
        self._changed = threading.Condition()

    def wait(self, label: str) -> None:
        """Block until `label` holds the turn."""
        with self._changed:
            self._changed.wait_for(lambda: self._order[self._holder] == label)

    def pass_on(self, label: str) -> None:
        """`label` hands the turn to the next participant."""
        with self._changed:
            self._holder = (self._order.index(label) + 1) % len(self._order)
            self._changed.notify_all()

    def leave(self, label: str) -> None:
        """`label` leaves the rotation; if it held the turn, the next participant gets it."""
        with self._changed:
            holder = self._order[self._holder]
            index = self._order.index(label)
            del self._order[index]
            if not self._order:
                self._holder = 0
            elif holder == label:
                self._holder = index % len(self._order)
            else:
                self._holder = self._order.index(holder)
            self._changed.notify_all()


class TurnStreamer(BaseStreamer):
    """A variant's streamer: each `put` ends a unit of work (timed from when the turn came back) and passes the
    turn on, then waits for it to come round again."""

    def __init__(self, turns: Turns, label: str, clock: Clock) -> None:
        self.units: list[float] = []  # seconds: set-up, prefill + first token, then one per decode step
        self._turns, self._label, self._clock = turns, label, clock
        self._resumed = clock()  # made once the variant holds its first turn

    def put(self, value: torch.Tensor) -> None:
        # generate hands streamers CPU copies of the tokens, so on a GPU the step has finished here
        self.units.append(self._clock() - self._resumed)
        self._turns.pass_on(self._label)
        self._turns.wait(self._label)
        self._resumed = self._clock()

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class Steps:
    """One variant's generate call of a round."""

    seconds: list[float]  # per decode step, in order
    edited: bool | None  # None: no method ran (plain generate, or vlmfix with no method)


@dataclass(frozen=True)
class Failure:
    """Why a variant's call of a round gave no figure."""

    reason: str
    edited: bool | None  # False: its methods edited nothing; None: it raised (which says nothing about edits)


def run_round(variants: Mapping[str, GenerateFn], new_tokens: int,
              clock: Clock = time.perf_counter) -> dict[str, Steps | Failure]:
    """One generate call of `new_tokens` per variant, each in its own thread, taking turns (in the order of
    `variants`) at every step. Per label: its decode steps, or why it failed (the exception, or the methods that
    edited nothing). A failing variant leaves the rotation, so the others run on."""
    turns = Turns(list(variants))
    outcomes: dict[str, Steps | Failure] = {}

    def take_part(label: str, fn: GenerateFn) -> None:
        try:
            turns.wait(label)
            streamer = TurnStreamer(turns, label, clock)
            session = fn(new_tokens, streamer)
            synchronize()
            steps = streamer.units[FIRST_DECODE_UNIT:]
            why_not = None if session is None or not session.methods else unedited(session.report())
            if why_not is not None:
                outcomes[label] = Failure(why_not, False)
            else:
                outcomes[label] = Steps(steps, None if session is None or not session.methods else True)
        except Exception as error:  # a broken method must not cost the other variants' figures
            outcomes[label] = Failure(f"{type(error).__name__}: {error}", None)
        finally:
            turns.leave(label)  # never keep the others waiting

    threads = [threading.Thread(target=take_part, args=(label, fn), name=f"lockstep {label}", daemon=True)
               for label, fn in variants.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lost = Failure("its thread ended without an outcome (a BaseException)", None)
    return {label: outcomes.get(label, lost) for label in variants}  # in the variants' order, not the order they ended


@dataclass(frozen=True)
class LockstepResult:
    """A variant's paired figures against the baseline (the first variant) over every (round, decode step) pair;
    a failed variant has `failure` set and NaN figures."""

    label: str
    seconds_per_token: float  # the mean decode step (a token for each row of the batch)
    paired_ratio: float  # median of step / the baseline's step at the same index of the same round
    paired_ratio_q1: float  # 25th percentile of the paired ratios
    paired_ratio_q3: float  # 75th percentile
    summed_ratio: float  # sum of the variant's steps / sum of the baseline's
    edited: bool | None = None
    failure: str | None = None


def failed_result(label: str, failure: str, edited: bool | None) -> LockstepResult:
    nan = math.nan
    return LockstepResult(label, nan, nan, nan, nan, nan, edited=edited, failure=failure)


def paired_figures(label: str, rounds: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                   edited: bool | None) -> LockstepResult:
    """The figures of a variant's decode steps `rounds[r][k]` against the baseline's `baseline[r][k]` (seconds)."""
    ratios = [step / base for steps, bases in zip(rounds, baseline, strict=True)
              for step, base in zip(steps, bases, strict=True)]
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")  # linear interpolation, as numpy's
    else:
        q1 = q3 = ratios[0]
    total = sum(map(sum, rounds))
    return LockstepResult(label, total / len(ratios), statistics.median(ratios), q1, q3,
                          total / sum(map(sum, baseline)), edited=edited)


def measure_lockstep(variants: Mapping[str, GenerateFn], new_tokens: int, repeats: int,
                     progress: Callable[[str], None] = print,
                     clock: Clock = time.perf_counter) -> list[LockstepResult]:
    """Paired per-step figures of every variant against the first (the baseline), over `repeats` lockstep rounds
    of `new_tokens` after one untimed warm-up round of a few tokens; each round's turn order is rotated by one
    place (`rotated`).

    Give each variant its own model (`copied_variants`). A variant other than the baseline that raises, whose
    methods edit nothing, or that makes a different number of steps than the baseline in any round fails: it is
    reported with the reason and left out of later rounds. A failing baseline raises."""
    if new_tokens < 2:
        raise ValueError(f"`new_tokens` must be at least 2 (the first decode step is token 2), got {new_tokens}.")
    live = dict(variants)
    failed: dict[str, LockstepResult] = {}
    rounds: dict[str, list[list[float]]] = {label: [] for label in variants}
    edited: dict[str, bool | None] = {}
    baseline = next(iter(variants))
    phases = [("warm-up round", WARM_UP_TOKENS)] + [(f"round {r + 1}", new_tokens) for r in range(repeats)]
    for number, (phase, tokens) in enumerate(phases):
        outcomes = run_round(rotated(live, max(number - 1, 0)), tokens, clock)  # timed round r: shift r - 1
        base = outcomes[baseline]
        if isinstance(base, Failure):
            raise RuntimeError(f"the baseline {baseline!r} failed: {base.reason}")
        for label, outcome in outcomes.items():
            if isinstance(outcome, Steps) and len(outcome.seconds) != len(base.seconds):
                outcome = Failure(f"{len(outcome.seconds)} decode steps where {baseline} made "
                                  f"{len(base.seconds)}: its steps cannot be paired", outcome.edited)
            if isinstance(outcome, Failure):
                failed[label] = failed_result(label, f"{phase}: {outcome.reason}", outcome.edited)
                progress(f"  {label}: failed during its {phase}: {outcome.reason}; no figure")
                del live[label]
                continue
            edited[label] = outcome.edited
            if phase != "warm-up round":
                rounds[label].append(outcome.seconds)
        if phase != "warm-up round":
            progress(f"  {phase}/{repeats} done")
    return [failed.get(label) or paired_figures(label, rounds[label], rounds[baseline], edited[label])
            for label in variants]


def copied_variants(tiny: TinyVLM, inputs: dict[str, Any], specs: Mapping[str, str],
                    stand_in_dir: str) -> dict[str, GenerateFn]:
    """Greedy, the two-stream floor when a spec is two-stream, then one variant per `{label: method spec}`, each
    on its own `copy.deepcopy` of `tiny` with its methods built on that copy (`build_methods`; DCD's stand-in
    checkpoints go to a folder of its own under `stand_in_dir`). Every copy holds a full set of weights."""
    variants: dict[str, GenerateFn] = {}
    with_methods: dict[str, GenerateFn] = {}
    two_stream = False
    for index, (label, spec) in enumerate(specs.items()):
        own = copy.deepcopy(tiny)
        directory = os.path.join(stand_in_dir, f"variant-{index}")
        os.makedirs(directory, exist_ok=True)
        methods = build_methods(spec, own, directory)
        two_stream = two_stream or is_two_stream(methods)
        with_methods[label] = generate_variants(own, inputs, {label: methods})[label]
    variants[GREEDY] = generate_variants(copy.deepcopy(tiny), inputs, {})[GREEDY]
    if two_stream:
        variants[FLOOR] = generate_variants(copy.deepcopy(tiny), inputs, {}, two_row_floor=True)[FLOOR]
    return {**variants, **with_methods}
