"""The CPU selection pass in plain torch ops: the reference for the C loop of `window_cpu`, and the pass on devices
and dtypes the C loop does not take (or where it cannot be built).

For one chunk of Δnew and Δold it keeps the elements whose key lies in a window [lo, hi], with their values; see
`window_cpu.window` for the contract, which both meet bit for bit.
"""

from __future__ import annotations

import torch

from ..selection.rule import MAX_KEY, chunk_keys
from .window_cpu import Kept, Piece


def window_torch(
    new: torch.Tensor, old: torch.Tensor, lo: int, hi: int, sure: int, scale: float, offset: int
) -> Kept:
    """`window_cpu.window` in torch ops: the chunk's elements whose key lies in [lo, hi] (lo ≥ 1: candidates only) as
    one piece of int64 indices (offset + flat index), or none; positions None where `sure` is past MAX_KEY (every
    entry keeps its key)."""
    keys, bad = chunk_keys(new, old)  # (n,) int32
    local = ((keys >= lo) & (keys <= hi)).nonzero().squeeze(1)  # (kept,) int64
    if not local.numel():
        return Kept([], bool(bad))
    values = new[local].float()
    if scale != 1.0:
        values = values * scale
    keys = keys[local]
    if sure > MAX_KEY:
        return Kept([Piece(local + offset, values, None, keys)], bool(bad))
    pos = (keys < sure).nonzero().squeeze(1).int()  # (keyed,)
    return Kept([Piece(local + offset, values, pos, keys[pos])], bool(bad))
