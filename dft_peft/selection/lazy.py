"""Deltas computed when read: a fine-tune's LoRA factors or a checkpoint on disk stand for Δ without a whole module's
delta ever existing; core selection reads them a block of rows at a time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import torch


class Terms(NamedTuple):
    """A delta chunk kept as its two terms, Δ = fp32(tuned) − base (rounded once, as torch subtracts a bf16/fp16/fp32
    base from an fp32 tensor): what a lazy mapping's `read_terms` returns, so that the C loop subtracts as it scores
    instead of the reader writing the deltas out."""

    tuned: torch.Tensor
    base: torch.Tensor

    def delta(self) -> torch.Tensor:
        tuned = self.tuned.to(self.base.device, torch.float32)
        return (tuned.clone() if tuned is self.tuned else tuned).sub_(self.base)  # never into the caller's tensor


class LazyDeltas(Mapping[str, torch.Tensor]):
    """A read-only mapping that computes each module's delta when it is read, so only one is in memory at a time.

    `read_range(name, start, length)`, when given, returns flat elements [start, start + length) of a delta without
    computing the whole module: core selection then samples its threshold cheaply and streams each module a block
    of rows at a time. `read_terms`, when given, returns the same range as `Terms` (fine-tuned weights and base), which
    the CPU selection loop subtracts as it scores; its `tuned` tensor may be a buffer that a later `read_terms` call
    overwrites (a streaming reader's two, used in turn: selection reads one chunk ahead).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], compute: Callable[[str], torch.Tensor],
                 read_range: Callable[[str, int, int], torch.Tensor] | None = None,
                 read_terms: Callable[[str, int, int], Terms] | None = None) -> None:
        self.shapes = dict(shapes)
        self.compute = compute
        self.read_range = read_range
        self.read_terms = read_terms

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return self.compute(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]


def flat_range(read_rows: Callable[[slice], torch.Tensor], shape: tuple[int, ...], start: int,
               length: int) -> torch.Tensor:
    """Flat elements [start, start + length) of a tensor of `shape`, reading only the rows that hold them."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    first, last = start // row, (start + length - 1) // row + 1
    offset = start - first * row
    return read_rows(slice(first, last)).reshape(-1)[offset : offset + length]


