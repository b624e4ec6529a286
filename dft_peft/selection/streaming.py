"""The streaming engine of the CPU selection path: the exact core of one scope, reading each delta once in chunks.

One fused pass per chunk computes the keys and compares them with a key window — the C loop of `window_cpu` where it
is built and takes the chunk, else `window_torch` — and only the elements that pass are appended to a buffer, which
is cut to the exact top k of the prefix seen so far whenever it exceeds ~2k entries (streaming top-k; the k-th key
then raises the window's floor). The floor starts at the low end of a key window estimated from a small random sample
(`sampling`), so the buffer holds little more than the core and rarely needs cutting; entries above the window are
kept without their keys, and the final cut ranks only the keys inside the window and compacts each module's entries
in place. If the estimate was too high, a second pass fetches the rest. The C loop scores each large chunk on the
pool's threads while the previous chunk's entries are stored. Peak extra memory is the window's keys, one module's
entries, the sample and O(chunk), never a copy of the scores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import torch

from ..format.sparse import SparseDelta, index_dtype
from ..kernels import window_cpu
from ..kernels.window_cpu import Kept, Piece
from ..kernels.window_torch import window_torch
from .chunks import gather_flat, iter_delta_chunks
from .lazy import Terms
from .rule import MAX_KEY, check_pair, chunk_keys, raise_nonfinite
from .sampling import sample_keys, sampled_window, worth_sampling


class Part(NamedTuple):
    """Buffered entries of one module, in stream order."""

    module: int  # the module's rank in the scope's sorted names
    index: torch.Tensor  # (n,) flat indices
    value: torch.Tensor  # (n,) float32 values
    pos: torch.Tensor | None  # (m,) positions of the keyed entries in `index`; None: every entry keyed (m = n)
    key: torch.Tensor  # (m,) int32 keys of the keyed entries


class Selected(NamedTuple):
    """A part's entries that made the cut."""

    index: torch.Tensor  # (n,) flat indices, ascending
    value: torch.Tensor  # (n,) float32 values


class ModuleEntries:
    """The entries of the module being streamed, appended chunk by chunk into storage that grows geometrically.

    Each chunk's entries are copied once, into pages touched once: joining them into fresh tensors per chunk and
    again per module cost more than the copies themselves (fresh pages fault). The storage is sized by extrapolating
    the module's count so far to its whole size. Positions are kept only while some entries go unkeyed (`Buffer`).
    """

    def __init__(self, module: int, numel: int, device: torch.device, track_pos: bool) -> None:
        self.module, self.numel, self.track_pos = module, numel, track_pos
        self.n = self.keyed = 0
        self.index = torch.empty(0, dtype=index_dtype(numel), device=device)
        self.value = torch.empty(0, dtype=torch.float32, device=device)
        self.pos = torch.empty(0, dtype=index_dtype(numel), device=device)
        self.key = torch.empty(0, dtype=torch.int32, device=device)

    def append(self, pieces: list[Piece], seen: int, shift: int) -> int:
        """Copy a chunk's pieces in (`shift` added to their indices; positions kept only when tracked), the C loop's
        in one C call, the torch pass's with torch ops; `seen` is how many of the module's elements have been read.
        Returns how many entries were added."""
        count, keyed = sum(len(p.index) for p in pieces), sum(len(p.key) for p in pieces)
        self.index, self.value = (self._room(t, self.n, count, seen) for t in (self.index, self.value))
        self.key = self._room(self.key, self.keyed, keyed, seen)
        if self.track_pos:
            self.pos = self._room(self.pos, self.keyed, keyed, seen)
        native = window_cpu.library()
        if native is not None and window_cpu.appendable(pieces):
            window_cpu.append(native, pieces, self.index, self.value, self.pos if self.track_pos else None, self.key,
                              self.n, self.keyed, shift)
            self.n, self.keyed = self.n + count, self.keyed + keyed
            return count
        for piece in pieces:
            n, c, kc = self.n, len(piece.index), len(piece.key)
            self.index[n : n + c].copy_(piece.index)
            if shift:
                self.index[n : n + c] += shift
            self.value[n : n + c].copy_(piece.value)
            if self.track_pos:  # then every piece has positions (its `sure` is a real key bound)
                torch.add(piece.pos, n, out=self.pos[self.keyed : self.keyed + kc])
            self.key[self.keyed : self.keyed + kc].copy_(piece.key)
            self.n, self.keyed = n + c, self.keyed + kc
        return count

    def _room(self, t: torch.Tensor, used: int, more: int, seen: int) -> torch.Tensor:
        """`t`, or a larger copy of its first `used` entries where `more` do not fit; never past the module's size."""
        if used + more <= t.numel():
            return t
        estimate = int((used + more) * self.numel / max(seen, 1) * 1.05) + 256
        grown = torch.empty(min(max(estimate, t.numel() * 3 // 2, used + more), self.numel), dtype=t.dtype,
                            device=t.device)
        grown[:used].copy_(t[:used])
        return grown

    def part(self) -> Part:
        """The entries as a `Buffer` part: views of the storage, or copies where over 1/8 of it is slack."""

        def trim(t: torch.Tensor, n: int) -> torch.Tensor:
            return t[:n] if 8 * (t.numel() - n) <= t.numel() else t[:n].clone()

        pos = trim(self.pos, self.keyed) if self.track_pos and self.keyed < self.n else None
        return Part(self.module, trim(self.index, self.n), trim(self.value, self.n), pos, trim(self.key, self.keyed))


class Buffer:
    """Selected entries in stream order, as `Part`s, the module being streamed in `ModuleEntries`.

    Entries whose key reaches `sure` (the top of the sampled window) belong to the core unless the sample misled, so
    only the others keep their key. Keys are 4 bytes per entry kept, as much as the values: this keeps the buffer's
    overhead to the window. Should the exact keys of all entries be needed (a cut mid-stream, or more than k sure
    entries), `rekey(module, indices)` recomputes them.
    """

    def __init__(self, k: int, chunk: int, sure: int | None, rekey: Callable[[int, torch.Tensor], torch.Tensor],
                 numels: list[int]) -> None:
        self.k = k
        self.cap = 2 * k + chunk
        self.sure = sure
        self.rekey = rekey
        self.numels = numels
        self.parts: list[Part] = []
        self.open: ModuleEntries | None = None
        self.size = 0
        self.device = torch.device("cpu")

    def add(self, module: int, pieces: list[Piece], seen: int, shift: int) -> int | None:
        """Append a chunk's pieces (see `ModuleEntries.append`); return a new (inclusive) key floor for later chunks
        when the buffer was cut."""
        if self.open is None or self.open.module != module:
            self.close()
            self.open = ModuleEntries(module, self.numels[module], pieces[0].index.device, self.sure is not None)
        self.size += self.open.append(pieces, seen, shift)
        if self.size <= self.cap:
            return None
        self.close()
        self.key_all()
        kth, above = self.threshold()
        masks = self.keep_masks(kth, above)
        self.parts = [Part(p.module, p.index[keep], p.value[keep], None, p.key[keep])
                      for p, keep in zip(self.parts, masks)]
        self.parts = [p for p in self.parts if p.index.numel()]
        self.size = self.k
        return kth + 1  # later entries lose ties to earlier ones

    def sure_key(self) -> int:
        """The key bound the window passes take as `sure` (past MAX_KEY once every entry is keyed)."""
        return MAX_KEY + 1 if self.sure is None else self.sure

    def close(self) -> None:
        """Move the open module's entries to the parts."""
        if self.open is not None:
            self.parts.append(self.open.part())
            self.open = None

    def key_all(self) -> None:
        """Give every entry its key (and stop sparing them)."""
        if self.sure is not None:
            self.parts = [p if p.pos is None else p._replace(pos=None, key=self.rekey(p.module, p.index))
                          for p in self.parts]
            self.sure = None

    def seal(self, module: int) -> None:
        """Close the module and merge its parts into one (more than one only after a cut mid-module): module-sized
        blocks, not chunk-sized scraps, are what the final cut frees and replaces, which the heap can reuse."""
        self.close()
        first = len(self.parts)
        while first and self.parts[first - 1].module == module:
            first -= 1
        group = self.parts[first:]
        if len(group) < 2:
            return
        sizes = [p.index.numel() for p in group]
        starts = [0, *itertools.accumulate(sizes)][:-1]
        pos = None
        if any(p.pos is not None for p in group):
            pos = torch.cat([(torch.arange(n, dtype=torch.int32, device=p.index.device) if p.pos is None else p.pos)
                             + start for p, n, start in zip(group, sizes, starts)])
        self.parts[first:] = [Part(module, torch.cat([p.index for p in group]), torch.cat([p.value for p in group]),
                                   pos, torch.cat([p.key for p in group]))]

    def threshold(self) -> tuple[int, int]:
        """(k-th largest key, number of entries above it) over the buffer, whose size exceeds k."""
        unkeyed = sum(p.index.numel() - p.key.numel() for p in self.parts)
        if unkeyed >= self.k:  # k entries or more above the window: the sample misled
            self.key_all()
            unkeyed = 0
        keys = [p.key for p in self.parts]  # the k-th key is among them
        native = window_cpu.library()
        found = window_cpu.kth_largest(native, keys, self.k - unkeyed) if native is not None else None
        if found is None:
            keys = torch.cat(keys)
            kth = int(torch.kthvalue(keys, keys.numel() - (self.k - unkeyed) + 1).values)
            found = kth, int((keys > kth).sum())
        return found[0], unkeyed + found[1]

    def keep_masks(self, kth: int, above: int) -> Iterator[torch.Tensor]:
        """Per part, the entries among the first k in (key desc, stream order), given the k-th key."""
        quota = self.k - above
        for p in self.parts:
            keep = p.key > kth
            if quota > 0:
                ties = p.key == kth
                n_ties = int(ties.sum())
                if n_ties > quota:
                    ties &= torch.cumsum(ties, 0) <= quota
                keep |= ties
                quota -= min(n_ties, quota)
            if p.pos is not None:
                keep = torch.ones(p.index.numel(), dtype=torch.bool, device=p.index.device).index_put_((p.pos,), keep)
            yield keep


class Job(NamedTuple):
    """A chunk whose window is being found: what `StreamPass.collect` needs to redo it and `store` to store it."""

    rank: int  # the module's rank in the scope
    begin: int  # the chunk's flat offset in the module
    offset: int  # added to the chunk's indices by the window pass (0 where the module's indices need int64)
    new: torch.Tensor
    old: torch.Tensor
    base: torch.Tensor | None  # the checkpoints' base where `new` and `old` are fine-tuned weights (C terms loop)
    sure: int  # the buffer's `sure_key()` when the chunk was started
    scratch: int | None  # the C loop's scratch in use; None: the torch pass
    finish: Callable[[], Kept]


class StreamPass:
    """One streaming pass over a scope's modules collecting the top k candidates whose key lies in [lo, hi): `run()`
    returns the `Buffer` (not yet cut to k). Keys from `sure` up are not stored (see `Buffer`).

    With chunks of two thread parts or more, the C loop scores a chunk while the previous one's entries are stored
    (two scratches in turn). A chunk's window is collected before the next chunk is taken, so a lazy mapping may read
    ahead into the room of the chunk before.
    """

    def __init__(self, names: list[str], new_deltas: Mapping[str, torch.Tensor],
                 old_deltas: Mapping[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], k: int, lo: int, hi: int,
                 scale: float, chunk: int, sure: int | None = None) -> None:
        self.names, self.new_deltas, self.old_deltas, self.shapes = names, new_deltas, old_deltas, shapes
        self.k, self.scale, self.chunk = k, scale, chunk
        self.lo, self.hi = lo, min(hi, MAX_KEY + 1) - 1  # inclusive bounds of the window passes
        self.buffer = Buffer(k, chunk, sure, self.rekey, [math.prod(shapes[n]) for n in names])
        self.native = window_cpu.library()
        self.overlap = self.native is not None and chunk >= 2 * window_cpu.MIN_PART
        self.scratches: list[window_cpu.Scratch | None] = [None, None] if self.overlap else [None]
        self.turn = 0  # the scratch the last chunk took
        self.settled = -1  # the module of the last entries stored

    def rekey(self, module: int, index: torch.Tensor) -> torch.Tensor:
        """The keys of a module's entries at flat indices `index`, recomputed from the deltas."""
        new, old = self.new_deltas[self.names[module]], self.old_deltas[self.names[module]]
        return chunk_keys(gather_flat(new, index), gather_flat(old, index))[0]

    def run(self) -> Buffer:
        """Stream every chunk of the scope once (each checked for NaN/inf) and return the buffer of its entries."""
        pending: tuple[Job, list[Piece]] | None = None  # a collected chunk, stored while the next one is scored
        for rank, name in enumerate(self.names):
            for begin, new, old in iter_delta_chunks(self.new_deltas, self.old_deltas, name, self.shapes[name],
                                                     self.chunk):
                new, old, base = self.chunk_operands(name, new, old)
                self.buffer.device = new.device
                job = self.start(rank, begin, new, old, base)
                if not self.overlap:
                    self.store(job, self.collect(job))
                    continue
                try:
                    if pending is not None:
                        self.store(*pending)
                except BaseException:  # no thread may still read a chunk or write a scratch once this returns
                    job.finish()
                    raise
                pending = job, self.collect(job)
        if pending is not None:
            self.store(*pending)
        if self.settled != -1:
            self.buffer.seal(self.settled)
        return self.buffer

    def chunk_operands(
        self, name: str, new: torch.Tensor | Terms, old: torch.Tensor | Terms
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(Δnew or new weights, Δold or old weights, base or None) for one chunk: `Terms` that share their base go
        to the C `terms` loop as they are, other `Terms` become deltas here (and are checked with `check_pair`)."""
        if not isinstance(new, Terms):  # `iter_delta_chunks` gives Terms for both or for neither
            return new, old, None
        base = new.base
        if (self.native is not None and old.base.data_ptr() == base.data_ptr() and old.base.dtype == base.dtype
                and window_cpu.usable_terms(new.tuned, old.tuned, base)):
            return new.tuned, old.tuned, base
        new, old = new.delta(), old.delta()
        check_pair(name, new, old)
        return new, old, None

    def start(self, rank: int, begin: int, new: torch.Tensor, old: torch.Tensor, base: torch.Tensor | None,
              scratch: int | None = None) -> Job:
        """Start finding a chunk's window: on the pool's threads (C loop), or done at once (torch pass)."""
        sure = self.buffer.sure_key()
        offset = begin if index_dtype(math.prod(self.shapes[self.names[rank]])) == torch.int32 else 0  # C: int32
        if self.native is None or (base is None and not window_cpu.usable(new, old)):
            done = window_torch(new, old, self.lo, self.hi, sure, self.scale, offset)
            return Job(rank, begin, offset, new, old, base, sure, None, lambda: done)
        if scratch is None:
            scratch = self.turn = (self.turn + 1) % len(self.scratches)
        room = self.scratches[scratch]
        if room is None or room.capacity < new.numel():
            room = self.scratches[scratch] = window_cpu.Scratch(max(self.chunk, new.numel()))
        finish = window_cpu.start_window(self.native, new, old, self.lo, self.hi, sure, self.scale, offset, room,
                                         base, background=self.overlap)
        return Job(rank, begin, offset, new, old, base, sure, scratch, finish)

    def collect(self, job: Job) -> list[Piece]:
        """The chunk's entries, found again if a cut since it started keyed every entry (its keys are then due)."""
        kept = job.finish()
        if kept.nonfinite:
            raise_nonfinite(self.names[job.rank])
        if job.sure != self.buffer.sure_key():
            return self.start(job.rank, job.begin, job.new, job.old, job.base, job.scratch).finish().pieces
        return kept.pieces

    def store(self, job: Job, pieces: list[Piece]) -> None:
        """Append a chunk's entries to the buffer, sealing the previous module's; a cut raises the window's floor."""
        if self.settled not in (-1, job.rank):
            self.buffer.seal(self.settled)
        self.settled = job.rank
        if self.k and pieces:
            floor = self.buffer.add(job.rank, pieces, job.begin + job.new.numel(), job.begin - job.offset)
            if floor is not None:
                self.lo = max(self.lo, floor)


def compact(keep: torch.Tensor, index: torch.Tensor, value: torch.Tensor, step: int = 1 << 18) -> int:
    """Move the kept entries of `index` and `value` to their front, in place (one C loop on the CPU; otherwise in
    slices, so temporaries stay small: writes never overtake reads); return how many were kept."""
    native = window_cpu.library()
    if native is not None and window_cpu.compactable(keep, index, value):
        return window_cpu.compact(native, keep, index, value)
    out = 0
    for start in range(0, keep.numel(), step):
        mask = keep[start : start + step]
        n = int(mask.sum())
        for t in (index, value):
            t[out : out + n] = t[start : start + step][mask]
        out += n
    return out


def select_scope(
    names: list[str], new_deltas: Mapping[str, torch.Tensor], old_deltas: Mapping[str, torch.Tensor], k: int,
    scale: float, sample: bool, chunk: int, shapes: dict[str, tuple[int, ...]],
) -> dict[str, SparseDelta]:
    """The core of one scope (its k best candidates, see `rule`): a sampled window (when `sample`), one streaming
    pass, a second one where the sampled floor was too high, and the exact cut."""
    total = sum(math.prod(shapes[n]) for n in names)
    lo, hi = 1, None
    if sample and k and worth_sampling(total):
        lo, hi = sampled_window(sample_keys(names, new_deltas, old_deltas, shapes), k, total)
    sure = hi if hi is not None and hi <= MAX_KEY else None
    buffers = [StreamPass(names, new_deltas, old_deltas, shapes, k, lo, MAX_KEY + 1, scale, chunk, sure).run()]
    if buffers[0].size < k and lo > 1:  # the sampled floor was too high: fetch the best of the rest
        rest = k - buffers[0].size
        buffers.append(StreamPass(names, new_deltas, old_deltas, shapes, rest, 1, lo, scale, chunk).run())
    # The exact cut, one sealed (module-sized) part at a time, compacted in place: allocating the outputs anew would
    # leave the parts' memory as heap holes and nearly double the peak. The cut entries' room stays as slack unless
    # it is large (a misled sample).
    found: dict[str, list[Selected]] = {n: [] for n in names}
    for buffer in buffers:
        masks = buffer.keep_masks(*buffer.threshold()) if buffer.size > buffer.k else itertools.repeat(None)
        parts = buffer.parts
        for j, keep in zip(range(len(parts)), masks):
            part, parts[j] = parts[j], None
            index, value = part.index, part.value
            if keep is not None:
                n = compact(keep, index, value)
                trim = 8 * n >= 7 * index.numel()
                index, value = (index[:n], value[:n]) if trim else (index[:n].clone(), value[:n].clone())
            found[names[part.module]].append(Selected(index, value))
            del part, index, value
    device = buffers[0].device
    core = {}
    for name, parts in found.items():
        if len(parts) > 1:  # second-pass entries come after the first pass's: merge by index
            index, order = torch.cat([p.index for p in parts]).sort()
            value = torch.cat([p.value for p in parts])[order]
        elif parts:
            index, value = parts[0]
        else:
            index, value = torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, device=device)
        core[name] = SparseDelta(index.to(index_dtype(math.prod(shapes[name]))), value, shapes[name])
    return core
