"""Where locality goes: what each edited model now answers to the locality prompts of its batch.

A CounterFact locality prompt asks the edit's relation about another subject ("Michel Rocard is a native speaker
of" next to the edit "The mother tongue of Danielle Darrieux is → English"), so an edit that learnt the relation
rather than the subject answers it with the new target. zsRE's locality prompts are unrelated questions. After each
method edits the same N requests of the report split in one batch (as `knowledge_update.py`, seed 0), every
locality prompt's greedy answer is put in one class: unchanged (the unedited model's answer), the new target of its
own request, the new target of another request of the batch, or something else. It also says how often the
model's own answer to an edit prompt (what DFT's Δold trains on when the requests carry no old answer) is the data's
old answer. Nothing is tuned here: the run explains the batch benchmark's locality figures.

    python benchmarks/neighbourhood.py --data ../shared/data/counterfact-edit-10k.json --format counterfact \
        --methods Full-FT DFT_FT DFT_FT+old ROME
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

from editors import DATA_OLD_ANSWERS, available_methods, make_editor
from harness import Splits, add_run_arguments, execute, for_protocol, generate_old_answers
from reporting import color_map, pyplot, write_json
from scoring import answer_budget, greedy_answers, matches, unchanged
from tqdm.auto import tqdm

CLASSES = ("unchanged", "own new target", "another new target", "other")


def classify(answer: str, reference: str, own: str, others: list[str]) -> str:
    """The class of one locality answer (the first that applies, in the order of `CLASSES`)."""
    if unchanged(answer, reference):
        return CLASSES[0]
    if matches(answer, own):
        return CLASSES[1]
    if any(matches(answer, target) for target in others):
        return CLASSES[2]
    return CLASSES[3]


def run(args: argparse.Namespace, base, tokenizer) -> dict:
    drawn = Splits.of(args.data, args.format).draw("report", 0, args.n_edits)
    requests = for_protocol(drawn, "base")
    prompts = [r.locality_prompt for r in requests]
    budgets = [max(answer_budget(tokenizer, r.target_new), answer_budget(tokenizer, r.locality_answer))
               for r in requests]
    reference = greedy_answers(base, tokenizer, prompts, budgets)
    targets = [r.target_new for r in requests]
    own = generate_old_answers(base, tokenizer, [r.prompt for r in drawn])
    old_answers = {"matching": 100 * sum(matches(a, r.target_old) for a, r in zip(own, drawn)) / len(drawn),
                   "examples": [{"prompt": r.prompt, "own": a, "data": r.target_old}
                                for a, r in zip(own[: args.examples], drawn)]}
    methods, examples = {}, {}
    for method in tqdm(args.methods, desc="neighbourhood"):
        editor = make_editor(method, copy.deepcopy(base), tokenizer, args.cache, 0)
        editor.apply(drawn if method in DATA_OLD_ANSWERS else requests)
        answers = greedy_answers(editor.model, tokenizer, prompts, budgets)
        classes = [classify(a, ref, own, targets[:i] + targets[i + 1:])
                   for i, (a, ref, own) in enumerate(zip(answers, reference, targets))]
        methods[method] = {c: 100 * classes.count(c) / len(classes) for c in CLASSES}
        examples[method] = [{"locality_prompt": p, "unedited": ref, "edited": a, "target_new": t, "class": c}
                            for p, ref, a, t, c in zip(prompts, reference, answers, targets, classes)][: args.examples]
        del editor
        gc.collect()
    return {"methods": methods, "examples": examples, "old_answers": old_answers}


def write_outputs(out: Path, results: dict) -> None:
    config = results["config"]
    write_json(out / "results.json", results)
    lines = [f"# Locality answers after a batch edit ({config['format']}, {config['n_edits']} edits)", "",
             f"Command: `{config['command']}`", "",
             f"{config['threads']} thread(s); total {config['total_seconds'] / 60:.1f} min, peak RSS "
             f"{config['peak_rss_mib']:.0f} MiB. Greedy answers to each request's locality prompt (target tokens + 2, "
             "cut as the batch benchmark cuts them), in % of the locality prompts.", "",
             "| Method | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{row[c]:.1f}" for c in CLASSES) + " |"
              for m, row in results["methods"].items()]
    old = results["old_answers"]
    lines += ["", "## The model's own old answers", "",
              f"The unedited model's greedy answer to the edit prompt (as `dft_peft.edit` generates it) begins "
              f"with the data's old answer for {old['matching']:.1f}% of the requests.", "",
              "| prompt | model's own answer | data's old answer |", "|---|---|---|"]
    lines += [f"| {e['prompt']} | {e['own']} | {e['data']} |" for e in old["examples"]]
    lines += ["", "## Examples", "", "| Method | locality prompt | unedited | edited | edit's new target | class |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {e['locality_prompt']} | {e['unedited']} | {e['edited']} | {e['target_new']} | {e['class']} |"
              for m, rows in results["examples"].items() for e in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(results["methods"])
    colors = color_map(list(CLASSES))
    bottom = [0.0] * len(names)
    for c in CLASSES:
        heights = [results["methods"][m][c] for m in names]
        ax.bar(names, heights, bottom=bottom, label=c, color=colors[c])
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("% of locality prompts")
    ax.set_title(f"Locality answers after a batch edit ({config['format']}, {config['n_edits']} edits)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "benchmarks/results/neighbourhood", "4 edits, Full-FT only")
    parser.add_argument("--n-edits", type=int, default=40)
    parser.add_argument("--examples", type=int, default=5, help="example answers kept per method")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_edits, args.methods = 4, args.methods or ["Full-FT"]
    args.methods = args.methods or ["Full-FT", "DFT_FT"]
    if unknown := [m for m in args.methods if m not in available_methods()]:
        parser.error(f"unknown or unavailable method(s) {unknown}; available: {list(available_methods())}")
    command = "python benchmarks/neighbourhood.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return execute(args, run, write_outputs, {"command": command, "format": args.format, "n_edits": args.n_edits,
                                              "methods": args.methods, "threads": args.threads})


if __name__ == "__main__":
    raise SystemExit(main())
