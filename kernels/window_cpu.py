"""The CPU selection pass as one compiled C loop (`window_cpu.c`): score, key-window test and compaction of a chunk in
a single read of Δnew and Δold.

The torch path's per-chunk work (a fused scoring pass that writes every element's key, then `nonzero`, then gathers)
moves each element several times and leaves selection far below memory speed; this loop writes only the kept
entries. It is plain C99, compiled with the system C compiler at first use (about a second, no torch headers; the
build is kept in ~/.cache/dft_peft, or $DFT_PEFT_CACHE, for later processes on the same processor) and called
through ctypes, which releases the GIL, so the parts of a chunk run on `torch.get_num_threads()` threads. Where no
compiler is found the torch path runs instead, with the same bits.

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("window_cpu.c")
MIN_PART = 1 << 16  # elements per thread, at least
FLAGS = ["-O3", "-std=c99", "-fno-trapping-math", "-fno-math-errno", "-fPIC", "-shared"]  # strict IEEE otherwise
_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
             ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)


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
    for new, old in itertools.product(_DTYPES.values(), repeat=2):
        fn = getattr(lib, f"window_{new}_{old}")
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int64
    for fn in (lib.compact_i32, lib.compact_i64):
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int64
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


def usable(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Whether a chunk pair can go through the C loop: contiguous CPU tensors of the four float dtypes."""
    return (new.device.type == "cpu" and old.device.type == "cpu" and new.dtype in _DTYPES
            and old.dtype in _DTYPES and new.is_contiguous() and old.is_contiguous())


class Scratch:
    """Reusable output room for one chunk (int32 index, int32 key, float32 value per element): 12 bytes per element
    of the largest chunk, allocated once per pass so that no chunk pays for fresh pages."""

    def __init__(self, capacity: int) -> None:
        self.index = torch.empty(capacity, dtype=torch.int32)
        self.key = torch.empty(capacity, dtype=torch.int32)
        self.value = torch.empty(capacity, dtype=torch.float32)


def window(
    lib: ctypes.CDLL, new: torch.Tensor, old: torch.Tensor, lo: int, hi: int, scale: float, scratch: Scratch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(flat indices within the chunk as int32, keys, values fp32(Δnew)·scale, NaN/inf seen) of the elements whose
    key lies in [lo, hi], in index order. Fresh tensors (the scratch is reused by the next chunk)."""
    global _pool
    n = new.numel()
    fn = getattr(lib, f"window_{_DTYPES[new.dtype]}_{_DTYPES[old.dtype]}")
    parts = max(1, min(torch.get_num_threads(), n // MIN_PART))
    bounds = [n * p // parts for p in range(parts + 1)]
    flags = (ctypes.c_int32 * parts)()
    new_ptr, old_ptr = new.data_ptr(), old.data_ptr()

    def run(p: int) -> int:
        start = bounds[p]
        return fn(new_ptr + start * new.element_size(), old_ptr + start * old.element_size(), bounds[p + 1] - start,
                  start, lo, hi, scale, scratch.index[start:].data_ptr(), scratch.key[start:].data_ptr(),
                  scratch.value[start:].data_ptr(), ctypes.byref(flags, 4 * p))

    if parts == 1:
        counts = [run(0)]
    else:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < parts:  # a forked child has no pool threads
            _pool = (os.getpid(), parts, ThreadPoolExecutor(max_workers=parts, thread_name_prefix="dft_peft_window"))
        counts = list(_pool[2].map(run, range(parts)))
    pieces = [(bounds[p], counts[p]) for p in range(parts) if counts[p]]
    index = torch.cat([scratch.index[s : s + c] for s, c in pieces]) if pieces else scratch.index[:0].clone()
    key = torch.cat([scratch.key[s : s + c] for s, c in pieces]) if pieces else scratch.key[:0].clone()
    value = torch.cat([scratch.value[s : s + c] for s, c in pieces]) if pieces else scratch.value[:0].clone()
    return index, key, value, any(flags)


def compactable(keep: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `compact` takes these: contiguous CPU tensors, a bool mask, int32/int64 indices, float32 values."""
    return (keep.dtype == torch.bool and index.dtype in (torch.int32, torch.int64) and value.dtype == torch.float32
            and all(t.device.type == "cpu" and t.is_contiguous() for t in (keep, index, value)))


def compact(lib: ctypes.CDLL, keep: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> int:
    """Move the kept (index, value) entries to the front, in order and in place, in one C loop; return their number."""
    fn = lib.compact_i32 if index.dtype == torch.int32 else lib.compact_i64
    return fn(keep.data_ptr(), keep.numel(), index.data_ptr(), value.data_ptr())
