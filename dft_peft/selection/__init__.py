"""`select_core`: DFT's locating step (§4.1), dispatched to the Triton kernels on CUDA and to torch elsewhere."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..format.sparse import SparseDelta
from ..kernels.select_core_torch import CHUNK, select_core_torch
from ..tuner.merge import HAS_TRITON
from .chunks import iter_chunk_pairs
from .lazy import LazyDeltas, Terms, flat_range
from .rule import SELECTIONS, chunk_keys, core_size, select_core_naive
from .sharded import Shard, ShardedDeltas, gather_core, sum_over_ranks

__all__ = [
    "SELECTIONS",
    "LazyDeltas",
    "Shard",
    "ShardedDeltas",
    "Terms",
    "core_size",
    "flat_range",
    "gather_core",
    "opposite_sign_fraction",
    "select_core",
    "select_core_naive",
    "sum_over_ranks",
]


def _on_cuda(deltas: Mapping[str, torch.Tensor]) -> bool:
    return any(t.is_cuda for t in deltas.values()) if isinstance(deltas, dict) else False


def select_core(
    new_deltas: Mapping[str, torch.Tensor],
    old_deltas: Mapping[str, torch.Tensor],
    top_t: float,
    selection: str = "global",
    *,
    scale: float = 1.0,
    process_group: Any = None,
    numels: Mapping[str, int | Sequence[int]] | None = None,
) -> dict[str, SparseDelta]:
    """The core of an edit: where Δnew and Δold disagree in sign, the top_t fraction by |Δnew − Δold|.

    Elements whose signs agree (or where either is zero) carry what both fine-tunes learned — style, grammar,
    format — and are dropped. Among the rest the k = ⌊top_t · numel⌋ largest |Δnew − Δold| are kept (fewer when
    fewer elements have opposite signs), with values Δnew · scale. Ties at the threshold go to the module whose
    name sorts first, then to the lowest flat index, so the result is deterministic and a sharded selection can
    reproduce it.

    Args:
        new_deltas / old_deltas: module name → delta tensor (any float dtype; same names and shapes).
        top_t: fraction kept, in (0, 1].
        selection: `"global"` ranks all modules together, `"per_module"` keeps top_t of each module.
        scale: factor on the kept values (λ).
        process_group: Select across the ranks of this `torch.distributed` group, each passing only the deltas it
            holds (whole modules, or `Shard(tensor, offset)` flat slices); call on every rank. Needs `numels`
            (module name → full shape or numel, the same on every rank). See `dft_peft.distributed`.

    Returns:
        module name → `SparseDelta` (sorted flat indices, float32 values), one per input module; with a process
        group, this rank's part of the core (`gather_core` assembles the whole of it).
    """
    if process_group is not None:
        if numels is None:
            raise ValueError("a sharded select_core needs numels: module name → full shape (or numel)")
        from .sharded import select_core_sharded

        return select_core_sharded(new_deltas, old_deltas, top_t, selection, scale=scale,
                                   process_group=process_group, numels=numels)
    if _on_cuda(new_deltas) and HAS_TRITON:
        from ..kernels.select_core_triton import select_core_triton

        return select_core_triton(new_deltas, old_deltas, top_t, selection, scale=scale)
    return select_core_torch(new_deltas, old_deltas, top_t, selection, scale=scale)


def opposite_sign_fraction(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the targeted parameters that are selection candidates (Δnew and Δold of opposite signs); over
    all ranks for `ShardedDeltas`."""
    candidates = total = 0
    for name in new:
        pair = (t.tensor if isinstance(t, Shard) else t for t in (new[name], old[name]))
        for _, new_chunk, old_chunk in iter_chunk_pairs(*pair, CHUNK):
            candidates += int((chunk_keys(new_chunk, old_chunk)[0] > 0).sum())
            total += new_chunk.numel()
    if isinstance(new, ShardedDeltas):
        candidates, total = sum_over_ranks([candidates, total], new.process_group)
    return candidates / max(total, 1)
