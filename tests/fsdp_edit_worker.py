"""Worker for test_ddp_edit.py: one rank of the same edit run under DDP and with FSDP2-sharded fine-tunes
(run by torch.distributed.run on 2 CPU processes); it saves both edits' cores for the test to compare."""

from __future__ import annotations

import importlib
import sys

import torch
from accelerate import Accelerator
from tiny_models import TOY_FACTS, tiny_llama, tiny_tokenizer
from torch.distributed.fsdp import fully_shard

import dft_peft
from dft_peft import EditArguments

edit_module = importlib.import_module("dft_peft.editing.rounds")  # the module (`dft_peft.edit` is also the function)

GATHERS = []
_gather_core = edit_module.gather_core
edit_module.gather_core = lambda *a: GATHERS.append(1) or _gather_core(*a)  # counts sharded selections


class FullyShardOnCPU(Accelerator):
    """accelerate runs FSDP on GPUs only. On CPU ranks this `prepare` shards a fine-tune as accelerate's FSDP2 path
    does (`fully_shard` on the root module, the optimiser over the sharded parameters), so DFT's handling of
    sharded fine-tunes runs on gloo."""

    def prepare(self, module, opt):
        fully_shard(module)
        (group,) = opt.param_groups  # no state yet: point it at the sharded parameters
        group["params"] = list(module.parameters())
        return module, opt


def main(out_dir: str, delta_source: str) -> None:
    # Steps too small to reach the target in one round: round 2 trains the core's values, sharded too.
    args = EditArguments(delta_source=delta_source, max_rounds=2, epochs=3, learning_rate=1e-3,
                         core_learning_rate=1e-4, batch_size=2)
    cores = {}
    for engine, accelerator in (("ddp", Accelerator(cpu=True)), ("fsdp2", FullyShardOnCPU(cpu=True))):
        assert accelerator.num_processes == 2, accelerator.distributed_type
        edited, report = dft_peft.edit(tiny_llama(), tiny_tokenizer(), TOY_FACTS, dft_peft.DFTConfig(top_t=0.1), args,
                                       progress=False, accelerator=accelerator)
        assert [r.kind for r in report.rounds] == ["locate", "train_core"], report.rounds
        cores[engine] = {name: (d.indices.clone(), d.values.clone())
                         for name, d in edited.base_model.get_core().items()}
        cores[engine + "_fraction"] = report.rounds[0].opposite_sign_fraction
        cores[engine + "_sharded_selections"] = len(GATHERS)
        GATHERS.clear()
    torch.save(cores, f"{out_dir}/cores_rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
