"""GPU kernel benchmark: Triton core selection against the device's copy bandwidth and `torch.topk`, and the Triton
scatter-merge against merging a LoRA adapter of the same file size.

    python benchmarks/kernel_speed_gpu.py [--sizes 100M,1B] [--top-t 0.05,0.01] [--dtypes float32,bfloat16]

writes benchmarks/results/kernels_gpu/kernels_gpu.{json,md,png}. `--device cpu` runs the same code on CPU tensors
under `TRITON_INTERPRET=1` (tiny sizes only: a smoke test of the script, not a measurement).

Definitions:
* time: median of `--repeats` runs after one warm-up (which compiles the kernels), timed with CUDA events;
* GB/s: bytes of Δnew + Δold read per second of selection;
* copy bandwidth: source bytes per second of `dst.copy_(src)` over the very tensors the selection reads, into a
  preallocated buffer (a copy also writes as many bytes, so a pure read stream can exceed it); the device copy figure
  of a 2 GiB buffer is reported too, counting bytes read + written;
* naive: concatenate, mask, abs, `torch.topk` over all scores (`select_naive_topk` in kernel_speed.py);
* peak extra: the CUDA allocator's high-water mark during one selection minus what was allocated before it.
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import kernel_speed as cpu_bench
import torch
import triton
from dft_peft.kernels.select_core_torch import select_core_torch
from dft_peft.kernels.select_core_triton import select_core_triton

from dft_peft.selection.rule import core_size

RESULTS = Path(__file__).resolve().parent / "results" / "kernels_gpu"
GOAL = 0.7


class Clock:
    """Timing and memory on the benchmark's device: CUDA events and allocator statistics, or wall time on a CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn: Callable[[], object]) -> float:
        self.sync()
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    def median(self, fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
        fn()  # warm-up: compiles the kernels
        times = [self.once(fn) for _ in range(repeats)]
        return statistics.median(times), times

    def peak_extra(self, fn: Callable[[], object]) -> tuple[int | None, object]:
        if not self.cuda:
            return None, fn()
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        self.sync()
        return torch.cuda.max_memory_allocated() - before, result


def free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_copy(clock: Clock, device: str, repeats: int) -> dict:
    """A large device-to-device copy: bytes read + written per second, and source bytes per second."""
    numel = (2 << 30) // 4 if clock.cuda else 1 << 20
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds, _ = clock.median(lambda: dst.copy_(src), max(repeats, 20) if clock.cuda else repeats)
    nbytes = src.numel() * src.element_size()
    return {"bytes": nbytes, "seconds": seconds, "read_write_bytes_per_s": 2 * nbytes / seconds,
            "source_bytes_per_s": nbytes / seconds}


def same_core(got: dict, want: dict) -> bool:
    return list(got) == list(want) and all(
        torch.equal(got[n].indices.cpu(), want[n].indices.cpu())
        and torch.equal(got[n].values.cpu().view(torch.int32), want[n].values.cpu().view(torch.int32))
        for n in want)


def selection_case(clock: Clock, device: str, numel: int, top_t: float, dtype: torch.dtype, selection: str,
                   repeats: int, check: bool) -> dict:
    new, old, _ = cpu_bench.make_deltas(numel, dtype, device)
    total = sum(t.numel() for t in new.values())
    nbytes = cpu_bench.delta_bytes(new, old)
    row = {"numel": total, "modules": len(new), "top_t": top_t, "dtype": str(dtype).removeprefix("torch."),
           "selection": selection, "delta_bytes": nbytes}
    select = lambda: select_core_triton(new, old, top_t, selection)  # noqa: E731
    row["select_s"], row["select_times"] = clock.median(select, repeats)
    row["peak_extra_bytes"], core = clock.peak_extra(select)
    row["core_nnz"] = sum(d.nnz for d in core.values())
    row["core_bytes"] = sum(d.nnz * (d.indices.element_size() + d.values.element_size()) for d in core.values())
    row["k"] = core_size(top_t, total) if selection == "global" else None
    if check:  # the torch path on the same device: the same bits
        row["identical_to_torch_path"] = same_core(core, select_core_torch(new, old, top_t, selection))
    del core
    free()
    row["bytes_per_s"] = nbytes / row["select_s"]
    row["copy_bytes_per_s"] = cpu_bench.copy_bandwidth(new, old, clock.sync, timer=time.perf_counter)
    row["fraction_of_copy"] = row["bytes_per_s"] / row["copy_bytes_per_s"]
    if selection == "global":
        try:
            row["topk_s"], _ = clock.median(lambda: cpu_bench.select_naive_topk(new, old, top_t), max(1, repeats // 2))
            row["speedup_vs_topk"] = row["topk_s"] / row["select_s"]
        except torch.OutOfMemoryError as err:
            row["topk_error"] = f"out of memory: {str(err).splitlines()[0]}"
    return row  # the deltas go with this frame; main empties the allocator's cache


# --- report -------------------------------------------------------------------------------------------------------


def render(results: dict) -> str:
    c = results["device_copy"]
    lines = ["# GPU kernel benchmark", "",
             f"Command: `{results['command']}` (wall time {results['wall_s']:.0f} s).", "",
             f"Device: {results['device']}; torch {results['torch']}, triton {results['triton']}; "
             f"{results['date']}.", "",
             f"Device copy (2 GiB, median): {c['read_write_bytes_per_s'] / 1e9:.0f} GB/s read + written = "
             f"{c['source_bytes_per_s'] / 1e9:.0f} GB/s of source bytes.", "",
             "Selection = `select_core_triton` on Δnew and Δold of Llama-7B-like modules (random normal, per-module "
             "scales). × copy = GB/s of Δnew + Δold read by the selection over the source GB/s of copying those same "
             f"tensors (goal ≥ {GOAL} at 1B elements). Naive = concatenate, mask, abs, `torch.topk`. Times are "
             "medians with CUDA events after a warm-up that compiles the kernels.", "",
             "| elements | dtype | top_t | selection | select ms | GB/s | copy GB/s | × copy | goal | topk ms "
             "| speedup vs topk | peak extra MB | core MB | same bits as torch path |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["selection"]:
        if "error" in r:
            lines.append(f"| {r['spec']} | error: {r['error']} |" + " |" * 12)
            continue
        topk = f"{1e3 * r['topk_s']:.1f}" if "topk_s" in r else r.get("topk_error", "—")
        speedup = f"{r['speedup_vs_topk']:.1f}×" if "speedup_vs_topk" in r else "—"
        goal = ("met" if r["fraction_of_copy"] >= GOAL else "missed") if r["numel"] >= 10**9 else "—"
        peak = "—" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        same = {True: "yes", False: "**no**"}.get(r.get("identical_to_torch_path"), "—")
        lines.append(f"| {r['numel']:,} | {r['dtype']} | {r['top_t']} | {r['selection']} | {1e3 * r['select_s']:.2f} "
                     f"| {r['bytes_per_s'] / 1e9:.0f} | {r['copy_bytes_per_s'] / 1e9:.0f} "
                     f"| {r['fraction_of_copy']:.2f} "
                     f"| {goal} | {topk} | {speedup} | {peak} | {r['core_bytes'] / 2**20:.0f} | {same} |")
    m = results["merge"]
    lines += ["", "## Merge: scatter-merge of a core vs a LoRA merge of the same file size (bf16 weights)", ""]
    if "error" in m:
        lines.append(f"error: {m['error']}")
    else:
        lines += ["| elements | modules | core density | core entries | edit file MB | LoRA rank | core merge ms "
                  "| LoRA merge ms | LoRA / core |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {m['numel']:,} | {m['modules']} | {m['density']} | {m['core_nnz']:,} "
                  f"| {m['file_bytes'] / 2**20:.1f} | {m['lora_ranks'][0]}–{m['lora_ranks'][1]} "
                  f"| {1e3 * m['core_merge_s']:.2f} | {1e3 * m['lora_merge_s']:.2f} | {m['lora_over_core']:.1f}× |"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["selection"] if "select_s" in r]
    if not rows:
        return
    labels = [f"{r['numel'] / 1e6:.0f}M {r['dtype'][:4]}\nt={r['top_t']} {r['selection'][:3]}" for r in rows]
    xs = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8))
    width = 0.27
    ax1.bar([x - width for x in xs], [r["copy_bytes_per_s"] / 1e9 for r in rows], width, label="copy (source bytes)",
            color="0.7")
    ax1.bar(xs, [r["bytes_per_s"] / 1e9 for r in rows], width, label="select_core_triton")
    ax1.bar([x + width for x in xs], [r["delta_bytes"] / r["topk_s"] / 1e9 if "topk_s" in r else 0 for r in rows],
            width, label="naive (torch.topk)")
    ax1.set_xticks(xs, labels, fontsize=7)
    ax1.set_ylabel("GB/s of Δnew + Δold")
    ax1.set_title(f"Core selection on {results['device']}")
    ax1.legend(fontsize=8)
    ax2.bar(xs, [r["fraction_of_copy"] for r in rows])
    ax2.axhline(GOAL, color="r", linestyle="--", linewidth=1, label=f"goal {GOAL}")
    ax2.set_xticks(xs, labels, fontsize=7)
    ax2.set_ylabel("selection GB/s / copy GB/s")
    ax2.set_title("Fraction of copy bandwidth")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100M,1B", help="total elements per case, comma separated")
    parser.add_argument("--top-t", default="0.05,0.01", help="fractions selected, comma separated")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--merge-size", default="100M")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("kernel_speed_gpu.py: no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a smoke test)")
    started = time.time()
    clock = Clock(args.device)
    sizes = [(text, cpu_bench.parse_size(text)) for text in args.sizes.split(",")]
    tops = [float(t) for t in args.top_t.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    specs = [(n, t, d, "global") for _, n in sizes for d in dtypes for t in tops]
    specs.append((sizes[-1][1], tops[0], dtypes[0], "per_module"))
    results = {"command": " ".join(["python benchmarks/kernel_speed_gpu.py", *sys.argv[1:]]),
               "device": torch.cuda.get_device_name() if clock.cuda else "cpu (Triton interpreter)",
               "torch": torch.__version__, "triton": triton.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "device_copy": device_copy(clock, args.device, args.repeats), "selection": []}
    print(json.dumps(results["device_copy"]), flush=True)
    for numel, top_t, dtype, selection in specs:
        spec = f"{numel:,} {dtype} top_t={top_t} {selection}"
        check = (top_t, dtype, selection) == (tops[0], dtypes[0], "global")  # per size: bit for bit vs torch
        try:
            row = selection_case(clock, args.device, numel, top_t, dtype, selection, args.repeats, check)
        except Exception as err:  # a failed case is recorded, the others still run
            row = {"spec": spec, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            free()
        results["selection"].append(row)
        free()
        print(spec, json.dumps({k: v for k, v in row.items() if k != "select_times"}), flush=True)
    try:
        results["merge"] = cpu_bench.merge_comparison(cpu_bench.parse_size(args.merge_size), 0.01, args.repeats,
                                                      args.device, clock.once)
    except Exception as err:
        results["merge"] = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(results["merge"]), flush=True)
    results["wall_s"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels_gpu.json").write_text(json.dumps(results, indent=1))
    (args.out / "kernels_gpu.md").write_text(render(results))
    plot(results, args.out / "kernels_gpu.png")
    print(render(results))


if __name__ == "__main__":
    main()
