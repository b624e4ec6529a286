"""`SparseDelta`: the per-module unit of a DFT edit (sorted flat indices + values)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

INT32_LIMIT = 2**31
CHECK_BLOCK = 1 << 20  # entries checked at a time by `check_indices` and `validate`


def index_dtype(numel: int) -> torch.dtype:
    """int32 where every flat index fits, else int64: halves index memory for all realistic weights."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


@dataclass(frozen=True)
class SparseDelta:
    """A sparse weight delta: `values[i]` is added at flat position `indices[i]` of a tensor of `shape`.

    `indices` are strictly increasing (sorted, no duplicates) and lie in `[0, prod(shape))`.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise ValueError("SparseDelta.indices and .values must be 1-D")
        if self.indices.numel() != self.values.numel():
            raise ValueError(
                f"SparseDelta has {self.indices.numel()} indices but {self.values.numel()} values"
            )
        if self.indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"SparseDelta.indices must be int32 or int64, got {self.indices.dtype}")
        if not self.values.dtype.is_floating_point:
            raise ValueError(f"SparseDelta.values must be floating point, got {self.values.dtype}")

    @property
    def numel(self) -> int:
        """Number of elements of the dense tensor the delta applies to."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def validate(self, name: str = "delta") -> SparseDelta:
        """Raise ValueError unless indices are sorted, unique and in range and values finite; return self."""
        check_indices(self.indices, self.numel, name)
        if not all(bool(torch.isfinite(self.values[s : s + CHECK_BLOCK]).all())
                   for s in range(0, self.nnz, CHECK_BLOCK)):
            raise ValueError(f"{name}: the delta values contain NaN or inf")
        return self

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor (for tests and small analyses; the library itself never builds it)."""
        dense = torch.zeros(self.numel, dtype=dtype or self.values.dtype, device=self.values.device)
        dense[self.indices.long()] = self.values.to(dense.dtype)
        return dense.view(self.shape)

    def scaled(self, factor: float) -> SparseDelta:
        return SparseDelta(self.indices, self.values * factor, self.shape)

    @staticmethod
    def empty(shape: Iterable[int], dtype: torch.dtype = torch.float32, device=None) -> SparseDelta:
        shape = tuple(shape)
        numel = 1
        for s in shape:
            numel *= s
        return SparseDelta(
            torch.empty(0, dtype=index_dtype(numel), device=device), torch.empty(0, dtype=dtype, device=device), shape
        )


def check_indices(indices: torch.Tensor, numel: int, name: str) -> None:
    """Raise ValueError unless `indices` is a 1-D integer tensor, strictly increasing and within [0, numel)."""
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64, torch.uint8, torch.int16):
        raise ValueError(f"{name}: indices must be a 1-D integer tensor, got {indices.dtype} of shape "
                         f"{tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    first, last = int(indices[0]), int(indices[-1])
    if first < 0 or last >= numel:
        bad = int(indices.min()) if first < 0 else int(indices.max())
        raise ValueError(f"{name}: index {bad} is outside the module's {numel} elements")
    for start in range(0, indices.numel() - 1, CHECK_BLOCK):  # in blocks: no temporary as large as the core
        block = indices[start : start + CHECK_BLOCK + 1]
        increasing = block[1:] > block[:-1]  # compared, not subtracted: narrow index dtypes would wrap
        if not bool(increasing.all()):
            pos = int((~increasing).nonzero()[0])
            kind = "duplicated" if bool(block[pos + 1] == block[pos]) else "unsorted"
            raise ValueError(f"{name}: indices are {kind} at position {start + pos + 1}; they must be strictly "
                             "increasing")


def coalesce(deltas: Iterable[SparseDelta], shape: tuple[int, ...] | None = None) -> SparseDelta:
    """Sum sparse deltas of one tensor: the union of their indices, values added where indices coincide."""
    deltas = list(deltas)
    if not deltas:
        if shape is None:
            raise ValueError("coalesce needs at least one delta or a shape")
        return SparseDelta.empty(shape)
    shape = deltas[0].shape if shape is None else tuple(shape)
    for d in deltas:
        if d.shape != shape:
            raise ValueError(f"cannot add a sparse delta of shape {d.shape} to one of shape {shape}")
    dtype = deltas[0].values.dtype
    nonempty = [d for d in deltas if d.nnz]
    if len(nonempty) <= 1:
        d = nonempty[0] if nonempty else deltas[0]
        return SparseDelta(d.indices, d.values.to(dtype), shape)
    indices = torch.cat([d.indices.long() for d in nonempty])
    values = torch.cat([d.values.to(dtype) for d in nonempty])
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    summed = torch.zeros(unique.numel(), dtype=dtype, device=values.device).index_add_(0, inverse, values)
    return SparseDelta(unique.to(index_dtype(deltas[0].numel)), summed, shape)


def normalize_core_names(core: Mapping[str, SparseDelta]) -> dict[str, SparseDelta]:
    """Accept module names as `named_modules()` gives them or with PEFT's `base_model.model.` prefix."""
    out: dict[str, SparseDelta] = {}
    for name, delta in core.items():
        if not isinstance(delta, SparseDelta):
            raise TypeError(f"core[{name!r}] must be a SparseDelta, got {type(delta).__name__}")
        key = name.removeprefix("base_model.model.")
        if key in out:
            raise ValueError(f"core names module {key!r} twice")
        out[key] = delta
    return out
