"""The selection rule (Delicate Fine-Tuning §4.1, made exact), its argument checks, and `select_core_naive`, the rule
written as plainly as possible: the reference every selection path is tested against, bit for bit.

* an element is a *candidate* when Δnew and Δold have opposite signs; a magnitude below the smallest normal float32
  counts as zero, i.e. no sign (this keeps every score a normal float, so CPU, GPU and C agree bit for bit whatever
  their denormal mode);
* its score is s = |fp32(Δnew) − fp32(Δold)| and its *key* the int32 bit pattern of s, which orders like s because
  s ≥ 0 (non-candidates get key 0);
* the core of a scope (all modules for `"global"`, each module for `"per_module"`) holds the k = ⌊top_t · numel⌋
  candidates that come first in the order (key descending, module name ascending, flat index ascending) — fewer when
  there are fewer candidates; its values are fp32(Δnew) · scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

import torch

from ..checks import check_choice, check_value
from ..format.sparse import SparseDelta, index_dtype

SELECTIONS = ("global", "per_module")
FLT_MIN = torch.finfo(torch.float32).tiny
MAX_KEY = 0x7F800000  # bit pattern of +inf: the largest key (an overflowing finite difference)


def core_size(top_t: float, numel: int) -> int:
    """k = ⌊top_t · numel⌋ with top_t read as the decimal it is written as (0.29 · 100 = 29, not 28)."""
    return int(Decimal(repr(float(top_t))) * numel)


def scores(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """s = |x − y| where x, y (fp32) have opposite signs, magnitudes below FLT_MIN counting as zero; 0 elsewhere."""
    candidate = ((x >= FLT_MIN) & (y <= -FLT_MIN)) | ((x <= -FLT_MIN) & (y >= FLT_MIN))
    return torch.where(candidate, (x - y).abs(), 0.0)


def nonfinite(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Whether x or y holds NaN or inf (a 0-d bool tensor: no device sync)."""
    return ~(torch.isfinite(x).all() & torch.isfinite(y).all())


def chunk_keys(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of a block of elements (int32, 0 for non-candidates) and whether the block holds NaN/inf."""
    x, y = new.float(), old.float()
    return scores(x, y).view(torch.int32), nonfinite(x, y)


def check_deltas(new_deltas: Mapping[str, torch.Tensor], old_deltas: Mapping[str, torch.Tensor]) -> list[str]:
    """Check that both mappings name the same modules; return the names sorted (the tie-break order)."""
    if set(new_deltas) != set(old_deltas):
        missing = sorted(set(new_deltas) ^ set(old_deltas))
        raise ValueError(f"Δnew and Δold must name the same modules; only one of them has {missing[:5]}")
    return sorted(new_deltas)


def check_pair(name: str, new: torch.Tensor, old: torch.Tensor) -> None:
    """Check one module's deltas: float tensors of equal shape on one device."""
    if not (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor)):
        raise TypeError(f"deltas of module {name!r} must be tensors")
    if new.shape != old.shape:
        raise ValueError(f"module {name!r}: Δnew has shape {tuple(new.shape)} but Δold {tuple(old.shape)}")
    if not (new.dtype.is_floating_point and old.dtype.is_floating_point):
        raise ValueError(f"module {name!r}: deltas must be floating point, got {new.dtype} and {old.dtype}")
    if new.device != old.device:
        raise ValueError(f"module {name!r}: Δnew is on {new.device} but Δold on {old.device}")


def check_selection_args(top_t: float, selection: str) -> None:
    """Check top_t (a fraction in (0, 1]) and the selection's name."""
    check_value("select_core", "top_t", top_t, "fraction")
    check_choice("select_core", "selection", selection, SELECTIONS)


def raise_nonfinite(name: str) -> None:
    """Raise the ValueError of a module whose deltas hold NaN or inf."""
    raise ValueError(f"module {name!r}: Δnew or Δold contains NaN or inf; the fine-tune diverged (lower the "
                     "learning rate) or the checkpoint is corrupt")


def select_core_naive(
    new_deltas: Mapping[str, torch.Tensor],
    old_deltas: Mapping[str, torch.Tensor],
    top_t: float,
    selection: str = "global",
    *,
    scale: float = 1.0,
) -> dict[str, SparseDelta]:
    """The rule written as plainly as possible: mask, abs, one stable sort over the concatenated scores.

    Materialises every score (O(numel) memory); the tests and benchmarks compare the real paths against it.
    """
    check_selection_args(top_t, selection)
    names = check_deltas(new_deltas, old_deltas)
    scopes = [names] if selection == "global" else [[n] for n in names]
    core = {}
    for scope in scopes:
        new = torch.cat([new_deltas[n].reshape(-1).float().cpu() for n in scope])
        old = torch.cat([old_deltas[n].reshape(-1).float().cpu() for n in scope])
        if not (torch.isfinite(new).all() and torch.isfinite(old).all()):
            raise ValueError("Δnew or Δold contains NaN or inf")
        opposite = ((new >= FLT_MIN) & (old <= -FLT_MIN)) | ((new <= -FLT_MIN) & (old >= FLT_MIN))
        score = torch.where(opposite, (new - old).abs(), -1.0)
        k = min(core_size(top_t, new.numel()), int(opposite.sum()))
        order = torch.sort(score, descending=True, stable=True).indices[:k]
        start = 0
        for n in scope:
            numel = new_deltas[n].numel()
            mine = order[(order >= start) & (order < start + numel)].sort().values
            core[n] = SparseDelta(
                (mine - start).to(index_dtype(numel)), new[mine] * scale, tuple(new_deltas[n].shape)
            )
            start += numel
    return core
