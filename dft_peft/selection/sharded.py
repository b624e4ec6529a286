"""Core selection when no rank holds the whole model: a radix select over the keys, across a process group.

Each rank holds some modules whole (tensor/pipeline placement) and flat slices of others (FSDP-style flat sharding,
unevenly cut; a rank may hold nothing). The result equals `select_core` on the whole deltas bit for bit (the rule is
in `dft_peft.selection.rule`), while no rank ever materialises more than one chunk's keys:

1. every rank streams its shards in chunks and counts its candidates per key bin (key >> 16); the counts are
   `all_reduce`d, so every rank knows the bin holding the k-th largest key and how many keys lie above it;
2. unless that bin is taken whole, a second pass counts the low 16 bits of the keys inside it: every rank now knows
   the exact threshold key t and how many of the ties at t the core takes;
3. a last pass collects the rank's entries above t and its ties; ties go to the module whose name sorts first, then
   to the lowest flat index, so the ranks `all_gather` their tie counts per module slice and each takes exactly the
   ties that precede the quota in that global order.

The collectives are plain torch ops and work with gloo on CPU and NCCL on CUDA; on CUDA the Triton histogram
kernels could replace the torch histograms (`bincount`) of passes 1 and 2 without changing anything else.
"""

from __future__ import annotations

import math
import operator
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..format.sparse import SparseDelta, index_dtype
from ..kernels.select_core_torch import CHUNK
from .chunks import iter_chunk_pairs
from .rule import MAX_KEY, check_deltas, check_pair, check_selection_args, chunk_keys, core_size, raise_nonfinite

LOW_BITS = 16
HIGH_BINS = (MAX_KEY >> LOW_BITS) + 1
LOW_BINS = 1 << LOW_BITS


@dataclass(frozen=True)
class Shard:
    """A flat slice of a module: the row-major elements of `tensor` (any shape; FSDP's flat parameters are 1-D, a
    dim-0 shard is a block of rows) are the module's flat elements `offset`, `offset + 1`, …"""

    tensor: torch.Tensor
    offset: int


@dataclass(frozen=True)
class _Piece:
    """What this rank holds of one module: Δnew and Δold over the flat range starting at `offset`."""

    index: int  # the module's position in the sorted names: the tie-break order
    name: str
    new: torch.Tensor
    old: torch.Tensor
    offset: int


def _collective_device(process_group: dist.ProcessGroup | None) -> torch.device:
    """NCCL communicates CUDA tensors, gloo CPU ones."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """The ranks' tensors (equal shapes) stacked along a new first dimension, on the CPU."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, tensor, group=process_group)
    return torch.stack(parts).cpu()


def sum_over_ranks(counts: Sequence[int], process_group: dist.ProcessGroup | None) -> list[int]:
    """Each count summed over the ranks of the group (exact: int64)."""
    total = torch.tensor(list(counts), dtype=torch.int64, device=_collective_device(process_group))
    dist.all_reduce(total, group=process_group)
    return total.tolist()


def _module_shapes(numels: Mapping[str, int | Sequence[int]]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, size in numels.items():
        try:
            shape = tuple(map(operator.index, size)) if isinstance(size, Sequence) else (operator.index(size),)
        except TypeError:
            shape = (-1,)
        if any(s < 0 for s in shape):
            raise ValueError(f"numels[{name!r}] must be a number of elements or a shape, got {size!r}")
        shapes[name] = shape
    return shapes


def _local_pieces(
    new_shards: Mapping[str, torch.Tensor | Shard],
    old_shards: Mapping[str, torch.Tensor | Shard],
    shapes: Mapping[str, tuple[int, ...]],
) -> list[_Piece]:
    """Check this rank's shards against each other and `numels`; return them in the tie-break (name) order."""
    check_deltas(new_shards, old_shards)
    order = {name: i for i, name in enumerate(sorted(shapes))}
    pieces = []
    for name in sorted(new_shards):
        if name not in shapes:
            raise ValueError(f"module {name!r} is not in numels, which must list every module in scope")
        pair = (new_shards[name], old_shards[name])
        new, old = (s.tensor if isinstance(s, Shard) else s for s in pair)
        check_pair(name, new, old)
        numel = math.prod(shapes[name])
        if not isinstance(pair[0], Shard) and new.numel() != numel:
            raise ValueError(f"module {name!r}: a plain tensor must hold the whole module ({numel} elements), this "
                             f"one has {new.numel()}; pass a slice as Shard(tensor, offset)")
        offset, old_offset = (s.offset if isinstance(s, Shard) else 0 for s in pair)
        if offset != old_offset:
            raise ValueError(f"module {name!r}: the Δnew and Δold shards start at different offsets "
                             f"({offset!r} and {old_offset!r})")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + new.numel() > numel:
            raise ValueError(f"module {name!r}: a shard of {new.numel()} elements at offset {offset!r} does not fit "
                             f"in the module's {numel}")
        pieces.append(_Piece(order[name], name, new, old, offset))
    return pieces


def _check_layout(layouts: torch.Tensor, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Check that the ranks' slices of each module, (offset, length) per rank and module, tile it exactly."""
    for i, name in enumerate(sorted(shapes)):
        covered = 0
        for offset, length in sorted((o, n) for o, n in layouts[:, i].tolist() if n):
            if offset != covered:
                problem = "overlap" if offset < covered else "leave a gap"
                raise ValueError(f"module {name!r}: the ranks' shards {problem} at flat index {min(offset, covered)}")
            covered += length
        if covered != math.prod(shapes[name]):
            raise ValueError(f"module {name!r}: the ranks' shards cover {covered} of its "
                             f"{math.prod(shapes[name])} elements")


def _agree(
    fingerprint: int, error: Exception | None, process_group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """Raise on every rank if any rank's arguments are invalid or differ from the others' (rather than let the
    others wait forever in the next collective)."""
    status = _all_gather(torch.tensor([fingerprint, int(error is not None)], device=device), process_group)
    failed = status[:, 1].nonzero().squeeze(1).tolist()
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"select_core_sharded: invalid arguments on rank(s) {failed} (see the error raised there)")
    if status[:, 0].unique().numel() > 1:
        raise ValueError(f"select_core_sharded: the ranks pass different numels, top_t or selection "
                         f"(fingerprints {status[:, 0].tolist()})")


def _rank_of(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """(the bin holding the `rank`-th largest element, 1 ≤ rank ≤ counts.sum(); how many elements lie above it)."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    b = int((at_or_above >= rank).sum()) - 1
    return b, int(at_or_above[b] - counts[b])


def _threshold(
    pieces: list[_Piece], scope: list[str], k: int, chunk: int, process_group: dist.ProcessGroup | None,
    device: torch.device,
) -> tuple[int, int] | None:
    """Passes 1 and 2 over a scope: (floor, quota) such that the core is every key above `floor` plus the first
    `quota` keys equal to it in the tie-break order (quota 0: every key ≥ floor); None for an empty core."""
    hist = torch.zeros(HIGH_BINS + len(scope), dtype=torch.int64, device=device)  # + a NaN/inf flag per module
    for piece in pieces:
        nonfinite = torch.zeros((), dtype=torch.bool, device=piece.new.device)
        for _, new, old in iter_chunk_pairs(piece.new, piece.old, chunk):
            keys, bad = chunk_keys(new, old)
            nonfinite |= bad  # accumulated, not synchronised per chunk
            hist[:HIGH_BINS] += torch.bincount(keys >> LOW_BITS, minlength=HIGH_BINS).to(device)
        hist[HIGH_BINS + scope.index(piece.name)] = nonfinite.to(device)
    dist.all_reduce(hist, group=process_group)
    bad = hist[HIGH_BINS:].nonzero()
    if bad.numel():
        raise_nonfinite(scope[int(bad[0])])
    # Candidates' scores are ≥ 2·FLT_MIN, whose key is 0x01000000: bin 0 holds exactly the non-candidates (key 0).
    counts = hist[:HIGH_BINS]
    counts[0] = 0
    k = min(k, int(counts.sum()))
    if k == 0:
        return None
    high, above = _rank_of(counts, k)
    if above + int(counts[high]) == k:  # the bin is taken whole: no second pass
        return high << LOW_BITS, 0
    low_hist = torch.zeros(LOW_BINS, dtype=torch.int64, device=device)
    for piece in pieces:
        for _, new, old in iter_chunk_pairs(piece.new, piece.old, chunk):
            keys, _ = chunk_keys(new, old)
            in_bin = keys[(keys >> LOW_BITS) == high] & (LOW_BINS - 1)
            low_hist += torch.bincount(in_bin, minlength=LOW_BINS).to(device)
    dist.all_reduce(low_hist, group=process_group)
    low, above_in_bin = _rank_of(low_hist, k - above)
    quota = k - above - above_in_bin
    return (high << LOW_BITS) | low, 0 if quota == int(low_hist[low]) else quota


def _collect(
    piece: _Piece, numel: int, floor: int, quota: int, room: int, scale: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pass 3 over one piece: (global flat indices, values, tie flags) of its keys ≥ floor, keeping only the first
    `room` ties (when quota > 0), and how many ties it holds in all."""
    idx_dtype = index_dtype(numel)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    ties_seen = 0
    for start, new, old in iter_chunk_pairs(piece.new, piece.old, chunk):
        keys, _ = chunk_keys(new, old)
        local = (keys >= floor).nonzero().squeeze(1)
        if local.numel() == 0:
            continue
        tie = keys[local] == floor if quota else torch.zeros_like(local, dtype=torch.bool)
        if quota:
            n_ties = int(tie.sum())
            ties_seen += n_ties
            if n_ties > room:  # ties past the rank's first `quota` can never be taken: don't hold them
                keep = ~(tie & (tie.cumsum(0) > room))
                local, tie = local[keep], tie[keep]
            room -= min(n_ties, room)
        vals = new[local].float()
        if scale != 1.0:
            vals = vals * scale
        parts.append(((local + (piece.offset + start)).to(idx_dtype), vals, tie))
    if not parts:
        device = piece.new.device
        return (torch.empty(0, dtype=idx_dtype, device=device), torch.empty(0, device=device),
                torch.empty(0, dtype=torch.bool, device=device), ties_seen)
    idx, vals, tie = (torch.cat([p[f] for p in parts]) for f in range(3))
    return idx, vals, tie, ties_seen


def select_core_sharded(
    new_shards: Mapping[str, torch.Tensor | Shard],
    old_shards: Mapping[str, torch.Tensor | Shard],
    top_t: float,
    selection: str = "global",
    *,
    scale: float = 1.0,
    process_group: dist.ProcessGroup | None,
    numels: Mapping[str, int | Sequence[int]],
    chunk: int | None = None,
) -> dict[str, SparseDelta]:
    """`select_core` over deltas spread across the ranks of a process group; call it on every rank.

    Memory per rank is one chunk's temporaries plus the rank's share of the core (and at most the core's ties at the
    threshold): scores are never materialised. Each rank streams its shards three times (twice when no bin of keys
    is split by the threshold). Collectives: two small all-gathers up front (argument agreement, shard layout), then
    per scope (one for `"global"`, one per module for `"per_module"`) an all-reduce of a 32641-bin histogram, one of a
    65536-bin histogram unless the first decides, and an all-gather of tie counts when the threshold splits ties.
    Invalid or inconsistent arguments and NaN/inf raise ValueError on every rank alike, so no rank is left waiting.

    Args:
        new_shards / old_shards: what this rank holds of Δnew / Δold: module name → tensor (the whole module) or
            `Shard(tensor, offset)` (a flat slice). A module may be split unevenly over any ranks; the slices of
            every module must tile it exactly. A rank may hold nothing (empty mappings).
        top_t: fraction of the parameters in scope kept, in (0, 1].
        selection: `"global"` or `"per_module"`.
        scale: factor applied to the kept Δnew values (λ).
        process_group: the ranks sharing the model (None: the default group). With NCCL the rank's current CUDA
            device must be set.
        numels: every module in scope → its number of elements or, better, its shape (the shape the returned
            `SparseDelta`s carry; a bare number makes them flat). The same on every rank.
        chunk: elements streamed at a time (default `CHUNK`).

    Returns:
        module name → `SparseDelta` for the modules this rank holds: the core elements of its slice, with global flat
        indices (sorted) and float32 values. `gather_core` assembles the whole core on every rank.
    """
    device = _collective_device(process_group)
    chunk = chunk or CHUNK
    try:
        check_selection_args(top_t, selection)
        shapes = _module_shapes(numels)
        pieces = _local_pieces(new_shards, old_shards, shapes)
        fingerprint, error = zlib.crc32(repr((sorted(shapes.items()), float(top_t), selection)).encode()), None
    except (TypeError, ValueError) as err:
        fingerprint, error = 0, err
    _agree(fingerprint, error, process_group, device)
    names = sorted(shapes)
    layout = torch.zeros(len(names), 2, dtype=torch.int64)
    for piece in pieces:
        layout[piece.index] = torch.tensor([piece.offset, piece.new.numel()])
    layouts = _all_gather(layout.to(device), process_group)  # (rank, module, (offset, length))
    _check_layout(layouts, shapes)

    held = {piece.name: piece for piece in pieces}
    core = {}
    for scope in [names] if selection == "global" else [[name] for name in names]:
        mine = [held[name] for name in scope if name in held]
        k = core_size(top_t, sum(math.prod(shapes[name]) for name in scope))
        picked = _threshold(mine, scope, k, chunk, process_group, device)
        if picked is None:
            core.update({p.name: SparseDelta.empty(shapes[p.name], device=p.new.device) for p in mine})
            continue
        floor, quota = picked
        collected, room = {}, quota
        for piece in mine:
            collected[piece.name] = _collect(piece, math.prod(shapes[piece.name]), floor, quota, room, scale, chunk)
            room -= min(room, collected[piece.name][3])
        takes = {}
        if quota:
            # The ties preceding this rank's slice of a module: those of the modules sorting before it in the scope
            # and those of the other ranks' slices of the module that start before this one.
            counts = torch.zeros(len(scope), dtype=torch.int64)
            for piece in mine:
                counts[scope.index(piece.name)] = collected[piece.name][3]
            ties = _all_gather(counts.to(device), process_group)
            for piece in mine:
                j = scope.index(piece.name)
                before = int(ties[:, :j].sum()) + int(ties[layouts[:, piece.index, 0] < piece.offset, j].sum())
                takes[piece.name] = max(0, quota - before)
        for piece in mine:
            idx, vals, tie, _ = collected.pop(piece.name)
            if quota:
                keep = ~(tie & (tie.cumsum(0) > takes[piece.name]))
                idx, vals = idx[keep], vals[keep]
            core[piece.name] = SparseDelta(idx, vals, shapes[piece.name])
    return core


def gather_core(
    core: Mapping[str, SparseDelta], process_group: dist.ProcessGroup | None
) -> dict[str, SparseDelta]:
    """All ranks' parts of a core (as `select_core_sharded` returns them) assembled into whole `SparseDelta`s, on
    every rank; call it on every rank. The result lies on the group's communication device (CPU for gloo).

    Each rank broadcasts its parts in turn, so a rank holds the whole core plus one rank's parts, never the world's.
    """
    device = _collective_device(process_group)
    names = sorted(core)
    metas: list[list[tuple[str, tuple[int, ...], int]]] = [[] for _ in range(dist.get_world_size(process_group))]
    dist.all_gather_object(metas, [(n, core[n].shape, core[n].nnz) for n in names], group=process_group)
    shapes: dict[str, tuple[int, ...]] = {}
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for src, meta in enumerate(metas):
        for name, shape, _ in meta:
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"gather_core: the ranks' parts of module {name!r} have shapes {shapes[name]} "
                                 f"and {shape}")
        total = sum(nnz for _, _, nnz in meta)
        if total == 0:
            continue
        if src == dist.get_rank(process_group):
            idx = torch.cat([core[n].indices.to(device, torch.int64) for n in names])
            vals = torch.cat([core[n].values.to(device, torch.float32) for n in names])
        else:
            idx = torch.empty(total, dtype=torch.int64, device=device)
            vals = torch.empty(total, dtype=torch.float32, device=device)
        dist.broadcast(idx, group=process_group, group_src=src)
        dist.broadcast(vals, group=process_group, group_src=src)
        sizes = [nnz for _, _, nnz in meta]
        for (name, _, nnz), i, v in zip(meta, idx.split(sizes), vals.split(sizes)):
            if nnz:
                parts.setdefault(name, []).append((i, v))
    whole = {}
    for name in sorted(shapes):
        found = sorted(parts.get(name, []), key=lambda part: int(part[0][0]))  # disjoint slices: order by start
        numel = math.prod(shapes[name])
        if not found:
            whole[name] = SparseDelta.empty(shapes[name], device=device)
            continue
        whole[name] = SparseDelta(torch.cat([i for i, _ in found]).to(index_dtype(numel)),
                                  torch.cat([v for _, v in found]), shapes[name])
    return whole


class ShardedDeltas(dict):
    """This rank's rows of each module's delta (`Shard`s) after an FSDP2 fine-tune; the core is selected across
    `process_group` (`select_core(..., process_group=, numels=shapes)`), no rank holding a whole delta."""

    def __init__(self, shards: dict[str, Shard], process_group: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__(shards)
        self.process_group = process_group
        self.shapes = shapes
