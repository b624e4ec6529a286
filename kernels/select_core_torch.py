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

The CPU path streams each delta once in chunks. One fused pass per chunk computes the scores and compares them with a
key floor — the compiled C loop of `window_cpu` where a C compiler is found, else torch ops (torch.compile'd for large
inputs) — and only the elements that pass are gathered and appended to a buffer, which is cut to
the exact top k of the prefix seen so far whenever it exceeds ~2k entries (streaming top-k; the k-th key then raises
the floor). The floor starts at the low end of a key window estimated from a small random sample, so the buffer holds
little more than the core and rarely needs cutting; entries above the window are kept without their keys, and the
final cut ranks only the keys inside the window and compacts each module's entries in place. If the estimate was too
high, a second pass fetches the rest. The C loop scores each large chunk on the pool's threads while the previous
chunk's entries are stored. Peak extra memory is the window's keys, one module's entries, the sample and O(chunk),
never a copy of the scores.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import warnings
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import NamedTuple

import torch

from ..format.sparse import SparseDelta, index_dtype
from . import window_cpu

SELECTIONS = ("global", "per_module")
FLT_MIN = torch.finfo(torch.float32).tiny
MAX_KEY = 0x7F800000  # bit pattern of +inf: the largest key (an overflowing finite difference)
CHUNK = 1 << 20  # elements per chunk, at most (and at most 1/128 of the input, at least MIN_CHUNK)
MIN_CHUNK = 1 << 16
SAMPLE = 1 << 16  # elements sampled from a scope, at least; all that a lazy mapping gets (each run is a read)
SAMPLE_MAX = 1 << 18  # elements sampled from a large scope of in-memory deltas (a run is a cheap gather there)
RUN = 1 << 6  # consecutive elements per sampled run
_COMPILE_MIN_NUMEL = 1 << 24


def core_size(top_t: float, numel: int) -> int:
    """k = ⌊top_t · numel⌋ with top_t read as the decimal it is written as (0.29 · 100 = 29, not 28)."""
    return int(Decimal(repr(float(top_t))) * numel)


def _scores(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """s = |x − y| where x, y (fp32) have opposite signs, magnitudes below FLT_MIN counting as zero; 0 elsewhere."""
    candidate = ((x >= FLT_MIN) & (y <= -FLT_MIN)) | ((x <= -FLT_MIN) & (y >= FLT_MIN))
    return torch.where(candidate, (x - y).abs(), 0.0)


def _nonfinite(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ~(torch.isfinite(x).all() & torch.isfinite(y).all())


def chunk_keys(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of one chunk (int32, 0 for non-candidates) and whether the chunk holds NaN/inf."""
    x, y = new.float(), old.float()
    return _scores(x, y).view(torch.int32), _nonfinite(x, y)


def chunk_window(
    new: torch.Tensor, old: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Write to `out` the chunk's scores whose keys lie in [lo, hi], 0 elsewhere; return whether it holds NaN/inf.

    `lo`, `hi` are 0-d float32 tensors holding the key bounds' bit patterns (lo ≥ 1 excludes non-candidates):
    scores compare as floats exactly as keys compare as ints. Viewed as int32, `out` holds the keys of the elements
    to keep and zeros. (Float scores, not a mask: inductor's CPU code stores bool tensors element by element, ten
    times slower. Tensor bounds keep one compiled graph for every bound, and the reused `out` keeps the heap from
    fragmenting between the buffer's parts.)
    """
    x, y = new.float(), old.float()
    s = _scores(x, y)
    out.copy_(torch.where((s >= lo) & (s <= hi), s, 0.0))
    return _nonfinite(x, y)


def key_bound(key: int) -> torch.Tensor:
    """The float32 0-d tensor whose bits are `key` (a bound for `chunk_window`)."""
    return torch.tensor(key, dtype=torch.int32).view(torch.float32)


_compiled: Callable | None = None


def compile_wanted(total_numel: int) -> bool:
    """Whether `chunk_window` runs torch.compile'd for an input of this size (see `_window_fn`)."""
    mode = os.environ.get("DFT_PEFT_COMPILE", "auto")
    return mode == "1" or (mode != "0" and total_numel >= _COMPILE_MIN_NUMEL)


def _window_fn(total_numel: int) -> Callable:
    """`chunk_window`, fused by torch.compile for large inputs; eager otherwise or if compiling fails.

    `DFT_PEFT_COMPILE=0` forces eager, `=1` forces compiled; by default inputs of 16M elements and more compile.
    """
    global _compiled
    if not compile_wanted(total_numel):
        return chunk_window
    if _compiled is None:
        compiled = torch.compile(chunk_window, dynamic=True)
        try:
            probe = torch.tensor([1.0, -2.0, 0.0])
            compiled(probe, -probe, key_bound(1), key_bound(MAX_KEY), torch.empty(3))
            _compiled = compiled
        except Exception as err:  # no C++ compiler, unsupported platform, ...
            warnings.warn(f"torch.compile unavailable for core selection ({err}); using eager torch", stacklevel=3)
            _compiled = chunk_window
    return _compiled


class Terms(NamedTuple):
    """A delta chunk kept as its two terms, Δ = fp32(tuned) − base (rounded once, as torch subtracts a bf16/fp16/fp32
    base from an fp32 tensor): what a lazy mapping's `read_terms` returns, so that the C loop subtracts as it scores
    instead of the reader writing the deltas out."""

    tuned: torch.Tensor
    base: torch.Tensor

    def delta(self) -> torch.Tensor:
        tuned = self.tuned.to(self.base.device, torch.float32)
        return (tuned.clone() if tuned is self.tuned else tuned).sub_(self.base)  # never into the caller's tensor


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


def iter_chunks(tensor: torch.Tensor, chunk: int | None = None):
    """Yield (flat offset, flat chunk) over the logical row-major order in blocks of whole rows (~chunk elements).

    Boundaries depend only on the shape, so two tensors of one shape chunk alike whatever their strides; a
    non-contiguous block is copied, a contiguous one is a view.
    """
    chunk = chunk or CHUNK
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    if tensor.numel() == 0:
        return
    row = tensor.numel() // tensor.shape[0]
    rows = max(1, chunk // max(row, 1))
    for r in range(0, tensor.shape[0], rows):
        yield r * row, tensor[r : r + rows].reshape(-1)


def iter_chunk_pairs(new: torch.Tensor, old: torch.Tensor, chunk: int | None = None):
    """Yield (flat offset, new chunk, old chunk): flat views of ~chunk elements for contiguous pairs, else
    `iter_chunks` row blocks of both."""
    chunk = chunk or CHUNK
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
):
    """(flat offset, Δnew chunk, Δold chunk) over one module, each pair checked with `check_pair`.

    Lazy mappings that are `range_readable` are read a block of whole rows at a time, so a delta computed on access (a
    checkpoint minus the base, LoRA factors) never exists whole; tensors are chunked by `iter_chunk_pairs`. Where
    both can `read_terms`, the chunks are `Terms` (checked by `chunk_pair`), each read while the previous one is
    used (so a streamed `read_terms` result must stay valid across one more read).
    """
    if not (range_readable(new_deltas) and range_readable(old_deltas)):
        new, old = new_deltas[name], old_deltas[name]
        check_pair(name, new, old)
        yield from iter_chunk_pairs(new, old, chunk)
        return
    terms = getattr(new_deltas, "read_terms", None) is not None and getattr(old_deltas, "read_terms", None) is not None
    numel = math.prod(shape)
    row = numel // shape[0] if len(shape) > 1 and shape[0] else 1
    step = max(1, chunk // max(row, 1)) * row
    if terms:  # the next chunk is read on a thread while this one is scored
        ranges = [(start, min(step, numel - start)) for start in range(0, numel, step)]

        def read_pair(i: int) -> tuple[Terms, Terms]:
            start, length = ranges[i]
            return new_deltas.read_terms(name, start, length), old_deltas.read_terms(name, start, length)

        if not ranges:
            return
        reader = window_cpu.executor("read", 1)  # file reads release the GIL
        pending = reader.submit(read_pair, 0)
        for i, (start, _) in enumerate(ranges):
            new, old = pending.result()
            if i + 1 < len(ranges):
                pending = reader.submit(read_pair, i + 1)
            yield start, new, old
        return
    for start in range(0, numel, step):
        length = min(step, numel - start)
        new, old = read_range(new_deltas, name, start, length), read_range(old_deltas, name, start, length)
        check_pair(name, new, old)
        yield start, new, old


def chunk_pair(
    name: str, new: torch.Tensor | Terms, old: torch.Tensor | Terms, native: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(Δnew or new weights, Δold or old weights, base or None) for one chunk: `Terms` that share their base go to the
    C `terms` loop as they are, other `Terms` become deltas here (and are checked with `check_pair`)."""
    if not isinstance(new, Terms):  # `iter_delta_chunks` gives Terms for both or for neither
        return new, old, None
    base = new.base
    if (native and old.base.data_ptr() == base.data_ptr() and old.base.dtype == base.dtype
            and window_cpu.usable_terms(new.tuned, old.tuned, base)):
        return new.tuned, old.tuned, base
    new, old = new.delta(), old.delta()
    check_pair(name, new, old)
    return new, old, None


def gather_flat(tensor: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The elements of `tensor` at row-major flat indices `idx`, without copying `tensor`."""
    if tensor.dim() <= 1 or tensor.is_contiguous():
        return tensor.reshape(-1)[idx]
    return tensor[torch.unravel_index(idx, tensor.shape)]


class _Entries:
    """The entries of the module being streamed, appended chunk by chunk into storage that grows geometrically.

    Each chunk's entries are copied once, into pages touched once: joining them into fresh tensors per chunk and
    again per module cost more than the copies themselves (fresh pages fault). The storage is sized by extrapolating
    the module's count so far to its whole size. Positions are kept only while some entries go unkeyed (`_Buffer`).
    """

    def __init__(self, module: int, numel: int, device: torch.device, track_pos: bool) -> None:
        self.module, self.numel, self.track_pos = module, numel, track_pos
        self.n = self.keyed = 0
        self.idx = torch.empty(0, dtype=index_dtype(numel), device=device)
        self.vals = torch.empty(0, dtype=torch.float32, device=device)
        self.pos = torch.empty(0, dtype=index_dtype(numel), device=device)
        self.keys = torch.empty(0, dtype=torch.int32, device=device)

    def append(self, pieces: list[window_cpu.Piece], seen: int, shift: int) -> int:
        """Copy a chunk's pieces in (`shift` added to their indices; positions, None from the torch pass when every
        entry is keyed, are kept only when tracked), the C loop's in one C call, the torch pass's with torch ops;
        `seen` is how many of the module's elements have been read. Returns how many entries were added."""
        count, keyed = sum(p[0].numel() for p in pieces), sum(p[3].numel() for p in pieces)
        self.idx, self.vals = (self._room(t, self.n, count, seen) for t in (self.idx, self.vals))
        self.keys = self._room(self.keys, self.keyed, keyed, seen)
        if self.track_pos:
            self.pos = self._room(self.pos, self.keyed, keyed, seen)
        if self.n + count > self.idx.numel() or self.keyed + keyed > self.keys.numel():  # C writes unchecked
            raise RuntimeError(f"a chunk brought more entries than its module has elements ({self.numel})")
        native = window_cpu.library()
        if native is not None and window_cpu.appendable(pieces):
            window_cpu.append(native, pieces, self.idx, self.vals, self.pos if self.track_pos else None, self.keys,
                              self.n, self.keyed, shift)
            self.n, self.keyed = self.n + count, self.keyed + keyed
            return count
        for index, value, pos, key in pieces:
            n, c, kc = self.n, index.numel(), key.numel()
            self.idx[n : n + c].copy_(index)
            if shift:
                self.idx[n : n + c] += shift
            self.vals[n : n + c].copy_(value)
            if self.track_pos:  # then every piece has positions (its `sure` is a real key bound)
                torch.add(pos, n, out=self.pos[self.keyed : self.keyed + kc])
            self.keys[self.keyed : self.keyed + kc].copy_(key)
            self.n, self.keyed = n + c, self.keyed + kc
        return count

    def _room(self, t: torch.Tensor, used: int, more: int, seen: int) -> torch.Tensor:
        if used + more <= t.numel():
            return t
        estimate = int((used + more) * self.numel / max(seen, 1) * 1.05) + 256
        grown = torch.empty(min(max(estimate, t.numel() * 3 // 2, used + more), self.numel), dtype=t.dtype,
                            device=t.device)
        grown[:used].copy_(t[:used])
        return grown

    def part(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The entries as a `_Buffer` part: views of the storage, or copies where over 1/8 of it is slack."""

        def trim(t: torch.Tensor, n: int) -> torch.Tensor:
            return t[:n] if 8 * (t.numel() - n) <= t.numel() else t[:n].clone()

        pos = trim(self.pos, self.keyed) if self.track_pos and self.keyed < self.n else None
        return self.module, trim(self.idx, self.n), trim(self.vals, self.n), pos, trim(self.keys, self.keyed)


class _Buffer:
    """Selected entries in stream order, as parts (module, flat indices, values, keyed positions, keys), the module
    being streamed in `_Entries`.

    Entries whose key reaches `sure` (the top of the sampled window) belong to the core unless the sample misled, so
    only the others keep their key (positions within the part; None: every entry keyed). Keys are 4 bytes per entry
    kept, as much as the values: this keeps the buffer's overhead to the window. Should the exact keys of all
    entries be needed (a cut mid-stream, or more than k sure entries), `rekey(module, indices)` recomputes them.
    """

    def __init__(self, k: int, chunk: int, sure: int | None, rekey: Callable, numels: list[int]) -> None:
        self.k = k
        self.cap = 2 * k + chunk
        self.sure = sure
        self.rekey = rekey
        self.numels = numels
        self.parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.open: _Entries | None = None
        self.size = 0
        self.device = torch.device("cpu")

    def add(self, module: int, pieces: list[window_cpu.Piece], seen: int, shift: int) -> int | None:
        """Append a chunk's pieces (see `_Entries.append`); return a new (inclusive) key floor for later chunks when
        the buffer was cut."""
        if self.open is None or self.open.module != module:
            self.close()
            self.open = _Entries(module, self.numels[module], pieces[0][0].device, self.sure is not None)
        self.size += self.open.append(pieces, seen, shift)
        if self.size <= self.cap:
            return None
        self.close()
        self.key_all()
        kth, above = self.threshold()
        masks = self.keep_masks(kth, above)
        self.parts = [(m, i[keep], v[keep], None, k[keep]) for (m, i, v, _, k), keep in zip(self.parts, masks)]
        self.parts = [p for p in self.parts if p[1].numel()]
        self.size = self.k
        return kth + 1  # later entries lose ties to earlier ones

    def sure_key(self) -> int:
        """The key bound the window loops take as `sure` (past MAX_KEY once every entry is keyed)."""
        return MAX_KEY + 1 if self.sure is None else self.sure

    def close(self) -> None:
        """Move the open module's entries to the parts."""
        if self.open is not None:
            self.parts.append(self.open.part())
            self.open = None

    def key_all(self) -> None:
        """Give every entry its key (and stop sparing them)."""
        if self.sure is not None:
            self.parts = [(m, i, v, None, k if p is None else self.rekey(m, i)) for m, i, v, p, k in self.parts]
            self.sure = None

    def seal(self, module: int) -> None:
        """Close the module and merge its parts into one (more than one only after a cut mid-module): module-sized
        blocks, not chunk-sized scraps, are what the final cut frees and replaces, which the heap can reuse."""
        self.close()
        first = len(self.parts)
        while first and self.parts[first - 1][0] == module:
            first -= 1
        group = self.parts[first:]
        if len(group) < 2:
            return
        sizes = [i.numel() for _, i, _, _, _ in group]
        starts = [0, *itertools.accumulate(sizes)][:-1]
        pos = None
        if any(p is not None for _, _, _, p, _ in group):
            pos = torch.cat([(torch.arange(n, dtype=torch.int32, device=i.device) if p is None else p) + start
                             for (_, i, _, p, _), n, start in zip(group, sizes, starts)])
        merged = (module, *(torch.cat([part[f] for part in group]) for f in (1, 2)), pos,
                  torch.cat([part[4] for part in group]))
        self.parts[first:] = [merged]

    def threshold(self) -> tuple[int, int]:
        """(k-th largest key, number of entries above it) over the buffer, whose size exceeds k."""
        unkeyed = sum(i.numel() - k.numel() for _, i, _, _, k in self.parts)
        if unkeyed >= self.k:  # k entries or more above the window: the sample misled
            self.key_all()
            unkeyed = 0
        keys = [p[4] for p in self.parts]  # the k-th key is among them
        native = window_cpu.library()
        found = window_cpu.kth_largest(native, keys, self.k - unkeyed) if native is not None else None
        if found is None:
            keys = torch.cat(keys)
            kth = int(torch.kthvalue(keys, keys.numel() - (self.k - unkeyed) + 1).values)
            found = kth, int((keys > kth).sum())
        return found[0], unkeyed + found[1]

    def keep_masks(self, kth: int, above: int):
        """Per part, the entries among the first k in (key desc, stream order), given the k-th key."""
        quota = self.k - above
        for _, idx, _, pos, keys in self.parts:
            keep = keys > kth
            if quota > 0:
                ties = keys == kth
                n_ties = int(ties.sum())
                if n_ties > quota:
                    ties &= torch.cumsum(ties, 0) <= quota
                keep |= ties
                quota -= min(n_ties, quota)
            if pos is not None:
                keep = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device).index_put_((pos,), keep)
            yield keep


def _torch_window(
    window_fn: Callable, new: torch.Tensor, old: torch.Tensor, lo: int, hi: int, sure: int, scale: float, offset: int,
    out: torch.Tensor,
) -> tuple[list[window_cpu.Piece], bool]:
    """`window_cpu.window` in torch ops: one piece (int64 indices; positions None where `sure` keys all); `out` is
    room for the chunk's keys."""
    keys = out[: new.numel()]
    bad = bool(window_fn(new, old, key_bound(lo), key_bound(hi), keys))
    keys = keys.view(torch.int32)
    local = keys.nonzero().squeeze(1)
    if not local.numel():
        return [], bad
    vals = new[local].float()
    keys = keys[local]
    pos = (keys < sure).nonzero().squeeze(1).int() if sure <= MAX_KEY else None
    piece = (local + offset, vals * scale if scale != 1.0 else vals, pos, keys if pos is None else keys[pos])
    return [piece], bad


def _stream_pass(
    names: list[str],
    new_deltas: Mapping[str, torch.Tensor],
    old_deltas: Mapping[str, torch.Tensor],
    k: int,
    lo: int,
    hi: int,
    scale: float,
    window_fn: Callable,
    chunk: int,
    shapes: dict[str, tuple[int, ...]],
    sure: int | None = None,
) -> _Buffer:
    """One streaming pass over `names` collecting the top k candidates whose key lies in [lo, hi) (not yet cut).

    Keys from `sure` up are not stored (see `_Buffer`).
    """

    def rekey(module: int, idx: torch.Tensor) -> torch.Tensor:
        new, old = new_deltas[names[module]], old_deltas[names[module]]
        return chunk_keys(gather_flat(new, idx), gather_flat(old, idx))[0]

    buffer = _Buffer(k, chunk, sure, rekey, [math.prod(shapes[n]) for n in names])
    hi = min(hi, MAX_KEY + 1) - 1  # inclusive from here on
    native, window = window_cpu.library(), torch.empty(0)
    # With chunks of two thread parts or more, the C loop scores a chunk while the previous one's entries are stored
    # (two scratches in turn). A chunk's window is collected before the next chunk is taken, for a lazy mapping then
    # reads ahead into the room of the chunk before.
    overlap = native is not None and chunk >= 2 * window_cpu.MIN_PART
    scratches: list[window_cpu.Scratch | None] = [None, None] if overlap else [None]
    turn, settled = 0, -1  # settled: the module of the last entries stored

    def start(rank: int, begin: int, new: torch.Tensor, old: torch.Tensor, base: torch.Tensor | None,
              scratch: int | None = None) -> _Window:
        nonlocal turn, window
        sure_key = buffer.sure_key()
        offset = begin if index_dtype(math.prod(shapes[names[rank]])) == torch.int32 else 0  # the C loop's: int32
        if native is not None and (base is not None or window_cpu.usable(new, old)):
            if scratch is None:
                scratch = turn = (turn + 1) % len(scratches)
            if scratches[scratch] is None or scratches[scratch].index.numel() < new.numel():
                scratches[scratch] = window_cpu.Scratch(max(chunk, new.numel()))
            finish = window_cpu.start_window(native, new, old, lo, hi, sure_key, scale, offset, scratches[scratch],
                                             base, background=overlap)
        else:
            if window.numel() < new.numel() or window.device != new.device:
                window = torch.empty(max(chunk, new.numel()), device=new.device)
            done = _torch_window(window_fn, new, old, lo, hi, sure_key, scale, offset, window)
            finish = lambda: done  # noqa: E731
        return _Window(rank, begin, offset, new, old, base, sure_key, scratch, finish)

    def collect(job: _Window) -> list[window_cpu.Piece]:
        """The chunk's entries, found again if a cut since it started keyed every entry (its keys are then due)."""
        pieces, bad = job.finish()
        if bad:
            raise_nonfinite(names[job.rank])
        if job.sure != buffer.sure_key():
            pieces, _ = start(job.rank, job.begin, job.new, job.old, job.base, job.scratch).finish()
        return pieces

    def store(job: _Window, pieces: list[window_cpu.Piece]) -> None:
        nonlocal lo, settled
        if settled not in (-1, job.rank):
            buffer.seal(settled)
        settled = job.rank
        if k and pieces:
            floor = buffer.add(job.rank, pieces, job.begin + job.new.numel(), job.begin - job.offset)
            if floor is not None:
                lo = max(lo, floor)

    pending = None  # a collected chunk whose entries are stored while the next one is scored
    for rank, name in enumerate(names):
        for begin, new_chunk, old_chunk in iter_delta_chunks(new_deltas, old_deltas, name, shapes[name], chunk):
            new_chunk, old_chunk, base = chunk_pair(name, new_chunk, old_chunk, native is not None)
            buffer.device = new_chunk.device
            job = start(rank, begin, new_chunk, old_chunk, base)
            if not overlap:
                store(job, collect(job))
                continue
            try:
                if pending is not None:
                    store(*pending)
            except BaseException:  # no thread may still read a chunk or write a scratch once this returns
                job.finish()
                raise
            pending = job, collect(job)
    if pending is not None:
        store(*pending)
    if settled != -1:
        buffer.seal(settled)
    return buffer


class _Window(NamedTuple):
    """A chunk whose window is being found: what `collect` needs to redo it and `store` to store its entries."""

    rank: int
    begin: int
    offset: int
    new: torch.Tensor
    old: torch.Tensor
    base: torch.Tensor | None
    sure: int
    scratch: int | None
    finish: Callable[[], tuple[list[window_cpu.Piece], bool]]


def worth_sampling(numel: int) -> bool:
    """Whether a scope is large enough for a sampled threshold to pay off."""
    return numel > 4 * SAMPLE


def sample_keys(
    names: list[str], new_deltas: Mapping[str, torch.Tensor], old_deltas: Mapping[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
) -> torch.Tensor:
    """Keys of `sample_size` elements of the scope in runs of RUN consecutive elements at uniformly drawn positions
    (fixed seed), on the CPU: a (runs, RUN) int32 tensor, -1 past the end of a module.

    Runs rather than single elements: a lazy mapping (a checkpoint, LoRA factors) reads a few rows per run instead of
    whole modules. Whatever the sample, the result is exact; a sample that misleads costs a second pass.
    """
    gen = torch.Generator().manual_seed(0)
    sizes = [math.prod(shapes[n]) for n in names]
    total = sum(sizes)
    ranged = range_readable(new_deltas) or range_readable(old_deltas)
    starts = torch.randint(0, total, (max(1, sample_size(total, ranged) // RUN),), generator=gen).sort().values
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    runs = torch.full((starts.numel(), RUN), -1, dtype=torch.int32)
    row = 0
    for i, name in enumerate(names):
        lo, hi = int(torch.searchsorted(starts, bounds[i])), int(torch.searchsorted(starts, bounds[i + 1]))
        if hi == lo:
            continue
        local = starts[lo:hi] - bounds[i]
        if not ranged:  # in-memory tensors: every run of the module in one gather (one device sync, not one per run)
            new, old = new_deltas[name], old_deltas[name]
            positions = local[:, None] + torch.arange(RUN)
            inside = positions < sizes[i]
            flat = positions.clamp_(max=sizes[i] - 1).reshape(-1).to(new.device)
            keys = chunk_keys(gather_flat(new, flat), gather_flat(old, flat))[0].cpu().view(-1, RUN)
            runs[row : row + hi - lo] = torch.where(inside, keys, -1)
            row += hi - lo
            continue
        new, old = (torch.zeros(hi - lo, RUN) for _ in range(2))  # the module's runs, keyed in one go
        lengths = (sizes[i] - local).clamp_(max=RUN)
        for j, (start, length) in enumerate(zip(local.tolist(), lengths.tolist())):
            new[j, :length] = read_range(new_deltas, name, start, length)
            old[j, :length] = read_range(old_deltas, name, start, length)
        keys = chunk_keys(new, old)[0]
        runs[row : row + hi - lo] = torch.where(torch.arange(RUN) < lengths[:, None], keys, -1)
        row += hi - lo
    return runs


def sample_size(total: int, lazy: bool) -> int:
    """Elements to sample from a scope of `total`: SAMPLE from a lazy mapping, else up to SAMPLE_MAX (1/512 of the
    scope), which narrows the window by half and with it the entries kept near the threshold."""
    return SAMPLE if lazy else max(SAMPLE, min(SAMPLE_MAX, total >> 9))


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


def sampled_window(sample: torch.Tensor, k: int, total: int, z: float = 4.0) -> tuple[int, int]:
    """A key window [lo, hi) that holds the scope's k-th largest key with high probability.

    `sample` holds runs of keys (`sample_keys`). The fraction of the scope whose key is ≥ t is estimated as a ratio
    over the runs, with its standard error taken from the spread between runs: the elements of a run share a module
    and rows, so they vary together (deltas differ in scale between modules and rows), and counting them as
    independent draws would make the window too narrow. `lo` is the largest key whose estimate minus z standard
    errors (and 8 elements) still reaches k/total, `hi` one past the largest whose estimate plus that margin does;
    `lo` is 1 (every candidate) where the sample cannot bound that side, `hi` past MAX_KEY (no upper cut) where the
    upper estimate reaches the target at every key, and `hi` ≥ lo + 1 always (a sample without candidates gives
    [1, 2)). Each estimate counts a run's keys by binary search in the run, sorted once; the bisection assumes the
    estimates fall along the keys, and the result is exact whatever window it returns.
    """
    rows = sample.sort(dim=1).values  # absent elements (-1) first
    sizes = (sample >= 0).sum(1, dtype=torch.float64)
    runs, elements = rows.shape[0], float(sizes.sum())
    if not elements:  # no element sampled: no window
        return 1, MAX_KEY + 1
    target = k / total
    probe = torch.empty(runs, 1, dtype=rows.dtype)

    def estimate(t: int, sign: float) -> float:
        counts = (rows.shape[1] - torch.searchsorted(rows, probe.fill_(t))).squeeze(1).double()
        p = float(counts.sum()) / elements
        spread = float(((counts - p * sizes) ** 2).sum()) * runs / max(runs - 1, 1)
        return p + sign * (z * math.sqrt(spread) / elements + 8 / elements)

    lo = last_true(lambda t: estimate(t, -1.0) >= target, 1, MAX_KEY)
    hi = last_true(lambda t: estimate(t, 1.0) >= target, 1, MAX_KEY)
    lo_key = 1 if lo is None else lo
    hi_key = 1 if hi is None else hi + 1
    return lo_key, max(hi_key, lo_key + 1)


def last_true(holds: Callable[[int], bool], first: int, last: int) -> int | None:
    """The largest integer in [first, last] where `holds` is true, for a predicate true up to some point (None:
    nowhere)."""
    found = None
    while first <= last:
        mid = (first + last) // 2
        if holds(mid):
            found, first = mid, mid + 1
        else:
            last = mid - 1
    return found


def delta_shapes(names: list[str], deltas: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes of a lazy mapping: it may expose `shape_of(name)` to avoid computing a delta just for its shape."""
    shape_of = getattr(deltas, "shape_of", None)
    return {n: tuple(shape_of(n)) if shape_of else tuple(deltas[n].shape) for n in names}


def _compact(keep: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, step: int = 1 << 18) -> int:
    """Move the kept entries of `idx` and `vals` to their front, in place (one C loop on the CPU; otherwise in slices,
    so temporaries stay small: writes never overtake reads); return how many were kept."""
    native = window_cpu.library()
    if native is not None and window_cpu.compactable(keep, idx, vals):
        return window_cpu.compact(native, keep, idx, vals)
    out = 0
    for start in range(0, keep.numel(), step):
        mask = keep[start : start + step]
        n = int(mask.sum())
        for t in (idx, vals):
            t[out : out + n] = t[start : start + step][mask]
        out += n
    return out


def _select_scope(
    names: list[str], new_deltas: Mapping[str, torch.Tensor], old_deltas: Mapping[str, torch.Tensor], k: int,
    scale: float, sample: bool, window_fn: Callable, chunk: int, shapes: dict[str, tuple[int, ...]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    total = sum(math.prod(shapes[n]) for n in names)
    lo, hi = 1, None
    if sample and k and worth_sampling(total):
        lo, hi = sampled_window(sample_keys(names, new_deltas, old_deltas, shapes), k, total)
    stream = functools.partial(_stream_pass, names, new_deltas, old_deltas, scale=scale, window_fn=window_fn,
                               chunk=chunk, shapes=shapes)
    buffers = [stream(k, lo, MAX_KEY + 1, sure=hi if hi is not None and hi <= MAX_KEY else None)]
    if buffers[0].size < k and lo > 1:  # the sampled floor was too high: fetch the best of the rest
        buffers.append(stream(k - buffers[0].size, 1, lo))
    # The exact cut, one sealed (module-sized) part at a time, compacted in place: allocating the outputs anew would
    # leave the parts' memory as heap holes and nearly double the peak. The cut entries' room stays as slack unless
    # it is large (a misled sample).
    result: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {n: ([], []) for n in names}
    for buffer in buffers:
        masks = buffer.keep_masks(*buffer.threshold()) if buffer.size > buffer.k else itertools.repeat(None)
        parts = buffer.parts
        for j, keep in zip(range(len(parts)), masks):
            module, idx, vals, _, _ = parts[j]
            parts[j] = None
            if keep is not None:
                n = _compact(keep, idx, vals)
                idx, vals = (idx[:n], vals[:n]) if 8 * n >= 7 * idx.numel() else (idx[:n].clone(), vals[:n].clone())
            result[names[module]][0].append(idx)
            result[names[module]][1].append(vals)
            del idx, vals
    device = buffers[0].device
    out = {}
    for name, (idx, vals) in result.items():
        if not idx:
            out[name] = (torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, device=device))
        elif len(idx) == 1:
            out[name] = (idx[0], vals[0])
        else:  # second-pass entries come after the first pass's: merge by index
            idx, order = torch.cat(idx).sort()
            out[name] = (idx, torch.cat(vals)[order])
    return out


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
    # Lazy mappings (deltas computed on access) are read once per pass, and sampled only through `read_range`.
    sample = samplable(new_deltas) and samplable(old_deltas)
    shapes = delta_shapes(names, new_deltas)
    total = sum(math.prod(s) for s in shapes.values())
    # The compiled C loop takes every CPU chunk when it can be built; the torch pass is then only for other devices.
    window_fn = chunk_window if window_cpu.library() is not None else _window_fn(total)
    chunk = min(CHUNK, max(MIN_CHUNK, total // 128))  # chunk temporaries stay a small fraction of the deltas
    if selection == "global":
        picked = _select_scope(names, new_deltas, old_deltas, core_size(top_t, total), scale, sample, window_fn,
                               chunk, shapes)
    else:
        picked = {}
        for name in names:
            k = core_size(top_t, math.prod(shapes[name]))
            picked.update(_select_scope([name], new_deltas, old_deltas, k, scale, sample, window_fn, chunk, shapes))
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
