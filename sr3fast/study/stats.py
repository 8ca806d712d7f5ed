"""Confidence intervals for a fool rate.

Two, because they answer different questions:

- `wilson_interval`: the Wilson score interval over trials, which treats every answer as an
  independent coin flip. It is exact in its assumptions and too narrow when they fail: one
  participant's answers are correlated (some people are easier to fool than others).
- `bootstrap_interval`: participants resampled with replacement, the pooled rate recomputed each
  time, the percentile interval of those rates. It keeps each participant's answers together, so
  it widens with the disagreement between people; with few participants it is rough (and with one,
  a single point).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z_95 = 1.959963984540054          # the standard normal's 97.5% quantile


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a proportion `successes / trials` at the normal quantile z:
    (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). (nan, nan) when trials == 0."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    z2 = z * z
    centre = p + z2 / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    scale = 1 + z2 / trials
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def bootstrap_interval(counts: Sequence[tuple[int, int]], resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """The participant-level percentile bootstrap interval of the pooled rate sum(k) / sum(n),
    where `counts` holds one (k, n) per participant: `resamples` times, draw as many participants
    with replacement, pool their answers; the (1 - level) / 2 and (1 + level) / 2 quantiles (linear
    interpolation) of those rates. Reproducible for a given seed. (nan, nan) without answers."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    counts = [(k, n) for k, n in counts if n > 0]
    if not counts:
        return math.nan, math.nan
    k, n = (np.array(column, dtype=np.int64) for column in zip(*counts))
    rng = np.random.Generator(np.random.PCG64(seed))
    draws = rng.integers(0, len(counts), size=(resamples, len(counts)))
    rates = k[draws].sum(axis=1) / n[draws].sum(axis=1)
    low, high = np.quantile(rates, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
