"""Kernels of dft-peft, each beside its plain torch reference (installed as `dft_peft.kernels`).

The dispatchers below pick the Triton kernel for CUDA tensors when Triton is installed, the torch path otherwise;
both give the same bits. On the CPU, core selection's per-chunk pass is a small C loop compiled at first use
(`window_cpu`), with torch ops as its fallback and reference. The Triton kernels are imported only when Triton is
installed (CPU-only installs need not have it); to run them on CPU tensors, set `TRITON_INTERPRET=1` before
importing this package.
"""

import importlib.util

import torch

from .scatter_merge_torch import (
    compose_weight_torch,
    merged_values_torch,
    scatter_merge_torch,
    scatter_restore_torch,
)
from .select_core_torch import select_core_naive, select_core_torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:  # peft imports triton anyway when it is installed: no extra import cost
    from .scatter_merge_triton import (
        compose_weight_triton,
        merged_values_triton,
        scatter_merge_triton,
        scatter_restore_triton,
    )
    from .select_core_triton import select_core_triton
else:  # the Triton entry points are None: callers test for that
    compose_weight_triton = merged_values_triton = scatter_merge_triton = scatter_restore_triton = None
    select_core_triton = None


def _use_triton(weight: torch.Tensor) -> bool:
    return HAS_TRITON and weight.is_cuda


def compose_weight(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`weight` with the sparse delta merged, out of place and differentiable w.r.t. `values`."""
    if _use_triton(weight):
        return compose_weight_triton(weight, indices, values)
    return compose_weight_torch(weight, indices, values)


def merged_values(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The values merging would write at `indices`, without writing them."""
    if _use_triton(weight):
        return merged_values_triton(weight, indices, values)
    return merged_values_torch(weight, indices, values)


def scatter_merge(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Merge the sparse delta into `weight` in place; return the replaced entries for `scatter_restore`."""
    if _use_triton(weight):
        return scatter_merge_triton(weight, indices, values)
    return scatter_merge_torch(weight, indices, values)


def scatter_restore(weight: torch.Tensor, indices: torch.Tensor, backup: torch.Tensor) -> None:
    """Undo `scatter_merge` exactly by writing the replaced entries back."""
    if _use_triton(weight):
        return scatter_restore_triton(weight, indices, backup)
    return scatter_restore_torch(weight, indices, backup)


__all__ = [
    "HAS_TRITON",
    "compose_weight",
    "compose_weight_torch",
    "compose_weight_triton",
    "merged_values",
    "merged_values_torch",
    "merged_values_triton",
    "scatter_merge",
    "scatter_merge_torch",
    "scatter_merge_triton",
    "scatter_restore",
    "scatter_restore_torch",
    "scatter_restore_triton",
    "select_core_naive",
    "select_core_torch",
    "select_core_triton",
]
