"""Sanity check of the ROME, MEMIT and AlphaEdit baselines: single zsRE edits of the base SmolLM2-135M-Instruct.

Each method edits one request at a time on the unedited weights (restored after every edit) and is scored with
`dft_peft.evaluate` (teacher-forced reliability, generality and locality, locality against the unedited model).
The scored requests are `--n` records drawn (seeded) from the first 400 of a seeded permutation of the valid zsRE
records; `--split tune` draws from the rest of those 400 instead, for choosing hyper-parameters.

    python benchmarks/baselines/sanity.py                                   # writes benchmarks/results/baselines/
    python benchmarks/baselines/sanity.py --split tune --n 8 --methods ROME --set ROME.layer=3 --out /tmp/tune
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from baselines import EDITORS, ValueSettings, make_editor
from baselines.causal_trace import trace_mlps
from dft_peft import evaluate, load_requests, locality_reference, to_requests
from dft_peft.models import load_model

ZSRE = Path(__file__).resolve().parents[3] / "shared" / "data" / "zsre_mend-800.json"
POOL = 400
PERMUTATION_SEED = 0
SAMPLE_SEED = 1
# Chosen on `--split tune` requests (disjoint from the scored ones); see sanity.md. Two context prefixes instead of
# five keep an edit under half a minute on this CPU; MEMIT's λ = 15000 (GPT-J's, d_ff 16384) under-writes a d_ff of
# 1536, where kᵀ C⁻¹ k is ~10× smaller, so λ is scaled down with it.
HYPERPARAMS: dict[str, dict] = {
    "ROME": {"templates": 2},
    "MEMIT": {"templates": 2, "covariance_weight": 1500.0},
    "AlphaEdit": {"templates": 2},
}


def requests_for(split: str, n: int) -> list:
    """`n` zsRE requests of the scored split or of the tuning split (the rest of the pool), seeded."""
    requests = to_requests(load_requests(ZSRE, format="zsre", skip_invalid=True))
    order = torch.randperm(len(requests), generator=torch.Generator().manual_seed(PERMUTATION_SEED)).tolist()
    pool = order[:POOL]
    scored = random.Random(SAMPLE_SEED).sample(pool, n if split == "scored" else 30)
    chosen = scored if split == "scored" else [i for i in pool if i not in scored][:n]
    return [requests[i] for i in chosen]


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """`METHOD.key=value` (a `value.` prefix sets a `ValueSettings` field; `layers=a-b` a range) as options."""
    options: dict[str, dict] = {name: {} for name in EDITORS}
    for item in items:
        target, raw = item.split("=", 1)
        method, key = target.split(".", 1)
        if key == "layers":
            start, stop = raw.split("-")
            options[method][key] = list(range(int(start), int(stop) + 1))
        else:
            options[method][key] = json.loads(raw)
    return options


def editor_options(method: str, overrides: dict) -> dict:
    """The constructor options of `method`: the chosen hyper-parameters, then the overrides."""
    options = {**HYPERPARAMS[method], **overrides}
    value = {key.removeprefix("value."): options.pop(key) for key in list(options) if key.startswith("value.")}
    options["value"] = dataclasses.replace(options.get("value", ValueSettings()), **value)
    return options


def run_method(method: str, options: dict, model, tokenizer, requests: list, cache_dir: Path) -> dict:
    """Single edits of each request on the unedited weights: per-request metrics, edit seconds, what the value
    optimisation reached."""
    tick = time.perf_counter()
    editor = make_editor(method, model, tokenizer, cache_dir, **options)
    setup_seconds = time.perf_counter() - tick
    rows = []
    for request in requests:
        reference = locality_reference(model, tokenizer, [request])
        editor.restore()
        tick = time.perf_counter()
        editor.apply([request])
        seconds = time.perf_counter() - tick
        metrics = evaluate(model, tokenizer, [request], reference=reference).per_request[0]
        values = [entry for entry in editor.log if "nll" in entry]
        rows.append({"prompt": request.prompt, "subject": request.subject, "target_new": request.target_new,
                     **metrics, "seconds": seconds, "value_nll": values[-1]["nll"], "value_steps": values[-1]["steps"],
                     "file_bytes": editor.file_bytes()})
        print(f"{method} {len(rows)}/{len(requests)} rel {metrics['reliability']:.2f} gen {metrics['generality']:.2f} "
              f"loc {metrics['locality']:.2f} nll {values[-1]['nll']:.3f} {seconds:.1f}s", flush=True)
    editor.restore()
    summary = {name: 100 * statistics.mean(row[name] for row in rows)
               for name in ("reliability", "generality", "locality")}
    extra = {}
    if hasattr(editor, "null_dimensions"):
        extra["null_dimensions"] = editor.null_dimensions
    return {
        "options": {k: (dataclasses.asdict(v) if k == "value" else v) for k, v in options.items()},
        "layers": editor.layers, **summary,
        "seconds_per_edit": statistics.mean(row["seconds"] for row in rows),
        "value_nll_mean": statistics.mean(row["value_nll"] for row in rows),
        "setup_seconds": setup_seconds,
        "statistics": {"tokens": editor.statistics.tokens, "precompute_seconds": editor.statistics.precompute_seconds,
                       "computed_in_this_run_seconds": editor.statistics.seconds},
        **extra, "per_request": rows,
    }


def table(results: dict) -> str:
    """The results as a markdown table (sanity.md quotes it)."""
    lines = ["| Method | Layers | Reliability | Generality | Locality | Edit s/request | value NLL reached |",
             "|---|---|---|---|---|---|---|"]
    for method, r in results["methods"].items():
        layers = r["layers"][0] if len(r["layers"]) == 1 else f"{r['layers'][0]}–{r['layers'][-1]}"
        lines.append(f"| {method} | {layers} | {r['reliability']:.1f} | {r['generality']:.1f} | {r['locality']:.1f} "
                     f"| {r['seconds_per_edit']:.1f} | {r['value_nll_mean']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("scored", "tune"), default="scored")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=list(EDITORS), choices=list(EDITORS))
    parser.add_argument("--set", nargs="*", default=[], metavar="METHOD.key=value")
    parser.add_argument("--cache", type=Path, default=None, help="key statistics cache (default ~/.cache/...)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "baselines")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trace", type=int, default=0, metavar="N",
                        help="first trace the MLPs at the subject's last token on N tuning-split prompts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2")
    requests = requests_for(args.split, args.n)
    overrides = parse_overrides(args.set)
    results = {"model": "SmolLM2-135M-Instruct", "split": args.split, "n": len(requests),
               "command": " ".join(["python", *sys.argv]), "methods": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.trace:
        tick = time.perf_counter()
        results["causal_trace"] = trace_mlps(model, tokenizer, requests_for("tune", args.trace))
        results["causal_trace"]["seconds"] = time.perf_counter() - tick
        print(json.dumps(results["causal_trace"]), flush=True)
    for method in args.methods:
        results["methods"][method] = run_method(method, editor_options(method, overrides[method]), model, tokenizer,
                                                requests, args.cache)
        (args.out / "sanity.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()
