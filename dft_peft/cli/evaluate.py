"""`dft-peft eval`: reliability, generality and locality of a base model, or of a base model plus a saved edit."""

from __future__ import annotations

import argparse
import dataclasses

from peft import PeftModel

from ..editing.arguments import EditArguments
from ..evaluation.metrics import evaluate
from ..format.edit_file import preflight, read_edit_file
from .common import (
    DataArguments,
    ModelArguments,
    arguments_of,
    cli_dataclass,
    metrics_json,
    print_metrics,
    read_model,
    read_requests,
    writable_file,
    write_json,
)


@dataclasses.dataclass
class EvalArguments:
    edit: str | None = dataclasses.field(default=None, metadata={"help": "A saved edit to apply to the model."})
    metrics: str | None = dataclasses.field(default=None, metadata={
        "help": "Write the metrics (in percent) to this JSON file."})


BATCH_ARGUMENTS = cli_dataclass(EditArguments, ["eval_batch_size"])


def add_parser(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "eval", help="evaluate a base model, or a base model plus a saved edit",
        description="Reliability and generality of the base model, or of the base model with an edit (then also "
                    "locality, against the base model).",
        dataclass_types=[ModelArguments, DataArguments, EvalArguments, BATCH_ARGUMENTS],
    ).set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    if ns.edit:
        read_edit_file(ns.edit)
        preflight(ns.edit)
    writable_file(ns.metrics, "--metrics")
    requests = read_requests(ns)
    model, tokenizer = read_model(ns)
    if ns.edit:
        model = PeftModel.from_pretrained(model, ns.edit)
        # Locality compares against the base model: evaluate disables the adapter to get its predictions.
        metrics = evaluate(model, tokenizer, requests, batch_size=ns.eval_batch_size)
        title = f"Metrics of {ns.model} + the edit {ns.edit} (locality against the base model)"
    else:
        # Locality compares a model with itself before an edit: for the base model it is 100% by definition.
        plain = [dataclasses.replace(r, locality_prompt=None, locality_answer=None) for r in requests]
        metrics = evaluate(model, tokenizer, plain, batch_size=ns.eval_batch_size)
        title = f"Metrics of the base model {ns.model} (no edit: locality does not apply)"
    print_metrics(metrics, title)
    if ns.metrics:
        write_json(ns.metrics, {**metrics_json(metrics), "arguments": {
            **arguments_of(ns, ModelArguments), **arguments_of(ns, DataArguments), "edit": ns.edit}})
    return 0
