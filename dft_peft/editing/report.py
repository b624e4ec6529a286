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

