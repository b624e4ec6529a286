"""`dft-peft`: edit facts of a model, evaluate an edit, inspect an edit file, run the demo, or describe the setup.

    dft-peft demo                                            # SmolLM2-135M-Instruct learns a few counterfactuals
    dft-peft edit --model smollm2 --data zsre.json --n 10 --output-dir edit/ --metrics edit/metrics.json
    dft-peft eval --model smollm2 --data zsre.json --n 10 --edit edit/
    dft-peft inspect edit/ --plot edit/layers.png            # where the edit changed the model (MLP vs attention)
    dft-peft env                                             # versions, GPU, C loop: paste it into a bug report

Every flag comes from a dataclass field and its help (`--help` on a command lists them). Models and edits are local
files only: the commands run offline.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformers import HfArgumentParser

from . import demo, edit, env, evaluate, inspect_edit
from .common import offline

COMMANDS = (demo, edit, evaluate, inspect_edit, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dft-peft",
        description="Delicate Fine-Tuning (DFT): edit facts of a language model by updating only the sparse core of "
                    "parameters that carries the old ones. Everything runs offline, on local files.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=HfArgumentParser)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dft-peft`; returns the exit code (1 with a one-line message on an error the user can fix)."""
    ns = build_parser().parse_args(argv)
    with offline():
        try:
            return ns.run(ns)
        except (ValueError, OSError) as err:
            print(f"dft-peft {ns.command}: error: {err}", file=sys.stderr)
            return 1
