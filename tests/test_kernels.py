"""Kernels against their references, bit for bit: Triton (interpreted on a CPU) and the streaming CPU path (C loop and
torch pass) against the naive selection, the C loop against the torch pass, Triton scatter-merge against torch.

Inputs are fresh random tensors on every run; each test prints its seed (shown on failure) and
`DFT_PEFT_TEST_SEED=<seed>` replays it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import itertools
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Mapping

import pytest
import torch
from dft_peft.kernels.scatter_merge_torch import (
    compose_weight_torch,
    merged_values_torch,
    scatter_merge_torch,
    scatter_restore_torch,
)
from dft_peft.kernels.select_core_torch import select_core_torch

from dft_peft.selection.lazy import Terms
from dft_peft.selection.rule import MAX_KEY, chunk_keys, select_core_naive
from dft_peft.tuner.merge import HAS_TRITON, compose_weight, merged_values, scatter_merge, scatter_restore

select_torch = importlib.import_module("dft_peft.kernels.select_core_torch")
streaming = importlib.import_module("dft_peft.selection.streaming")
sampling = importlib.import_module("dft_peft.selection.sampling")
window_cpu = importlib.import_module("dft_peft.kernels.window_cpu")
window_torch = importlib.import_module("dft_peft.kernels.window_torch")
# The CPU path's chunk pass: the compiled C loop (where it can be built) and the torch ops; both are checked.
CPU_KERNELS = ("c", "torch") if window_cpu.library() is not None else ("torch",)
# (kernel, overlap): the C loop also with chunks split across threads and scored while the last one's entries are
# stored (forced on small inputs by a small MIN_PART)
CPU_KERNEL_MODES = [(k, False) for k in CPU_KERNELS] + ([("c", True)] if "c" in CPU_KERNELS else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("DFT_PEFT_TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"seed {seed} (replay: DFT_PEFT_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def select_triton(monkeypatch):
    """The Triton selection module, with small tiles so that small inputs span many tiles."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    module = importlib.import_module("dft_peft.kernels.select_core_triton")
    monkeypatch.setattr(module, "BLOCK", 256)
    return module


class LazyDeltas(Mapping):
    """A non-dict mapping, as for deltas computed on access: the torch path neither samples nor indexes it twice."""

    def __init__(self, deltas: dict[str, torch.Tensor]) -> None:
        self.deltas = deltas

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.deltas[name]

    def __iter__(self):
        return iter(self.deltas)

    def __len__(self) -> int:
        return len(self.deltas)


class RangeReadDeltas(LazyDeltas):
    """A lazy mapping that can read flat ranges (as checkpoint and LoRA deltas do); counts whole-module reads."""

    def __init__(self, deltas: dict[str, torch.Tensor]) -> None:
        super().__init__(deltas)
        self.whole_reads = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        self.whole_reads += 1
        return self.deltas[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.deltas[name].shape)

    def read_range(self, name: str, start: int, length: int) -> torch.Tensor:
        return self.deltas[name].reshape(-1)[start : start + length]


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, levels: int | None = None):
    x = torch.randn(shape, generator=gen)
    if levels:  # few distinct magnitudes: many exact ties
        x = (x * levels).round() / levels
    return x.to(dtype)


def random_deltas(gen: torch.Generator, n_modules: int, max_numel: int = 1500, levels: int | None = None):
    """Modules of random shapes (vectors, matrices, scalars, empty) and dtypes, some non-contiguous."""
    new, old = {}, {}
    for i in range(n_modules):
        kind = int(torch.randint(0, 8, (), generator=gen))
        if kind == 0:
            shape = ()
        elif kind == 1:
            shape = (0, 3)
        elif kind <= 4:
            shape = (int(torch.randint(1, max_numel, (), generator=gen)),)
        else:
            rows = int(torch.randint(1, 60, (), generator=gen))
            shape = (rows, int(torch.randint(1, max_numel // rows + 2, (), generator=gen)))
        dtypes = [FLOATS[int(torch.randint(0, 4, (), generator=gen))] for _ in range(2)]
        pair = [rand(gen, *shape, dtype=dt, levels=levels) for dt in dtypes]
        if len(shape) == 2 and kind == 7:  # the same values, stored transposed
            pair[0] = pair[0].t().contiguous().t()
        new[f"layers.{i}.proj"], old[f"layers.{i}.proj"] = pair
    return new, old


def sized_deltas(gen: torch.Generator, shapes, levels: int | None = None):
    """Modules of the given shapes with random dtypes (Δnew: any float; Δold: fp32/bf16/fp16)."""
    new, old = {}, {}
    for i, shape in enumerate(shapes):
        new_dtype, old_dtype = (FLOATS[int(torch.randint(0, n, (), generator=gen))] for n in (4, 3))
        new[f"m{i}"] = rand(gen, *shape, dtype=new_dtype, levels=levels)
        old[f"m{i}"] = rand(gen, *shape, dtype=old_dtype, levels=levels)
    return new, old


def to_device(deltas):
    return {name: t.to(DEVICE) for name, t in deltas.items()}


def assert_same_core(got, want, what: str) -> None:
    assert list(got) == list(want), what
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, (what, name)
        assert g.indices.dtype == w.indices.dtype and g.values.dtype == w.values.dtype, (what, name)
        assert torch.equal(g.indices.cpu(), w.indices), (what, name, g.nnz, w.nnz)
        assert torch.equal(g.values.cpu().view(torch.int32), w.values.view(torch.int32)), (what, name)


@contextlib.contextmanager
def cpu_kernel(kernel: str):
    """Run the CPU path with the given chunk pass ("c" or "torch")."""
    saved = os.environ.get("DFT_PEFT_CPU_KERNEL")
    os.environ["DFT_PEFT_CPU_KERNEL"] = kernel
    try:
        yield
    finally:
        if saved is None:
            del os.environ["DFT_PEFT_CPU_KERNEL"]
        else:
            os.environ["DFT_PEFT_CPU_KERNEL"] = saved


def check_selection(new, old, top_t, selection, select_triton=None, scale=1.0):
    """Every path against the naive reference; returns the reference."""
    want = select_core_naive(new, old, top_t, selection, scale=scale)
    what = f"top_t={top_t} {selection}"
    for kernel in CPU_KERNELS:
        with cpu_kernel(kernel):
            got = select_core_torch(new, old, top_t, selection, scale=scale)
        assert_same_core(got, want, f"torch[{kernel}] {what}")
    if select_triton is not None:
        got = select_triton.select_core_triton(to_device(new), to_device(old), top_t, selection, scale=scale)
        assert_same_core(got, want, f"triton {what}")
    return want


# --- core selection: Triton and streaming torch against the naive reference ----------------------------------------


@needs_triton
@pytest.mark.parametrize("selection", ["global", "per_module"])
def test_select_random_modules(gen, select_triton, selection):
    new, old = random_deltas(gen, 7)
    for top_t in (0.01, 0.2, 0.9):
        check_selection(new, old, top_t, selection, select_triton, scale=0.3)


@needs_triton
@pytest.mark.parametrize("selection", ["global", "per_module"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 3e38 − (−3e38) = inf, on purpose
def test_select_ties_zeros_and_extremes(gen, select_triton, selection):
    """Exact ties within and across modules, all-equal scores, zeros, subnormals, same signs, an overflowing score."""
    tied = rand(gen, 40, 30, levels=3)
    extreme = torch.tensor([3e38, 1e-39, -1e-39, 0.0, 5.0, -0.0, 2.0, 1e-45])
    new = {
        "a": tied,
        "b": tied.clone().bfloat16().float(),  # the same scores: ties across modules
        "c": torch.full((300,), 0.5),  # one score everywhere
        "d": extreme,
        "e": torch.tensor([1e-300, -1e-300, 4.0], dtype=torch.float64),  # fp32 casts underflow to zero: no sign
    }
    old = {
        "a": rand(gen, 40, 30, levels=2),
        "b": -tied,
        "c": torch.full((300,), -0.25),
        "d": torch.tensor([-3e38, -1.0, 1.0, -1.0, 1.0, 3.0, 2.0, -1e-45]),
        "e": torch.tensor([-1.0, 1.0, -4.0], dtype=torch.float64),
    }
    for top_t in (0.05, 0.3, 0.6, 1.0):
        check_selection(new, old, top_t, selection, select_triton)


@needs_triton
def test_select_k_zero_and_k_beyond_candidates(gen, select_triton):
    new, old = {"a": rand(gen, 30, 20), "b": rand(gen, 7)}, {"a": rand(gen, 30, 20), "b": rand(gen, 7)}
    for selection in ("global", "per_module"):
        want = check_selection(new, old, 0.001, selection, select_triton)  # k = 0 (per module: 0 and 0)
        assert all(d.nnz == 0 and d.indices.dtype == torch.int32 for d in want.values())
        want = check_selection(new, old, 0.95, selection, select_triton)  # k ≥ candidates: all of them
        candidates = sum(int((chunk_keys(new[n], old[n])[0] > 0).sum()) for n in new)
        assert sum(d.nnz for d in want.values()) == candidates


@needs_triton
@pytest.mark.parametrize("selection", ["global", "per_module"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_select_nonfinite_names_module(gen, select_triton, selection, bad):
    new = {name: rand(gen, 20, 10) for name in ("a.weight", "b.weight", "c.weight")}
    old = {name: rand(gen, 20, 10) for name in new}
    new["b.weight"][3, 4] = bad
    old["c.weight"][0, 0] = bad
    def torch_path(kernel):
        def select(*a):
            with cpu_kernel(kernel):
                return select_core_torch(new, old, *a)
        return select

    paths = {
        **{f"torch[{kernel}]": torch_path(kernel) for kernel in CPU_KERNELS},
        "naive": lambda *a: select_core_naive(new, old, *a),
        "triton": lambda *a: select_triton.select_core_triton(to_device(new), to_device(old), *a),
    }
    for top_t in (0.1, 0.001):  # also when nothing is selected
        for path, select in paths.items():
            with pytest.raises(ValueError, match="NaN or inf") as err:
                select(top_t, selection)
            if path != "naive":  # the reference does not say which module
                assert "'b.weight'" in str(err.value), path


@needs_triton
def test_select_empty_inputs(select_triton):
    assert select_triton.select_core_triton({}, {}, 0.5) == select_core_torch({}, {}, 0.5) == {}
    new = {"empty": torch.zeros(0, 4), "also": torch.zeros(0)}
    old = {"empty": torch.zeros(0, 4), "also": torch.zeros(0)}
    for selection in ("global", "per_module"):
        want = check_selection(new, old, 1.0, selection, select_triton)
        assert want["empty"].shape == (0, 4) and want["also"].nnz == 0


@needs_triton
def test_select_many_modules(gen, select_triton):
    new, old = random_deltas(gen, 60, max_numel=300)
    for selection in ("global", "per_module"):
        check_selection(new, old, 0.1, selection, select_triton)


@needs_triton
def test_select_noncontiguous(gen, select_triton):
    base = rand(gen, 50, 64)
    new = {
        "transposed": rand(gen, 40, 30).t(),
        "sliced": base[::2, 3:50],
        "strided_vector": base[:, 5],
        "expanded": torch.tensor([[0.5], [-1.0], [2.0]]).expand(3, 50),
        "permuted_3d": rand(gen, 6, 5, 7, dtype=torch.float16).permute(2, 0, 1),  # needs a copy
    }
    old = {
        "transposed": rand(gen, 30, 40, dtype=torch.bfloat16),
        "sliced": rand(gen, 47, 25).t(),
        "strided_vector": rand(gen, 50),
        "expanded": rand(gen, 3, 50),
        "permuted_3d": rand(gen, 7, 6, 5).transpose(1, 2).contiguous().transpose(1, 2),
    }
    for selection in ("global", "per_module"):
        check_selection(new, old, 0.25, selection, select_triton)


@needs_triton
@pytest.mark.parametrize("window", ["sampled", "too_high", "too_low"])
def test_select_triton_narrowing_passes(gen, select_triton, monkeypatch, window):
    """A side list too small for the window forces histogram narrowing; a misplaced sampled window forces the
    passes that search above or below it."""
    monkeypatch.setattr(select_triton, "SIDE_MIN", 64)
    monkeypatch.setattr(sampling, "SAMPLE", 128)
    sampled = select_triton.sampled_window

    def misplaced(sample, k, total):
        lo, hi = sampled(sample, k, total)
        if window == "too_high":
            return hi, 2 * hi - lo
        if window == "too_low":
            return max(1, lo - 60 * (hi - lo)), max(2, lo - 59 * (hi - lo))
        return lo, hi

    monkeypatch.setattr(select_triton, "sampled_window", misplaced)
    passes = []
    resolve = select_triton._Selection.resolve
    monkeypatch.setattr(select_triton._Selection, "resolve", lambda self, s: passes.append(s) or resolve(self, s))
    levels = int(torch.randint(0, 2, (), generator=gen)) * 40  # half the runs with heavy ties
    new, old = sized_deltas(gen, [(40, 50), (1500,), (30, 70), (2,)], levels)
    for selection in ("global", "per_module"):
        check_selection(new, old, 0.07, selection, select_triton)
    assert len(passes) > 2


@pytest.mark.parametrize(("kernel", "overlap"), CPU_KERNEL_MODES)
def test_select_lazy_mapping(gen, monkeypatch, kernel, overlap):
    """A lazy mapping (no sampling) with a small chunk: the torch path cuts its buffer while streaming."""
    monkeypatch.setenv("DFT_PEFT_CPU_KERNEL", kernel)
    if overlap:
        monkeypatch.setattr(window_cpu, "MIN_PART", 64)
    monkeypatch.setattr(select_torch, "CHUNK", 128)
    cuts = []
    add = streaming.Buffer.add
    monkeypatch.setattr(streaming.Buffer, "add", lambda self, *a: cuts.append(add(self, *a)) or cuts[-1])
    new, old = sized_deltas(gen, [(40, 50), (3000,), (25, 40)], levels=20)
    for selection in ("global", "per_module"):
        want = select_core_naive(new, old, 0.05, selection)
        assert_same_core(select_core_torch(LazyDeltas(new), LazyDeltas(old), 0.05, selection), want, selection)
    assert any(floor is not None for floor in cuts)
    if HAS_TRITON:
        triton_module = importlib.import_module("dft_peft.kernels.select_core_triton")
        got = triton_module.select_core_triton(LazyDeltas(to_device(new)), LazyDeltas(to_device(old)), 0.05)
        assert_same_core(got, select_core_naive(new, old, 0.05), "triton")


@pytest.mark.parametrize(("kernel", "overlap"), CPU_KERNEL_MODES)
@pytest.mark.parametrize("sampled", [False, True])
def test_select_range_readable_mapping_never_reads_a_whole_module(monkeypatch, sampled, kernel, overlap):
    """Deltas computed on access are streamed block by block of rows (memory O(chunk), not O(module)).

    Fixed inputs: a sample that misleads (possible with this tiny sample) falls back to reading whole modules to key
    the entries it kept unkeyed, which is correct but not what this test is about."""
    monkeypatch.setenv("DFT_PEFT_CPU_KERNEL", kernel)
    monkeypatch.setattr(select_torch, "CHUNK", 128)
    if overlap:
        monkeypatch.setattr(window_cpu, "MIN_PART", 32)
    if sampled:
        monkeypatch.setattr(sampling, "SAMPLE", 1024)
    new, old = sized_deltas(torch.Generator().manual_seed(0), [(40, 50), (3000,), (25, 40), (7, 300)])
    for selection in ("global", "per_module"):
        lazy_new, lazy_old = RangeReadDeltas(new), RangeReadDeltas(old)
        got = select_core_torch(lazy_new, lazy_old, 0.05, selection)
        assert_same_core(got, select_core_naive(new, old, 0.05, selection), selection)
        assert lazy_new.whole_reads == lazy_old.whole_reads == 0


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_select_int64_indices(gen, monkeypatch, kernel):
    """Modules past 2³¹ elements take int64 indices (the C loop's are int32, shifted as they are stored): forced here
    on small modules, with chunks smaller than the modules."""
    monkeypatch.setenv("DFT_PEFT_CPU_KERNEL", kernel)
    monkeypatch.setattr(select_torch, "CHUNK", 256)
    monkeypatch.setattr(streaming, "index_dtype", lambda numel: torch.int64)
    new, old = random_deltas(gen, 5)
    for selection in ("global", "per_module"):
        got = select_core_torch(new, old, 0.1, selection)
        want = select_core_naive(new, old, 0.1, selection)
        for name, w in want.items():
            assert got[name].indices.dtype == torch.int64
            assert torch.equal(got[name].indices, w.indices.long()) and torch.equal(got[name].values, w.values)


def _pool_in_child() -> None:
    os._exit(0 if window_cpu.executor("read", 1).submit(int, "7").result(timeout=20) == 7 else 1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_thread_pools_in_a_forked_child():
    """A pool's threads (the read-ahead's, the C loop's) do not exist in a forked child: the child makes its own."""
    import multiprocessing

    assert window_cpu.executor("read", 1).submit(int, "3").result() == 3
    child = multiprocessing.get_context("fork").Process(target=_pool_in_child)
    child.start()
    child.join(60)
    assert child.exitcode == 0


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("numel", [100_000, 1 << 31])
def test_entries_grow_past_their_estimate(gen, monkeypatch, kernel, numel):
    """A module's storage is sized from its first chunks; a later chunk with many more entries grows it, and the part
    equals the pieces joined (positions shifted to the module; none stored where they are not tracked), whether the
    C loop's pieces are copied in by one C call or by torch ops, into int32 or (a module of 2^31 elements) int64."""
    monkeypatch.setenv("DFT_PEFT_CPU_KERNEL", kernel)
    calls = []
    append = window_cpu.append
    monkeypatch.setattr(window_cpu, "append", lambda *a: calls.append(1) or append(*a))
    pieces = []
    for count in (3, 5, 900, 0, 40):
        index = torch.arange(count, dtype=torch.int32) * 2
        keyed = torch.randperm(count, generator=gen)[: count // 3].sort().values.int()
        pieces.append(window_cpu.Piece(index, rand(gen, count), keyed,
                                       torch.randint(1, 99, (keyed.numel(),), dtype=torch.int32)))
    entries = streaming.ModuleEntries(module=0, numel=numel, device=torch.device("cpu"), track_pos=True)
    for i, piece in enumerate(pieces):
        entries.append([piece], seen=numel - 1000 * (len(pieces) - i), shift=10 * i)
    assert len(calls) == (len(pieces) if kernel == "c" else 0)
    module, idx, vals, pos, keys = entries.part()
    before = [0, *itertools.accumulate(p[0].numel() for p in pieces)]
    assert module == 0 and idx.dtype == pos.dtype == (torch.int32 if numel < 1 << 31 else torch.int64)
    assert torch.equal(idx, torch.cat([p[0] + 10 * i for i, p in enumerate(pieces)]).to(idx.dtype))
    assert torch.equal(vals, torch.cat([p[1] for p in pieces]))
    assert torch.equal(pos, torch.cat([p[2] + b for p, b in zip(pieces, before)]).to(pos.dtype))
    assert torch.equal(keys, torch.cat([p[3] for p in pieces]))
    every = streaming.ModuleEntries(module=1, numel=10, device=torch.device("cpu"), track_pos=False)
    every.append([window_cpu.Piece(torch.arange(4, dtype=torch.int32), rand(gen, 4), None,
                                   torch.ones(4, dtype=torch.int32))], 10, 0)
    assert every.part().pos is None and every.pos.numel() == 0
    # several pieces in one call (a chunk split across threads), positions not tracked
    untracked = streaming.ModuleEntries(module=2, numel=numel, device=torch.device("cpu"), track_pos=False)
    untracked.append(pieces, seen=numel, shift=7)
    _, idx, vals, pos, keys = untracked.part()
    assert pos is None and untracked.pos.numel() == 0
    assert torch.equal(idx, (torch.cat([p[0] for p in pieces]) + 7).to(idx.dtype))
    assert torch.equal(vals, torch.cat([p[1] for p in pieces]))
    assert torch.equal(keys, torch.cat([p[3] for p in pieces]))
    assert len(calls) == (len(pieces) + 1 if kernel == "c" else 0)


@pytest.mark.parametrize("seed", range(6))
def test_sampled_window_bounds_are_where_the_estimates_cross_the_target(seed):
    """`sampled_window`'s bisection over the key range (counts by binary search in sorted runs) stops where the lower
    estimate reaches k/total and the next key's does not, and one past such a key for the upper estimate, as plain
    counting over the unsorted sample says (the estimates here fall along the keys, so these are the last such keys);
    runs of clustered scales, absent elements (-1) and non-candidates (0) included."""
    gen = torch.Generator().manual_seed(seed)
    runs, total = 40 + 30 * seed, 10**6
    scales = 10 ** (3 * torch.rand(runs, 1, generator=gen))
    sample = (torch.rand(runs, sampling.RUN, generator=gen) * scales * 1e-3).view(torch.int32)
    sample[torch.rand(sample.shape, generator=gen) < 0.4] = 0
    sample[-1, 10 * (seed % 5):] = -1
    k = int(total * (0.01 + 0.05 * seed))
    lo, hi = sampling.sampled_window(sample, k, total)

    def estimate(t: int, sign: float) -> float:  # the estimator, counted plainly
        sizes, counts = (sample >= 0).sum(1).double(), (sample >= t).sum(1).double()
        p = float(counts.sum() / sizes.sum())
        spread = float(((counts - p * sizes) ** 2).sum()) * runs / (runs - 1)
        return p + sign * (4 * spread**0.5 / float(sizes.sum()) + 8 / float(sizes.sum()))

    assert 1 <= lo < hi <= MAX_KEY + 1
    if lo > 1:
        assert estimate(lo, -1.0) >= k / total > estimate(lo + 1, -1.0)
    else:
        assert estimate(2, -1.0) < k / total
    if hi <= MAX_KEY and hi > lo + 1:
        assert estimate(hi - 1, 1.0) >= k / total > estimate(hi, 1.0)


def test_in_memory_scopes_get_the_larger_sample(monkeypatch):
    """In-memory deltas are sampled up to SAMPLE_MAX elements (1/512 of the scope); a lazy mapping, where each run
    is a read, gets SAMPLE."""
    monkeypatch.setattr(sampling, "SAMPLE", 128)
    monkeypatch.setattr(sampling, "SAMPLE_MAX", 1024)
    new, old = sized_deltas(torch.Generator().manual_seed(0), [(512, 800), (300, 512)])
    names, shapes = sorted(new), {n: tuple(t.shape) for n, t in new.items()}
    in_memory = sampling.sample_keys(names, new, old, shapes)
    lazy = sampling.sample_keys(names, RangeReadDeltas(new), RangeReadDeltas(old), shapes)
    assert in_memory.shape == (1024 // sampling.RUN, sampling.RUN)
    assert lazy.shape == (128 // sampling.RUN, sampling.RUN)


def test_sampled_window_allows_for_clustered_runs(monkeypatch):
    """Rows of very different scales (as real deltas have): the sampled runs of one row vary together, and the window
    must allow for it, so one pass suffices; the result is exact either way. (Counting the runs' elements as
    independent draws missed the threshold on some of these inputs.)"""
    passes = []
    run = streaming.StreamPass.run
    monkeypatch.setattr(streaming.StreamPass, "run", lambda self: passes.append(1) or run(self))
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        new, old = {}, {}
        for m in range(24):
            rows = 10 ** (2 * torch.rand(256, 1, generator=gen)) * 1e-3
            new[f"m{m:02d}"], old[f"m{m:02d}"] = (torch.randn(256, 256, generator=gen) * rows for _ in range(2))
        passes.clear()
        got = select_core_torch(new, old, 0.05)
        assert_same_core(got, select_core_naive(new, old, 0.05), "global")
        assert len(passes) == 1, f"seed {seed}: the sampled window missed the threshold"


# --- the CPU (torch) path's own machinery ----------------------------------------------------------------------


@pytest.mark.parametrize(("kernel", "overlap"), CPU_KERNEL_MODES)
@pytest.mark.parametrize("window", ["too_high", "too_low"])
def test_torch_sampled_window_misses(gen, monkeypatch, window, kernel, overlap):
    """A sampled floor above the k-th key needs the second pass; a window below it, the full final ranking (with
    `overlap`, the cut that keys every entry comes while the next chunk, keyed for the old window, is scored)."""
    monkeypatch.setenv("DFT_PEFT_CPU_KERNEL", kernel)
    if overlap:
        monkeypatch.setattr(window_cpu, "MIN_PART", 64)
    monkeypatch.setattr(select_torch, "CHUNK", 512)
    monkeypatch.setattr(sampling, "SAMPLE", 128)
    sampled = streaming.sampled_window

    def misplaced(sample, k, total):
        lo, hi = sampled(sample, k, total)
        return (hi, 2 * hi - lo) if window == "too_high" else (max(1, lo // 2), lo)

    monkeypatch.setattr(streaming, "sampled_window", misplaced)
    passes, sures = [], []
    run = streaming.StreamPass.run
    monkeypatch.setattr(streaming.StreamPass, "run", lambda self: passes.append(1) or run(self))
    start = window_cpu.start_window
    monkeypatch.setattr(window_cpu, "start_window",
                        lambda *a, **kw: sures.append((a[1].data_ptr(), a[7], a[5])) or start(*a, **kw))
    new, old = sized_deltas(gen, [(60, 50), (3000,), (40, 40)])
    want = select_core_naive(new, old, 0.05)
    assert_same_core(select_core_torch(new, old, 0.05), want, window)
    assert len(passes) == (2 if window == "too_high" else 1)
    if overlap and window == "too_low":  # the chunk started before the cut was scored again, every entry keyed
        redone = [(a, b) for a, b in itertools.pairwise(sures)
                  if a[:2] == b[:2] and a[2] <= MAX_KEY and b[2] == MAX_KEY + 1]
        assert redone


@pytest.mark.skipif("c" not in CPU_KERNELS, reason="no C compiler")
def test_overlapped_chunk_is_finished_before_an_error_propagates(gen, monkeypatch):
    """If storing a chunk's entries fails while the next chunk is scored on the pool, that chunk's threads are
    waited for before the error leaves: they read its inputs and write a scratch, which may be freed after."""
    monkeypatch.setenv("DFT_PEFT_CPU_KERNEL", "c")
    monkeypatch.setattr(select_torch, "CHUNK", 512)
    monkeypatch.setattr(window_cpu, "MIN_PART", 64)
    finished, started = [], []
    start = window_cpu.start_window

    def tracked(*a, **kw):
        finish = start(*a, **kw)
        started.append(len(started))
        index = started[-1]
        return lambda: finished.append(index) or finish()

    monkeypatch.setattr(window_cpu, "start_window", tracked)
    calls = []

    def failing_add(self, *a):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming.Buffer, "add", failing_add)
    new, old = sized_deltas(gen, [(60, 50), (3000,)])
    with pytest.raises(KeyboardInterrupt):
        select_core_torch(new, old, 0.05)
    assert calls and len(started) >= 2 and set(started) <= set(finished)


def test_c_loop_builds_where_a_compiler_exists():
    """CI machines have a C++ compiler driver and ninja: the C loop must build there, not silently fall back."""
    if not (shutil.which(os.environ.get("CXX", "c++")) and shutil.which("ninja")):
        pytest.skip("no compiler driver or no ninja on this machine")
    assert window_cpu.status() == (True, None)


BUILD_STATUS = "from dft_peft.kernels import window_cpu; print(window_cpu.status())"


@pytest.mark.skipif("c" not in CPU_KERNELS, reason="the C loop cannot be built here")
def test_c_loop_build_is_kept_for_later_processes(tmp_path):
    """A process builds the loop into torch's extension folder, for any processor of the architecture (no flag chosen
    for the building machine; on x86-64 one clone per level); a later process loads that build without rebuilding."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("DFT_PEFT_CPU_KERNEL", None)
    first = subprocess.run([sys.executable, "-c", BUILD_STATUS], env=env, capture_output=True, text=True)
    assert first.stdout.strip() == "(True, None)", first.stderr
    (built,) = tmp_path.glob(f"{window_cpu.NAME}/*.so")
    assert "-march=native" not in (built.parent / "build.ninja").read_text()
    if platform.machine() == "x86_64":
        assert b"window_f32_f32.arch_x86_64_v3" in built.read_bytes()
    stamp = built.stat().st_mtime_ns
    later = subprocess.run([sys.executable, "-c", BUILD_STATUS], env=env, capture_output=True, text=True)
    assert later.stdout.strip() == "(True, None)", later.stderr
    assert built.stat().st_mtime_ns == stamp


def test_fallback_to_torch_warns_once_with_the_reason(gen, monkeypatch):
    """Where the loop cannot be built, selection runs the torch pass (same bits) after one warning naming the reason;
    `status()` gives that reason, and `DFT_PEFT_CPU_KERNEL=c` makes it an error."""
    monkeypatch.delenv("DFT_PEFT_CPU_KERNEL", raising=False)

    def no_compiler():
        raise RuntimeError("Error building extension 'dft_peft_window_cpu'\n/bin/sh: 1: c++: not found")

    monkeypatch.setattr(window_cpu, "_build", no_compiler)
    monkeypatch.setattr(window_cpu, "_library", None)
    monkeypatch.setattr(window_cpu, "_error", None)
    new, old = sized_deltas(gen, [(40, 50), (300,)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert_same_core(select_core_torch(new, old, 0.1), select_core_naive(new, old, 0.1), "fallback")
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "core selection's C loop is unavailable (Error building extension 'dft_peft_window_cpu' (/bin/sh: 1: c++: not "
        "found)); selecting with torch ops, which is slower"]
    reason = "Error building extension 'dft_peft_window_cpu' (/bin/sh: 1: c++: not found)"
    assert window_cpu.status() == (False, reason)
    monkeypatch.setenv("DFT_PEFT_CPU_KERNEL", "c")
    with pytest.raises(RuntimeError, match=f"DFT_PEFT_CPU_KERNEL=c but .*{re.escape(reason)}"):
        select_core_torch(new, old, 0.1)


# --- the C loop's buffers: capacities are checked in C, and nothing is written past them -----------------------------

GUARD = 64  # entries past each buffer that must stay untouched
SENTINEL = -7


def guarded(capacity: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(a buffer of `capacity` entries filled with SENTINEL, the GUARD entries just past it in the same storage)."""
    whole = torch.full((capacity + GUARD,), SENTINEL, dtype=dtype)
    return whole[:capacity], whole[capacity:]


def untouched(*tensors: torch.Tensor) -> bool:
    return all(bool((t == SENTINEL).all()) for t in tensors)


def guarded_scratch(capacity: int) -> tuple[object, list[torch.Tensor]]:
    """A `window_cpu.Scratch` of `capacity` entries whose four arrays each have GUARD sentinels just past them."""
    scratch, guards = window_cpu.Scratch(0), []
    for field, dtype in (("index", torch.int32), ("value", torch.float32), ("pos", torch.int32),
                         ("key", torch.int32)):
        buffer, guard = guarded(capacity, dtype)
        setattr(scratch, field, buffer)
        guards.append(guard)
    scratch.capacity = capacity
    return scratch, guards


@pytest.mark.skipif("c" not in CPU_KERNELS, reason="the C loop cannot be built here")
@pytest.mark.parametrize("n", [1000, 3 * (1 << 16) + 17])  # one thread's part; parts on several threads
def test_c_window_refuses_a_scratch_too_small_for_the_kept_entries(gen, monkeypatch, n):
    """The scratch bounds the kept entries, not the chunk: a small one serves a narrow window (one thread), and one
    entry fewer than a window keeps is an error with nothing written past it (a thread writes from its part's start
    to the next part's)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    lib = window_cpu.library()
    new, old = rand(gen, n), rand(gen, n)
    keys = chunk_keys(new, old)[0]
    kept = int((keys > 0).sum())
    if n < 2 * window_cpu.MIN_PART:
        top = int(keys.max())
        scratch, guards = guarded_scratch(8)
        narrow = window_cpu.window(lib, new, old, top, top, top + 1, 1.0, 0, scratch)  # the largest key only
        assert joined(narrow)[0].tolist() == [int(keys.argmax())] and untouched(*guards)
    scratch, guards = guarded_scratch(kept - 1)
    with pytest.raises(BufferError, match="more entries than the scratch's room"):
        window_cpu.window(lib, new, old, *WHOLE_WINDOW, scratch)
    assert untouched(*guards)
    enough = window_cpu.Scratch(kept if n < 2 * window_cpu.MIN_PART else n)
    assert joined(window_cpu.window(lib, new, old, *WHOLE_WINDOW, enough))[0].numel() == kept


@pytest.mark.skipif("c" not in CPU_KERNELS, reason="the C loop cannot be built here")
@pytest.mark.parametrize("short", ["entries", "keyed"])
def test_c_append_refuses_pieces_past_the_storage(gen, short):
    """Pieces that do not fit a storage's room (for entries, or for keyed entries) are an error before anything is
    written to it."""
    lib = window_cpu.library()
    pieces = [window_cpu.Piece(torch.arange(count, dtype=torch.int32), rand(gen, count),
                               torch.arange(count // 2, dtype=torch.int32),
                               torch.arange(1, count // 2 + 1, dtype=torch.int32)) for count in (5, 9)]
    room, keyed_room = (14, 7) if short == "entries" else (15, 6)  # the pieces need 14 and 6, after 1 and 1 stored
    index, index_guard = guarded(room, torch.int64)
    value, value_guard = guarded(room, torch.float32)
    pos, pos_guard = guarded(keyed_room, torch.int64)
    key, key_guard = guarded(keyed_room, torch.int32)
    with pytest.raises(BufferError, match="do not fit after entry 1"):
        window_cpu.append(lib, pieces, index, value, pos, key, 1, 1, 0)
    assert untouched(index, value, pos, key, index_guard, value_guard, pos_guard, key_guard)
    exact = (guarded(n, t.dtype)[0] for n, t in ((14, index), (14, value), (6, pos), (6, key)))
    window_cpu.append(lib, pieces, *exact, 0, 0, 0)  # room for exactly what the pieces hold


@pytest.mark.skipif("c" not in CPU_KERNELS, reason="the C loop cannot be built here")
def test_c_compact_and_kth_largest_refuse_short_buffers(gen):
    """compact with a mask longer than the entries, and kth_largest with a histogram short of 65536 bins, are errors
    with nothing written."""
    lib = window_cpu.library()
    index, index_guard = guarded(10, torch.int32)
    value, value_guard = guarded(10, torch.float32)
    with pytest.raises(BufferError, match="a mask of 11 entries over room for 10"):
        window_cpu.compact(lib, torch.ones(11, dtype=torch.bool), index, value)
    assert untouched(index, value, index_guard, value_guard)
    keys = torch.randint(1, 1 << 30, (100,), generator=gen, dtype=torch.int32)
    hist, guard = guarded(window_cpu.HIST_BINS - 1, torch.int64)
    above = ctypes.c_int64(SENTINEL)
    parts, sizes = (ctypes.c_void_p * 1)(keys.data_ptr()), (ctypes.c_int64 * 1)(keys.numel())
    got = lib.kth_largest(parts, sizes, 1, 5, hist.data_ptr(), hist.numel(), ctypes.byref(above))
    assert got == window_cpu.OVERFLOW and above.value == SENTINEL and untouched(hist, guard)


WHOLE_WINDOW = (1, MAX_KEY, MAX_KEY + 1, 1.0, 0)  # lo, hi, sure, scale, offset: all kept


def joined(got: window_cpu.Kept):
    """(index, value, positions or None if all keyed, keys, NaN/inf seen) of a window pass's pieces, joined."""
    pieces, bad = got
    before = [0, *itertools.accumulate(len(p.index) for p in pieces)]
    empty = torch.empty(0, dtype=torch.int32)
    index, values, keys = (torch.cat([p[f] for p in pieces] or [empty]) for f in (0, 1, 3))
    pos = torch.cat([(torch.arange(len(p.index)) if p.pos is None else p.pos) + b for p, b in zip(pieces, before)]
                    or [empty])
    return index, values, None if keys.numel() == index.numel() else pos, keys, bad


def check_window(got, keys: torch.Tensor, delta: torch.Tensor, lo: int, hi: int, sure: int, offset: int) -> None:
    """`window_cpu.window`'s result against torch ops on the chunk's keys and fp32 Δnew (scale 0.3)."""
    index, values, pos, got_keys, bad = joined(got)
    want = ((keys >= lo) & (keys <= hi)).nonzero().squeeze(1)
    want_pos = (keys[want] < sure).nonzero().squeeze(1)
    assert not bad
    assert torch.equal(index.long(), want + offset)
    assert torch.equal(values.view(torch.int32), (delta[want] * 0.3).view(torch.int32))
    assert (pos is None) == (want_pos.numel() == want.numel())
    if pos is not None:
        assert torch.equal(pos.long(), want_pos)
    assert torch.equal(got_keys, keys[want][want_pos])


def window_bounds(keys: torch.Tensor) -> list[tuple[int, int, int]]:
    """(lo, hi, sure) triples: everything, keys exactly at both bounds, and `sure` inside, below and above."""
    bounds = [(1, MAX_KEY, MAX_KEY + 1)]
    present = keys[keys > 0]
    if present.numel():
        lo, hi, mid = int(present.min()), int(present.max()), int(present.median())
        bounds += [(lo, hi, mid), (hi, hi, hi), (lo + 1, max(lo + 1, hi - 1), lo), (lo, hi, hi + 1)]
    return bounds


@pytest.mark.skipif("c" not in CPU_KERNELS, reason="the C loop cannot be built here")
@pytest.mark.parametrize("new_dtype", FLOATS)
@pytest.mark.parametrize("old_dtype", FLOATS)
def test_c_loop_matches_torch_chunk_pass(gen, new_dtype, old_dtype):
    """The C loop and its reference `window_torch` against the torch ops of the rule (keys, nonzero, gather, scale),
    every dtype pair, odd lengths, keys exactly at both window bounds, zeros, subnormals and signs that agree."""
    lib = window_cpu.library()
    n = int(torch.randint(1, 3000, (), generator=gen))
    new = rand(gen, n, dtype=new_dtype, levels=4)
    old = rand(gen, n, dtype=old_dtype, levels=4)
    new[: min(n, 3)] = torch.tensor([0.0, 1e-39, -2.0], dtype=torch.float64)[: min(n, 3)].to(new_dtype)
    keys, _ = chunk_keys(new, old)
    scratch = window_cpu.Scratch(n)
    for lo, hi, sure in window_bounds(keys):
        got = window_cpu.window(lib, new, old, lo, hi, sure, 0.3, 1000, scratch)
        assert all(piece.index.dtype == torch.int32 for piece in got.pieces)
        check_window(got, keys, new.float(), lo, hi, sure, 1000)
        check_window(window_torch.window_torch(new, old, lo, hi, sure, 0.3, 1000), keys, new.float(), lo, hi, sure,
                     1000)


@pytest.mark.skipif("c" not in CPU_KERNELS, reason="the C loop cannot be built here")
@pytest.mark.parametrize("tuned_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_c_terms_loop_matches_torch_subtraction(gen, tuned_dtype, base_dtype):
    """The `terms` loops (two checkpoints and their base) against torch subtracting first (`Terms.delta`), with
    checkpoint values equal to the base (Δ = 0) and differences that round."""
    lib = window_cpu.library()
    n = int(torch.randint(1, 3000, (), generator=gen))
    base = rand(gen, n, dtype=base_dtype)
    new, old = ((base.float() + rand(gen, n, levels=64) * 1e-2).to(tuned_dtype) for _ in range(2))
    new[: n // 4] = base[: n // 4].to(tuned_dtype)
    assert window_cpu.usable_terms(new, old, base)
    delta_new, delta_old = Terms(new, base).delta(), Terms(old, base).delta()
    keys, _ = chunk_keys(delta_new, delta_old)
    scratch = window_cpu.Scratch(n)
    for lo, hi, sure in window_bounds(keys):
        got = window_cpu.window(lib, new, old, lo, hi, sure, 0.3, 7, scratch, base)
        check_window(got, keys, delta_new, lo, hi, sure, 7)


@pytest.mark.skipif("c" not in CPU_KERNELS, reason="the C loop cannot be built here")
def test_c_kth_largest_matches_kthvalue(gen):
    """The histogram select against `torch.kthvalue` over parts: ties, keys in the lowest and highest bins, k = 1 and
    k = all."""
    lib = window_cpu.library()
    pools = [torch.randint(1, 1 << 31, (500,), generator=gen, dtype=torch.int64).int(),
             torch.randint(0x7F7FFFF0, 0x7F800001, (300,), generator=gen, dtype=torch.int64).int(),
             torch.randint(0, 3, (300,), generator=gen, dtype=torch.int32), torch.full((50,), 77, dtype=torch.int32)]
    for keys in [*pools, torch.cat(pools)]:
        parts = list(keys.split(int(torch.randint(1, 400, (), generator=gen))))
        for k in {1, keys.numel(), int(torch.randint(1, keys.numel() + 1, (), generator=gen))}:
            kth = int(torch.kthvalue(keys, keys.numel() - k + 1).values)
            assert window_cpu.kth_largest(lib, [*parts, keys[:0]], k) == (kth, int((keys > kth).sum()))
        with pytest.raises(ValueError, match="k = 0"):
            window_cpu.kth_largest(lib, parts, 0)


@pytest.mark.skipif("c" not in CPU_KERNELS, reason="the C loop cannot be built here")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_c_loop_flags_nonfinite_and_splits_across_threads(gen, bad):
    """Chunks large enough for several threads: the parts are joined in index order; NaN/inf anywhere is flagged."""
    lib = window_cpu.library()
    n = 3 * window_cpu.MIN_PART + 17
    new, old = rand(gen, n), rand(gen, n)
    keys = chunk_keys(new, old)[0]
    scratch = window_cpu.Scratch(n)
    for lo, hi, sure in window_bounds(keys):
        check_window(window_cpu.window(lib, new, old, lo, hi, sure, 0.3, 5, scratch), keys, new, lo, hi, sure, 5)
    old[n - 5] = bad
    assert window_cpu.window(lib, new, old, *WHOLE_WINDOW, scratch)[1]
    empty = torch.empty(0)
    assert window_cpu.window(lib, empty, empty, *WHOLE_WINDOW, scratch) == ([], False)


# --- scatter-merge ------------------------------------------------------------------------------------------------


def merge_case(gen, dtype, numel=6000, nnz=1500):
    weight = rand(gen, numel // 50, 50, dtype=dtype)
    indices = torch.randperm(numel, generator=gen)[:nnz].sort().values.int()
    values = rand(gen, nnz) * 0.01
    if dtype != torch.float32:  # exact rounding ties and a carry into the exponent
        weight.view(-1)[indices[:3].long()] = torch.tensor([1.0, 1.0, 1.9921875], dtype=dtype)
        values[:3] = torch.tensor([2.0**-8, 3 * 2.0**-8, 2.0**-8]) * (1 if dtype == torch.bfloat16 else 2.0**-3)
    return weight.to(DEVICE), indices.to(DEVICE), values.to(DEVICE)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scatter_merge_matches_torch(gen, dtype):
    from dft_peft.kernels.scatter_merge_triton import (
        merged_values_triton,
        scatter_merge_triton,
        scatter_restore_triton,
    )

    weight, indices, values = merge_case(gen, dtype)
    for idx in (indices, indices.long()):
        want, got = weight.clone(), weight.clone()
        want_backup = scatter_merge_torch(want, idx, values)
        assert torch.equal(bits(merged_values_triton(weight, idx, values)), bits(want.view(-1)[idx.long()]))
        got_backup = scatter_merge_triton(got, idx, values)
        assert torch.equal(bits(got), bits(want)) and torch.equal(bits(got_backup), bits(want_backup))
        scatter_restore_triton(got, idx, got_backup)
        assert torch.equal(bits(got), bits(weight))
    empty = torch.empty(0, dtype=torch.int32, device=DEVICE)
    assert scatter_merge_triton(weight, empty, values[:0]).numel() == 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_compose_weight_matches_torch(gen, dtype, transposed):
    from dft_peft.kernels.scatter_merge_triton import compose_weight_triton

    weight, indices, values = merge_case(gen, dtype)
    if transposed:
        weight = weight.t()
    grad = rand(gen, *weight.shape, dtype=dtype).to(DEVICE)
    results = []
    for compose in (compose_weight_torch, compose_weight_triton):
        w, v = weight.clone().requires_grad_(), values.clone().requires_grad_()
        out = compose(w, indices, v)
        out.backward(grad)
        results.append((out.detach(), w.grad, v.grad))
    for want, got in zip(*results):
        assert got.shape == want.shape and torch.equal(bits(got), bits(want))


def test_dispatchers_match_torch(gen):
    """The public dispatchers (Triton on CUDA, torch elsewhere) give the torch bits."""
    weight, indices, values = merge_case(gen, torch.bfloat16)
    want, got = weight.clone(), weight.clone()
    backup = scatter_merge(got, indices, values)
    assert torch.equal(bits(backup), bits(scatter_merge_torch(want, indices, values)))
    assert torch.equal(bits(got), bits(want))
    merged = merged_values(weight, indices, values)
    assert torch.equal(bits(merged), bits(merged_values_torch(weight, indices, values)))
    scatter_restore(got, indices, backup)
    scatter_restore_torch(want, indices, backup)
    assert torch.equal(bits(got), bits(weight)) and torch.equal(bits(want), bits(weight))
    composed = compose_weight(weight, indices, values)
    assert torch.equal(bits(composed), bits(compose_weight_torch(weight, indices, values)))
