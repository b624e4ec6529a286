"""Core selection on the CPU (and any torch device): the streaming path, and the reference for the Triton kernels of
`select_core_triton` beside `select_core_naive`, the rule's plain definition (`dft_peft.selection.rule`).

Each scope is streamed once in chunks by `dft_peft.selection.streaming`, whose per-chunk pass is the C loop of
`window_cpu` where it is built, else `window_torch`; both give the bits of `select_core_naive`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..format.sparse import SparseDelta
from ..selection.chunks import delta_shapes, samplable
from ..selection.rule import check_deltas, check_selection_args, core_size
from ..selection.streaming import select_scope

CHUNK = 1 << 20  # elements per chunk, at most (and at most 1/128 of the input, at least MIN_CHUNK)
MIN_CHUNK = 1 << 16


def select_core_torch(
    new_deltas: Mapping[str, torch.Tensor],
    old_deltas: Mapping[str, torch.Tensor],
    top_t: float,
    selection: str = "global",
    *,
    scale: float = 1.0,
) -> dict[str, SparseDelta]:
    """Select the DFT core with torch ops and the C loop, streaming each delta in chunks (the rule: see
    `dft_peft.selection.rule`).

    Args:
        new_deltas / old_deltas: module name → Δnew / Δold (any float dtype, same shapes; may be non-contiguous), or
            lazy mappings (see `LazyDeltas`), read once per pass and sampled only where they read ranges.
        top_t: fraction of the parameters in scope kept, in (0, 1].
        selection: `"global"` (one ranking over all modules) or `"per_module"`.
        scale: factor applied to the kept Δnew values (λ).

    Returns:
        module name → `SparseDelta` with sorted flat indices and float32 values.
    """
    check_selection_args(top_t, selection)
    names = check_deltas(new_deltas, old_deltas)
    sample = samplable(new_deltas) and samplable(old_deltas)
    shapes = delta_shapes(names, new_deltas)
    total = sum(math.prod(s) for s in shapes.values())
    chunk = min(CHUNK, max(MIN_CHUNK, total // 128))  # chunk temporaries stay a small fraction of the deltas
    if selection == "global":
        return select_scope(names, new_deltas, old_deltas, core_size(top_t, total), scale, sample, chunk, shapes)
    core = {}
    for name in names:
        k = core_size(top_t, math.prod(shapes[name]))
        core.update(select_scope([name], new_deltas, old_deltas, k, scale, sample, chunk, shapes))
    return core
