"""Worker for test_ddp_edit.py: one rank of a DDP edit of a tiny model (run by torch.distributed.run)."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from tiny_models import TOY_FACTS, tiny_llama, tiny_tokenizer

import dft_peft
from dft_peft import EditArguments

PROBE = torch.tensor([[2, 5, 7, 9, 3]])


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.distributed_type
    # Steps too small to reach the target in one round: round 2 trains the core's values under DDP too.
    args = EditArguments(max_rounds=2, epochs=3, learning_rate=1e-4, core_learning_rate=1e-4, batch_size=2)
    edited, report = dft_peft.edit(tiny_llama(), tiny_tokenizer(), TOY_FACTS, dft_peft.DFTConfig(top_t=0.1), args,
                                   progress=False)  # the launched environment alone must make it distributed
    core = edited.base_model.get_core()
    gathered = accelerator.gather(torch.stack([sum(d.values.double().sum() for d in core.values()),
                                               sum(d.indices.double().sum() for d in core.values())]).view(1, 2))
    assert torch.equal(gathered[0], gathered[1]), "ranks ended with different edits"
    if accelerator.is_main_process:
        edited.save_pretrained(out_dir)
        with torch.no_grad():
            torch.save({"logits": edited(PROBE).logits, "rounds": [r.kind for r in report.rounds]},
                       f"{out_dir}/expected.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
