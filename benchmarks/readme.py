"""Writes benchmarks/README.md from the committed results: each benchmark's markdown (which its script renders from
its results JSON), the command that produced it and its plots, under one heading per benchmark.

    python benchmarks/readme.py
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Section:
    title: str
    results: str  # the JSON whose "command" produced the section, relative to results/
    markdown: str  # the rendered tables, relative to results/
    about: str


SECTIONS = (
    Section("Knowledge editing in one batch (zsRE)", "knowledge_update/zsre/results.json",
            "knowledge_update/zsre/results.md",
            "DFT against fine-tuning, LoRA and the locate-then-edit editors, all editing the pretrained model: "
            "teacher-forced and generated-answer scores with 95% bootstrap intervals, and each method's paired "
            "difference against Full-FT on the same requests. This run is smaller than the issue's 200 edits × 3 "
            "seeds per dataset (about 5 hours per dataset here): 40 zsRE edits, one seed. ROME, DFT_LoRA and "
            "DFT_FT+old (DFT_FT given the data's true old answers instead of generating the model's own) were added "
            "to the same requests later (`--add`, one thread, while other runs shared the machine); FT-c was not "
            "run. Full-FT, FT-M and LoRA were timed while test runs shared the machine, so their seconds are "
            "inflated; DFT_FT, MEMIT and AlphaEdit ran alone."),
    Section("Knowledge editing in one batch (CounterFact)", "knowledge_update/counterfact/results.json",
            "knowledge_update/counterfact/results.md",
            "The same comparison on 40 CounterFact edits (one seed), with ROME added (one edit after another, as its "
            "paper ran batches), and DFT_FT+old added later on the same requests (`--add`). One torch thread, while "
            "two other runs of this benchmark shared the 2-core machine: the seconds compare only roughly."),
    Section("Where CounterFact's locality goes", "neighbourhood/counterfact/results.json",
            "neighbourhood/counterfact/results.md",
            "The locality prompts of the CounterFact batch run above, answered by the edited models: whether each "
            "answer stayed the unedited model's or became its request's new target (the edit learnt the relation, "
            "not the subject)."),
    Section("Sequential editing (zsRE, 100 edits in calls of 10)", "sequential/zsre_t100_b10/results.json",
            "sequential/zsre_t100_b10/results.md",
            "Edits applied in successive calls to one model: after each scored call, the scores over every edit so "
            "far (retention), locality and the capability probe. T = 100 in calls of 10, one seed, with DFT's "
            "default edit (output anchor on); the issue's T = 1,000 (`--full`) takes about ten times as long. One "
            "torch thread, while two other runs shared the 2-core machine."),
    Section("Locate-then-edit baselines: single-edit sanity check", "baselines/sanity.json", "baselines/sanity.md",
            "ROME, MEMIT and AlphaEdit, written here from their papers, each on single zsRE edits of the base "
            "model before their figures are trusted in the tables above."),
    Section("Edit file size", "file_size.json", "file_size.md",
            "Bytes per edited parameter of the saved edit against the layouts of Super-Tuning and PEFT's SHiRA."),
    Section("Kernels: core selection and scatter-merge on the CPU", "kernels.json", "kernels.md",
            "Core selection as a fraction of a plain copy of the same bytes measured in the same run, against the "
            "naive selection, and its memory beyond the core; scatter-merge against a LoRA merge of the same size. "
            "These rows were measured on 2026-11-25, before the C loop was built with torch.utils.cpp_extension "
            "(with capacity checks and target_clones instead of -march=native) and before the torch.compile path "
            "(the 'torch ops, compiled' rows) was removed; a 10M-element rerun on 2026-12-03 was too loaded to "
            "compare, and an in-process timing of the old and new C function showed no slowdown."),
    Section("build_edit at scale", "scale.json", "scale.md",
            "The core of two 1B-parameter checkpoints read from disk, against a plain read of the same files."),
    Section("build_edit at scale, top_t = 0.01", "scale_top_t_0.01/scale.json", "scale_top_t_0.01/scale.md", ""),
)


def section_text(section: Section) -> list[str]:
    lines = [f"## {section.title}", ""]
    if section.about:
        lines += [section.about, ""]
    markdown, results = RESULTS / section.markdown, RESULTS / section.results
    if not markdown.exists() or not results.exists():
        return [*lines, "Not run yet: no committed results.", ""]
    command = json.loads(results.read_text()).get("command") or json.loads(results.read_text()).get(
        "config", {}).get("command")
    if command:
        lines += ["```bash", command, "```", ""]
    body = markdown.read_text().splitlines()
    body = body[1:] if body and body[0].startswith("# ") else body  # the section heading replaces its title
    body = [line for line in body if not line.startswith(("Command: `", "Produced by `"))]  # shown above
    body = ["#" + line if line.startswith("## ") else line for line in body]
    lines += [*body, ""]
    folder = markdown.parent.relative_to(HERE)
    lines += [f"![{png.stem}]({folder / png.name})" for png in sorted(markdown.parent.glob("*.png"))
              if markdown.parent != RESULTS or png.stem == markdown.stem]
    return [*lines, ""]


VARIANTS_AFTER = "neighbourhood/counterfact/results.md"  # the variants tables follow the batch runs
VARIANT_FILES = {"zsRE": "variants_zsre_n20.json", "CounterFact": "variants_counterfact_n20.json"}


def variants_text() -> list[str]:
    """The DFT variants of the tuning splits (`benchmarks/dft_variants.py`) as one table per dataset."""
    lines = []
    for label, name in VARIANT_FILES.items():
        path = RESULTS / "dft_variants" / name
        if not path.exists():
            continue
        run = json.loads(path.read_text())
        lines += [f"## DFT variants on the {label} tuning split", "",
                  f"{run['n']} requests of the {run['split']}, teacher-forced, locality against the unedited model "
                  f"(`python benchmarks/dft_variants.py --format {label.lower()} --variants NAME ...`; the script "
                  "defines each variant; `fullft` is Full-FT). Each row ran with one torch thread while other "
                  "benchmark runs shared the 2-core machine: compare seconds between rows measured close together "
                  f"(the last column). {run.get('note', '')}", "",
                  "| variant | reliability | generality | locality | seconds | rounds: locate s, then core-value "
                  "rounds × s | measured |", "|---|---|---|---|---|---|---|"]
        for variant, v in run["variants"].items():
            rounds = v.get("rounds") or []
            core = [r["seconds"] for r in rounds if r["kind"] == "train_core"]
            split = (f"{rounds[0]['seconds']:.0f}" + (f", {len(core)} × {sum(core) / len(core):.0f}" if core else "")
                     if rounds else "—")
            lines.append(f"| {variant} | {v['reliability']:.1f} | {v['generality']:.1f} | {v['locality']:.1f} | "
                         f"{v['seconds']:.0f} | {split} | {v.get('measured', '- 16:37–17:26 UTC').split(' ', 1)[1]} |")
        lines.append("")
    return lines


HEADLINE = ("<!-- headline -->", "<!-- /headline -->")
HEADLINE_METHODS = ("Full-FT", "LoRA", "FT-M", "ROME", "MEMIT", "AlphaEdit", "DFT_FT", "DFT_FT+old")


HEADLINE_DATASETS = {"zsre": "zsRE", "counterfact": "CounterFact"}


def headline() -> list[str]:
    """The batch runs' main figures, one table per dataset, for the project README."""
    lines = []
    for folder, label in HEADLINE_DATASETS.items():
        path = RESULTS / "knowledge_update" / folder / "results.json"
        if not path.exists():
            continue
        run = json.loads(path.read_text())
        methods, config = run["methods"], run["config"]
        lines += [f"{config['n_edits']} {label} edits of SmolLM2-135M-Instruct in one batch, {config['seeds']} seed; "
                  "teacher-forced scores (gen.: greedy answers) against the unedited model, with 95% intervals; KL on "
                  "unrelated text (lower is better):", "",
                  "| method | reliability | generality | locality | gen. locality | KL | edit s | file MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in HEADLINE_METHODS:
            if name in methods:
                m = methods[name]
                cells = [f"{m[k]['mean']:.1f} [{m[k]['lo']:.0f}, {m[k]['hi']:.0f}]"
                         for k in ("reliability", "generality", "locality", "gen_locality")]
                lines.append(f"| {name} | {' | '.join(cells)} | {m['capability']['mean']:.2f} | "
                             f"{m['seconds']['mean']:.0f} | {m['file_bytes']['mean'] / 1e6:.1f} |")
        lines.append("")
    return lines[:-1] or ["No committed batch results yet."]


def write_headline(readme: Path) -> None:
    """Replace the README's headline block with `headline()`."""
    text = readme.read_text()
    start, end = text.index(HEADLINE[0]), text.index(HEADLINE[1])
    readme.write_text(text[: start + len(HEADLINE[0])] + "\n" + "\n".join(headline()) + "\n" + text[end:])


def main() -> int:
    lines = ["# Benchmarks", "",
             "Every figure here was measured on this project's 2-core CPU machine by the command shown above it; "
             "this file is written by `python benchmarks/readme.py` from the results in `results/`. No GPU was "
             "lent to this project, so the Triton kernels are tested (under the interpreter) but not timed: "
             "`benchmarks/kernel_speed_gpu.py` is ready for a machine that has one.", ""]
    for section in SECTIONS:
        lines += section_text(section)
        if section.markdown == VARIANTS_AFTER:
            lines += variants_text()
    (HERE / "README.md").write_text("\n".join(lines).rstrip() + "\n")
    write_headline(HERE.parent / "README.md")
    print(f"wrote {HERE / 'README.md'} and the headline of {HERE.parent / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
