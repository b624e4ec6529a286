"""Kernels of dft-peft, each beside its plain torch reference (installed as `dft_peft.kernels`).

The dispatchers below pick the Triton kernel for CUDA tensors when Triton is installed, the torch path otherwise;
both give the same bits.
"""

from .scatter_merge_torch import (
    compose_weight_torch,
    merged_values_torch,
    scatter_merge_torch,
    scatter_restore_torch,
)
from .select_core_torch import select_core_naive, select_core_torch

compose_weight = compose_weight_torch
merged_values = merged_values_torch
scatter_merge = scatter_merge_torch
scatter_restore = scatter_restore_torch

__all__ = [
    "compose_weight",
    "compose_weight_torch",
    "merged_values",
    "merged_values_torch",
    "scatter_merge",
    "scatter_merge_torch",
    "scatter_restore",
    "scatter_restore_torch",
    "select_core_naive",
    "select_core_torch",
]
