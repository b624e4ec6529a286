"""What an edit did: one `RoundReport` per round, gathered in the `EditReport` that `edit` returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


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
class Retention:
    """How many earlier edits (the `retain` requests of `edit`) hold before and after this edit: a request holds
    when the model predicts every token of its new answer (teacher-forced), and `reliability` is the mean token
    accuracy over them."""

    requests: int
    held_before: int
    held_after: int
    reliability_before: float
    reliability_after: float


@dataclass
class EditReport:
    """What `edit` did: the reliability before it, its rounds, the old answers it located, its seconds (the
    `on_round` callback's excluded) and, when earlier edits were passed as `retain`, how many still hold."""

    initial_reliability: float
    rounds: list[RoundReport] = field(default_factory=list)
    old_answers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    callback_seconds: float = 0.0
    retention: Retention | None = None

    @property
    def reliability(self) -> float:
        return self.rounds[-1].reliability if self.rounds else self.initial_reliability

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reliability": self.reliability}

