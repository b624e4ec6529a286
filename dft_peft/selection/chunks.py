"""Reading deltas a chunk or a flat range at a time, from in-memory tensors (any strides) or lazy mappings, so that
selection never holds more than one chunk of a module beyond the deltas themselves."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

from ..kernels.window_cpu import executor
from .lazy import Terms
from .rule import check_pair


def iter_chunks(tensor: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (flat offset, flat chunk) over the logical row-major order in blocks of whole rows (~chunk elements).

    Boundaries depend only on the shape, so two tensors of one shape chunk alike whatever their strides; a
    non-contiguous block is copied, a contiguous one is a view.
    """
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    if tensor.numel() == 0:
        return
    row = tensor.numel() // tensor.shape[0]
    rows = max(1, chunk // max(row, 1))
    for r in range(0, tensor.shape[0], rows):
        yield r * row, tensor[r : r + rows].reshape(-1)


def iter_chunk_pairs(
    new: torch.Tensor, old: torch.Tensor, chunk: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (flat offset, new chunk, old chunk): flat views of ~chunk elements for contiguous pairs, else
    `iter_chunks` row blocks of both."""
    if new.dim() == 0:
        new, old = new.reshape(1), old.reshape(1)
    numel = new.numel()
    if numel == 0:
        return
    if new.is_contiguous() and old.is_contiguous():
        flat_new, flat_old = new.view(-1), old.view(-1)
        for start in range(0, numel, chunk):
            yield start, flat_new[start : start + chunk], flat_old[start : start + chunk]
        return
    yield from ((start, a, b) for (start, a), (_, b) in zip(iter_chunks(new, chunk), iter_chunks(old, chunk)))


def iter_delta_chunks(
    new_deltas: Mapping[str, torch.Tensor], old_deltas: Mapping[str, torch.Tensor], name: str,
    shape: tuple[int, ...], chunk: int,
) -> Iterator[tuple[int, torch.Tensor | Terms, torch.Tensor | Terms]]:
    """(flat offset, Δnew chunk, Δold chunk) over one module, each pair of tensors checked with `check_pair`.

    Lazy mappings that are `range_readable` are read a block of whole rows at a time, so a delta computed on access (a
    checkpoint minus the base, LoRA factors) never exists whole; tensors are chunked by `iter_chunk_pairs`. Where
    both can `read_terms`, the chunks are `Terms` (for both or for neither; checked where they become deltas), each
    read on a thread while the previous one is used (so a streamed `read_terms` result must stay valid across one more
    read).
    """
    if not (range_readable(new_deltas) and range_readable(old_deltas)):
        new, old = new_deltas[name], old_deltas[name]
        check_pair(name, new, old)
        yield from iter_chunk_pairs(new, old, chunk)
        return
    numel = math.prod(shape)
    row = numel // shape[0] if len(shape) > 1 and shape[0] else 1
    step = max(1, chunk // max(row, 1)) * row
    ranges = [(start, min(step, numel - start)) for start in range(0, numel, step)]
    if getattr(new_deltas, "read_terms", None) is None or getattr(old_deltas, "read_terms", None) is None:
        for start, length in ranges:
            new, old = read_range(new_deltas, name, start, length), read_range(old_deltas, name, start, length)
            check_pair(name, new, old)
            yield start, new, old
        return

    def read_pair(i: int) -> tuple[Terms, Terms]:
        start, length = ranges[i]
        return new_deltas.read_terms(name, start, length), old_deltas.read_terms(name, start, length)

    if not ranges:
        return
    reader = executor("read", 1)  # file reads release the GIL
    pending = reader.submit(read_pair, 0)
    for i, (start, _) in enumerate(ranges):
        new, old = pending.result()
        if i + 1 < len(ranges):
            pending = reader.submit(read_pair, i + 1)
        yield start, new, old


def gather_flat(tensor: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The elements of `tensor` at row-major flat indices `idx`, without copying `tensor`."""
    if tensor.dim() <= 1 or tensor.is_contiguous():
        return tensor.reshape(-1)[idx]
    return tensor[torch.unravel_index(idx, tensor.shape)]


def read_range(deltas: Mapping[str, torch.Tensor], name: str, start: int, length: int) -> torch.Tensor:
    """Flat elements [start, start + length) of a module's delta; a lazy mapping may provide `read_terms` (preferred:
    it reads just those elements, where a delta's `read_range` may compute whole rows) or `read_range`."""
    terms = getattr(deltas, "read_terms", None)
    if terms is not None:
        return terms(name, start, length).delta()
    reader = getattr(deltas, "read_range", None)
    if reader is not None:
        return reader(name, start, length)
    tensor = deltas[name]
    if tensor.is_contiguous():
        return tensor.reshape(-1)[start : start + length]
    return gather_flat(tensor, torch.arange(start, start + length, device=tensor.device))


def range_readable(deltas: Mapping[str, torch.Tensor]) -> bool:
    """Whether a lazy mapping reads flat ranges of a delta (`read_range` or `read_terms`) without the whole module."""
    return getattr(deltas, "read_range", None) is not None or getattr(deltas, "read_terms", None) is not None


def samplable(deltas: Mapping[str, torch.Tensor]) -> bool:
    """In-memory tensors, or a lazy mapping that can read a range without computing the whole module."""
    return isinstance(deltas, dict) or range_readable(deltas)


def delta_shapes(names: list[str], deltas: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes of a lazy mapping: it may expose `shape_of(name)` to avoid computing a delta just for its shape."""
    shape_of = getattr(deltas, "shape_of", None)
    return {n: tuple(shape_of(n)) if shape_of else tuple(deltas[n].shape) for n in names}
