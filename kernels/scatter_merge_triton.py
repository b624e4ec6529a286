"""Scatter-merge of a sparse delta into a weight with Triton: the GPU path, bit-identical to `scatter_merge_torch`.

One program per BLOCK delta entries; indices are unique (SparseDelta's invariant), so scattered stores never race.
The kernels do no bounds checks: they rely on the indices having been checked where they enter the model
(`DFTLayer.set_sparse_delta` and its state-dict load hook), once, not on every merge.
The arithmetic is the reference's, `w[i] ← dtype(fp32(w[i]) + fp32(v))` with round-to-nearest-even casts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .scatter_merge_torch import _flat

BLOCK = 1024


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 → dtype, round to nearest even. bf16 is rounded by hand: the same bits as the hardware conversion, and
    the Triton interpreter (the CPU tests) truncates instead. NaN becomes torch's canonical 0x7FC0."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _merge_kernel(weight_ptr, idx_ptr, val_ptr, backup_ptr, dst_ptr, nnz,
                  BACKUP: tl.constexpr, SCATTER: tl.constexpr, BLOCK: tl.constexpr):
    """merged = dtype(fp32(w[i]) + fp32(v)); written to dst[i] (SCATTER) or dst[j]; w[i] saved to backup[j]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < nnz
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    w = tl.load(weight_ptr + idx, mask=mask)
    merged = _round(w.to(tl.float32) + tl.load(val_ptr + offs, mask=mask).to(tl.float32), w.dtype)
    if BACKUP:
        tl.store(backup_ptr + offs, w, mask=mask)
    if SCATTER:
        tl.store(dst_ptr + idx, merged, mask=mask)
    else:
        tl.store(dst_ptr + offs, merged, mask=mask)


@triton.jit
def _move_kernel(src_ptr, idx_ptr, dst_ptr, nnz, SCATTER: tl.constexpr, BLOCK: tl.constexpr):
    """dst[i] = src[j] (SCATTER: the exact restore) or dst[j] = src[i] through fp32 (the gather of a gradient)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < nnz
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    if SCATTER:
        tl.store(dst_ptr + idx, tl.load(src_ptr + offs, mask=mask), mask=mask)
    else:
        x = tl.load(src_ptr + idx, mask=mask).to(tl.float32)
        tl.store(dst_ptr + offs, _round(x, dst_ptr.dtype.element_ty), mask=mask)


def _merge(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, backup, dst, scatter: bool) -> None:
    nnz = indices.numel()
    if nnz:
        _merge_kernel[(triton.cdiv(nnz, BLOCK),)](
            weight, indices, values, backup, dst, nnz, BACKUP=backup is not None, SCATTER=scatter, BLOCK=BLOCK
        )


def _move(src: torch.Tensor, indices: torch.Tensor, dst: torch.Tensor, scatter: bool) -> None:
    nnz = indices.numel()
    if nnz:
        _move_kernel[(triton.cdiv(nnz, BLOCK),)](src, indices, dst, nnz, SCATTER=scatter, BLOCK=BLOCK)


def scatter_merge_triton(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add `values` at flat `indices` of `weight` in place; return the replaced originals (for the exact unmerge)."""
    flat = _flat(weight)
    backup = torch.empty(indices.numel(), dtype=weight.dtype, device=weight.device)
    _merge(flat, indices, values.contiguous(), backup, flat, scatter=True)
    return backup


def scatter_restore_triton(weight: torch.Tensor, indices: torch.Tensor, backup: torch.Tensor) -> None:
    """Write the originals returned by `scatter_merge_triton` back: the exact unmerge."""
    _move(backup.contiguous(), indices, _flat(weight), scatter=True)


def merged_values_triton(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The values merging would write, without writing them (for `safe_merge`'s NaN check)."""
    out = torch.empty(indices.numel(), dtype=weight.dtype, device=weight.device)
    _merge(_flat(weight), indices, values.contiguous(), None, out, scatter=False)
    return out


class _ComposeWeight(torch.autograd.Function):
    """Forward: a contiguous copy of the weight with the delta merged. Backward: the weight's gradient passes through
    unchanged (every output element depends on its input element with slope 1), the values' is its gather."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        out = weight.clone(memory_format=torch.contiguous_format)
        _merge(out.view(-1), indices, values.contiguous(), None, out.view(-1), scatter=True)
        ctx.save_for_backward(indices)
        ctx.values_dtype = values.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (indices,) = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[2]:
            grad_values = torch.empty(indices.numel(), dtype=ctx.values_dtype, device=grad.device)
            _move(grad.contiguous().view(-1), indices, grad_values, scatter=False)
        return (grad if ctx.needs_input_grad[0] else None), None, grad_values


def compose_weight_triton(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A new tensor equal to `weight` with the delta merged; differentiable w.r.t. `values` (the unmerged forward).

    Costs one copy of the weight, never a dense delta; the backward is a gather of the weight's gradient.
    """
    return _ComposeWeight.apply(weight, indices, values)
