"""The benchmark harness: dft_peft's internals in one import block, data splits, probe texts, the memory probe.

Every benchmark module takes the package internals it needs from here (`from harness import train`), so a move
inside `dft_peft` is fixed in this file's import block alone. Scoring lives in `scoring.py`, the editors in
`editors.py`, intervals in `intervals.py`, results files and plots in `reporting.py`.

Data splits (the same in every script): a file's valid requests (`load_requests(..., skip_invalid=True)`) that are
eligible for editing — every zsRE record; CounterFact's records at file positions 0–5999, because positions
6000–8999 are reserved for the ROME/MEMIT/AlphaEdit key statistics and 9000–9999 for the capability probe — in an
order drawn with seed 0. The first 100 of that order are the tuning split (hyper-parameter choices only); the rest
is the report pool, from which every reported run draws.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from memory import peak_rss_mib
from torch import nn

# --- dft_peft: its public API, and the internals the benchmarks use (imported here only) -------------------------
from dft_peft import (  # noqa: F401 (re-exported)
    DFTConfig,
    EditArguments,
    EditReport,
    EditRequest,
    edit,
    evaluate,
    load_requests,
    locality_reference,
    to_requests,
)
from dft_peft.editing.old_answers import generate_old_answers  # noqa: F401 (re-exported)
from dft_peft.editing.training import EpochBatches, ModelLoss, train  # noqa: F401 (re-exported)
from dft_peft.evaluation.metrics import (  # noqa: F401 (re-exported)
    encode_pairs,
    encode_text,
    module_mode,
    padded,
    target_token_accuracy,
)
from dft_peft.models import load_model

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {"zsre": "zsre_mend-800.json", "counterfact": "counterfact-edit-10k.json"}
PROMPT_KEYS = {"zsre": "src", "counterfact": "prompt"}  # each format's raw key of `EditRequest.prompt`
SPLIT_SEED = 0
TUNING_SIZE = 100
COUNTERFACT_ELIGIBLE = range(0, 6000)  # file positions CounterFact edits may come from
PROBE_POSITIONS = range(9000, 9200)  # CounterFact file positions of the capability probe's texts
QUICK_PROBE_POSITIONS = range(9000, 9010)


def file_positions(path: Path, fmt: str, requests: list[EditRequest]) -> list[int]:
    """The file position of each of `requests`, the valid records of `path` in file order (`load_requests` drops
    invalid ones, so positions are found by walking the raw records alongside, matching the prompt)."""
    records = json.loads(path.read_text(encoding="utf-8-sig"))
    key = PROMPT_KEYS[fmt]
    positions, position = [], 0
    for request in requests:
        while position < len(records) and str(records[position].get(key, "")).strip() != request.prompt:
            position += 1
        if position == len(records):
            raise ValueError(f"{path}: request {request.prompt!r} matches no record in file order")
        positions.append(position)
        position += 1
    return positions


@dataclasses.dataclass(frozen=True)
class Splits:
    """A data file's tuning split and report pool (see the module docstring)."""

    path: Path
    format: str
    tuning: list[EditRequest]
    report: list[EditRequest]

    @classmethod
    def of(cls, path: Path, fmt: str) -> Splits:
        requests = to_requests(load_requests(path, format=fmt, skip_invalid=True))
        if fmt == "counterfact":
            positions = file_positions(path, fmt, requests)
            requests = [r for r, p in zip(requests, positions) if p in COUNTERFACT_ELIGIBLE]
        order = torch.randperm(len(requests), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        shuffled = [requests[i] for i in order]
        if len(shuffled) <= TUNING_SIZE:
            raise ValueError(f"{path}: {len(shuffled)} eligible requests leave nothing after the tuning split")
        return cls(path, fmt, shuffled[:TUNING_SIZE], shuffled[TUNING_SIZE:])

    def draw(self, split: str, seed: int, n: int) -> list[EditRequest]:
        """Seed `seed`'s `n` requests of `split` ("report" or "tuning"): split[seed·n : (seed+1)·n], disjoint
        across seeds."""
        pool = self.tuning if split == "tuning" else self.report
        if (seed + 1) * n > len(pool):
            raise ValueError(f"{self.path}: the {split} split holds {len(pool)} requests, fewer than the "
                             f"{(seed + 1) * n} that seed {seed} of {n} requests per seed needs")
        return pool[seed * n : (seed + 1) * n]


def for_protocol(requests: list[EditRequest], protocol: str) -> list[EditRequest]:
    """The requests as a protocol's editors get them: `"paper"` keeps the data's old answers (what the original
    model was fine-tuned on); `"base"` drops them, so that DFT generates the model's own."""
    if protocol == "paper":
        return requests
    return [dataclasses.replace(r, target_old=None) for r in requests]


def probe_texts(path: Path, positions: range = PROBE_POSITIONS) -> list[str]:
    """The capability probe's neutral texts: for CounterFact records at `positions` of `path` (never edited),
    `prompt + " " + ground_truth` and `locality_prompt + " " + locality_ground_truth`, read from the raw fields."""
    records = json.loads(path.read_text(encoding="utf-8-sig"))
    if positions.stop > len(records):
        raise ValueError(f"{path} has {len(records)} records; the capability probe reads positions "
                         f"{positions.start}–{positions.stop - 1} of the CounterFact file")
    texts = []
    for position in positions:
        record = records[position]
        texts += [f"{record['prompt'].strip()} {record['ground_truth'].strip()}",
                  f"{record['locality_prompt'].strip()} {record['locality_ground_truth'].strip()}"]
    return texts


def probe_description(positions: range) -> str:
    """What `probe_texts(path, positions)` reads, for the results files."""
    return (f"CounterFact records at file positions {positions.start}–{positions.stop - 1} (never edited): "
            f"prompt + ground_truth and locality_prompt + locality_ground_truth, {2 * len(positions)} texts")


def execute(args: Any, run: Callable[[Any, nn.Module, Any], dict], write_outputs: Callable[[Path, dict], None],
            config: dict) -> int:
    """A benchmark script's run: load the model with `args.threads` torch threads, `run(args, model, tokenizer)`,
    then write its results to `args.out` with `config`, the run's seconds and its peak memory, and print them.
    A `config` that already holds seconds and memory (a run being extended) gets the sum and the maximum."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tokenizer = load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run(args, base, tokenizer)
    results["config"] = {**config, "total_seconds": config.get("total_seconds", 0.0) + time.perf_counter() - started,
                         "peak_rss_mib": max(config.get("peak_rss_mib", 0.0), peak_rss_mib())}
    write_outputs(args.out, results)
    print((args.out / "results.md").read_text())
    print(f"peak RSS: {peak_rss_mib():.0f} MiB; total {results['config']['total_seconds']:.0f} s")
    return 0


def add_run_arguments(parser: argparse.ArgumentParser, out: str, quick: str) -> None:
    """The options every editing benchmark takes: the data, methods, model, probe texts, output, cache, threads."""
    parser.add_argument("--data", type=Path, default=DATA_DIR / DATASETS["zsre"], help="a zsRE or CounterFact file")
    parser.add_argument("--format", choices=list(DATASETS), default="zsre")
    parser.add_argument("--methods", nargs="+", help="the methods to run (default: the script's and the baselines)")
    parser.add_argument("--model", default="smollm2", help="smollm2 or a local transformers model directory")
    parser.add_argument("--probe-data", type=Path, default=DATA_DIR / DATASETS["counterfact"],
                        help="the CounterFact file whose records 9000–9199 are the capability probe's texts")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dft_peft_benchmark_cache")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help=quick)
