"""Batch editing: every method edits the same N requests in one batch, per seed; scored with intervals.

Protocols: `base` (default) edits the pretrained model directly, the old answers being the model's own (DFT
generates them); `paper` (DFT §5.3) first fine-tunes the base for 3 epochs on the data's old answers of the
sampled requests (the "original model", cached on disk) and edits that. Every method starts from a copy of the
unedited model and is scored against it (`scoring.py`: teacher-forced, generated answers, capability probe).
Seed s edits report pool[s·N:(s+1)·N] (`harness.Splits`); `--split tuning` runs on the tuning split instead, for
choosing hyper-parameters (`--set METHOD.key=value` overrides one).

    python benchmarks/knowledge_update.py --data ../shared/data/zsre_mend-800.json --format zsre --out DIR
    python benchmarks/knowledge_update.py --quick --out /tmp/ku                                    # CI, minutes
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from editors import (
    BASELINE_METHODS,
    DATA_OLD_ANSWERS,
    HYPERPARAMS,
    QUICK_OVERRIDES,
    available_methods,
    make_editor,
    original_model,
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
    METRICS,
    differences,
    goal_lines,
    method_notes,
    metric_table,
    pair_differences,
    plot_batch,
    summarize,
    tradeoff_lines,
    verdict_lines,
    write_json,
)
from scoring import Scorer
from tqdm.auto import tqdm

DEFAULT_METHODS = ("Full-FT", "FT-c", "FT-M", "LoRA", "DFT_FT", "DFT_LoRA")
DEFAULT_EDITS, DEFAULT_SEEDS = 100, 2  # fit 2 hours per dataset on the 2-core machine; --full is the size
FULL_EDITS, FULL_SEEDS = 200, 3
QUICK = {"n_edits": 4, "seeds": 1, "methods": ["Full-FT", "DFT_FT"]}


def run(args: argparse.Namespace, base, tokenizer) -> dict:
    """Edit and score every seed and method; returns the results (summaries, differences, per-unit values)."""
    splits = Splits.of(args.data, args.format)
    texts = probe_texts(args.probe_data, args.probe_positions)
    values: dict[str, dict[str, list[list[float]]]] = {m: {} for m in args.methods}
    costs = {m: {"seconds": [], "file_bytes": [], "score_seconds": []} for m in args.methods}
    with tqdm(total=args.seeds * len(args.methods), desc="batch editing") as progress:
        for seed in range(args.seeds):
            requests = splits.draw(args.split, seed, args.n_edits)
            progress.set_description(f"seed {seed}: unedited model")
            unedited = base
            if args.protocol == "paper":
                key = {"data": str(args.data), "model": args.model, "split": args.split, "seed": seed}
                unedited = original_model(base, tokenizer, requests, args.cache, key)
            drawn, requests = requests, for_protocol(requests, args.protocol)
            scorer = Scorer(unedited, tokenizer, requests, texts)
            for method in args.methods:
                progress.set_description(f"seed {seed}: {method}")
                editor = make_editor(method, copy.deepcopy(unedited), tokenizer, args.cache, seed)
                tick = time.perf_counter()
                editor.apply(drawn if method in DATA_OLD_ANSWERS else requests)
                costs[method]["seconds"].append(time.perf_counter() - tick)
                costs[method]["file_bytes"].append(editor.file_bytes())
                tick = time.perf_counter()
                for metric, per_unit in scorer(editor.model).items():
                    values[method].setdefault(metric, []).append(per_unit)
                costs[method]["score_seconds"].append(time.perf_counter() - tick)
                del editor
                gc.collect()
                progress.update(1)
    methods = {}
    for m in args.methods:
        methods[m] = summarize(values[m])
        for cost, per_seed in costs[m].items():
            methods[m][cost] = {"mean": sum(per_seed) / len(per_seed), "per_seed": per_seed}
    return {"methods": methods, "differences": differences(values), "pairs": pair_differences(values),
            "values": values}


def run_adding(prior: dict, prior_values: dict) -> Callable[[argparse.Namespace, Any, Any], dict]:
    """`run` for `--add`: the new methods' results merged into a prior run's, the differences recomputed from the
    per-unit values of all of them (the same requests, so the pairs hold)."""

    def run_added(args: argparse.Namespace, base, tokenizer) -> dict:
        new = run(args, base, tokenizer)
        values = {**prior_values, **new["values"]}
        return {"methods": {**prior["methods"], **new["methods"]}, "differences": differences(values),
                "pairs": pair_differences(values), "values": values}

    return run_added


def write_outputs(out: Path, results: dict) -> None:
    """results.json (per-unit values apart, in values.json), results.md and results.png."""
    config = results["config"]
    values = results.pop("values", None)
    if values is not None:
        write_json(out / "values.json", values)
    write_json(out / "results.json", results)
    title = f"Batch editing, {config['format']}, protocol {config['protocol']}"
    added = [added_line(a) for a in config.get("added", [])]
    lines = [f"# {title}", "", f"Command: `{config['command']}`", "", *([*added, ""] if added else []),
             f"Model {config['model']}; {config['n_edits']} edits × {config['seeds']} seed(s) from the "
             f"{config['split']} split of `{Path(config['data']).name}` (seed s: requests [s·N, (s+1)·N) of it), "
             f"{config['threads']} thread(s); total {config['total_seconds'] / 60:.1f} min, peak RSS "
             f"{config['peak_rss_mib']:.0f} MiB.", "", *method_notes(config["probe"]),
             "Seconds: wall time of the edit call on this machine's CPU (scoring: of scoring the edited model); file: "
             "bytes the edit ships (dense float32 delta of the trained weights for the fine-tunes).", "",
             "## Metrics", "", *metric_table(results["methods"]), "",
             "| Method | Seconds | Scoring seconds | File (bytes) |", "|---|---|---|---|"]
    lines += [f"| {m} | {r['seconds']['mean']:.1f} | {r['score_seconds']['mean']:.1f} | "
              f"{r['file_bytes']['mean']:,.0f} |" for m, r in results["methods"].items()]
    if results["differences"]:
        lines += ["", "## Paired differences against Full-FT (same requests)", "",
                  *metric_table(results["differences"], columns=METRICS), "", "Locality against reliability:", "",
                  *tradeoff_lines(results["differences"]), ""]
        if goals := goal_lines(results["differences"]):
            lines += ["Issue 17's batch goals for DFT_FT:", "", *goals, ""]
        lines += ["Every metric:", "", *verdict_lines(results["differences"])]
    for pair, diffs in results.get("pairs", {}).items():
        name, baseline = pair.split(" − ")
        lines += ["", f"## Paired differences: {pair} (same requests)", "",
                  *metric_table({pair: diffs}, first="Pair", columns=METRICS), "",
                  *goal_lines({name: diffs}, name, baseline)]
    lines += ["", "## Hyper-parameters", "", "```json", json.dumps(config["hyperparameters"], indent=1), "```"]
    if config.get("notes"):
        lines += ["", "## Findings", "", config["notes"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_batch(out / "results.png", results["methods"], title)


def added_line(added: dict) -> str:
    """One `--add` run in words: which methods it added, which it re-run in place of earlier figures."""
    replaced = added.get("replaced", [])
    new = [m for m in added["methods"] if m not in replaced]
    parts = [f"{', '.join(new)} added"] if new else []
    parts += [f"{', '.join(replaced)} re-run, replacing earlier figures"] if replaced else []
    return f"Methods {' and '.join(parts)} by `{added['command']}` ({added['threads']} thread(s))."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "benchmarks/results/knowledge_update",
                      "4 edits, 1 seed, Full-FT and DFT_FT, 20 probe texts")
    parser.add_argument("--n-edits", type=int, default=DEFAULT_EDITS)
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS)
    parser.add_argument("--full", action="store_true", help=f"issue size: {FULL_EDITS} edits, {FULL_SEEDS} seeds")
    parser.add_argument("--protocol", choices=("base", "paper"), default="base")
    parser.add_argument("--split", choices=("report", "tuning"), default="report")
    parser.add_argument("--set", nargs="*", default=[], metavar="METHOD.key=value", help="override a hyper-parameter")
    parser.add_argument("--notes", type=Path, help="a markdown file of findings to include in results.md")
    parser.add_argument("--render", action="store_true", help="rewrite results.md and the plot from results.json")
    parser.add_argument("--add", action="store_true",
                        help="add --methods to the run in --out (same data, edits, seeds, protocol and split), "
                             "keeping its other methods' figures")
    parser.add_argument("--replace", action="store_true",
                        help="with --add: re-run --methods the run already holds (after a hyper-parameter change), "
                             "replacing their figures")
    args = parser.parse_args(argv)
    command = "python benchmarks/knowledge_update.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render:
        results = json.loads((args.out / "results.json").read_text())
        if args.notes:
            results["config"]["notes"] = args.notes.read_text()
        write_outputs(args.out, results)
        return 0
    methods = available_methods()
    if args.quick:
        args.n_edits, args.seeds, args.methods = QUICK["n_edits"], QUICK["seeds"], args.methods or QUICK["methods"]
        args.set = QUICK_OVERRIDES + args.set
    elif args.full:
        args.n_edits, args.seeds = FULL_EDITS, FULL_SEEDS
    args.methods = args.methods or [m for m in methods if m in DEFAULT_METHODS + BASELINE_METHODS]
    if unknown := [m for m in args.methods if m not in methods]:
        parser.error(f"unknown or unavailable method(s) {unknown}; available: {list(methods)}")
    for path in (args.data, args.probe_data):
        if not path.exists():
            parser.error(f"{path} does not exist (the shared data lives in ../shared/data)")
    for item in args.set:
        override(item)
    args.probe_positions = QUICK_PROBE_POSITIONS if args.quick else PROBE_POSITIONS
    config = {
        "command": command, "model": args.model, "data": str(args.data), "format": args.format,
        "protocol": args.protocol, "split": args.split, "n_edits": args.n_edits, "seeds": args.seeds,
        "methods": args.methods,
        "hyperparameters": {m: HYPERPARAMS[m] for m in [*args.methods, "original"] if m in HYPERPARAMS
                            and (m != "original" or args.protocol == "paper")},
        "threads": args.threads, "probe": probe_description(args.probe_positions),
        "notes": args.notes.read_text() if args.notes else None,
    }
    if args.replace and not args.add:
        parser.error("--replace re-runs methods of the run in --out: it goes with --add")
    if not args.add:
        return execute(args, run, write_outputs, config)
    prior, prior_values = added_to(args.out, config, args.replace, parser)
    before = prior["config"]["methods"]
    return execute(args, run_adding(prior, prior_values), write_outputs, {
        **prior["config"], "methods": [*before, *(m for m in args.methods if m not in before)],
        "hyperparameters": {**prior["config"]["hyperparameters"], **config["hyperparameters"]},
        "added": [*prior["config"].get("added", []),
                  {"command": command, "methods": args.methods, "threads": args.threads,
                   "replaced": [m for m in args.methods if m in before]}]})


def added_to(out: Path, config: dict, replace: bool, parser: argparse.ArgumentParser) -> tuple[dict, dict]:
    """The prior run in `out` that `--add` extends (its results and per-unit values), checked to be the same
    requests and scoring as `config`'s and, unless `replace`, to lack its methods."""
    try:
        prior = json.loads((out / "results.json").read_text())
        prior_values = json.loads((out / "values.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"--add extends the run in {out}, but its results.json/values.json cannot be read: {error}")
    keys = ("model", "data", "format", "protocol", "split", "n_edits", "seeds", "probe")
    before = prior["config"]
    if differ := [f"{k}={before.get(k)!r}" for k in keys if before.get(k) != config[k]]:
        parser.error(f"--add: {out} was run with other settings ({', '.join(differ)})")
    if not replace and (again := [m for m in config["methods"] if m in prior["methods"]]):
        parser.error(f"--add: {out} already holds {again} (--replace re-runs them)")
    return prior, prior_values

if __name__ == "__main__":
    raise SystemExit(main())
