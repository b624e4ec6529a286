"""DFT variants on a tuning split (base protocol): what the default edit is chosen from.

Each variant edits a fresh copy of SmolLM2 on the same tuning-split requests (never reported elsewhere) and is scored
teacher-forced against the unedited model; Full-FT is the reference. The old answers are the model's own, as users
have them, except for the variants of `OLD_FROM_DATA`, which keep the data's (zsRE's and CounterFact's true
objects). One line of JSON per variant as it finishes; results/dft_variants/variants_FORMAT_nN.json keeps them all.

    python benchmarks/dft_variants.py --n 20 --variants no_preserve preserve1 mlp fullft
    python benchmarks/dft_variants.py --format counterfact --n 20 --variants default old_from_data fullft
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from editors import make_editor
from harness import (
    DATA_DIR,
    DATASETS,
    DFTConfig,
    EditArguments,
    Splits,
    edit,
    evaluate,
    for_protocol,
    load_model,
    locality_reference,
)

MLP = ["gate_proj", "up_proj", "down_proj"]
# name → (DFTConfig overrides, EditArguments overrides); the edit's defaults otherwise
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "no_preserve": ({}, {"preserve_weight": 0.0}),
    "preserve1": ({}, {"preserve_weight": 1.0}),
    "preserve1_t8": ({}, {"preserve_weight": 1.0, "preserve_texts": 8}),
    "preserve3_t8": ({}, {"preserve_weight": 3.0, "preserve_texts": 8}),
    "mlp": ({"target_modules": MLP}, {"preserve_weight": 0.0}),
    "mlp_preserve1": ({"target_modules": MLP}, {"preserve_weight": 1.0}),
    # cheaper edits: fewer locate epochs, a larger core learning rate, fewer anchor texts
    "locate_1epoch": ({}, {"epochs": 1}),
    "core_lr3e-3": ({}, {"core_learning_rate": 3e-3}),
    # the anchor's 16 texts of 32 tokens outnumber an edit batch's tokens: hold a few of them per step
    "anchor_batch4": ({}, {"preserve_batch": 4}),
    "anchor_batch4_locate_1epoch": ({}, {"preserve_batch": 4, "epochs": 1}),
    # anchor text that starts like the edit's prompts
    "anchor_prompts": ({}, {"preserve_from": "prompts"}),
    "anchor_prompts_batch4": ({}, {"preserve_from": "prompts", "preserve_batch": 4}),
    # Δold from the data's true objects instead of the model's own continuations
    "old_from_data": ({}, {}),
    # the model's own old answers asked for after example facts, in the form of the new answers
    "old_shots": ({}, {"old_answer_shots": True}),
}
OLD_FROM_DATA = {"old_from_data"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="tuning-split requests")
    parser.add_argument("--format", choices=list(DATASETS), default="zsre")
    parser.add_argument("--variants", nargs="+", default=["no_preserve", "preserve1", "fullft"],
                        choices=[*VARIANTS, "fullft"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dft_variants"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    drawn = Splits.of(DATA_DIR / DATASETS[args.format], args.format).draw("tuning", 0, args.n)
    requests = for_protocol(drawn, "base")
    base, tokenizer = load_model("smollm2")
    reference = locality_reference(base, tokenizer, requests)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"variants_{args.format}_n{args.n}.json"
    summary = json.loads(path.read_text()) if path.exists() else {
        "n": args.n, "split": f"{args.format} tuning split (harness.Splits, first {args.n}), base protocol",
        "variants": {}}
    results = summary["variants"]
    for name in args.variants:
        model = copy.deepcopy(base)
        if name == "fullft":
            tick = time.perf_counter()
            make_editor("Full-FT", model, tokenizer, args.out, seed=0).apply(requests)
            seconds, rounds = time.perf_counter() - tick, []
        else:
            config, arguments = VARIANTS[name]
            model, report = edit(model, tokenizer, drawn if name in OLD_FROM_DATA else requests,
                                 DFTConfig(**config), EditArguments(**arguments), progress=False)
            seconds = report.seconds
            rounds = [{"kind": r.kind, "seconds": r.seconds, "reliability": 100 * r.reliability}
                      for r in report.rounds]
        metrics = evaluate(model, tokenizer, requests, reference=reference)
        results[name] = {"reliability": 100 * metrics.reliability, "generality": 100 * metrics.generality,
                         "locality": 100 * metrics.locality, "seconds": seconds, "rounds": rounds}
        print(name, json.dumps(results[name]), flush=True)
        results[name].update(threads=args.threads, measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        path.write_text(json.dumps(summary, indent=1))  # after each variant: a long run keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
