"""`dft-peft inspect`: where an edit changed the model (per module, per layer, MLP vs attention: the paper's §5.8),
read from the edit file alone."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..evaluation.analysis import KINDS, inspect_edit, plot_edit_analysis
from .common import table, writable_file, write_json


@dataclasses.dataclass
class InspectArguments:
    plot: str | None = dataclasses.field(default=None, metadata={
        "help": "Plot edited parameters and densities per layer to this PNG file."})
    json: str | None = dataclasses.field(default=None, metadata={"help": "Write the report to this JSON file."})


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect", help="where an edit changes the model: per module, per layer, MLP vs attention",
        description="Read a saved edit (no model needed) and report each edited module's core size and density, "
                    "per-layer totals and the MLP vs attention share of the edited parameters (DFT §5.8).",
        dataclass_types=[InspectArguments],
    )
    parser.add_argument("edit_dir", metavar="EDIT_DIR", help="A saved edit.")
    parser.set_defaults(run=run)


def print_analysis(summary: dict[str, Any]) -> None:
    numel = summary["numel_of_edited_modules"]
    print(f"Edit file {summary['file']}: {summary['bytes']:,} bytes (top_t={summary['top_t']}, "
          f"selection={summary['selection']!r})")
    print(f"Edited parameters: {summary['edited_parameters']:,} of the {numel:,} weights of the "
          f"{len(summary['modules'])} edited modules ({100 * summary['edited_parameters'] / max(numel, 1):.2f}%)")
    print("\nPer module\n" + table(
        ["module", "kind", "layer", "edited", "of", "density %", "bytes"],
        [[m["name"], m["kind"], m["layer"], m["edited"], m["numel"], 100 * m["density"], m["bytes"]]
         for m in summary["modules"]],
        decimals=2,
    ))
    print("\nPer layer\n" + table(
        ["layer", *KINDS, "total"],
        [[row["layer"], *(row[k] for k in KINDS), row["total"]] for row in summary["layers"]],
    ))
    print("\nBy kind (DFT §5.8: MLP vs attention)\n" + table(
        ["kind", "modules", "edited", "share %", "density %"],
        [[kind, s["modules"], s["edited"], 100 * s["share"], None if s["density"] is None else 100 * s["density"]]
         for kind, s in summary["kinds"].items()],
        decimals=2,
    ))

def run(ns: argparse.Namespace) -> int:
    writable_file(ns.plot, "--plot")
    writable_file(ns.json, "--json")
    summary = inspect_edit(ns.edit_dir)
    print_analysis(summary)
    if ns.plot:
        plot_edit_analysis(summary, ns.plot)
    if ns.json:
        write_json(ns.json, summary)
    return 0
