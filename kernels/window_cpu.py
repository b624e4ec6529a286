"""The CPU selection pass as one compiled C loop (`window_cpu.c`): score, key-window test and compaction of a chunk in
a single read of Δnew and Δold.

The torch path's per-chunk work (a fused scoring pass that writes every element's key, then `nonzero`, then gathers)
moves each element several times and leaves selection far below memory speed; this loop writes only the kept
entries. It is plain C99, compiled with the system C compiler at first use (about a second, no torch headers; the
build is kept in ~/.cache/dft_peft, or $DFT_PEFT_CACHE, for later processes on the same processor) and called
through ctypes, which releases the GIL, so the parts of a chunk run on `torch.get_num_threads()` threads. Where no
compiler is found the torch path runs instead, with the same bits.

A second family of loops (`terms`) takes two fine-tuned checkpoints and the base weights instead of the deltas and
forms Δnew = new − base and Δold = old − base on the fly, so `build_edit` never writes the deltas out.

`DFT_PEFT_CPU_KERNEL=torch` forces the torch path, `=c` requires this one (an error if it cannot be built).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("window_cpu.c")
MIN_PART = 1 << 16  # elements per thread, at least
FLAGS = ["-O3", "-std=c99", "-fno-trapping-math", "-fno-math-errno", "-fPIC", "-shared"]  # strict IEEE otherwise
_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_TERM_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}  # checkpoints and base
_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
             ctypes.c_int32, ctypes.c_int32, ctypes.c_float, *[ctypes.c_void_p] * 6]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None
_executors: dict[str, tuple[int, int, ThreadPoolExecutor]] = {}  # name → (process id, workers, executor)


def _cache_path(compiler: str) -> Path | None:
    """Where a build for this source, compiler and processor is kept between processes (None: no cache).

    The key covers the processor's feature flags because the loop is built for the native instruction set.
    """
    root = os.environ.get("DFT_PEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dft_peft")
    cpu = platform.machine() + platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu += next((line for line in f if line.startswith(("flags", "Features"))), "")
    key = hashlib.sha256(b"\0".join(x.encode() for x in (SOURCE.read_text(), compiler, " ".join(FLAGS), cpu)))
    return Path(root) / f"window_cpu-{key.hexdigest()[:16]}.so"


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Argument and result types of every entry point, set once."""
    names = [f"window_{new}_{old}" for new, old in itertools.product(_DTYPES.values(), repeat=2)]
    names += [f"terms_{tuned}_{base}" for tuned, base in itertools.product(_TERM_DTYPES.values(), repeat=2)]
    for name in names:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int64
    for fn in (lib.compact_i32, lib.compact_i64):
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int64
    for fn in (lib.append_i32, lib.append_i64):
        fn.argtypes, fn.restype = [ctypes.c_int64, *[ctypes.c_void_p] * 10, *[ctypes.c_int64] * 3], None
    lib.kth_largest.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_void_p]
    lib.kth_largest.restype = ctypes.c_int32
    return lib


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    cached = _cache_path(compiler)
    if cached is not None and cached.is_file():
        with contextlib.suppress(OSError):
            return _declare(ctypes.CDLL(str(cached)))
    with tempfile.TemporaryDirectory(prefix="dft_peft_") as tmp:
        target = os.path.join(tmp, "window_cpu.so")
        errors = []
        for extra in (["-march=native"], []):  # native vector units where the compiler knows the flag
            command = [compiler, *extra, *FLAGS, str(SOURCE), "-o", target]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0:
                if extra and cached is not None:  # kept for the next process; a failure to keep it is harmless
                    with contextlib.suppress(OSError):
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        staged = cached.with_suffix(f".{os.getpid()}.tmp")
                        shutil.copyfile(target, staged)
                        os.replace(staged, cached)
                return _declare(ctypes.CDLL(target))  # mapped: the file may go
            errors.append(done.stderr.strip().splitlines()[-1:] or ["?"])
        raise RuntimeError(f"compiling {SOURCE.name} failed: {errors[-1][0]}")


def library() -> ctypes.CDLL | None:
    """The compiled loop, built on first use; None (and the reason in `unavailable_reason()`) if it cannot be."""
    global _library, _error
    mode = os.environ.get("DFT_PEFT_CPU_KERNEL", "auto")
    if mode == "torch":
        return None
    with _lock:
        if _library is None and _error is None:
            try:
                _library = _build()
            except (OSError, RuntimeError) as err:
                _error = str(err)
    if _library is None and mode == "c":
        raise RuntimeError(f"DFT_PEFT_CPU_KERNEL=c but the C selection loop is unavailable: {_error}")
    return _library


def unavailable_reason() -> str | None:
    return _error


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
    """Reusable output room for one chunk (int32 index, float32 value, int32 position and int32 key per element): 16
    bytes per element of the largest chunk, allocated once per pass (two, used in turn, where chunks overlap) so
    that no chunk pays for fresh pages."""

    def __init__(self, capacity: int) -> None:
        self.index = torch.empty(capacity, dtype=torch.int32)
        self.value = torch.empty(capacity, dtype=torch.float32)
        self.pos = torch.empty(capacity, dtype=torch.int32)
        self.key = torch.empty(capacity, dtype=torch.int32)


# (index, value, position, key) of a chunk's kept entries; position None (torch pass only): every entry keyed
Piece = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor]


def window(
    lib: ctypes.CDLL, new: torch.Tensor, old: torch.Tensor, lo: int, hi: int, sure: int, scale: float, offset: int,
    scratch: Scratch, base: torch.Tensor | None = None,
) -> tuple[list[Piece], bool]:
    """The chunk's elements whose key lies in [lo, hi], in index order, and whether the chunk holds NaN/inf.

    They come as pieces, one per thread that found any, each (offset + flat index as int32, value fp32(Δnew)·scale,
    position within the piece of each entry whose key is below `sure`, that entry's key): views of the scratch,
    valid until its next use. offset + numel must fit in int32. With `base` (see `usable_terms`), `new` and `old`
    are the fine-tuned weights and the deltas their differences from it.
    """
    return start_window(lib, new, old, lo, hi, sure, scale, offset, scratch, base, background=False)()


def start_window(
    lib: ctypes.CDLL, new: torch.Tensor, old: torch.Tensor, lo: int, hi: int, sure: int, scale: float, offset: int,
    scratch: Scratch, base: torch.Tensor | None = None, background: bool = True,
) -> Callable[[], tuple[list[Piece], bool]]:
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

    def run(p: int) -> int:
        start = bounds[p]
        x, y, b = (t.data_ptr() + start * t.element_size() for t in inputs)
        out = (t[start:].data_ptr() for t in (scratch.index, scratch.value, scratch.pos, scratch.key))
        return fn(x, y, b, bounds[p + 1] - start, offset + start, lo, hi, sure, scale, *out,
                  ctypes.byref(keyed, 8 * p), ctypes.byref(flags, 4 * p))

    if background or parts > 1:
        pool = executor("window", max(parts, torch.get_num_threads()))
        futures = [pool.submit(run, p) for p in range(parts)]
    else:
        futures = None
        counts = [run(0)]

    def finish() -> tuple[list[Piece], bool]:
        done = counts if futures is None else [f.result() for f in futures]
        pieces = [(scratch.index[s : s + c], scratch.value[s : s + c], scratch.pos[s : s + kc],
                   scratch.key[s : s + kc]) for s, c, kc in zip(bounds, done, keyed) if c]
        return pieces, any(flags)

    return finish


def appendable(pieces: list[Piece]) -> bool:
    """Whether `append` takes these pieces: `window`'s (contiguous CPU int32 indices and positions, float32 values)."""
    return all(
        pos is not None and index.dtype == pos.dtype == key.dtype == torch.int32 and value.dtype == torch.float32
        and all(t.device.type == "cpu" and t.is_contiguous() for t in (index, value, pos, key))
        for index, value, pos, key in pieces
    )


def append(
    lib: ctypes.CDLL, pieces: list[Piece], index: torch.Tensor, value: torch.Tensor, pos: torch.Tensor | None,
    key: torch.Tensor, n: int, keyed: int, shift: int,
) -> None:
    """Copy `window`'s pieces into a module's storage in one C call on this thread, without the GIL: indices plus
    `shift` and values from entry n, keys from keyed entry `keyed`, and (`pos` given) the keyed entries' positions
    made relative to the storage. (It measured faster than four torch copies per piece, each op paying dispatch and,
    for large pieces, a parallel region, while the pool scores the next chunk.) The storage must have room; its index
    type is that of `index` (int32/int64)."""
    fn = lib.append_i32 if index.dtype == torch.int32 else lib.append_i64
    parts = len(pieces)

    def pointers(field: int) -> ctypes.Array:
        return (ctypes.c_void_p * parts)(*(piece[field].data_ptr() for piece in pieces))

    sizes = [(ctypes.c_int64 * parts)(*(piece[field].numel() for piece in pieces)) for field in (0, 3)]
    fn(parts, pointers(0), pointers(1), pointers(2), pointers(3), *sizes, index.data_ptr(), value.data_ptr(),
       None if pos is None else pos.data_ptr(), key.data_ptr(), n, keyed, shift)


def compactable(keep: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `compact` takes these: contiguous CPU tensors, a bool mask, int32/int64 indices, float32 values."""
    return (keep.dtype == torch.bool and index.dtype in (torch.int32, torch.int64) and value.dtype == torch.float32
            and all(t.device.type == "cpu" and t.is_contiguous() for t in (keep, index, value)))


def compact(lib: ctypes.CDLL, keep: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> int:
    """Move the kept (index, value) entries to the front, in order and in place, in one C loop; return their number."""
    fn = lib.compact_i32 if index.dtype == torch.int32 else lib.compact_i64
    return fn(keep.data_ptr(), keep.numel(), index.data_ptr(), value.data_ptr())


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
    hist, above = torch.empty(1 << 16, dtype=torch.int64), ctypes.c_int64()
    kth = lib.kth_largest(parts, sizes, len(keys), k, hist.data_ptr(), ctypes.byref(above))
    return kth, above.value
