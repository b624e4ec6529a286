"""`dft-peft demo`: SmolLM2-135M-Instruct learns a few counterfactuals; the answers before and after, the saved edit,
and the reloaded, merged edit answering the same."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time

from peft import PeftModel

from ..editing.arguments import EditArguments
from ..editing.old_answers import generate_old_answers
from ..editing.rounds import edit
from ..evaluation.metrics import evaluate, locality_reference
from ..evaluation.requests import demo_requests
from ..tuner.config import DFTConfig
from .common import ModelArguments, print_metrics, read_model, save_edit, table, writable_dir
from .edit import print_report

# The demo's edit of SmolLM2-135M-Instruct on the shipped facts (`demo_requests`), chosen to take about half a
# minute on a 2-core CPU: one locate round finds a core of 1% of the weights, then only the core's values are trained
# (rounds of 2 steps) until every new answer holds. Old answers are cut at 8 tokens: a fact, not a paragraph.
DEMO_CONFIG = {"top_t": 0.01, "lam": 1.0}
DEMO_ARGUMENTS = {"strategy": "locate_once", "epochs": 2, "old_epochs": 2, "learning_rate": 1e-4,
                  "core_epochs": 2, "core_learning_rate": 2e-3, "max_rounds": 8, "generate_max_new_tokens": 8}


@dataclasses.dataclass
class DemoArguments:
    output_dir: str | None = dataclasses.field(default=None, metadata={
        "help": "Where to save the edit (default: a new temporary folder)."})


def add_parser(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "demo", help="edit a few facts of SmolLM2-135M-Instruct and show the answers change",
        description="Edit the facts shipped with dft-peft, show the model's answers before and after, save the edit, "
                    "then reload and merge it and check that the merged model answers the same.",
        dataclass_types=[ModelArguments, DemoArguments],
    ).set_defaults(run=run)


def _gives(answer: str, target: str) -> bool:
    return answer.lower().startswith(target.lower())


def run(ns: argparse.Namespace) -> int:
    start = time.perf_counter()
    if ns.output_dir:
        writable_dir(ns.output_dir, "--output-dir")
    output_dir = ns.output_dir or tempfile.mkdtemp(prefix="dft-demo-")
    model, tokenizer = read_model(ns)
    fresh_base = copy.deepcopy(model)  # the edit wraps `model` in place; the reload check needs the unedited weights
    requests = demo_requests()
    prompts = [r.prompt for r in requests]
    config, args = DFTConfig(**DEMO_CONFIG), EditArguments(**DEMO_ARGUMENTS)
    print(f"\nEditing {len(requests)} facts (DFT: {DEMO_CONFIG}, {DEMO_ARGUMENTS})")
    reference = locality_reference(model, tokenizer, requests, args.eval_batch_size)
    # The demo facts carry no target_old, so the edit generates the model's own answers first: those are "before".
    peft_model, report = edit(model, tokenizer, requests, config, args)
    before = report.old_answers
    after = generate_old_answers(peft_model, tokenizer, prompts, args.generate_max_new_tokens)
    print_report(report)
    print("\nGreedy continuations before and after the edit\n" + table(
        ["prompt", "before", "after", "new fact", "holds"],
        [[r.prompt + " …", b, a, r.target_new, "yes" if _gives(a, r.target_new) else "no"]
         for r, b, a in zip(requests, before, after)],
    ))
    changed = sum(b != a for b, a in zip(before, after))
    holds = sum(_gives(a, r.target_new) for r, a in zip(requests, after))
    print(f"Answers changed: {changed}/{len(requests)} facts; the new fact holds for {holds}/{len(requests)}")

    metrics = evaluate(peft_model, tokenizer, requests, reference=reference, batch_size=args.eval_batch_size)
    print_metrics(metrics, "Metrics (teacher-forced token accuracy; locality against the unedited model)")
    size, edited = save_edit(peft_model, output_dir)
    targeted = sum(layer.base_numel for layer in peft_model.base_model.dft_layers().values())
    print(f"\nSaved the edit to {output_dir}: {size:,} bytes for {edited:,} edited parameters "
          f"({100 * edited / targeted:.2f}% of the {targeted:,} targeted weights)")

    merged = PeftModel.from_pretrained(fresh_base, output_dir).merge_and_unload()
    reloaded = generate_old_answers(merged, tokenizer, prompts, args.generate_max_new_tokens)
    mismatches = [(p, a, m) for p, a, m in zip(prompts, after, reloaded) if a != m]
    print(f"\nReloaded the edit onto a fresh base model with PeftModel.from_pretrained and merged it: "
          f"{len(prompts) - len(mismatches)}/{len(prompts)} answers identical to the unmerged edited model's")
    for prompt, unmerged, merged_answer in mismatches:
        print(f"  {prompt!r}: unmerged {unmerged!r}, merged {merged_answer!r}", file=sys.stderr)
    print(f"Demo finished in {time.perf_counter() - start:.0f} s")
    if mismatches:
        print("dft-peft demo: error: the merged model answers differently from the unmerged edited model",
              file=sys.stderr)
        return 1
    return 0


