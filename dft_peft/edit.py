"""`dft_peft.edit`: locate the parameters that hold the old facts, update only that core, until the new facts hold."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .config import DFTConfig
from .core import select_core
from .data import EditRequest, as_requests
from .distributed import Shard, gather_core, sum_over_ranks
from .finetune import CoreValues, DenseDeltas, EpochBatches, LoRADeltas, ShardedDeltas, check_engine, train
from .kernels.select_core_torch import chunk_keys, iter_chunk_pairs
from .layer import Embedding
from .metrics import module_mode, target_token_accuracy
from .model import PEFT_PREFIX, DFTModel, adapter_to_edit


@dataclass
class EditArguments:
    """How `edit` fine-tunes and when it stops.

    Args:
        delta_source: `"full"` (DFT_FT: full fine-tuning of the targeted weights) or `"lora"` (DFT_LoRA: LoRA
            fine-tunes whose scale·B·A are the deltas).
        strategy: `"locate_once"` (default) runs one locate-and-update round, then trains only the core's values
            on the new facts, round after round (no further fine-tunes). `"paper"` repeats the whole round (§4.2):
            both fine-tunes from the current weights, a new core, θ ← θ + λ·core. On SmolLM2-135M the paper's
            rounds needed 4–10× Full-FT's time for similar quality; see benchmarks/results/knowledge_update.
        max_rounds: Rounds at most.
        target_reliability: Stop once the mean reliability (teacher-forced token accuracy on the new answers)
            reaches this.
        epochs / old_epochs: Epochs of the Δnew and the Δold fine-tunes (`old_epochs=None`: same as `epochs`).
        core_epochs: Epochs of core-value training per round (`strategy="locate_once"`).
        reuse_old_delta: Compute Δold in the first round only (`strategy="paper"`).
        learning_rate / core_learning_rate: Of the fine-tunes / of the core-value training.
        batch_size, optimizer (`"adamw"` or `"sgd"`), seed: as usual; the edit is deterministic under a seed.
        lora_r / lora_alpha: LoRA rank and alpha for `delta_source="lora"`.
        generate_max_new_tokens: Length limit of generated old answers.
        eval_batch_size: Batch size of the reliability checks.
    """

    delta_source: Literal["full", "lora"] = "full"
    strategy: Literal["paper", "locate_once"] = "locate_once"
    max_rounds: int = 8
    target_reliability: float = 1.0
    epochs: int = 2
    old_epochs: int | None = None
    core_epochs: int = 1
    reuse_old_delta: bool = False
    learning_rate: float = 1e-4
    core_learning_rate: float = 1e-3
    batch_size: int = 8
    optimizer: Literal["adamw", "sgd"] = "adamw"
    seed: int = 0
    lora_r: int = 8
    lora_alpha: float = 16.0
    generate_max_new_tokens: int = 16
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        choices = {"delta_source": ("full", "lora"), "strategy": ("paper", "locate_once"),
                   "optimizer": ("adamw", "sgd")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"EditArguments.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_rounds", "epochs", "core_epochs", "batch_size", "lora_r", "generate_max_new_tokens",
                     "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EditArguments.{name} must be a positive integer, got {value!r}")
        if self.old_epochs is not None and (not isinstance(self.old_epochs, int) or self.old_epochs < 1):
            raise ValueError(f"EditArguments.old_epochs must be a positive integer or None, got {self.old_epochs!r}")
        for name in ("learning_rate", "core_learning_rate", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"EditArguments.{name} must be a finite number > 0, got {value!r}")
        if not 0.0 < self.target_reliability <= 1.0:
            raise ValueError(f"EditArguments.target_reliability must be in (0, 1], got {self.target_reliability!r}")


@dataclass
class RoundReport:
    """What one round did: `core_size` elements located (0 for a core-training round), how many of the targeted
    parameters had opposite signs in Δnew and Δold, the adapter's size and the reliability after the round."""

    round: int
    kind: Literal["locate", "train_core"]
    core_size: int
    opposite_sign_fraction: float | None
    adapter_size: int
    reliability: float
    seconds: float
    loss_old: float | None = None
    loss_new: float | None = None


@dataclass
class EditReport:
    initial_reliability: float
    rounds: list[RoundReport] = field(default_factory=list)
    old_answers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    callback_seconds: float = 0.0

    @property
    def reliability(self) -> float:
        return self.rounds[-1].reliability if self.rounds else self.initial_reliability

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reliability": self.reliability}


def generate_old_answers(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 16
) -> list[str]:
    """The model's own greedy answers: the old knowledge DFT locates (§4.1), so users supply only the new facts.

    The model continues each prompt as it is read in training and evaluation (`prompt + " " + answer`); a chat
    model that only ends its turn there is asked again through its chat template. The answer is cut at the first
    line break or sentence end.
    """
    with module_mode(model, training=False), torch.no_grad():
        answers = []
        for prompt in prompts:
            answer = _greedy(model, tokenizer, tokenizer(prompt, return_tensors="pt"), max_new_tokens)
            if not answer and getattr(tokenizer, "chat_template", None):
                chat = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                    return_dict=True,
                )
                answer = _greedy(model, tokenizer, chat, max_new_tokens)
            answers.append(answer)
    return answers


def _greedy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, inputs: Mapping[str, torch.Tensor],
            max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return re.split(r"\n|(?<=\w)[.;!?](?:\s|$)", text.strip(), maxsplit=1)[0].strip()


def opposite_sign_fraction(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the targeted parameters that are selection candidates (Δnew and Δold of opposite signs); over
    all ranks for `ShardedDeltas`."""
    candidates = total = 0
    for name in new:
        pair = (new[name], old[name])
        for _, new_chunk, old_chunk in iter_chunk_pairs(*(t.tensor if isinstance(t, Shard) else t for t in pair)):
            candidates += int((chunk_keys(new_chunk, old_chunk)[0] > 0).sum())
            total += new_chunk.numel()
    if isinstance(new, ShardedDeltas):
        candidates, total = sum_over_ranks([candidates, total], new.process_group)
    return candidates / max(total, 1)


def locate_core(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor], config: DFTConfig
                ) -> dict[str, Any]:
    """`select_core` of a round's deltas; sharded deltas are selected across their ranks and the core gathered, so
    every rank adds the same core."""
    if isinstance(new, ShardedDeltas):
        part = select_core(new, old, config.top_t, config.selection, process_group=new.process_group,
                           numels=new.shapes)
        return gather_core(part, new.process_group)
    return select_core(new, old, config.top_t, config.selection)


def edit(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    config: DFTConfig | None = None,
    args: EditArguments | None = None,
    adapter_name: str = "default",
    progress: bool = True,
    on_round: Callable[[PeftModel, RoundReport], None] | None = None,
    accelerator: Any = None,
) -> tuple[PeftModel, EditReport]:
    """Edit `model` so that it answers `requests` with their new targets, changing only a sparse core.

    A locate round starts from the current weights θ (base + edit so far): it fine-tunes on the old answers (Δold)
    and on the new ones (Δnew), keeps where they disagree in sign the `config.top_t` fraction with the largest
    |Δnew − Δold| (`select_core`), and adds λ·Δnew there to the adapter (§4). By default (`strategy="locate_once"`)
    later rounds train only the located core's values on the new facts; `strategy="paper"` repeats locate rounds.
    Rounds stop once the reliability on the requests reaches `args.target_reliability`, or after `args.max_rounds`.
    Old answers missing from the requests are generated by the model itself.

    Args:
        model: A transformers causal LM (wrapped with `get_peft_model(model, config)`), or a DFT `PeftModel` whose
            adapter `adapter_name` is extended.
        tokenizer: Its tokenizer.
        requests: `EditRequest`s, or dicts in the request schema (prompt, target_new, optional target_old, ...).
        config: The DFT config (default `DFTConfig()`); ignored for an existing adapter.
        args: Fine-tuning and stopping arguments (default `EditArguments()`).
        progress: Show a tqdm bar over rounds and steps with the loss and the reliability reached.
        on_round: Called after each round with the model and the round's report (e.g. to trace metrics); its
            time is not counted in the report's seconds.
        accelerator: An `accelerate.Accelerator` to run the fine-tunes on (DDP, FSDP2, DeepSpeed ZeRO-1/2); the
            model is moved to its device. Default: a new one when the process was started by `accelerate
            launch`/`torchrun` with several processes or with an FSDP/DeepSpeed config, else none. Every rank ends
            with the same edit; save it on the main process only.

    Returns:
        The edited `PeftModel` (adapter unmerged) and an `EditReport`. On any error the model is left as it was.
    """
    start = time.perf_counter()
    requests = as_requests(requests, "edit")
    args = args or EditArguments()
    with adapter_to_edit(model, config, adapter_name, "edit") as peft_model:
        report = _run(peft_model, tokenizer, requests, args, adapter_name, progress, on_round,
                      accelerator if accelerator is not None else _launched_accelerator())
    report.seconds = time.perf_counter() - start - report.callback_seconds
    return peft_model, report


def _run(
    peft_model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    args: EditArguments,
    adapter_name: str,
    progress: bool,
    on_round: Callable[[PeftModel, RoundReport], None] | None,
    accelerator: Any,
) -> EditReport:
    check_engine(accelerator)
    if accelerator is not None:  # the fine-tunes run where the accelerator puts them: so must the model
        peft_model.to(accelerator.device)
    tuner: DFTModel = peft_model.base_model
    config: DFTConfig = peft_model.peft_config[adapter_name]
    layers = tuner._layers_with(adapter_name)
    previous_adapters = list(tuner.active_adapters)
    peft_model.base_model.set_adapter(adapter_name)
    bar = None
    try:
        if args.delta_source == "lora" and (embeddings := [n for n, m in layers.items() if isinstance(m, Embedding)]):
            raise ValueError(f"delta_source='lora' fine-tunes linear layers only, but {embeddings[0]!r} is an "
                             "embedding: leave it out of target_modules or use delta_source='full'")
        prompts = [r.prompt for r in requests]
        new_answers = [r.target_new for r in requests]

        def reliability() -> float:
            acc = target_token_accuracy(peft_model, tokenizer, prompts, new_answers, args.eval_batch_size).accuracies
            return sum(acc) / len(acc)

        report = EditReport(initial_reliability=reliability())
        missing = [i for i, r in enumerate(requests) if r.target_old is None]
        generated = generate_old_answers(peft_model, tokenizer, [prompts[i] for i in missing],
                                         args.generate_max_new_tokens) if missing else []
        old_answers = [r.target_old for r in requests]
        for i, answer in zip(missing, generated):
            if not answer:
                raise ValueError(f"the model generated no answer to {prompts[i]!r}; give its target_old explicitly")
            old_answers[i] = answer
        report.old_answers = old_answers

        gen = torch.Generator().manual_seed(args.seed)
        old_epochs = args.old_epochs or args.epochs
        world = accelerator.num_processes if accelerator is not None else 1
        steps_per_epoch = math.ceil(math.ceil(len(requests) / args.batch_size) / world)  # this rank's steps
        locate_epochs = args.epochs + (0 if args.reuse_old_delta else old_epochs)
        later = args.core_epochs if args.strategy == "locate_once" else locate_epochs
        total = steps_per_epoch * (args.epochs + old_epochs + (args.max_rounds - 1) * later)
        bar = tqdm(total=total, desc="DFT edit", unit="step",
                   disable=not (progress and (accelerator is None or accelerator.is_main_process)))
        old_deltas = None
        reached = report.initial_reliability >= args.target_reliability
        for round_index in range(1, args.max_rounds + 1):
            if reached:
                break
            tick = time.perf_counter()
            torch.manual_seed(args.seed + round_index)
            if args.strategy == "locate_once" and round_index > 1:
                bar.set_description(f"DFT round {round_index}: core values")
                values = CoreValues(peft_model, layers, adapter_name, PEFT_PREFIX)
                with module_mode(peft_model, training=True):
                    loss_new = train(values, EpochBatches(tokenizer, prompts, new_answers, args.batch_size, gen),
                                     args.core_epochs, args.core_learning_rate, args.optimizer, bar,
                                     accelerator=accelerator)
                values.write_back()
                del values
                rel = reliability()
                report.rounds.append(RoundReport(round_index, "train_core", 0, None,
                                                 _adapter_size(tuner, adapter_name), rel,
                                                 time.perf_counter() - tick, None, loss_new))
            else:
                peft_model.merge_adapter([adapter_name])
                try:
                    with module_mode(peft_model, training=True):
                        loss_old = None
                        if old_deltas is None or not args.reuse_old_delta:
                            bar.set_description(f"DFT round {round_index}: Δold")
                            old_deltas, loss_old = _fine_tune(peft_model, layers, tokenizer, prompts, old_answers,
                                                              old_epochs, args, gen, bar, accelerator)
                        bar.set_description(f"DFT round {round_index}: Δnew")
                        new_deltas, loss_new = _fine_tune(peft_model, layers, tokenizer, prompts, new_answers,
                                                          args.epochs, args, gen, bar, accelerator)
                finally:
                    peft_model.unmerge_adapter()
                core = locate_core(new_deltas, old_deltas, config)
                core_size = sum(d.nnz for d in core.values())
                fraction = opposite_sign_fraction(new_deltas, old_deltas)
                if core_size == 0:
                    raise ValueError(
                        f"round {round_index}: Δnew and Δold have no element of opposite signs, so there is no core "
                        "to update; the model is left as it was (try more epochs or another learning rate)"
                        if fraction == 0 else
                        f"top_t={config.top_t} keeps ⌊top_t · parameters⌋ = 0 elements of the targeted modules; "
                        "the model is left as it was (raise top_t)"
                    )
                tuner.add_core(core, adapter_name=adapter_name, lam=config.lam, consume=True)
                del new_deltas, core
                if not args.reuse_old_delta:
                    old_deltas = None
                rel = reliability()
                report.rounds.append(RoundReport(round_index, "locate", core_size, fraction,
                                                 _adapter_size(tuner, adapter_name), rel, time.perf_counter() - tick,
                                                 loss_old, loss_new))
            bar.set_postfix(reliability=f"{rel:.3f}", refresh=True)
            reached = rel >= args.target_reliability
            if on_round is not None:
                tick = time.perf_counter()
                on_round(peft_model, report.rounds[-1])
                report.callback_seconds += time.perf_counter() - tick
    finally:
        peft_model.base_model.set_adapter(previous_adapters)
        if bar is not None:
            bar.close()
    return report


def _fine_tune(
    peft_model: PeftModel,
    layers: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    answers: list[str],
    epochs: int,
    args: EditArguments,
    gen: torch.Generator,
    bar: tqdm,
    accelerator: Any,
) -> tuple[Mapping[str, torch.Tensor], float]:
    if args.delta_source == "full":
        fine_tune = DenseDeltas(peft_model, layers, PEFT_PREFIX)
    else:
        fine_tune = LoRADeltas(peft_model, layers, args.lora_r, args.lora_alpha, gen)
    batches = EpochBatches(tokenizer, prompts, answers, args.batch_size, gen)
    loss = train(fine_tune, batches, epochs, args.learning_rate, args.optimizer, bar, accelerator=accelerator)
    return fine_tune.deltas(), loss


def _launched_accelerator() -> Any:
    """An Accelerator when this process is one of several launched together (`accelerate launch`, `torchrun`), or
    was launched with an FSDP or DeepSpeed config (`accelerate launch` says so in the environment), even alone."""
    sharded = any(os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true")
                  for engine in ("FSDP", "DEEPSPEED"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not sharded:
        return None
    from accelerate import Accelerator

    return Accelerator()


def _adapter_size(tuner: DFTModel, adapter_name: str) -> int:
    return sum(d.nnz for d in tuner.get_core(adapter_name).values())
