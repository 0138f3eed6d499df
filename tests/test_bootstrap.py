"""Bootstrap intervals over images and paired differences: against a plain-numpy reference written here, and
the properties that must hold (constant units, seeds, identical runs, unit-level resampling)."""

from __future__ import annotations

import numpy as np
import pytest

from vlmfix.eval.bootstrap import bootstrap_interval, paired_difference
from vlmfix.eval.errors import EvalInputError

# per image: (hallucinated mentions, mentions)
IMAGES = [(0, 3), (1, 2), (2, 4), (0, 1), (1, 5), (3, 3), (0, 2)]


def chair_i(units):
    mentions = sum(m for _, m in units)
    return {"chair_i": sum(h for h, _ in units) / mentions}


def test_interval_matches_a_numpy_reference() -> None:
    got = bootstrap_interval(IMAGES, chair_i, n_resamples=500, seed=3)["chair_i"]
    # reference: the same draws (numpy default_rng(3).integers), pooled ratio per draw, 2.5 / 97.5 % quantiles
    draws = np.random.default_rng(3).integers(0, len(IMAGES), size=(500, len(IMAGES)))
    h = np.array([h for h, _ in IMAGES])[draws].sum(1)
    m = np.array([m for _, m in IMAGES])[draws].sum(1)
    low, high = np.quantile(h / m, [0.025, 0.975])
    assert (got.low, got.high) == pytest.approx((low, high))
    assert got.low <= 7 / 20 <= got.high  # the point estimate 7/20 lies inside


def test_constant_units_and_seeds() -> None:
    same = bootstrap_interval([(1, 2)] * 5, chair_i, n_resamples=50)["chair_i"]
    assert (same.low, same.high) == (0.5, 0.5)
    a = bootstrap_interval(IMAGES, chair_i, n_resamples=200, seed=1)
    assert a == bootstrap_interval(IMAGES, chair_i, n_resamples=200, seed=1)
    assert a != bootstrap_interval(IMAGES, chair_i, n_resamples=200, seed=2)


def test_paired_difference() -> None:
    greedy = dict(enumerate(IMAGES))
    assert {k: (d.value, d.low, d.high) for k, d in paired_difference(greedy, greedy, chair_i).items()} == {
        "chair_i": (0.0, 0.0, 0.0)}
    # a method that removes every hallucination on every image: difference -7/20 exactly, interval below 0
    method = {k: (0, m) for k, (_, m) in greedy.items()}
    d = paired_difference(greedy, method, chair_i, n_resamples=300)["chair_i"]
    assert d.value == pytest.approx(-7 / 20) and d.high < 0
    with pytest.raises(EvalInputError, match="needs both runs on the same images; 1 differ"):
        paired_difference(greedy, {**method, 99: (0, 1)}, chair_i)


def test_bad_arguments() -> None:
    with pytest.raises(EvalInputError, match="at least one unit"):
        bootstrap_interval([], chair_i)
    with pytest.raises(EvalInputError, match="`n_resamples` must be an int >= 1, got 0"):
        bootstrap_interval(IMAGES, chair_i, n_resamples=0)
    with pytest.raises(EvalInputError, match=r"`level` must be a float in \(0, 1\)"):
        bootstrap_interval(IMAGES, chair_i, level=95)
