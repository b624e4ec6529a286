"""A key window from a small random sample: where a scope's k-th largest key lies, with high probability.

Both selection paths (the streaming CPU path and the Triton kernels) start from it, so that their first pass keeps
little more than the core. Whatever the sample, their result is exact; a sample that misleads costs another pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from .chunks import gather_flat, range_readable, read_range
from .rule import MAX_KEY, chunk_keys

SAMPLE = 1 << 16  # elements sampled from a scope, at least; all that a lazy mapping gets (each run is a read)
SAMPLE_MAX = 1 << 18  # elements sampled from a large scope of in-memory deltas (a run is a cheap gather there)
RUN = 1 << 6  # consecutive elements per sampled run


def worth_sampling(numel: int) -> bool:
    """Whether a scope is large enough for a sampled threshold to pay off."""
    return numel > 4 * SAMPLE


def sample_size(total: int, lazy: bool) -> int:
    """Elements to sample from a scope of `total`: SAMPLE from a lazy mapping, else up to SAMPLE_MAX (1/512 of the
    scope), which narrows the window by half and with it the entries kept near the threshold."""
    return SAMPLE if lazy else max(SAMPLE, min(SAMPLE_MAX, total >> 9))


def sample_keys(
    names: list[str], new_deltas: Mapping[str, torch.Tensor], old_deltas: Mapping[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
) -> torch.Tensor:
    """Keys of `sample_size` elements of the scope in runs of RUN consecutive elements at uniformly drawn positions
    (fixed seed), on the CPU: a (runs, RUN) int32 tensor, -1 past the end of a module.

    Runs rather than single elements: a lazy mapping (a checkpoint, LoRA factors) reads a few rows per run instead of
    whole modules.
    """
    gen = torch.Generator().manual_seed(0)
    sizes = [math.prod(shapes[n]) for n in names]
    total = sum(sizes)
    ranged = range_readable(new_deltas) or range_readable(old_deltas)
    starts = torch.randint(0, total, (max(1, sample_size(total, ranged) // RUN),), generator=gen).sort().values
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    runs = torch.full((starts.numel(), RUN), -1, dtype=torch.int32)  # (runs, RUN)
    row = 0
    for i, name in enumerate(names):
        lo, hi = int(torch.searchsorted(starts, bounds[i])), int(torch.searchsorted(starts, bounds[i + 1]))
        if hi == lo:
            continue
        local = starts[lo:hi] - bounds[i]
        if not ranged:  # in-memory tensors: every run of the module in one gather (one device sync, not one per run)
            new, old = new_deltas[name], old_deltas[name]
            positions = local[:, None] + torch.arange(RUN)  # (runs of the module, RUN)
            inside = positions < sizes[i]
            flat = positions.clamp_(max=sizes[i] - 1).reshape(-1).to(new.device)
            keys = chunk_keys(gather_flat(new, flat), gather_flat(old, flat))[0].cpu().view(-1, RUN)
            runs[row : row + hi - lo] = torch.where(inside, keys, -1)
            row += hi - lo
            continue
        new, old = (torch.zeros(hi - lo, RUN) for _ in range(2))  # the module's runs, keyed in one go
        lengths = (sizes[i] - local).clamp_(max=RUN)
        for j, (start, length) in enumerate(zip(local.tolist(), lengths.tolist())):
            new[j, :length] = read_range(new_deltas, name, start, length)
            old[j, :length] = read_range(old_deltas, name, start, length)
        keys = chunk_keys(new, old)[0]
        runs[row : row + hi - lo] = torch.where(torch.arange(RUN) < lengths[:, None], keys, -1)
        row += hi - lo
    return runs


def sampled_window(sample: torch.Tensor, k: int, total: int, z: float = 4.0) -> tuple[int, int]:
    """A key window [lo, hi) that holds the scope's k-th largest key with high probability.

    `sample` holds runs of keys (`sample_keys`). The fraction of the scope whose key is ≥ t is estimated as a ratio
    over the runs, with its standard error taken from the spread between runs: the elements of a run share a module
    and rows, so they vary together (deltas differ in scale between modules and rows), and counting them as
    independent draws would make the window too narrow. `lo` is the largest key whose estimate minus z standard
    errors (and 8 elements) still reaches k/total, `hi` one past the largest whose estimate plus that margin does;
    `lo` is 1 (every candidate) where the sample cannot bound that side, `hi` past MAX_KEY (no upper cut) where the
    upper estimate reaches the target at every key, and `hi` ≥ lo + 1 always (a sample without candidates gives
    [1, 2)). Each estimate counts a run's keys by binary search in the run, sorted once; the bisection assumes the
    estimates fall along the keys, and the result is exact whatever window it returns.
    """
    rows = sample.sort(dim=1).values  # absent elements (-1) first
    sizes = (sample >= 0).sum(1, dtype=torch.float64)
    runs, elements = rows.shape[0], float(sizes.sum())
    if not elements:  # no element sampled: no window
        return 1, MAX_KEY + 1
    target = k / total
    probe = torch.empty(runs, 1, dtype=rows.dtype)

    def estimate(t: int, sign: float) -> float:
        counts = (rows.shape[1] - torch.searchsorted(rows, probe.fill_(t))).squeeze(1).double()
        p = float(counts.sum()) / elements
        spread = float(((counts - p * sizes) ** 2).sum()) * runs / max(runs - 1, 1)
        return p + sign * (z * math.sqrt(spread) / elements + 8 / elements)

    lo = last_true(lambda t: estimate(t, -1.0) >= target, 1, MAX_KEY)
    hi = last_true(lambda t: estimate(t, 1.0) >= target, 1, MAX_KEY)
    lo_key = 1 if lo is None else lo
    hi_key = 1 if hi is None else hi + 1
    return lo_key, max(hi_key, lo_key + 1)


def last_true(holds: Callable[[int], bool], first: int, last: int) -> int | None:
    """The largest integer in [first, last] where `holds` is true, for a predicate true up to some point (None:
    nowhere)."""
    found = None
    while first <= last:
        mid = (first + last) // 2
        if holds(mid):
            found, first = mid, mid + 1
        else:
            last = mid - 1
    return found
