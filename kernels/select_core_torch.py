"""Core selection in plain torch: the CPU path and the reference for the Triton kernels.

The rule (Delicate Fine-Tuning §4.1, made exact):

* an element is a *candidate* when Δnew and Δold have opposite signs; a magnitude below the smallest normal float32
  counts as zero, i.e. no sign (this keeps every score a normal float, so CPU, GPU and compiled code agree bit for bit
  whatever their denormal mode);
* its score is s = |fp32(Δnew) − fp32(Δold)| and its *key* the int32 bit pattern of s, which orders like s because
  s ≥ 0 (non-candidates get key 0);
* the core of a scope (all modules for `"global"`, each module for `"per_module"`) holds the k = ⌊top_t · numel⌋
  candidates that come first in the order (key descending, module name ascending, flat index ascending) — fewer when
  there are fewer candidates; its values are fp32(Δnew) · scale.

The CPU path streams each delta once in chunks and keeps a buffer of at most ~2k entries: whenever the buffer
overflows it is cut to the exact top k of the prefix seen so far, whose k-th key then filters all later chunks
(streaming top-k). A key threshold estimated from a small random sample filters from the start, so the buffer
rarely needs cutting; if the estimate was too high a second pass fetches the rest. Peak extra memory is
O(k + chunk), never a copy of the scores.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from decimal import Decimal

import torch

from ..sparse import SparseDelta, index_dtype

SELECTIONS = ("global", "per_module")
FLT_MIN = torch.finfo(torch.float32).tiny
MAX_KEY = 0x7F800000  # bit pattern of +inf: the largest key (an overflowing finite difference)
CHUNK = 1 << 20
SAMPLE = 1 << 16
_COMPILE_MIN_NUMEL = 1 << 24


def core_size(top_t: float, numel: int) -> int:
    """k = ⌊top_t · numel⌋ with top_t read as the decimal it is written as (0.29 · 100 = 29, not 28)."""
    return int(Decimal(repr(float(top_t))) * numel)


def chunk_keys(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of one chunk (int32, 0 for non-candidates) and whether the chunk holds NaN/inf."""
    x = new.float()
    y = old.float()
    candidate = ((x >= FLT_MIN) & (y <= -FLT_MIN)) | ((x <= -FLT_MIN) & (y >= FLT_MIN))
    keys = torch.where(candidate, (x - y).abs(), 0.0).view(torch.int32)
    nonfinite = ~(torch.isfinite(x).all() & torch.isfinite(y).all())
    return keys, nonfinite


_compiled_chunk_keys: Callable | None = None


def _chunk_keys_fn(total_numel: int) -> Callable:
    """The fused (torch.compile'd) key function for large inputs, the eager one otherwise or if compiling fails.

    `DFT_PEFT_COMPILE=0` forces eager, `=1` forces compiled; by default inputs of 16M elements and more compile.
    """
    global _compiled_chunk_keys
    mode = os.environ.get("DFT_PEFT_COMPILE", "auto")
    if mode == "0" or (mode != "1" and total_numel < _COMPILE_MIN_NUMEL):
        return chunk_keys
    if _compiled_chunk_keys is None:
        compiled = torch.compile(chunk_keys, dynamic=True)
        try:
            probe = torch.tensor([1.0, -2.0, 0.0])
            compiled(probe, -probe)
            _compiled_chunk_keys = compiled
        except Exception as err:  # no C++ compiler, unsupported platform, ...
            warnings.warn(f"torch.compile unavailable for core selection ({err}); using eager torch", stacklevel=3)
            _compiled_chunk_keys = chunk_keys
    return _compiled_chunk_keys


def check_deltas(new_deltas: Mapping[str, torch.Tensor], old_deltas: Mapping[str, torch.Tensor]) -> list[str]:
    """Check that both mappings name the same modules; return the names sorted (the tie-break order)."""
    if set(new_deltas) != set(old_deltas):
        missing = sorted(set(new_deltas) ^ set(old_deltas))
        raise ValueError(f"Δnew and Δold must name the same modules; only one of them has {missing[:5]}")
    return sorted(new_deltas)


def check_pair(name: str, new: torch.Tensor, old: torch.Tensor) -> None:
    """Check one module's deltas: float tensors of equal shape on one device."""
    if not (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor)):
        raise TypeError(f"deltas of module {name!r} must be tensors")
    if new.shape != old.shape:
        raise ValueError(f"module {name!r}: Δnew has shape {tuple(new.shape)} but Δold {tuple(old.shape)}")
    if not (new.dtype.is_floating_point and old.dtype.is_floating_point):
        raise ValueError(f"module {name!r}: deltas must be floating point, got {new.dtype} and {old.dtype}")
    if new.device != old.device:
        raise ValueError(f"module {name!r}: Δnew is on {new.device} but Δold on {old.device}")


def check_selection_args(top_t: float, selection: str) -> None:
    if isinstance(top_t, bool) or not isinstance(top_t, (int, float)) or not 0.0 < top_t <= 1.0:
        raise ValueError(f"top_t must be a fraction in (0, 1], got {top_t!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")


def raise_nonfinite(name: str) -> None:
    raise ValueError(f"module {name!r}: Δnew or Δold contains NaN or inf; the fine-tune diverged (lower the "
                     "learning rate) or the checkpoint is corrupt")


def iter_chunks(tensor: torch.Tensor, chunk: int = CHUNK):
    """Yield (flat offset, flat chunk) over the logical row-major order, copying at most ~chunk elements at a time."""
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    numel = tensor.numel()
    if numel == 0:
        return
    if tensor.is_contiguous():
        flat = tensor.view(-1)
        for start in range(0, numel, chunk):
            yield start, flat[start : start + chunk]
        return
    row = numel // tensor.shape[0]
    rows = max(1, chunk // max(row, 1))
    for r in range(0, tensor.shape[0], rows):
        yield r * row, tensor[r : r + rows].reshape(-1)


class _Buffer:
    """Selected (key, module, index, value) entries in stream order, cut back to the exact top k on overflow."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.cap = 2 * k + CHUNK
        self.parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.size = 0
        self.device = torch.device("cpu")

    def add(self, module: int, keys: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> int | None:
        """Append entries; return a new (exclusive) key floor for later chunks when the buffer was cut."""
        if idx.numel():
            self.parts.append((module, keys, idx, vals))
            self.size += idx.numel()
        if self.size > self.cap:
            return self.cut() + 1
        return None

    def cut(self) -> int:
        """Keep exactly the first k entries in (key desc, stream order); return the k-th key."""
        keys = torch.cat([p[1] for p in self.parts])
        if self.size <= self.k:
            return 0
        # kth largest = (n - k + 1)-th smallest
        kth = int(torch.kthvalue(keys, self.size - self.k + 1).values)
        above = int((keys > kth).sum())
        quota = self.k - above
        ties = keys == kth
        keep = (keys > kth) | (ties & (torch.cumsum(ties, 0) <= quota))
        parts, start = [], 0
        for module, k_, i_, v_ in self.parts:
            m = keep[start : start + k_.numel()]
            start += k_.numel()
            if bool(m.any()):
                parts.append((module, k_[m], i_[m], v_[m]))
        self.parts = parts
        self.size = self.k
        return kth

    def finish(self) -> None:
        if self.size > self.k:
            self.cut()


def _stream_pass(
    names: list[str],
    new_deltas: Mapping[str, torch.Tensor],
    old_deltas: Mapping[str, torch.Tensor],
    k: int,
    lo: int,
    hi: int,
    scale: float,
    keys_fn: Callable,
) -> _Buffer:
    """One streaming pass over `names` keeping the top k candidates whose key lies in [lo, hi)."""
    buffer = _Buffer(k)
    for rank, name in enumerate(names):
        new, old = new_deltas[name], old_deltas[name]
        check_pair(name, new, old)
        buffer.device = new.device
        old_chunks = iter_chunks(old)
        for start, new_chunk in iter_chunks(new):
            _, old_chunk = next(old_chunks)
            keys, nonfinite = keys_fn(new_chunk, old_chunk)
            if bool(nonfinite):
                raise_nonfinite(name)
            if k == 0:
                continue
            mask = keys >= lo
            if hi <= MAX_KEY:
                mask &= keys < hi
            local = mask.nonzero().squeeze(1)
            if local.numel() == 0:
                continue
            vals = new_chunk[local].float()
            if scale != 1.0:
                vals = vals * scale
            floor = buffer.add(rank, keys[local], local + start, vals)
            if floor is not None:
                lo = max(lo, floor)
    buffer.finish()
    return buffer


def _sampled_floor(
    names: list[str], new_deltas: Mapping[str, torch.Tensor], old_deltas: Mapping[str, torch.Tensor], k: int,
    total: int,
) -> int:
    """A key floor that at least k candidates reach with high probability, from a uniform random sample."""
    if total <= SAMPLE * 4:
        return 1
    gen = torch.Generator().manual_seed(0)
    sizes = [new_deltas[n].numel() for n in names]
    positions = torch.randint(0, total, (SAMPLE,), generator=gen).sort().values
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    keys = []
    for i, name in enumerate(names):
        lo, hi = int(torch.searchsorted(positions, bounds[i])), int(torch.searchsorted(positions, bounds[i + 1]))
        if hi == lo:
            continue
        new, old = new_deltas[name], old_deltas[name]
        where = torch.unravel_index((positions[lo:hi] - bounds[i]).to(new.device), new.shape)
        keys.append(chunk_keys(new[where].reshape(-1), old[where].reshape(-1))[0].cpu())
    sample = torch.cat(keys).sort(descending=True).values
    expected = k * SAMPLE / total
    rank = math.ceil(expected + 4.0 * math.sqrt(expected) + 8)
    if rank >= SAMPLE or int(sample[rank]) <= 0:
        return 1
    return int(sample[rank])


def _shapes_once(names: list[str], deltas: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes of a lazy mapping: it may expose `shape_of(name)` to avoid computing a delta just for its shape."""
    shape_of = getattr(deltas, "shape_of", None)
    return {n: tuple(shape_of(n)) if shape_of else tuple(deltas[n].shape) for n in names}


def _select_scope(
    names: list[str], new_deltas: Mapping[str, torch.Tensor], old_deltas: Mapping[str, torch.Tensor], k: int,
    scale: float, sample: bool, keys_fn: Callable,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    total = sum(new_deltas[n].numel() for n in names) if sample else 0
    floor = _sampled_floor(names, new_deltas, old_deltas, k, total) if sample and k else 1
    buffers = [_stream_pass(names, new_deltas, old_deltas, k, floor, MAX_KEY + 1, scale, keys_fn)]
    if buffers[0].size < k and floor > 1:  # the sampled floor was too high: fetch the best of the rest
        buffers.append(_stream_pass(names, new_deltas, old_deltas, k - buffers[0].size, 1, floor, scale, keys_fn))
    out: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {n: ([], []) for n in names}
    for buffer in buffers:
        for module, _, idx, vals in buffer.parts:
            out[names[module]][0].append(idx)
            out[names[module]][1].append(vals)
    result = {}
    device = buffers[0].device
    for name, (idx, vals) in out.items():
        if not idx:
            result[name] = (torch.empty(0, dtype=torch.int64, device=device),
                            torch.empty(0, dtype=torch.float32, device=device))
            continue
        idx, vals = torch.cat(idx), torch.cat(vals)
        if len(buffers) > 1:
            idx, order = idx.sort()
            vals = vals[order]
        result[name] = (idx, vals)
    return result


def select_core_torch(
    new_deltas: Mapping[str, torch.Tensor],
    old_deltas: Mapping[str, torch.Tensor],
    top_t: float,
    selection: str = "global",
    *,
    scale: float = 1.0,
) -> dict[str, SparseDelta]:
    """Select the DFT core with torch ops, streaming each delta in chunks (see the module docstring for the rule).

    Args:
        new_deltas / old_deltas: module name → Δnew / Δold (any float dtype, same shapes; may be non-contiguous).
        top_t: fraction of the parameters in scope kept, in (0, 1].
        selection: `"global"` (one ranking over all modules) or `"per_module"`.
        scale: factor applied to the kept Δnew values (λ).

    Returns:
        module name → `SparseDelta` with sorted flat indices and float32 values.
    """
    check_selection_args(top_t, selection)
    names = check_deltas(new_deltas, old_deltas)
    # Lazy mappings (deltas computed on access, e.g. from LoRA factors) are read once per pass and not sampled.
    sample = isinstance(new_deltas, dict) and isinstance(old_deltas, dict)
    shapes = {n: tuple(new_deltas[n].shape) for n in names} if sample else _shapes_once(names, new_deltas)
    total = sum(math.prod(s) for s in shapes.values())
    keys_fn = _chunk_keys_fn(total)
    if selection == "global":
        picked = _select_scope(names, new_deltas, old_deltas, core_size(top_t, total), scale, sample, keys_fn)
    else:
        picked = {}
        for name in names:
            k = core_size(top_t, math.prod(shapes[name]))
            picked.update(_select_scope([name], new_deltas, old_deltas, k, scale, sample, keys_fn))
    core = {}
    for name in names:
        idx, vals = picked[name]
        core[name] = SparseDelta(idx.to(index_dtype(math.prod(shapes[name]))), vals, shapes[name])
    return core


def select_core_naive(
    new_deltas: Mapping[str, torch.Tensor],
    old_deltas: Mapping[str, torch.Tensor],
    top_t: float,
    selection: str = "global",
    *,
    scale: float = 1.0,
) -> dict[str, SparseDelta]:
    """The rule written as plainly as possible: mask, abs, one stable sort over the concatenated scores.

    Materialises every score (O(numel) memory); the tests and benchmarks compare the real paths against it.
    """
    check_selection_args(top_t, selection)
    names = check_deltas(new_deltas, old_deltas)
    scopes = [names] if selection == "global" else [[n] for n in names]
    core = {}
    for scope in scopes:
        new = torch.cat([new_deltas[n].reshape(-1).float().cpu() for n in scope])
        old = torch.cat([old_deltas[n].reshape(-1).float().cpu() for n in scope])
        if not (torch.isfinite(new).all() and torch.isfinite(old).all()):
            raise ValueError("Δnew or Δold contains NaN or inf")
        opposite = ((new >= FLT_MIN) & (old <= -FLT_MIN)) | ((new <= -FLT_MIN) & (old >= FLT_MIN))
        score = torch.where(opposite, (new - old).abs(), -1.0)
        k = min(core_size(top_t, new.numel()), int(opposite.sum()))
        order = torch.sort(score, descending=True, stable=True).indices[:k]
        start = 0
        for n in scope:
            numel = new_deltas[n].numel()
            mine = order[(order >= start) & (order < start + numel)].sort().values
            core[n] = SparseDelta(
                (mine - start).to(index_dtype(numel)), new[mine] * scale, tuple(new_deltas[n].shape)
            )
            start += numel
    return core
