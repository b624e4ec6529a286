"""`dft-peft edit`: edit a model on a file of requests, save the edit and report its metrics."""

from __future__ import annotations

import argparse
import dataclasses
import os

from ..editing.arguments import EditArguments
from ..editing.report import EditReport
from ..editing.rounds import edit
from ..evaluation.metrics import evaluate, locality_reference
from ..format.edit_file import WEIGHTS_NAME
from ..tuner.config import DFTConfig
from .common import (
    CONFIG_FLAGS,
    DataArguments,
    ModelArguments,
    arguments_of,
    cli_dataclass,
    dft_config,
    metrics_json,
    print_metrics,
    read_model,
    read_requests,
    save_edit,
    table,
    writable_dir,
    writable_file,
    write_json,
)


@dataclasses.dataclass
class OutputArguments:
    output_dir: str = dataclasses.field(metadata={"help": "Where to save the edit."})
    metrics: str | None = dataclasses.field(default=None, metadata={
        "help": "Write the metrics (in percent), the edit's rounds and the arguments to this JSON file."})


CONFIG_ARGUMENTS = cli_dataclass(DFTConfig, list(CONFIG_FLAGS), {k: t for k, t in CONFIG_FLAGS.items() if t})
EDIT_ARGUMENTS = cli_dataclass(EditArguments)


def add_parser(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "edit", help="edit a model on a file of requests and save the edit",
        description="Record the pre-edit predictions, run the DFT edit, save it (PEFT save_pretrained) and report "
                    "reliability, generality and locality.",
        dataclass_types=[ModelArguments, DataArguments, OutputArguments, EDIT_ARGUMENTS, CONFIG_ARGUMENTS],
    ).set_defaults(run=run)


def edit_arguments(ns: argparse.Namespace) -> EditArguments:
    return EditArguments(**arguments_of(ns, EDIT_ARGUMENTS))


def print_report(report: EditReport) -> None:
    rows = [
        [r.round, r.kind, r.core_size, None if r.opposite_sign_fraction is None else 100 * r.opposite_sign_fraction,
         r.adapter_size, 100 * r.reliability, r.seconds]
        for r in report.rounds
    ]
    print(f"\nEdit: reliability {100 * report.initial_reliability:.1f}% → {100 * report.reliability:.1f}% in "
          f"{len(report.rounds)} round(s), {report.seconds:.1f} s")
    print(table(["round", "kind", "core size", "opposite signs %", "edited params", "reliability %", "seconds"],
                rows))


def run(ns: argparse.Namespace) -> int:
    args, config = edit_arguments(ns), dft_config(ns)  # every argument and path is checked before any work
    writable_dir(ns.output_dir, "--output-dir")
    writable_file(ns.metrics, "--metrics")
    requests = read_requests(ns)
    model, tokenizer = read_model(ns)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # launched on several ranks, all end with the same edit
    reference = locality_reference(model, tokenizer, requests, args.eval_batch_size) if main_rank else None
    peft_model, report = edit(model, tokenizer, requests, config, args)
    if not main_rank:  # rank 0 alone reports and saves
        return 0
    print_report(report)
    size, edited = save_edit(peft_model, ns.output_dir)
    metrics = evaluate(peft_model, tokenizer, requests, reference=reference, batch_size=args.eval_batch_size)
    print_metrics(metrics, "Metrics after the edit (locality against the unedited model)")
    print(f"\nSaved the edit to {ns.output_dir}: {WEIGHTS_NAME} is {size:,} bytes for {edited:,} edited parameters")
    if ns.metrics:
        write_json(ns.metrics, {
            **metrics_json(metrics),
            "report": report.to_dict(),
            "edit_file": {"directory": ns.output_dir, "bytes": size, "edited_parameters": edited},
            "arguments": {
                **arguments_of(ns, ModelArguments), **arguments_of(ns, DataArguments),
                "edit": dataclasses.asdict(args),
                "config": {name: sorted(v) if isinstance(v := getattr(config, name), set) else v
                           for name in CONFIG_FLAGS},
            },
        })
    return 0
