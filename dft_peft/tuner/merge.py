"""Scatter-merge of sparse deltas into weights: the Triton kernels for CUDA weights, the torch path elsewhere.

Both give the same bits. Indices are trusted here: `DFTLayer` checks them (strictly increasing, within the weight)
where they enter the model, since the Triton kernels have no bounds checks. The Triton kernels are imported only when
Triton is installed (CPU-only installs need not have it); to run them on CPU tensors, set `TRITON_INTERPRET=1` before
importing dft_peft.
"""

from __future__ import annotations

import importlib.util

import torch

from ..kernels.scatter_merge_torch import (
    compose_weight_torch,
    merged_values_torch,
    scatter_merge_torch,
    scatter_restore_torch,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _use_triton(weight: torch.Tensor) -> bool:
    return HAS_TRITON and weight.is_cuda


def compose_weight(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`weight` with the sparse delta merged, out of place and differentiable w.r.t. `values`."""
    if _use_triton(weight):
        from ..kernels.scatter_merge_triton import compose_weight_triton

        return compose_weight_triton(weight, indices, values)
    return compose_weight_torch(weight, indices, values)


def merged_values(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The values merging would write at `indices`, without writing them."""
    if _use_triton(weight):
        from ..kernels.scatter_merge_triton import merged_values_triton

        return merged_values_triton(weight, indices, values)
    return merged_values_torch(weight, indices, values)


def scatter_merge(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Merge the sparse delta into `weight` in place; return the replaced entries for `scatter_restore`."""
    if _use_triton(weight):
        from ..kernels.scatter_merge_triton import scatter_merge_triton

        return scatter_merge_triton(weight, indices, values)
    return scatter_merge_torch(weight, indices, values)


def scatter_restore(weight: torch.Tensor, indices: torch.Tensor, backup: torch.Tensor) -> None:
    """Undo `scatter_merge` exactly by writing the replaced entries back."""
    if _use_triton(weight):
        from ..kernels.scatter_merge_triton import scatter_restore_triton

        return scatter_restore_triton(weight, indices, backup)
    return scatter_restore_torch(weight, indices, backup)
