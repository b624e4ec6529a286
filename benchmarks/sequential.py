"""Sequential editing: T edits applied in successive calls of B to one model, scored as the edits accumulate.

Each method edits the pretrained model (protocol `base`: old answers are the model's own) in ceil(T/B) calls of B
requests; every call edits the already-edited model (the fine-tunes keep training the same weights, LoRA the same
adapter, DFT extends the same adapter through repeated `dft_peft.edit` calls, the baselines edit in place). After
each call, or at `--eval-points` evenly spaced calls when there are more, the model is scored against the unedited
one: retention (reliability and generality, both scorings) over the edits made so far, locality over the locality
probes of all T requests, and the capability probe. Above `--eval-requests` M, retention is scored on a seeded
sample of M of the edits so far, and locality on a fixed seeded sample of M of the T probes. Seed s edits report
pool[s·T:(s+1)·T].

    python benchmarks/sequential.py --data ../shared/data/zsre_mend-800.json --format zsre --batch 10 --out DIR
    python benchmarks/sequential.py --quick --out /tmp/seq                                          # CI, minutes
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import random
import sys
import time
from pathlib import Path

from editors import (
    BASELINE_METHODS,
    DATA_OLD_ANSWERS,
    HYPERPARAMS,
    QUICK_OVERRIDES,
    available_methods,
    make_editor,
    override,
)
from harness import (
    PROBE_POSITIONS,
    QUICK_PROBE_POSITIONS,
    Splits,
    add_run_arguments,
    execute,
    for_protocol,
    probe_description,
    probe_texts,
)
from reporting import (
    differences,
    interval,
    method_notes,
    plot_sequential,
    sequential_goal_lines,
    summarize,
    tradeoff_lines,
    verdict_lines,
    write_json,
)
from scoring import Scorer
from tqdm.auto import tqdm

DEFAULT_METHODS = ("Full-FT", "FT-M", "LoRA", "DFT_FT", "DFT_LoRA")
DEFAULT_TOTAL, FULL_TOTAL = 100, 1000  # the default fits 3 hours on the 2-core machine; --full is the T
QUICK = {"total": 4, "batch": 2, "eval_points": 2, "methods": ["Full-FT", "DFT_FT"]}
TABLE_METRICS = ("reliability", "gen_reliability", "locality", "gen_locality", "capability")


def eval_calls(calls: int, points: int) -> list[int]:
    """The calls (1-based) after which the model is scored: all of them, or `points` evenly spaced ending at the
    last."""
    if calls <= points:
        return list(range(1, calls + 1))
    return sorted({math.ceil(k * calls / points) for k in range(1, points + 1)})


def sample(indices: range, m: int, rng: random.Random) -> list[int]:
    """All of `indices`, or a sample of `m` of them, in order."""
    return list(indices) if len(indices) <= m else sorted(rng.sample(indices, m))


def run(args: argparse.Namespace, base, tokenizer) -> dict:
    """Edit and score every seed and method; returns per-point summaries, seconds per call and final differences."""
    splits = Splits.of(args.data, args.format)
    texts = probe_texts(args.probe_data, args.probe_positions)
    calls = math.ceil(args.total / args.batch)
    points = eval_calls(calls, args.eval_points)
    # values[method][point][metric] = per-seed lists of per-unit values
    values = {m: [{} for _ in points] for m in args.methods}
    seconds = {m: [] for m in args.methods}
    file_bytes = {m: [] for m in args.methods}
    score_seconds = {m: [] for m in args.methods}
    with tqdm(total=args.seeds * len(args.methods) * calls, desc="sequential editing") as progress:
        for seed in range(args.seeds):
            drawn = splits.draw("report", seed, args.total)
            requests = for_protocol(drawn, "base")
            rng = random.Random(seed)
            local = sample(range(args.total), args.eval_requests, rng)
            retained = {p: sample(range(min(p * args.batch, args.total)), args.eval_requests, rng) for p in points}
            progress.set_description(f"seed {seed}: unedited model")
            scorer = Scorer(base, tokenizer, requests, texts)
            for method in args.methods:
                editor = make_editor(method, copy.deepcopy(base), tokenizer, args.cache, seed)
                given = drawn if method in DATA_OLD_ANSWERS else requests
                per_call = []
                for call in range(1, calls + 1):
                    progress.set_description(f"seed {seed}: {method}, call {call}/{calls}")
                    tick = time.perf_counter()
                    editor.apply(given[(call - 1) * args.batch : call * args.batch])
                    per_call.append(time.perf_counter() - tick)
                    if call in retained:
                        tick = time.perf_counter()
                        scores = scorer(editor.model, retained[call], local)
                        score_seconds[method].append(time.perf_counter() - tick)
                        for metric, per_unit in scores.items():
                            values[method][points.index(call)].setdefault(metric, []).append(per_unit)
                    progress.update(1)
                seconds[method].append(per_call)
                file_bytes[method].append(editor.file_bytes())
                del editor
                gc.collect()
    methods = {}
    for m in args.methods:
        after = [{"edits": min(p * args.batch, args.total), "calls": p, **summarize(v)}
                 for p, v in zip(points, values[m])]
        methods[m] = {"after": after, "seconds": [sum(s) / len(s) for s in zip(*seconds[m])],
                      "seconds_per_seed": seconds[m], "file_bytes": sum(file_bytes[m]) / len(file_bytes[m]),
                      "score_seconds": sum(score_seconds[m]) / len(score_seconds[m])}
    final = differences({m: v[-1] for m, v in values.items()})
    return {"methods": methods, "differences": final}


def write_outputs(out: Path, results: dict) -> None:
    """results.json, results.md and results.png."""
    config = results["config"]
    write_json(out / "results.json", results)
    title = (f"Sequential editing, {config['format']}: {config['total']} edits in calls of {config['batch']}, "
             f"{config['seeds']} seed(s)")
    lines = [f"# {title}", "", f"Command: `{config['command']}`", "",
             f"Model {config['model']}, protocol base; seed s edits report pool [s·T, (s+1)·T) of "
             f"`{Path(config['data']).name}`; scored after calls {config['eval_calls']}; retention on at most "
             f"{config['eval_requests']} of the edits so far, locality on at most {config['eval_requests']} of the T "
             f"probes. {config['threads']} thread(s); total {config['total_seconds'] / 60:.1f} min, peak RSS "
             f"{config['peak_rss_mib']:.0f} MiB.", "", *method_notes(config["probe"])]
    if config["note"]:
        lines += ["", f"**{config['note']}**"]
    for metric in TABLE_METRICS:
        names = list(results["methods"])
        edits = [p["edits"] for p in results["methods"][names[0]]["after"]]
        lines += ["", f"## {metric} after each scored call", "", "| Method | " + " | ".join(map(str, edits)) + " |",
                  "|---" * (len(edits) + 1) + "|"]
        k = 4 if metric == "capability" else 1
        lines += [f"| {m} | " + " | ".join(interval(p[metric], k) for p in results["methods"][m]["after"]) + " |"
                  for m in names]
    lines += ["", "## Seconds per call (mean over seeds), per scoring, and edit file", "",
              "| Method | mean | first | last | total | per scoring | File (bytes) |", "|---|---|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        s = r["seconds"]
        lines.append(f"| {m} | {sum(s) / len(s):.1f} | {s[0]:.1f} | {s[-1]:.1f} | {sum(s):.0f} | "
                     f"{r['score_seconds']:.1f} | {r['file_bytes']:,.0f} |")
    if results["differences"]:
        lines += ["", "## After all edits: paired differences against Full-FT (same requests)", "",
                  *tradeoff_lines(results["differences"]), "", "Every metric:", "",
                  *verdict_lines(results["differences"])]
    if goals := sequential_goal_lines(results["methods"]):
        lines += ["", "## Issue 17's sequential goals for DFT_FT", "", *goals]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_sequential(out / "results.png", results["methods"], title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "benchmarks/results/sequential", "T=4 in calls of 2, Full-FT and DFT_FT, 2 points")
    parser.add_argument("--total", type=int, default=DEFAULT_TOTAL, help="T: edits in all")
    parser.add_argument("--full", action="store_true", help=f"T = {FULL_TOTAL} (capped by the report pool)")
    parser.add_argument("--batch", type=int, default=10, help="B: edits per call")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--eval-points", type=int, default=5, help="K: scored calls at most")
    parser.add_argument("--eval-requests", type=int, default=200, help="M: requests scored per point at most")
    parser.add_argument("--render", action="store_true", help="rewrite results.md and the plot from results.json")
    args = parser.parse_args(argv)
    command = "python benchmarks/sequential.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render:
        write_outputs(args.out, json.loads((args.out / "results.json").read_text()))
        return 0
    methods = available_methods()
    if args.quick:
        args.total, args.batch, args.eval_points = QUICK["total"], QUICK["batch"], QUICK["eval_points"]
        args.methods = args.methods or QUICK["methods"]
        for item in QUICK_OVERRIDES:
            override(item)
    elif args.full:
        args.total = FULL_TOTAL
    args.methods = args.methods or [m for m in methods if m in DEFAULT_METHODS + BASELINE_METHODS]
    if unknown := [m for m in args.methods if m not in methods]:
        parser.error(f"unknown or unavailable method(s) {unknown}; available: {list(methods)}")
    for path in (args.data, args.probe_data):
        if not path.exists():
            parser.error(f"{path} does not exist (the shared data lives in ../shared/data)")
    if min(args.total, args.batch, args.seeds, args.eval_points, args.eval_requests) < 1:
        parser.error("--total, --batch, --seeds, --eval-points and --eval-requests must be positive")
    note = None
    pool = len(Splits.of(args.data, args.format).report)
    if args.seeds * args.total > pool:
        capped = pool // args.seeds
        note = (f"T capped at {capped}: the report pool of {Path(args.data).name} holds {pool} requests, fewer than "
                f"{args.seeds} seed(s) × {args.total}")
        print(note)
        args.total = capped
    args.probe_positions = QUICK_PROBE_POSITIONS if args.quick else PROBE_POSITIONS
    return execute(args, run, write_outputs, {
        "command": command, "model": args.model, "data": str(args.data), "format": args.format,
        "total": args.total, "batch": args.batch, "seeds": args.seeds, "methods": args.methods,
        "eval_calls": eval_calls(math.ceil(args.total / args.batch), args.eval_points),
        "eval_requests": args.eval_requests, "note": note, "threads": args.threads,
        "hyperparameters": {m: HYPERPARAMS[m] for m in args.methods if m in HYPERPARAMS},
        "probe": probe_description(args.probe_positions),
    })


if __name__ == "__main__":
    raise SystemExit(main())
