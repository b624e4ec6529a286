"""Kernel benchmark on the CPU: core-selection throughput and memory, merge cost (the GPU: kernel_speed_gpu.py).

    python benchmarks/kernel_speed.py [--sizes 10M,100M,1B] [--top-t 0.05,0.01] [--repeats 3]

writes benchmarks/results/kernels.{json,md,png}. Every selection measurement runs in a fresh subprocess, so its peak
memory (RSS high-water mark, reset after the inputs are built) is its own.

Definitions:
* throughput: bytes of Δnew + Δold read per second, best of `--repeats` warm runs;
* copy bandwidth: bytes per second of `dst.copy_(src)` copying every module's Δnew and Δold (the very tensors the
  selection reads) into a preallocated buffer, measured in the same process (source bytes, best of 3);
* naive: the rule done plainly (mask, abs, torch.topk over the concatenated scores), written here as the baseline;
* peak extra memory: RSS high-water mark during one selection minus the RSS before it (inputs already built);
  the core's own size (int32 index + fp32 value per entry) is reported beside it.
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from dft_peft.kernels import window_cpu
from dft_peft.kernels.select_core_torch import select_core_torch
from llama_shapes import layer_shapes
from memory import peak_extra_bytes

from dft_peft.format import codec
from dft_peft.selection.rule import FLT_MIN, core_size
from dft_peft.tuner.config import DFTConfig
from dft_peft.tuner.merge import scatter_merge

RESULTS = Path(__file__).resolve().parent / "results"
POOL = 1 << 28  # elements per input pool of the largest size (1 GiB of fp32 each)
UNITS = {"K": 10**3, "M": 10**6, "B": 10**9}

# (hidden, kv dim, intermediate) of real models: 10M ~ SmolLM2-135M, 100M ~ TinyLlama-1.1B, 1B ~ Llama-2-7B layers
FAMILIES = [(5 * 10**7, (576, 192, 1536)), (5 * 10**8, (2048, 256, 5632)), (None, (4096, 4096, 11008))]


def parse_size(text: str) -> int:
    return int(float(text[:-1]) * UNITS[text[-1].upper()]) if text[-1].upper() in UNITS else int(text)


def module_shapes(target: int) -> dict[str, tuple[int, int]]:
    """Llama-style projection shapes, layer after layer, until `target` elements are reached."""
    hidden, kv, inter = next(dims for limit, dims in FAMILIES if limit is None or target <= limit)
    layer = layer_shapes(hidden, kv, inter)
    shapes, total, i = {}, 0, 0
    while total < target:
        for name, shape in layer.items():
            if total < target:
                shapes[f"model.layers.{i}.{name}"] = shape
                total += math.prod(shape)
        i += 1
    return shapes


def make_deltas(target: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """Random Δnew, Δold (per-module scales) of Llama-like modules.

    Above 4·POOL elements the modules are views into two pools of POOL random elements at module-dependent offsets,
    so the full deltas never sit in memory at once; the pools are far larger than any cache, so every view is still
    read from DRAM.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = module_shapes(target)
    pooled = sum(math.prod(s) for s in shapes.values()) > 4 * POOL
    if pooled:
        pools = [torch.randn(POOL, generator=gen, device=device, dtype=dtype) for _ in range(2)]
    new, old = {}, {}
    for m, (name, shape) in enumerate(shapes.items()):
        numel = math.prod(shape)
        scale = 1e-3 * (1 + m % 3)
        if pooled:
            starts = ((m * 7919 * 4096) % (POOL - numel), (m * 104729 * 4096 + 999) % (POOL - numel))
            new[name], old[name] = (pool[s : s + numel].view(shape) for pool, s in zip(pools, starts))
        else:
            new[name], old[name] = (torch.randn(shape, generator=gen, device=device, dtype=dtype) * scale
                                    for _ in range(2))
    return new, old, pooled


def delta_bytes(new, old) -> int:
    return sum(t.numel() * t.element_size() for d in (new, old) for t in d.values())


def select_naive_topk(new, old, top_t: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The baseline: concatenate, mask, abs, torch.topk, split per module (global selection)."""
    names = sorted(new)
    x = torch.cat([new[n].reshape(-1).float() for n in names])
    y = torch.cat([old[n].reshape(-1).float() for n in names])
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("Δnew or Δold contains NaN or inf")
    candidate = ((x >= FLT_MIN) & (y <= -FLT_MIN)) | ((x <= -FLT_MIN) & (y >= FLT_MIN))
    score = torch.where(candidate, (x - y).abs(), -1.0)
    k = min(core_size(top_t, x.numel()), int(candidate.sum()))
    picked = torch.topk(score, k, sorted=False).indices.sort().values
    core, start = {}, 0
    for n in names:
        numel = new[n].numel()
        lo, hi = torch.searchsorted(picked, torch.tensor([start, start + numel], device=picked.device)).tolist()
        core[n] = (picked[lo:hi] - start, x[picked[lo:hi]])
        start += numel
    return core


def copy_bandwidth(new, old, sync=lambda: None, timer=time.perf_counter) -> float:
    """Source bytes per second of copying every module's Δnew and Δold into a preallocated buffer (best of 3)."""
    tensors = [t for d in (new, old) for t in d.values()]
    dst = torch.empty(max(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    best = math.inf
    for _ in range(3):
        sync()
        start = timer()
        for t in tensors:
            dst[: t.numel()].view(t.shape).copy_(t)
        sync()
        best = min(best, timer() - start)
    return delta_bytes(new, old) / best


def core_bytes(core) -> tuple[int, int]:
    """(entries, bytes as int32 index + fp32 value) of a core, whatever its container."""
    nnz = sum((c.nnz if hasattr(c, "nnz") else c[0].numel()) for c in core.values())
    return nnz, 8 * nnz


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process: a selection method at one size and top_t."""
    os.environ["DFT_PEFT_CPU_KERNEL"] = spec.get("cpu_kernel", "auto")
    torch.manual_seed(0)
    new, old, pooled = make_deltas(spec["numel"], getattr(torch, spec["dtype"]))
    if spec["method"] == "torch":
        def fn():
            return select_core_torch(new, old, spec["top_t"])
    else:
        def fn():
            return select_naive_topk(new, old, spec["top_t"])
    fn()  # warm-up (builds or loads the C loop where used)
    peak, core = peak_extra_bytes(fn)
    nnz, size = core_bytes(core)
    del core
    times = []
    for _ in range(spec["repeats"]):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    out = {"seconds": times, "best_s": min(times), "peak_extra_bytes": peak, "core_nnz": nnz, "core_bytes": size,
           "delta_bytes": delta_bytes(new, old), "pooled": pooled, "modules": len(new)}
    if spec["method"] == "torch":
        out["path"] = "C loop" if window_cpu.library() is not None else "torch ops"
        out["copy_bytes_per_s"] = copy_bandwidth(new, old)
    return out


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- merge: scatter-merge of a core versus a LoRA merge of the same file size ---------------------------------------


def timed_once(fn: Callable[[], object]) -> float:
    """Seconds of one call of fn on the CPU."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def merge_comparison(numel: int, density: float, repeats: int, device: str = "cpu",
                     once: Callable[[Callable[[], object]], float] = timed_once) -> dict:
    """Merge time of a random core (density `density`) into bf16 weights vs a LoRA adapter whose file (bf16 factors)
    has the same bytes as the core's edit file (Elias-Fano indices + values in DFTConfig's default value dtype);
    best of `repeats` after a warm-up, each call timed by `once` (kernels_gpu.py passes a CUDA-event timer)."""
    gen = torch.Generator(device=device).manual_seed(0)
    value_bytes = DFTConfig().torch_value_dtype.itemsize
    weights, cores, loras, file_bytes = {}, {}, {}, 0
    for name, (rows, cols) in module_shapes(numel).items():
        size = rows * cols
        nnz = int(size * density)
        weights[name] = torch.randn(rows, cols, generator=gen, device=device).bfloat16()
        idx = torch.randperm(size, generator=gen, device=device)[:nnz].sort().values.int()
        cores[name] = (idx, torch.randn(nnz, generator=gen, device=device) * 1e-3)
        module_bytes = codec.encoded_size_bytes(nnz, size) + nnz * value_bytes
        rank = max(1, round(module_bytes / (2 * (rows + cols))))
        loras[name] = tuple(torch.randn(shape, generator=gen, device=device).bfloat16()
                            for shape in ((rows, rank), (rank, cols)))
        file_bytes += module_bytes

    def merge_core():
        for name, (idx, vals) in cores.items():
            scatter_merge(weights[name], idx, vals)

    def merge_lora():  # as PEFT merges: the delta in fp32, cast to the weight dtype, added in place
        for name, (b, a) in loras.items():
            weights[name] += (b.float() @ a.float()).mul_(2.0).to(weights[name].dtype)

    times = {}
    for label, fn in (("core", merge_core), ("lora", merge_lora)):
        fn()
        times[label] = min(once(fn) for _ in range(repeats))
    ranks = sorted({b.shape[1] for b, _ in loras.values()})
    return {"numel": sum(math.prod(w.shape) for w in weights.values()), "modules": len(weights), "density": density,
            "core_nnz": sum(c[0].numel() for c in cores.values()), "file_bytes": file_bytes,
            "lora_ranks": [ranks[0], ranks[-1]], "core_merge_s": times["core"], "lora_merge_s": times["lora"],
            "lora_over_core": times["lora"] / times["core"]}


# --- report -------------------------------------------------------------------------------------------------------


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def mb(x: float) -> str:
    return f"{x / 2**20:.1f}"


def render(results: dict) -> str:
    lines = ["# Kernel benchmark", "", f"Command: `{results['command']}` (wall time {results['wall_s']:.0f} s).", "",
             f"Machine: {results['machine']}; torch {results['torch']}; {results['date']}; load average "
             f"{results['load_average']['start'][0]:.1f} at the start, {results['load_average']['end'][0]:.1f} at the "
             "end (the machine is shared: other jobs compete for its cores). Deltas: "
             f"{results['dtype']} Δnew and Δold of Llama-like modules (random normal), global selection.", "",
             "Throughput = bytes of Δnew + Δold read per second (best of the repeats). Copy = source bytes per second "
             "of `dst.copy_(src)` over the same module tensors into a preallocated buffer, in the same process. "
             "Naive = concatenate, mask, abs, `torch.topk` (this script). Peak extra = RSS high-water mark during one "
             "selection minus RSS before it; core = the selected entries as int32 index + fp32 value.", "",
             "## CPU core selection (`select_core_torch`)", "",
             "| elements | modules | top_t | path | time s | GB/s | copy GB/s | × copy | naive s | speedup "
             "| peak extra MB (% deltas) | core MB | extra − core % | naive peak extra MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, t in ((r, r[key]) for r in results["cpu"] for key in ("torch", "torch_ops") if key in r):
        n = row.get("naive") or {}
        if "error" in t:
            lines.append(f"| {row['size']} | | {row['top_t']} | error: {t['error']} |" + " |" * 10)
            continue
        rate = t["delta_bytes"] / t["best_s"]
        naive_s = f"{n['best_s']:.2f}" if "best_s" in n else n.get("skipped", n.get("error", "—"))
        speedup = f"{n['best_s'] / t['best_s']:.1f}×" if "best_s" in n else "—"
        naive_mem = mb(n["peak_extra_bytes"]) if "peak_extra_bytes" in n else "—"
        lines.append(
            f"| {row['numel']:,} | {t['modules']} | {row['top_t']} | {t['path']} | {t['best_s']:.3f} | {gb(rate)} "
            f"| {gb(t['copy_bytes_per_s'])} | {rate / t['copy_bytes_per_s']:.2f} | {naive_s} | {speedup} "
            f"| {mb(t['peak_extra_bytes'])} ({100 * t['peak_extra_bytes'] / t['delta_bytes']:.1f}%) "
            f"| {mb(t['core_bytes'])} | {100 * (t['peak_extra_bytes'] - t['core_bytes']) / t['delta_bytes']:.1f} "
            f"| {naive_mem} |")
    lines += ["", "## Goals", ""] + [f"- {g}" for g in results["goals"]]
    m = results["merge"]
    lines += ["", "## Merge: scatter-merge of a core vs a LoRA merge of the same file size (CPU, bf16 weights)", "",
              "| elements | modules | core density | core entries | edit file MB | LoRA rank | core merge ms "
              "| LoRA merge ms | LoRA / core |", "|---|---|---|---|---|---|---|---|---|",
              f"| {m['numel']:,} | {m['modules']} | {m['density']} | {m['core_nnz']:,} | {mb(m['file_bytes'])} "
              f"| {m['lora_ranks'][0]}–{m['lora_ranks'][1]} | {1e3 * m['core_merge_s']:.1f} "
              f"| {1e3 * m['lora_merge_s']:.1f} | {m['lora_over_core']:.1f}× |"]
    lines += ["", "## GPU (Triton)", "", "Benchmarked by `benchmarks/kernel_speed_gpu.py` on a CUDA machine."]
    for note in results["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def goals(rows: list[dict]) -> list[str]:
    """The three CPU goals, judged on every measured row (the default path, and the torch-ops pass it replaced)."""
    done = [(f"{r['size']}@{r['top_t']}" + (" torch ops" if key == "torch_ops" else ""), r[key], r)
            for r in rows for key in ("torch", "torch_ops") if "best_s" in r.get(key, {})]
    copy = [(label, t["delta_bytes"] / t["best_s"] / t["copy_bytes_per_s"]) for label, t, _ in done]
    fast = [(label, r["naive"]["best_s"] / t["best_s"]) for label, t, r in done if "best_s" in r.get("naive", {})]
    mem = [(label, (t["peak_extra_bytes"] - t["core_bytes"]) / t["delta_bytes"]) for label, t, _ in done]

    def verdict(pairs, ok, fmt):
        met = sum(ok(v) for _, v in pairs)
        detail = ", ".join(f"{label}: {fmt(v)}" for label, v in pairs)
        return f"{'met' if met == len(pairs) else f'met in {met} of {len(pairs)}'} ({detail})"

    return [
        "≥ 0.5 of copy bandwidth: " + verdict(copy, lambda v: v >= 0.5, lambda v: f"{v:.2f}"),
        "≥ 5× faster than naive: " + verdict(fast, lambda v: v >= 5, lambda v: f"{v:.1f}×"),
        "peak extra memory beyond the core ≤ 5% of the deltas: " + verdict(mem, lambda v: v <= 0.05,
                                                                        lambda v: f"{100 * v:.1f}%"),
    ]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["cpu"] if "best_s" in r["torch"]]
    labels = [f"{r['size']}\nt={r['top_t']}" for r in rows]
    xs = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rate = [r["torch"]["delta_bytes"] / r["torch"]["best_s"] / 1e9 for r in rows]
    copy = [r["torch"]["copy_bytes_per_s"] / 1e9 for r in rows]
    naive = [r["torch"]["delta_bytes"] / r["naive"]["best_s"] / 1e9 if "best_s" in (r.get("naive") or {}) else 0
             for r in rows]
    width = 0.27
    ax1.bar([x - width for x in xs], copy, width, label="copy (same bytes)", color="0.7")
    ax1.bar(list(xs), rate, width, label="select_core_torch")
    ax1.bar([x + width for x in xs], naive, width, label="naive (topk)")
    ax1.set_xticks(list(xs), labels)
    ax1.set_ylabel("GB/s of Δnew + Δold read")
    ax1.set_title("CPU core selection throughput")
    ax1.legend()
    beyond = [100 * (r["torch"]["peak_extra_bytes"] - r["torch"]["core_bytes"]) / r["torch"]["delta_bytes"]
              for r in rows]
    core = [100 * r["torch"]["core_bytes"] / r["torch"]["delta_bytes"] for r in rows]
    naive_mem = [100 * r["naive"]["peak_extra_bytes"] / r["torch"]["delta_bytes"]
                 if "peak_extra_bytes" in (r.get("naive") or {}) else 0 for r in rows]
    ax2.bar([x - width for x in xs], beyond, width, label="select_core_torch: peak extra beyond the core")
    ax2.bar(list(xs), core, width, label="the core itself", color="0.3")
    ax2.bar([x + width for x in xs], naive_mem, width, label="naive: peak extra")
    ax2.axhline(5, color="r", linestyle="--", linewidth=1, label="goal: 5% of the deltas beyond the core")
    ax2.set_yscale("log")
    ax2.set_xticks(list(xs), labels)
    ax2.set_ylabel("% of delta bytes")
    ax2.set_title("Peak extra memory")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10M,100M,1B", help="total elements per run, comma separated")
    parser.add_argument("--top-t", default="0.05,0.01", help="fractions selected, comma separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--naive-max", default="100M", help="largest size the naive baseline is run at")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    started, load_before = time.time(), os.getloadavg()
    sizes = [(text, parse_size(text)) for text in args.sizes.split(",")]
    tops = [float(t) for t in args.top_t.split(",")]
    rows = []
    for text, numel in sizes:
        for top_t in tops:
            spec = {"numel": numel, "top_t": top_t, "dtype": args.dtype, "repeats": args.repeats}
            row = {"size": text, "numel": sum(math.prod(s) for s in module_shapes(numel).values()), "top_t": top_t,
                   "torch": run_worker({**spec, "method": "torch"})}
            if window_cpu.library() is not None:  # the torch-ops pass the C loop replaced, in the same run
                row["torch_ops"] = run_worker({**spec, "method": "torch", "cpu_kernel": "torch"})
            if numel <= parse_size(args.naive_max):
                row["naive"] = run_worker({**spec, "method": "naive"})
            else:
                row["naive"] = {"skipped": "not run"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    merge = merge_comparison(min(parse_size("100M"), max(n for _, n in sizes)), 0.01, args.repeats)
    print(json.dumps(merge), flush=True)
    notes = [
        "Naive at sizes above --naive-max is not run: at 1B elements it needs the concatenated fp32 Δnew, Δold and "
        "scores (12 GB) plus torch.topk's working copy of values and int64 indices (12 GB), more than this machine's "
        "memory, and it would have to materialise every lazily loaded delta at once.",
    ]
    if any(r["torch"].get("pooled") for r in rows):
        notes.append(f"Sizes above {4 * POOL:,} elements read their modules as views into two pools of {POOL:,} "
                     "random elements (different offsets per module and for Δnew/Δold), so the deltas never sit in "
                     "memory at once; the pools far exceed the caches, so every read comes from DRAM.")
    results = {
        "command": " ".join(["python benchmarks/kernel_speed.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"{torch.get_num_threads()} torch threads",
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "torch": torch.__version__, "date": datetime.date.today().isoformat(), "dtype": args.dtype,
        "cpu": rows, "merge": merge, "goals": goals(rows), "notes": notes,
    }
    results["wall_s"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(results, indent=1))
    (args.out / "kernels.md").write_text(render(results))
    plot(results, args.out / "kernels.png")
    print(render(results))


if __name__ == "__main__":
    main()
