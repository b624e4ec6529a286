"""The CPU selection pass as one compiled C loop (`window_cpu.c`): score, key-window test and compaction of a chunk in
a single read of Δnew and Δold. Its torch reference is `window_torch.window_torch`, which gives the same bits.

The torch pass's per-chunk work (scores, a mask, `nonzero`, then gathers) moves each element several times and leaves
selection far below memory speed; this loop writes only the kept entries. It is plain C99 (no torch headers), built
at first use by `torch.utils.cpp_extension` with $CXX (c++ by default) and ninja, and called through ctypes, which
releases the GIL, so the parts of a chunk run on `torch.get_num_threads()` threads.

The build is kept in torch's extension folder ($TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions/<python,
accelerator>/dft_peft_window_cpu), which torch locks while one process builds, so that concurrent first uses build
once; a changed source is rebuilt there. The folder may be shared by machines with different processors, so the build
carries no instructions chosen for the building machine: the C loops are compiled once per x86-64 level (AVX-512, AVX2,
baseline) and the loader picks the widest the running processor has (GCC's `target_clones`; see `window_cpu.c`).

Where the loop cannot be built (no compiler, no ninja), the torch pass runs instead, with the same bits, and a warning
naming the reason is given once per process. `DFT_PEFT_CPU_KERNEL=torch` forces the torch pass, `=c` requires this
loop (an error if it cannot be built). `status()` says whether it is built, and why not.

A second family of loops (`terms`) takes two fine-tuned checkpoints and the base weights instead of the deltas and
forms Δnew = new − base and Δold = old − base on the fly, so `build_edit` never writes the deltas out.

Every C function is handed the capacity of each buffer it writes and refuses, with an error code, an input that
would need more; the wrappers here raise `BufferError` then.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = Path(__file__).with_name("window_cpu.c")
NAME = "dft_peft_window_cpu"  # the build's folder in torch's extension folder
# C99 despite the C++ driver; strict IEEE otherwise: no fast-math, no contraction of a product into a sum
FLAGS = ["-x", "c", "-std=c99", "-O3", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off"]
MIN_PART = 1 << 16  # elements per thread, at least
OVERFLOW = -1  # what a C function returns where its input would not fit a buffer
HIST_BINS = 1 << 16  # kth_largest's histogram
_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_TERM_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}  # checkpoints and base
_WINDOW_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32,
                    ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_float, *[ctypes.c_void_p] * 4,
                    ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None
_executors: dict[str, tuple[int, int, ThreadPoolExecutor]] = {}  # name → (process id, workers, executor)


class Piece(NamedTuple):
    """Kept entries of one part of a chunk, in index order."""

    index: torch.Tensor  # (n,) int32 (C loop) or int64 (torch pass): chunk offset + flat index
    value: torch.Tensor  # (n,) float32: fp32(Δnew) · scale
    pos: torch.Tensor | None  # (m,) positions in `index` of the entries whose key is below `sure`; None: all of them
    key: torch.Tensor  # (m,) int32: those entries' keys


class Kept(NamedTuple):
    """What a chunk's window pass found: its pieces, and whether the chunk holds NaN/inf."""

    pieces: list[Piece]
    nonfinite: bool


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Argument and result types of every entry point, set once."""
    names = [f"window_{new}_{old}" for new, old in itertools.product(_DTYPES.values(), repeat=2)]
    names += [f"terms_{tuned}_{base}" for tuned, base in itertools.product(_TERM_DTYPES.values(), repeat=2)]
    for name in names:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _WINDOW_ARGTYPES, ctypes.c_int64
    for fn in (lib.compact_i32, lib.compact_i64):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = ctypes.c_int64
    for fn in (lib.append_i32, lib.append_i64):
        fn.argtypes, fn.restype = [ctypes.c_int64, *[ctypes.c_void_p] * 10, *[ctypes.c_int64] * 5], ctypes.c_int64
    lib.kth_largest.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_int64, ctypes.c_void_p]
    lib.kth_largest.restype = ctypes.c_int32
    return lib


def _build() -> ctypes.CDLL:
    """Build (or find built) the loop in torch's extension folder and load it."""
    from torch.utils import cpp_extension  # imports setuptools: only once the loop is needed

    path = cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=FLAGS, is_python_module=False)
    return _declare(ctypes.CDLL(path))


def _reason(err: Exception) -> str:
    """The first line of a build error, and the compiler's first error line where it printed one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    detail = next((line for line in lines[1:] if "error" in line.lower() or "not found" in line), None)
    return lines[0] if detail is None else f"{lines[0]} ({detail})"


def library() -> ctypes.CDLL | None:
    """The compiled loop, built on first use; None where it cannot be (warned once) or `DFT_PEFT_CPU_KERNEL=torch`."""
    global _library, _error
    mode = os.environ.get("DFT_PEFT_CPU_KERNEL", "auto")
    if mode == "torch":
        return None
    with _lock:
        if _library is None and _error is None:
            try:
                _library = _build()
            except Exception as err:  # any failure to build or load: the torch pass gives the same bits
                _error = _reason(err)
                warnings.warn(f"core selection's C loop is unavailable ({_error}); selecting with torch ops, "
                              "which is slower", RuntimeWarning, stacklevel=2)
    if _library is None and mode == "c":
        raise RuntimeError(f"DFT_PEFT_CPU_KERNEL=c but core selection's C loop is unavailable: {_error}")
    return _library


def status() -> tuple[bool, str | None]:
    """Whether the C loop is built (building it if no one tried yet), and why not."""
    if os.environ.get("DFT_PEFT_CPU_KERNEL", "auto") == "torch":
        return False, "DFT_PEFT_CPU_KERNEL=torch"
    with warnings.catch_warnings(), contextlib.suppress(RuntimeError):  # the reason is returned, not warned or raised
        warnings.simplefilter("ignore", RuntimeWarning)
        library()
    return _library is not None, _error


def executor(name: str, workers: int) -> ThreadPoolExecutor:
    """This process's thread pool `name` with at least `workers` threads (for work that releases the GIL: ctypes
    calls, file reads). A forked child makes its own: the parent's threads do not exist there."""
    held = _executors.get(name)
    if held is None or held[0] != os.getpid() or held[1] < workers:
        held = _executors[name] = (os.getpid(), workers, ThreadPoolExecutor(workers, f"dft_peft_{name}"))
    return held[2]


def usable(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Whether a chunk pair can go through the C loop: contiguous CPU tensors of the four float dtypes."""
    return (new.device.type == "cpu" and old.device.type == "cpu" and new.dtype in _DTYPES
            and old.dtype in _DTYPES and new.is_contiguous() and old.is_contiguous())


def usable_terms(new: torch.Tensor, old: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether two checkpoints' chunks and the base's can go through a `terms` loop: contiguous CPU tensors of one
    size, both checkpoints of one dtype, fp32/bf16/fp16 (where torch, too, subtracts in fp32)."""
    return (usable(new, old) and usable(new, base) and new.dtype == old.dtype and new.dtype in _TERM_DTYPES
            and base.dtype in _TERM_DTYPES and new.numel() == old.numel() == base.numel())


class Scratch:
    """Reusable output room for a chunk's kept entries (int32 index, float32 value, int32 position and int32 key per
    entry): allocated once per pass (two, used in turn, where chunks overlap) so that no chunk pays for fresh pages.
    Room for the chunk's length always suffices."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.index = torch.empty(capacity, dtype=torch.int32)
        self.value = torch.empty(capacity, dtype=torch.float32)
        self.pos = torch.empty(capacity, dtype=torch.int32)
        self.key = torch.empty(capacity, dtype=torch.int32)


def window(
    lib: ctypes.CDLL, new: torch.Tensor, old: torch.Tensor, lo: int, hi: int, sure: int, scale: float, offset: int,
    scratch: Scratch, base: torch.Tensor | None = None,
) -> Kept:
    """The chunk's elements whose key lies in [lo, hi], in index order, and whether the chunk holds NaN/inf.

    They come as pieces, one per thread that found any: views of the scratch, valid until its next use (positions
    relative to the piece, keys of the entries below `sure`). offset + numel must fit in int32. With `base` (see
    `usable_terms`), `new` and `old` are the fine-tuned weights and the deltas their differences from it. Raises
    `BufferError` (having written nothing past the scratch) where a thread's part keeps more entries than the scratch
    has room for from the part's start.
    """
    return start_window(lib, new, old, lo, hi, sure, scale, offset, scratch, base, background=False)()


def start_window(
    lib: ctypes.CDLL, new: torch.Tensor, old: torch.Tensor, lo: int, hi: int, sure: int, scale: float, offset: int,
    scratch: Scratch, base: torch.Tensor | None = None, background: bool = True,
) -> Callable[[], Kept]:
    """`window`, started on the pool's threads (`background`: even a one-part chunk, so that the caller can store
    the previous chunk's entries meanwhile); the returned function waits and gives `window`'s result. The inputs and
    the scratch must stay untouched until then."""
    n = new.numel()
    if base is None:
        fn = getattr(lib, f"window_{_DTYPES[new.dtype]}_{_DTYPES[old.dtype]}")
    else:
        fn = getattr(lib, f"terms_{_TERM_DTYPES[new.dtype]}_{_TERM_DTYPES[base.dtype]}")
    parts = max(1, min(torch.get_num_threads(), n // MIN_PART))
    bounds = [n * p // parts for p in range(parts + 1)]
    flags, keyed = (ctypes.c_int32 * parts)(), (ctypes.c_int64 * parts)()
    inputs = (new, old, base if base is not None else new)  # held by `run`: alive while a thread reads them
    room = scratch.capacity

    def run(p: int) -> int:
        start = bounds[p]
        x, y, b = (t.data_ptr() + start * t.element_size() for t in inputs)
        first = min(start, room)  # part p writes from its start up to the next part's
        out = (t[first:].data_ptr() for t in (scratch.index, scratch.value, scratch.pos, scratch.key))
        capacity = max(0, min(bounds[p + 1], room) - start)
        return fn(x, y, b, bounds[p + 1] - start, offset + start, lo, hi, sure, scale, *out, capacity,
                  ctypes.byref(keyed, 8 * p), ctypes.byref(flags, 4 * p))

    if background or parts > 1:
        pool = executor("window", max(parts, torch.get_num_threads()))
        futures = [pool.submit(run, p) for p in range(parts)]
    else:
        futures = None
        counts = [run(0)]

    def finish() -> Kept:
        done = counts if futures is None else [f.result() for f in futures]
        if OVERFLOW in done:
            raise BufferError(f"window_cpu.window: a chunk of {n} elements keeps more entries than the scratch's "
                              f"room for {room}")
        pieces = [Piece(scratch.index[s : s + c], scratch.value[s : s + c], scratch.pos[s : s + kc],
                        scratch.key[s : s + kc]) for s, c, kc in zip(bounds, done, keyed) if c]
        return Kept(pieces, any(flags))

    return finish


def appendable(pieces: list[Piece]) -> bool:
    """Whether `append` takes these pieces: `window`'s (contiguous CPU int32 indices and positions, float32 values)."""
    return all(
        p.pos is not None and p.index.dtype == p.pos.dtype == p.key.dtype == torch.int32
        and p.value.dtype == torch.float32 and all(t.device.type == "cpu" and t.is_contiguous() for t in p)
        for p in pieces
    )


def append(
    lib: ctypes.CDLL, pieces: list[Piece], index: torch.Tensor, value: torch.Tensor, pos: torch.Tensor | None,
    key: torch.Tensor, n: int, keyed: int, shift: int,
) -> None:
    """Copy `window`'s pieces into a module's storage in one C call on this thread, without the GIL: indices plus
    `shift` and values from entry n, keys from keyed entry `keyed`, and (`pos` given) the keyed entries' positions
    made relative to the storage. (It measured faster than four torch copies per piece, each op paying dispatch and,
    for large pieces, a parallel region, while the pool scores the next chunk.) The storage's index type is that of
    `index` (int32/int64). Raises `BufferError`, having written nothing, where the pieces do not fit the storage."""
    fn = lib.append_i32 if index.dtype == torch.int32 else lib.append_i64
    parts = len(pieces)

    def pointers(field: int) -> ctypes.Array:
        return (ctypes.c_void_p * parts)(*(piece[field].data_ptr() for piece in pieces))

    sizes = [(ctypes.c_int64 * parts)(*(len(piece.index) for piece in pieces)),
             (ctypes.c_int64 * parts)(*(len(piece.key) for piece in pieces))]
    room = min(index.numel(), value.numel())
    keyed_room = min(key.numel(), pos.numel()) if pos is not None else key.numel()
    if fn(parts, pointers(0), pointers(1), pointers(2), pointers(3), *sizes, index.data_ptr(), value.data_ptr(),
          None if pos is None else pos.data_ptr(), key.data_ptr(), n, keyed, shift, room, keyed_room) == OVERFLOW:
        raise BufferError(f"window_cpu.append: {sum(sizes[0])} entries ({sum(sizes[1])} keyed) do not fit after "
                          f"entry {n} ({keyed} keyed) of a storage with room for {room} ({keyed_room} keyed)")


def compactable(keep: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `compact` takes these: contiguous CPU tensors, a bool mask, int32/int64 indices, float32 values."""
    return (keep.dtype == torch.bool and index.dtype in (torch.int32, torch.int64) and value.dtype == torch.float32
            and all(t.device.type == "cpu" and t.is_contiguous() for t in (keep, index, value)))


def compact(lib: ctypes.CDLL, keep: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> int:
    """Move the kept (index, value) entries to the front, in order and in place, in one C loop; return their number.
    Raises `BufferError`, having written nothing, where the mask is longer than the entries."""
    fn = lib.compact_i32 if index.dtype == torch.int32 else lib.compact_i64
    room = min(index.numel(), value.numel())
    kept = fn(keep.data_ptr(), keep.numel(), index.data_ptr(), value.data_ptr(), room)
    if kept == OVERFLOW:
        raise BufferError(f"window_cpu.compact: a mask of {keep.numel()} entries over room for {room}")
    return kept


def kth_largest(lib: ctypes.CDLL, keys: list[torch.Tensor], k: int) -> tuple[int, int] | None:
    """(k-th largest key, number of keys above it) over int32 key tensors, without joining them; None where the C
    function does not take these tensors (not contiguous int32 on the CPU)."""
    if not all(t.dtype == torch.int32 and t.device.type == "cpu" and t.is_contiguous() for t in keys):
        return None
    keys = [t for t in keys if t.numel()]
    if not 1 <= k <= sum(t.numel() for t in keys):
        raise ValueError(f"kth_largest: k = {k} is not between 1 and the number of keys")
    parts = (ctypes.c_void_p * len(keys))(*(t.data_ptr() for t in keys))
    sizes = (ctypes.c_int64 * len(keys))(*(t.numel() for t in keys))
    hist, above = torch.empty(HIST_BINS, dtype=torch.int64), ctypes.c_int64()
    kth = lib.kth_largest(parts, sizes, len(keys), k, hist.data_ptr(), hist.numel(), ctypes.byref(above))
    if kth == OVERFLOW:
        raise BufferError(f"window_cpu.kth_largest: a histogram of {hist.numel()} bins, not {HIST_BINS}")
    return kth, above.value
