"""Scatter-merge of a sparse delta into a weight, in plain torch: the CPU path and the Triton kernels' reference.

Arithmetic, shared by every path so that merged, unmerged and compiled forwards agree bit for bit:
`w[i] ← dtype(fp32(w[i]) + fp32(v))`. Merging returns the original values at the merged indices, and unmerging
writes them back, so unmerge restores the weight exactly in every dtype (adding −v would not undo a rounded add in
bf16).
"""

from __future__ import annotations

import torch


def _flat(weight: torch.Tensor) -> torch.Tensor:
    if not weight.is_contiguous():
        raise ValueError("scatter-merge needs a contiguous weight")
    return weight.view(-1)


def scatter_merge_torch(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add `values` at flat `indices` of `weight` in place; return the replaced originals (for the exact unmerge)."""
    flat = _flat(weight)
    idx = indices.long()
    backup = flat[idx]
    flat[idx] = (backup.float() + values.float()).to(weight.dtype)
    return backup


def scatter_restore_torch(weight: torch.Tensor, indices: torch.Tensor, backup: torch.Tensor) -> None:
    """Write the originals returned by `scatter_merge_torch` back: the exact unmerge."""
    _flat(weight)[indices.long()] = backup


def merged_values_torch(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The values merging would write, without writing them (for `safe_merge`'s NaN check)."""
    return (_flat(weight)[indices.long()].float() + values.float()).to(weight.dtype)


def compose_weight_torch(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A new tensor equal to `weight` with the delta merged; differentiable w.r.t. `values` (the unmerged forward).

    Costs one copy of the weight, never a dense delta; the backward is a gather of the weight's gradient.
    """
    flat = weight.reshape(-1)
    idx = indices.long()
    return flat.index_put((idx,), (flat[idx].float() + values.float()).to(weight.dtype)).view_as(weight)
