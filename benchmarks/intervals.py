"""Means with hierarchical bootstrap intervals over seeds and requests, and paired differences between methods.

A metric's data are per-seed lists of per-unit values (a unit is a request, or a probe text for the capability
probe). The point estimate is the mean over seeds of each seed's mean. The interval is the percentile interval of
that statistic under a two-level bootstrap: draw as many seeds as there are, with replacement; within each drawn
seed, draw as many units as it has, with replacement. With one seed this is the plain bootstrap over units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
RNG_SEED = 0

PerSeed = Sequence[Sequence[float]]


def bootstrap_mean(per_seed: PerSeed, resamples: int = RESAMPLES, level: float = LEVEL,
                   transform: Callable[[float], float] | None = None) -> dict:
    """`{"mean", "lo", "hi", "per_seed"}`: the mean of the seeds' means and its `level` bootstrap interval.

    The resampling is drawn from a generator seeded with `RNG_SEED`, so the same data always give the same interval.
    `transform`, when given, is a monotone increasing map applied to the mean, the bounds and each seed's mean (e.g.
    mean log-ratio → percent change); percentile intervals carry through it exactly.
    """
    seeds = [np.asarray(values, dtype=np.float64) for values in per_seed]
    if not seeds or any(v.size == 0 for v in seeds):
        raise ValueError("bootstrap_mean needs at least one seed, each with at least one value")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    shift = seeds[0][0]  # values less one of them: a constant sample gives exact zeros, a zero-width interval
    seeds = [v - shift for v in seeds]
    rng = np.random.default_rng(RNG_SEED)
    n_seeds = len(seeds)
    # For each seed: the mean of an independent within-seed resample, per (bootstrap replicate, draw slot).
    inner = np.stack([v[rng.integers(0, v.size, (resamples, n_seeds, v.size))].mean(axis=-1) for v in seeds])
    drawn = rng.integers(0, n_seeds, (resamples, n_seeds))
    statistic = inner[drawn, np.arange(resamples)[:, None], np.arange(n_seeds)[None, :]].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(statistic, [tail, 100 - tail])
    means = [float(v.mean() + shift) for v in seeds]
    f = transform or float
    return {"mean": f(float(np.mean([v.mean() for v in seeds]) + shift)), "lo": f(float(lo + shift)),
            "hi": f(float(hi + shift)), "per_seed": [f(m) for m in means]}


def paired_difference(per_seed: PerSeed, baseline: PerSeed, resamples: int = RESAMPLES, level: float = LEVEL) -> dict:
    """`bootstrap_mean` of the per-unit differences `per_seed − baseline`: both must hold the same units in order
    (the same requests of the same seeds, scored for two methods)."""
    if len(per_seed) != len(baseline) or any(len(a) != len(b) for a, b in zip(per_seed, baseline)):
        raise ValueError("a paired difference needs the same seeds and units on both sides")
    differences = [np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
                   for a, b in zip(per_seed, baseline)]
    return bootstrap_mean(differences, resamples, level)
