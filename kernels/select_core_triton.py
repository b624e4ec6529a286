"""Core selection with Triton: the GPU path, bit-identical to `select_core_naive` and `select_core_torch` (the rule:
`dft_peft.selection.rule`).

The threshold search never materialises the scores and never sorts the model: each pass streams Δnew and Δold once,
recomputes the keys on the fly and reduces them against a per-scope key window [lo, hi):

1. Window pass (`_window_pass_kernel`, persistent programs over 4096-element tiles): per tile, the number of keys
   ≥ hi ("above") and in [lo, hi) ("inside"); the inside keys are appended, with their tile number, to a side list
   (one atomic claim per tile, bounded capacity); when needed, a 256-bin histogram of the inside keys
   (`tl.histogram` per program, flushed with one atomic add per bin); a non-finite flag per module.
   The first window of a large scope comes from a random sample of 64K–256K elements (`sampled_window`) and holds
   the scope's k-th key with high probability while covering a small fraction of the elements, so the side list is
   small.
2. On the host, per scope: with A above and W inside, the k-th key lies above, inside or below the window. Inside
   and the side list complete: the exact k-th key t comes from sorting the side list (keys of the window only).
   A width-1 window is t itself. Otherwise the next pass narrows the window (to the histogram bin holding the k-th
   key, or to the side of the window that holds it); only scopes still open are read again.
3. Write pass (`_write_kernel`): per tile, keys > t plus ties at t while their rank in (module name, flat index)
   order is below the scope's quota; positions come from exclusive scans of the per-tile counts (torch.cumsum over
   the small per-tile arrays) plus in-tile `tl.cumsum`, so each module's indices come out sorted.

Typical cost: two reads of the deltas (window pass, write pass) plus the sample. A missed or overfull window costs
extra window passes, each narrowing it by 8 bits of key (at most seven reads in all, for adversarial inputs).
Extra device memory: 8 bytes per side-list slot (max(2^20, numel/64) slots), ~40 bytes per tile (numel/100 bytes)
and the core itself.

Inputs may be any float dtype (mixed between modules and between Δnew/Δold) and non-contiguous: tensors whose
strides collapse to two dimensions (every transposed or sliced weight) are read in place, through their strides
(uncoalesced on a GPU for a transposed weight: correct but slower); others are copied contiguous one module at a
time, once per pass (costing that module's size in extra memory, transiently).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..format.sparse import INT32_LIMIT, SparseDelta, index_dtype
from ..selection.chunks import delta_shapes
from ..selection.rule import (
    FLT_MIN,
    MAX_KEY,
    check_deltas,
    check_pair,
    check_selection_args,
    core_size,
    raise_nonfinite,
)
from ..selection.sampling import sample_keys, sampled_window, worth_sampling

BLOCK = 4096  # elements per tile: the unit of the per-tile counts and of the write pass
BINS = 256  # histogram bins per narrowing pass (8 bits of key)
SIDE_MIN = 1 << 20  # side-list slots: max(SIDE_MIN, numel // SIDE_FRACTION)
SIDE_FRACTION = 64
NO_KEY = 0x7FFFFFFF  # a threshold above every key: selects nothing

_FLT_MIN = tl.constexpr(FLT_MIN)
_FLT_MAX = tl.constexpr(torch.finfo(torch.float32).max)


@triton.jit
def _tile_keys(
    new_ptr, old_ptr, offs, mask, new_cols, new_sr, new_sc, old_cols, old_sr, old_sc,
    NEW_CONTIG: tl.constexpr, OLD_CONTIG: tl.constexpr,
):
    """fp32(Δnew), the keys and the non-finite mask of one tile (`rule.chunk_keys`, element for element)."""
    if NEW_CONTIG:
        new_off = offs
    else:
        row = offs // new_cols
        new_off = row * new_sr + (offs - row * new_cols) * new_sc
    if OLD_CONTIG:
        old_off = offs
    else:
        row = offs // old_cols
        old_off = row * old_sr + (offs - row * old_cols) * old_sc
    x = tl.load(new_ptr + new_off, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(old_ptr + old_off, mask=mask, other=0.0).to(tl.float32)
    candidate = ((x >= _FLT_MIN) & (y <= -_FLT_MIN)) | ((x <= -_FLT_MIN) & (y >= _FLT_MIN))
    key = tl.where(candidate, tl.abs(x - y), 0.0).to(tl.int32, bitcast=True)
    # |v| <= FLT_MAX is false for inf and NaN alike
    nonfinite = ~((tl.abs(x) <= _FLT_MAX) & (tl.abs(y) <= _FLT_MAX))
    return x, key, nonfinite


@triton.jit
def _tile_offsets(tile, numel, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    offs = (tile.to(tl.int64) if IDX64 else tile) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def _window_pass_kernel(
    new_ptr, old_ptr, numel, n_tiles, tile_base,
    new_cols, new_sr, new_sc, old_cols, old_sr, old_sc,
    lo, hi, shift,
    above_ptr, inside_ptr, hist_ptr, flag_ptr,
    side_key_ptr, side_tile_ptr, side_count_ptr, side_cap,
    NEW_CONTIG: tl.constexpr, OLD_CONTIG: tl.constexpr, IDX64: tl.constexpr, HIST: tl.constexpr,
    BLOCK: tl.constexpr, BINS: tl.constexpr,
):
    """Per tile: #keys ≥ hi and #keys in [lo, hi); inside keys to the side list; optional window histogram.

    Persistent: each program strides over tiles so the histogram is flushed with one atomic per bin and program.
    """
    hist = tl.zeros([BINS], dtype=tl.int32)
    bad = tl.full([], 0, tl.int32)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        offs, mask = _tile_offsets(tile, numel, BLOCK, IDX64)
        _, key, nonfinite = _tile_keys(
            new_ptr, old_ptr, offs, mask, new_cols, new_sr, new_sc, old_cols, old_sr, old_sc, NEW_CONTIG, OLD_CONTIG
        )
        bad += tl.sum(nonfinite.to(tl.int32), axis=0)
        inside = (key >= lo) & (key < hi)  # lo >= 1: non-candidates (key 0) and padding never count
        n_inside = tl.sum(inside.to(tl.int32), axis=0)
        tl.store(above_ptr + tile_base + tile, tl.sum((key >= hi).to(tl.int32), axis=0))
        tl.store(inside_ptr + tile_base + tile, n_inside)
        if HIST:
            hist += tl.histogram(tl.where(inside, (key - lo) >> shift, 0), BINS, mask=inside)
        start = tl.atomic_add(side_count_ptr, n_inside.to(tl.int64), mask=n_inside > 0)
        pos = start + tl.cumsum(inside.to(tl.int32), axis=0) - 1
        keep = inside & (pos < side_cap)
        tl.store(side_key_ptr + pos, key, mask=keep)
        tl.store(side_tile_ptr + pos, tl.zeros([BLOCK], dtype=tl.int32) + tile_base + tile, mask=keep)
    if HIST:
        tl.atomic_add(hist_ptr + tl.arange(0, BINS), hist, mask=hist > 0)
    tl.store(flag_ptr, 1, mask=bad > 0)


@triton.jit
def _write_kernel(
    new_ptr, old_ptr, numel, tile_base,
    new_cols, new_sr, new_sc, old_cols, old_sr, old_sc,
    threshold, quota, out_base_ptr, tie_base_ptr, idx_ptr, val_ptr, scale,
    NEW_CONTIG: tl.constexpr, OLD_CONTIG: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Emit the tile's keys > threshold and its ties ranked below the quota, at scanned positions (sorted output)."""
    tile = tl.program_id(0)
    offs, mask = _tile_offsets(tile, numel, BLOCK, IDX64)
    x, key, _ = _tile_keys(
        new_ptr, old_ptr, offs, mask, new_cols, new_sr, new_sc, old_cols, old_sr, old_sc, NEW_CONTIG, OLD_CONTIG
    )
    tie = key == threshold
    tie_rank = tl.load(tie_base_ptr + tile_base + tile) + tl.cumsum(tie.to(tl.int32), axis=0) - 1
    selected = (key > threshold) | (tie & (tie_rank < quota))
    pos = tl.load(out_base_ptr + tile_base + tile) + tl.cumsum(selected.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + pos, offs.to(idx_ptr.dtype.element_ty), mask=selected)
    tl.store(val_ptr + pos, x * scale, mask=selected)


# --- host side ----------------------------------------------------------------------------------------------------

# How a settled scope's per-tile counts (keys > threshold, ties at it) derive from the pass that settled it.
_OPEN, _NONE, _ALL, _WINDOW, _SIDE = range(5)


def _layout(t: torch.Tensor) -> tuple[bool, int, int, int] | None:
    """(contiguous, cols, row stride, col stride) addressing `t` in row-major order, or None if it needs a copy.

    Dimensions of size 1 are dropped and mergeable neighbours merged; what remains must be at most 2-D.
    """
    if t.is_contiguous():
        return True, 1, 0, 1
    merged: list[list[int]] = []
    for size, stride in zip(t.shape, t.stride()):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) == 1:
        return False, merged[0][0], 0, merged[0][1]
    if len(merged) == 2:
        return False, merged[1][0], merged[0][1], merged[1][1]
    return None


def _launch_args(new: torch.Tensor, old: torch.Tensor, numel: int) -> tuple[list, dict]:
    """Positional tensors and layout scalars, constexprs and launch options shared by both kernels (one module)."""
    args, consts = [None, None], {"BLOCK": BLOCK, "num_warps": 8}
    idx64 = numel >= INT32_LIMIT
    for i, (t, flag) in enumerate(((new, "NEW_CONTIG"), (old, "OLD_CONTIG"))):
        layout = _layout(t)
        if layout is None:
            t = t.contiguous()
            layout = _layout(t)
        args[i] = t
        args.extend(layout[1:])
        consts[flag] = layout[0]
        idx64 |= 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) >= INT32_LIMIT
    consts["IDX64"] = idx64
    return args, consts


def _shift(lo: int, hi: int) -> int:
    """Right shift mapping keys of [lo, hi) onto at most BINS histogram bins."""
    return max(0, (hi - lo - 1).bit_length() - (BINS.bit_length() - 1))


def _segment_exclusive_scan(counts: torch.Tensor, segment: torch.Tensor, first_tile: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums of per-tile counts restarted at each segment (segments are contiguous tile ranges)."""
    exclusive = counts.cumsum(0) - counts
    return exclusive - exclusive[first_tile[segment]]


@dataclass
class _Module:
    name: str
    rank: int
    shape: tuple[int, ...]
    numel: int
    scope: int
    tile_base: int

    @property
    def n_tiles(self) -> int:
        return triton.cdiv(self.numel, BLOCK)


@dataclass
class _Scope:
    """One ranking: its k, the key interval known to hold its k-th key, the window read next, and the verdict."""

    k: int
    modules: list[_Module]
    lo: int = 1
    hi: int = MAX_KEY + 1
    bound_lo: int = 1
    bound_hi: int = MAX_KEY + 1
    hist: bool = False
    threshold: int = NO_KEY
    quota: int = 0

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.modules)


class _Selection:
    """One `select_core_triton` call: the modules and scopes, per-tile counters and the side list, on the device."""

    def __init__(self, new_deltas, old_deltas, names, shapes, selection, top_t, scale, device):
        self.new_deltas, self.old_deltas, self.scale, self.device = new_deltas, old_deltas, scale, device
        self.modules, tiles = [], 0
        for rank, name in enumerate(names):
            numel = math.prod(shapes[name])
            self.modules.append(_Module(name, rank, shapes[name], numel, 0 if selection == "global" else rank, tiles))
            tiles += self.modules[-1].n_tiles
        groups = [self.modules] if selection == "global" else [[m] for m in self.modules]
        self.scopes = [_Scope(core_size(top_t, sum(m.numel for m in ms)), ms) for ms in groups]
        total = sum(m.numel for m in self.modules)
        self.side_cap = min(max(SIDE_MIN, total // SIDE_FRACTION), total)
        self.n_tiles = tiles
        i32, i64 = {"dtype": torch.int32, "device": device}, {"dtype": torch.int64, "device": device}
        self.above = torch.zeros(tiles, **i32)
        self.inside = torch.zeros(tiles, **i32)
        self.final_above = torch.zeros(tiles, **i64)
        self.final_ties = torch.zeros(tiles, **i64)
        self.hist = torch.zeros(len(self.scopes), BINS, **i32)
        self.flags = torch.zeros(len(self.modules), **i32)
        self.side_key = torch.empty(self.side_cap, **i32)
        self.side_tile = torch.empty(self.side_cap, **i32)
        self.side_count = torch.zeros(1, **i64)
        self.scope_of_tile = torch.tensor([m.scope for m in self.modules for _ in range(m.n_tiles)], **i64)
        self.module_of_tile = torch.tensor([m.rank for m in self.modules for _ in range(m.n_tiles)], **i64)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.max_programs = 4 * sms
        for scope in self.scopes:
            # a scope that may not fit the side list starts from a sampled window, or with a histogram if too small
            # to sample; scopes that fit are settled from the side list in one pass
            if scope.k and scope.numel > self.side_cap:
                if worth_sampling(scope.numel):
                    scope_names = [m.name for m in scope.modules]
                    sample = sample_keys(scope_names, new_deltas, old_deltas, shapes)
                    scope.lo, scope.hi = sampled_window(sample, scope.k, scope.numel)
                else:
                    scope.hist = True

    def window_pass(self, open_scopes: list[int], first: bool) -> None:
        """One read of the open scopes' modules; the first pass also validates the deltas and checks finiteness."""
        self.hist.zero_()
        self.side_count.zero_()
        for s in open_scopes:
            scope = self.scopes[s]
            for m in scope.modules:
                new, old = self.new_deltas[m.name], self.old_deltas[m.name]
                if first:
                    self._check(m, new, old)
                if m.numel == 0:
                    continue
                args, consts = _launch_args(new, old, m.numel)
                _window_pass_kernel[(min(m.n_tiles, self.max_programs),)](
                    args[0], args[1], m.numel, m.n_tiles, m.tile_base, *args[2:],
                    scope.lo, scope.hi, _shift(scope.lo, scope.hi),
                    self.above, self.inside, self.hist[s], self.flags[m.rank],
                    self.side_key, self.side_tile, self.side_count, self.side_cap,
                    HIST=scope.hist, BINS=BINS, **consts,
                )
        if first:
            self._raise_nonfinite(len(self.modules))

    def _check(self, module: _Module, new: torch.Tensor, old: torch.Tensor) -> None:
        """check_pair, reporting a non-finite earlier module first, as the streaming torch path would."""
        try:
            check_pair(module.name, new, old)
            if new.device != self.device:
                raise ValueError(f"module {module.name!r} is on {new.device}, other modules on {self.device}")
        except (TypeError, ValueError):
            self._raise_nonfinite(module.rank)
            raise

    def _raise_nonfinite(self, upto: int) -> None:
        flagged = self.flags[:upto].nonzero()
        if flagged.numel():
            raise_nonfinite(self.modules[int(flagged[0])].name)

    def resolve(self, open_scopes: list[int]) -> list[int]:
        """Read the pass's counts, settle what they settle, narrow the other windows; return the scopes still open."""
        n = len(self.scopes)
        per_scope = torch.zeros(2, n, dtype=torch.int64, device=self.device)
        per_scope[0].index_add_(0, self.scope_of_tile, self.above.long())
        per_scope[1].index_add_(0, self.scope_of_tile, self.inside.long())
        parts = [per_scope.view(-1), self.side_count]
        if any(self.scopes[s].hist for s in open_scopes):
            parts.append(self.hist.view(-1).long())
        summary = torch.cat(parts).tolist()
        above, inside, side_count = summary[:n], summary[n : 2 * n], summary[2 * n]
        hists = summary[2 * n + 1 :]
        modes = [_OPEN] * n
        still_open = []
        for s in open_scopes:
            scope = self.scopes[s]
            need = scope.k - above[s]  # how many of the k lie inside or below the window
            if scope.k == 0:
                modes[s] = _NONE
            elif need <= 0:  # the k-th key is above the window: read all of the bound above it
                scope.lo, scope.hi, scope.bound_lo, scope.hist = scope.hi, scope.bound_hi, scope.hi, True
            elif need > inside[s]:  # ... below it
                if scope.lo == 1:  # fewer candidates than k: all of them
                    modes[s], scope.threshold = _ALL, 0
                else:
                    scope.lo, scope.hi, scope.bound_hi, scope.hist = scope.bound_lo, scope.lo, scope.lo, True
            elif scope.hi - scope.lo == 1:  # inside a one-key window: that key is the threshold
                modes[s], scope.threshold, scope.quota = _WINDOW, scope.lo, need
            elif side_count <= self.side_cap:
                modes[s], scope.quota = _SIDE, need  # quota refined by `_settle_from_side`
            elif scope.hist:  # crowded window: narrow it to the histogram bin holding the k-th key
                hist, shift = hists[s * BINS : (s + 1) * BINS], _shift(scope.lo, scope.hi)
                b, seen = BINS - 1, 0
                while seen + hist[b] < need:
                    seen += hist[b]
                    b -= 1
                lo = scope.lo + (b << shift)
                scope.lo, scope.hi = lo, min(scope.hi, lo + (1 << shift))
                scope.bound_lo, scope.bound_hi = scope.lo, scope.hi
            else:  # crowded window read without a histogram: read it again with one
                scope.hist = True
            if modes[s] == _OPEN:
                still_open.append(s)
        self._settle(modes)
        return still_open

    def _settle(self, modes: list[int]) -> None:
        """Per-tile final counts (keys above the threshold, ties at it) of the scopes settled by this pass."""
        if all(m == _OPEN for m in modes):
            return
        mode = torch.tensor(modes, device=self.device)[self.scope_of_tile]
        above, inside = self.above.long(), self.inside.long()
        extra_above, ties = torch.zeros_like(above), inside
        if _SIDE in modes:
            extra_above, side_ties = self._settle_from_side([s for s, m in enumerate(modes) if m == _SIDE])
            ties = torch.where(mode == _SIDE, side_ties, inside)
        new_above = torch.where(mode == _ALL, above + inside, above + extra_above)
        new_above = torch.where(mode == _NONE, 0, new_above)
        new_ties = torch.where((mode == _ALL) | (mode == _NONE), 0, ties)
        settled = mode != _OPEN
        self.final_above = torch.where(settled, new_above, self.final_above)
        self.final_ties = torch.where(settled, new_ties, self.final_ties)

    def _settle_from_side(self, scopes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact thresholds of scopes whose window fit the side list: sort the window's keys (descending, per scope).

        Returns per-tile counts of side keys above the threshold and at it.
        """
        n = int(self.side_count)
        key, tile = self.side_key[:n].long(), self.side_tile[:n].long()
        scope = self.scope_of_tile[tile]
        wanted = torch.zeros(len(self.scopes), dtype=torch.bool, device=self.device)
        wanted[scopes] = True
        keep = wanted[scope]
        key, tile, scope = key[keep], tile[keep], scope[keep]
        ordered = torch.sort(scope * INT32_LIMIT + (NO_KEY - key)).values
        ordered_key = NO_KEY - ordered % INT32_LIMIT
        count = torch.bincount(scope, minlength=len(self.scopes))
        start = count.cumsum(0) - count
        chosen = torch.tensor(scopes, device=self.device)
        need = torch.tensor([self.scopes[s].quota for s in scopes], device=self.device)
        threshold = torch.full((len(self.scopes),), NO_KEY, dtype=torch.int64, device=self.device)
        threshold[chosen] = ordered_key[start[chosen] + need - 1]
        above = key > threshold[scope]
        tie = key == threshold[scope]
        quota = need - torch.bincount(scope[above], minlength=len(self.scopes))[chosen]
        for s, t, q in zip(scopes, threshold[chosen].tolist(), quota.tolist()):
            self.scopes[s].threshold, self.scopes[s].quota = t, q
        return (torch.bincount(tile[above], minlength=self.n_tiles),
                torch.bincount(tile[tie], minlength=self.n_tiles))

    def write(self) -> dict[str, SparseDelta]:
        """Scan the per-tile counts into output positions and run the write pass."""
        core = {}
        if self.n_tiles:
            dev = {"dtype": torch.int64, "device": self.device}
            quota = torch.tensor([s.quota for s in self.scopes], **dev)
            last = self.n_tiles - 1  # (first tiles of empty modules are never looked up)
            scope_first = torch.tensor([s.modules[0].tile_base for s in self.scopes], **dev).clamp(max=last)
            module_first = torch.tensor([m.tile_base for m in self.modules], **dev).clamp(max=last)
            ties = self.final_ties
            tie_base = _segment_exclusive_scan(ties, self.scope_of_tile, scope_first)
            taken = (quota[self.scope_of_tile] - tie_base).clamp(min=0).minimum(ties)
            chosen = self.final_above + taken
            out_base = _segment_exclusive_scan(chosen, self.module_of_tile, module_first)
            nnz = torch.zeros(len(self.modules), **dev).index_add_(0, self.module_of_tile, chosen).tolist()
        else:
            nnz = [0] * len(self.modules)
        for m, count in zip(self.modules, nnz):
            idx = torch.empty(count, dtype=index_dtype(m.numel), device=self.device)
            vals = torch.empty(count, dtype=torch.float32, device=self.device)
            if count:
                scope = self.scopes[m.scope]
                args, consts = _launch_args(self.new_deltas[m.name], self.old_deltas[m.name], m.numel)
                _write_kernel[(m.n_tiles,)](
                    args[0], args[1], m.numel, m.tile_base, *args[2:],
                    scope.threshold, scope.quota, out_base, tie_base, idx, vals, self.scale, **consts,
                )
            core[m.name] = SparseDelta(idx, vals, m.shape)
        return core


def select_core_triton(
    new_deltas: Mapping[str, torch.Tensor],
    old_deltas: Mapping[str, torch.Tensor],
    top_t: float,
    selection: str = "global",
    *,
    scale: float = 1.0,
) -> dict[str, SparseDelta]:
    """Select the DFT core with Triton kernels: same arguments and bit-identical results as `select_core_torch`.

    All deltas must live on one device (a CUDA GPU, or the CPU under `TRITON_INTERPRET=1`). Lazy mappings are read
    once per pass (usually twice).
    """
    check_selection_args(top_t, selection)
    names = check_deltas(new_deltas, old_deltas)
    if not names:
        return {}
    shapes = delta_shapes(names, new_deltas)
    device = new_deltas[names[0]].device
    state = _Selection(new_deltas, old_deltas, names, shapes, selection, top_t, float(scale), device)
    open_scopes, first = list(range(len(state.scopes))), True
    while open_scopes:
        state.window_pass(open_scopes, first)
        open_scopes, first = state.resolve(open_scopes), False
    return state.write()
