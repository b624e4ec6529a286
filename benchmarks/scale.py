"""`build_edit` at scale: peak memory and wall time on synthetic sharded checkpoints, against a plain read of them.

Three checkpoints are written to a temporary directory as `model.safetensors.index.json` + shards, in bfloat16 (the
dtype fine-tunes are saved in): the base, "old" = base + N(0, σ²) and "new" = base + N(0, σ²), over the seven
projections of Llama-3.2-1B's decoder layers (hidden 2048, kv 512, intermediate 8192: 60.8M parameters a layer), as
many layers as `--params` asks for (1e9: 16 layers, 0.97B). Embeddings and norms are left out: `build_edit` never
reads them, and the plain read must read what `build_edit` reads.

Each measurement runs in a fresh subprocess:

* build_edit: the base model, `nn.Linear` layers under Llama's module names whose weights are memory-mapped from the
  base checkpoint and touched once before the clock starts (the model is resident, as a loaded model is), then
  `build_edit(model, old, new, DFTConfig(top_t))`;
* plain read: every tensor of the old and new checkpoints read once (`safe_open` + `get_tensor` + `clone`, since
  safetensors maps tensors lazily) and discarded.

Peak memory is the RSS high-water mark (VmHWM, reset via /proc/self/clear_refs once the model is resident) minus the
RSS at that moment: what the measured call adds, mapped checkpoint pages included (the plain read maps them;
build_edit reads into its own buffers). A thread samples RssAnon and
RssFile every 10 ms for the split and the plot. "cold" runs first evict the old and new checkpoints from the page
cache (posix_fadvise DONTNEED on files this script wrote; nothing else is touched), "warm" runs read them cached.
Each measurement runs `--repeats` times, build_edit and plain read interleaved so that a slow spell of the shared
machine hits both; the median wall time is reported with the range, and the largest peak.

    python benchmarks/scale.py [--params 1e9] [--top-t 0.05] [--repeats 3] [--out benchmarks/results] [--workdir DIR]

writes benchmarks/results/scale.{json,md,png}.
"""

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch
from llama_shapes import layer_shapes, model_shapes, projection_names
from memory import status_kb
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

HIDDEN, KV_DIM, INTERMEDIATE = 2048, 512, 8192  # Llama-3.2-1B
LAYER_SHAPES = layer_shapes(HIDDEN, KV_DIM, INTERMEDIATE)
LAYER_PARAMS = sum(o * i for o, i in LAYER_SHAPES.values())
TARGETS = projection_names(LAYER_SHAPES)
DTYPE = torch.bfloat16
WEIGHT_STD, DELTA_STD = 0.02, 1e-3  # the delta spans ~8 bf16 steps of a typical weight, so few deltas round to 0
SHARD_BYTES = 1 << 30
CHECKPOINTS = ("base", "old", "new")
GOALS = {"peak_rss_to_pair": 0.10, "time_to_read": 1.5}
SAMPLE_S = 0.01
NOTES = """\
* Peak extra RSS is what the call holds beyond the resident model, the returned core included (an int32 index and an
  fp32 value per entry: at top_t = 0.05 that alone is 10% of a bf16 pair, so no implementation that returns the core
  in memory meets the memory goal at this top_t). The plain read's peak is the file mapping of the open 1 GiB shard.
* "cold" evicts the checkpoints from this machine's page cache only; a virtual disk may still be cached by its host,
  so cold and warm can be close.
* The profiled run is a separate warm run under cProfile, which slows it: read its shares, not its seconds.
"""


# --- checkpoints --------------------------------------------------------------------------------------------------

def module_shapes(layers: int) -> dict[str, tuple[int, int]]:
    return model_shapes(LAYER_SHAPES, layers)


def write_checkpoints(workdir: str, layers: int, seed: int) -> dict[str, list[str]]:
    """Write base/old/new as sharded safetensors checkpoints (one module's three weights in memory at a time)."""
    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, list[dict[str, torch.Tensor]]] = {c: [{}] for c in CHECKPOINTS}
    files: dict[str, list[str]] = {c: [] for c in CHECKPOINTS}

    def flush(checkpoint: str, last: bool) -> None:
        tensors = shards[checkpoint][-1]
        if tensors:
            path = os.path.join(workdir, checkpoint, f"part-{len(files[checkpoint]):05d}.safetensors")
            save_file(tensors, path)
            files[checkpoint].append(path)
            shards[checkpoint][-1] = {}
        if last:
            count = len(files[checkpoint])
            weight_map, total = {}, 0
            for i, path in enumerate(files[checkpoint]):
                final = os.path.join(workdir, checkpoint, f"model-{i + 1:05d}-of-{count:05d}.safetensors")
                os.replace(path, final)
                files[checkpoint][i] = final
                with safe_open(final, framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        weight_map[key] = os.path.basename(final)
                        total += math.prod(f.get_slice(key).get_shape()) * DTYPE.itemsize
            with open(os.path.join(workdir, checkpoint, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)

    for checkpoint in CHECKPOINTS:
        os.makedirs(os.path.join(workdir, checkpoint), exist_ok=True)
    for name, shape in module_shapes(layers).items():
        base = torch.randn(shape, generator=gen) * WEIGHT_STD
        weights = {"base": base.to(DTYPE)}
        for checkpoint in ("old", "new"):
            weights[checkpoint] = (base + torch.randn(shape, generator=gen) * DELTA_STD).to(DTYPE)
        del base
        for checkpoint, weight in weights.items():
            current = shards[checkpoint][-1]
            if current and sum(t.nbytes for t in current.values()) + weight.nbytes > SHARD_BYTES:
                flush(checkpoint, last=False)
            shards[checkpoint][-1][f"{name}.weight"] = weight
    for checkpoint in CHECKPOINTS:
        flush(checkpoint, last=True)
    return files


def evict(files: list[str]) -> None:
    """Drop these files' pages from the page cache (they are clean: written and synced)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- measurement (in the worker subprocess) -----------------------------------------------------------------------

class Sampler(threading.Thread):
    """Samples RssAnon and RssFile (torch ops release the GIL, so samples keep coming during long kernels)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int, int]] = []
        self.done = threading.Event()
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self.done.is_set():
            s = status_kb()
            self.samples.append((time.perf_counter() - self.start_time, s["RssAnon"], s["RssFile"]))
            self.done.wait(SAMPLE_S)

    def stop(self) -> list[tuple[float, int, int]]:
        self.done.set()
        self.join()
        return self.samples


def base_model(workdir: str) -> nn.Module:
    """Llama-named `nn.Linear`s whose weights map the base checkpoint, touched once so that they are resident."""
    weights = {}
    for name in sorted(os.listdir(os.path.join(workdir, "base"))):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(workdir, "base", name)))
    model = nn.Module()
    for key, weight in weights.items():
        *path, leaf, _ = key.split(".")
        parent = model
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        with torch.device("meta"):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        parent.add_module(leaf, linear)
        weight.view(torch.int16).sum()  # fault the pages in
    return model


def plain_read(workdir: str) -> int:
    """Read every tensor of the old and new checkpoints once; return the bytes read."""
    total = 0
    for checkpoint in ("old", "new"):
        for name in sorted(os.listdir(os.path.join(workdir, checkpoint))):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(workdir, checkpoint, name), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        total += f.get_tensor(key).clone().nbytes
    return total


def worker(task: str, workdir: str, top_t: float, profile: bool) -> dict:
    import dft_peft

    model = base_model(workdir) if task == "build" else None
    if task == "build":
        config = dft_peft.DFTConfig(top_t=top_t, target_modules=TARGETS)
        call = lambda: dft_peft.build_edit(model, os.path.join(workdir, "old"), os.path.join(workdir, "new"), config)  # noqa: E731
    else:
        call = lambda: plain_read(workdir)  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status_kb()
    sampler = Sampler()
    sampler.start()
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    result = call()
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - start
    samples = sampler.stop()
    after = status_kb()
    out = {
        "task": task,
        "wall_s": wall,
        "rss_before_kb": before["VmRSS"],
        "anon_before_kb": before["RssAnon"],
        "file_before_kb": before["RssFile"],
        "peak_extra_kb": after["VmHWM"] - before["VmRSS"],
        "sampled_peak_anon_extra_kb": max(a for _, a, _ in samples) - before["RssAnon"],
        "sampled_peak_file_extra_kb": max(f for _, _, f in samples) - before["RssFile"],
        "timeline": samples[:: max(1, len(samples) // 400)],
    }
    if task == "build":
        core = result.base_model.get_core()
        out["core_nnz"] = sum(d.nnz for d in core.values())
        out["core_bytes"] = sum(d.indices.nbytes + d.values.nbytes for d in core.values())
    else:
        out["bytes_read"] = result
    if profiler:
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(r"(dft_peft|kernels|peft)/", 25)  # where in the library
        stats.sort_stats("tottime").print_stats(15)  # which calls spend it
        out["profile"] = text.getvalue()
    return out


# --- orchestration ------------------------------------------------------------------------------------------------

def measure(task: str, workdir: str, top_t: float, files: list[str] | None, profile: bool = False) -> dict:
    """One measurement in a fresh subprocess; `files` are evicted from the page cache first (a cold run)."""
    if files:
        evict(files)
    load = os.getloadavg()
    command = [sys.executable, os.path.abspath(__file__), "--worker", task, "--workdir", workdir,
               "--top-t", str(top_t), *(["--profile"] if profile else [])]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode:
        raise RuntimeError(f"the {task} worker failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(cache="cold" if files else "warm", process_s=time.perf_counter() - start,
                  loadavg_before=load, loadavg_after=os.getloadavg())
    print(f"  {task:5s} {result['cache']}: {result['wall_s']:.1f} s, peak extra "
          f"{result['peak_extra_kb'] / 2**20:.2f} GiB, load {load[0]:.1f}", flush=True)
    return result


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (its timeline is plotted), with every run's wall time and peak memory."""
    median = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
    peaks = [r["peak_extra_kb"] for r in runs]
    return {**median, "wall_s_all": [r["wall_s"] for r in runs], "peak_extra_kb_all": peaks,
            "peak_extra_kb_max": max(peaks)}


def markdown(report: dict) -> str:
    pair = report["pair_bytes"]
    lines = [
        f"{report['layers']} decoder layers of Llama-3.2-1B's projections = {report['params'] / 1e9:.3f}B parameters "
        f"per checkpoint, bfloat16; checkpoint pair (old + new) = {pair / 2**30:.2f} GiB; top_t = {report['top_t']} "
        f"(core {report['core_nnz']:,} entries, {report['core_bytes'] / 2**20:.0f} MiB as int32 + fp32 = "
        f"{report['core_bytes'] / pair:.1%} of the pair).",
        "",
        f"Wall times: median of {report['repeats']} runs (range); peak memory: the largest of them.",
        "",
        "| cache | build_edit wall | plain read wall | time ratio of medians (goal ≤ 1.5) | build_edit peak extra RSS "
        "| of the pair (goal ≤ 10%) | of which anon / file-backed | plain read peak extra RSS | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def wall(run: dict) -> str:
        return f"{run['wall_s']:.1f} s ({min(run['wall_s_all']):.1f}–{max(run['wall_s_all']):.1f})"

    for cache in ("cold", "warm"):
        b, r = report["runs"][f"build_{cache}"], report["runs"][f"read_{cache}"]
        lines.append(
            f"| {cache} | {wall(b)} | {wall(r)} | {b['wall_s'] / r['wall_s']:.2f}× "
            f"| {b['peak_extra_kb_max'] / 2**20:.2f} GiB | {b['peak_extra_kb_max'] * 1024 / pair:.1%} "
            f"| {b['sampled_peak_anon_extra_kb'] / 2**20:.2f} / {b['sampled_peak_file_extra_kb'] / 2**20:.2f} GiB "
            f"| {r['peak_extra_kb_max'] / 2**20:.2f} GiB "
            f"| {b['loadavg_before'][0]:.1f} / {r['loadavg_before'][0]:.1f} |"
        )
    for cache in ("cold", "warm"):
        b, r = report["runs"][f"build_{cache}"], report["runs"][f"read_{cache}"]
        memory = b["peak_extra_kb_max"] * 1024 / pair <= GOALS["peak_rss_to_pair"]
        speed = b["wall_s"] / r["wall_s"] <= GOALS["time_to_read"]
        verdict = [f"{goal} goal {'met' if ok else 'missed'}" for goal, ok in (("memory", memory), ("time", speed))]
        lines.append(f"\n{cache}: {', '.join(verdict)}.")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    pair_gib = report["pair_bytes"] / 2**30
    for ax, cache in zip(axes, ("cold", "warm")):
        for task, color in (("build", "C0"), ("read", "C1")):
            run = report["runs"][f"{task}_{cache}"]
            t = [s[0] for s in run["timeline"]]
            anon = [(s[1] - run["anon_before_kb"]) / 2**20 for s in run["timeline"]]
            total = [(s[1] + s[2] - run["rss_before_kb"]) / 2**20 for s in run["timeline"]]
            label = "build_edit" if task == "build" else "plain read"
            ax.plot(t, total, color=color, label=f"{label}: RSS − RSS before")
            ax.plot(t, anon, color=color, linestyle="--", label=f"{label}: anonymous part")
        ax.axhline(GOALS["peak_rss_to_pair"] * pair_gib, color="k", linestyle=":", label="goal: 10% of the pair")
        ax.axhline(report["core_bytes"] / 2**30, color="C2", linestyle="-.", label="the core itself (int32 + fp32)")
        ax.set_title(f"{cache} page cache")
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GiB")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"build_edit vs plain read, {report['params'] / 1e9:.2f}B bf16 parameters per checkpoint, "
                 f"top_t={report['top_t']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e9, help="parameters per checkpoint (rounded to layers)")
    parser.add_argument("--top-t", type=float, default=0.05, help="DFTConfig.top_t (default: DFTConfig's)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for scale.{json,md,png}")
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the median is reported)")
    parser.add_argument("--worker", choices=("build", "read"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args.top_t, args.profile)))
        return

    command = "python " + shlex.join(["benchmarks/scale.py", *sys.argv[1:]])
    layers = max(1, round(args.params / LAYER_PARAMS))
    params = layers * LAYER_PARAMS
    need = 3 * params * DTYPE.itemsize
    workdir = args.workdir or tempfile.mkdtemp(prefix="dft-scale-")
    os.makedirs(workdir, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < 1.2 * need:
        raise SystemExit(f"{workdir}: {free / 2**30:.1f} GiB free, the checkpoints need {need / 2**30:.1f} GiB")
    started = time.perf_counter()
    try:
        print(f"writing 3 checkpoints of {params / 1e9:.3f}B bf16 parameters to {workdir}", flush=True)
        start = time.perf_counter()
        files = write_checkpoints(workdir, layers, args.seed)
        write_s = time.perf_counter() - start
        pair_files = files["old"] + files["new"]
        pair = sum(os.path.getsize(p) for p in pair_files)
        trials: dict[str, list[dict]] = {f"{t}_{c}": [] for c in ("cold", "warm") for t in ("read", "build")}
        for cache in ("cold", "warm"):
            for _ in range(args.repeats):
                for task in ("read", "build"):
                    if cache == "warm":
                        measure("read", workdir, args.top_t, None)  # warms the cache for the next run
                    evicted = pair_files if cache == "cold" else None
                    trials[f"{task}_{cache}"].append(measure(task, workdir, args.top_t, evicted))
        runs = {key: median_run(runs) for key, runs in trials.items()}
        profiled = measure("build", workdir, args.top_t, None, profile=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "command": command,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "params": params,
        "layers": layers,
        "dtype": "bfloat16",
        "top_t": args.top_t,
        "repeats": args.repeats,
        "pair_bytes": pair,
        "core_nnz": runs["build_warm"]["core_nnz"],
        "core_bytes": runs["build_warm"]["core_bytes"],
        "goals": GOALS,
        "write_s": write_s,
        "runs": runs,
        "profile_warm": profiled["profile"],
        "profiled_wall_s": profiled["wall_s"],
        "total_s": time.perf_counter() - started,
    }
    table = markdown(report)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "scale.md"), "w") as f:
        f.write(f"# build_edit at scale\n\nProduced by `{command}` (torch {torch.__version__}, {os.cpu_count()} CPUs, "
                f"shared machine; load average before each run in the table), {report['total_s'] / 60:.1f} min in "
                f"all.\n\n{table}\n\n{NOTES}\n## Profile of a warm build_edit (cProfile)\n\n```\n"
                f"{report['profile_warm']}```\n")
    plot(report, os.path.join(args.out, "scale.png"))


if __name__ == "__main__":
    main()
