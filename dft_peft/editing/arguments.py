"""`EditArguments`: how `edit` fine-tunes and when it stops; each field's help is its command-line flag's help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..checks import check_fields


@dataclass
class EditArguments:
    """How `edit` fine-tunes and when it stops (each field documents itself in its metadata, as `--help` shows)."""

    delta_source: Literal["full", "lora"] = field(default="full", metadata={
        "help": "'full' (DFT_FT: full fine-tunes of the targeted weights) or 'lora' (DFT_LoRA: LoRA fine-tunes whose "
                "scale·B·A are the deltas)."})
    strategy: Literal["paper", "locate_once"] = field(default="locate_once", metadata={
        "help": "'locate_once': one locate-and-update round, then only the core's values train on the new facts. "
                "'paper': every round repeats both fine-tunes from the current weights, a new core and θ ← θ + λ·core "
                "(§4.2)."})
    max_rounds: int = field(default=8, metadata={"check": "positive_int", "help": "Rounds at most."})
    target_reliability: float = field(default=1.0, metadata={
        "check": "fraction",
        "help": "Stop once the mean reliability (teacher-forced token accuracy on the new answers) reaches this."})
    epochs: int = field(default=2, metadata={"check": "positive_int", "help": "Epochs of the Δnew fine-tune."})
    old_epochs: int | None = field(default=None, metadata={
        "check": "positive_int", "help": "Epochs of the Δold fine-tune (default: as epochs)."})
    core_epochs: int = field(default=1, metadata={
        "check": "positive_int", "help": "Epochs of core-value training per round (strategy 'locate_once')."})
    reuse_old_delta: bool = field(default=False, metadata={
        "help": "Compute Δold in the first round only (strategy 'paper')."})
    learning_rate: float = field(default=1e-4, metadata={"check": "positive", "help": "Learning rate of the "
                                                                                       "fine-tunes."})
    core_learning_rate: float = field(default=1e-3, metadata={
        "check": "positive", "help": "Learning rate of the core-value training."})
    batch_size: int = field(default=8, metadata={"check": "positive_int", "help": "Requests per training step."})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={"help": "Optimizer of every fine-tune."})
    seed: int = field(default=0, metadata={"help": "Seed of batch order and LoRA initialisation: the edit is "
                                                   "deterministic under it."})
    lora_r: int = field(default=8, metadata={"check": "positive_int", "help": "LoRA rank (delta_source 'lora')."})
    lora_alpha: float = field(default=16.0, metadata={"check": "positive", "help": "LoRA alpha (delta_source "
                                                                                   "'lora')."})
    preserve_weight: float = field(default=1.0, metadata={
        "check": "non_negative",
        "help": "Weight of a KL term that holds the model's next-token distributions, on text it sampled itself "
                "before the edit, while the core's values train (0: off; 1 chosen on the zsRE tuning split, where it "
                "kept 77.5 locality against 62.4 without it at the same reliability)."})
    preserve_texts: int = field(default=16, metadata={
        "check": "positive_int", "help": "Texts the model samples for that term (preserve_weight > 0)."})
    preserve_batch: int | None = field(default=None, metadata={
        "check": "positive_int",
        "help": "Of those texts, how many each training step holds, cycling through them (default: all of them; "
                "fewer make a step cheaper, as the texts outnumber an edit batch's tokens)."})
    preserve_from: Literal["start", "prompts"] = field(default="start", metadata={
        "help": "Where the model starts those texts: 'start' (its beginning-of-text token) or 'prompts' (the first "
                "two tokens of the edit's prompts, text in the user's register)."})
    preserve_length: int = field(default=32, metadata={
        "check": "positive_int", "help": "Tokens per sampled text (preserve_weight > 0)."})
    generate_max_new_tokens: int = field(default=16, metadata={
        "check": "positive_int", "help": "Length limit of the old answers the model generates."})
    old_answer_shots: bool = field(default=False, metadata={
        "help": "Generate the model's own old answers after four well-known example facts, one per line, so that "
                "they come as short facts like the new answers rather than as prose."})
    eval_batch_size: int = field(default=16, metadata={
        "check": "positive_int", "help": "Batch size of the reliability checks."})

    def __post_init__(self) -> None:
        check_fields(self)
