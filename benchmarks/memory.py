"""Memory probes shared by the benchmarks (Linux): the process's status fields, its peak, and a call's peak extra."""

from __future__ import annotations

import ctypes
import gc
import resource
from collections.abc import Callable
from typing import Any


def status_kb() -> dict[str, int]:
    """The resident memory fields of /proc/self/status, in KiB: VmRSS, VmHWM (its peak), RssAnon, RssFile."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_extra_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """RSS high-water mark during fn() minus the RSS before it (Linux: resets the mark via /proc/self/clear_refs)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, or reusing it would hide part of the peak
    before = status_kb()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    return (status_kb()["VmHWM"] - before) * 1024, result
