"""`select_core_sharded` over 2 gloo processes equals `select_core_naive` on the whole deltas, bit for bit.

The ranks are this file run as a script, one process each (file:// rendezvous in a temporary directory): they run
every case once and save their parts and gathered cores, which the parametrised tests below compare. Small chunks
make each module span several chunks, so ties are capped and counted across chunk boundaries too.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dft_peft.selection.rule import core_size, select_core_naive
from dft_peft.selection.sharded import Shard, gather_core, select_core_sharded

WORLD = 2
CHUNK = 160
TIMEOUT_S = 180
SHAPES = {
    "layers.0.attn.q": (24, 40),
    "layers.0.mlp.up": (48, 24),
    "layers.1.attn.q": (24, 40),  # held transposed (non-contiguous) where held whole
    "layers.1.norm": (40,),
}
A, B, C, D = SHAPES
# Per layout, per rank: module → flat range [start, stop) held. "whole" interleaves the names over the ranks;
# "sliced" cuts two modules unevenly (not at row boundaries), the lower part on rank 1; in "idle" rank 0 holds nothing.
LAYOUTS = {
    "whole": [{A: None, C: None}, {B: None, D: None}],
    "sliced": [{A: (0, 5), B: (421, 1152), D: None}, {A: (5, 960), B: (0, 421), C: None}],
    "idle": [{}, {A: None, B: None, C: None, D: None}],
}
TOP_TS = (0.0002, 0.01, 0.1, 0.37, 1.0)  # 0.0002: k = 0 in every scope; 1.0: k ≥ the candidates


@dataclass(frozen=True)
class Case:
    layout: str
    selection: str
    top_t: float
    kind: str  # "random": normal deltas (one module bf16, zeros and subnormals); "ties": integers in [-3, 3]

    @property
    def scale(self) -> float:
        return 0.5 if self.kind == "ties" else 1.0

    def __str__(self) -> str:
        return f"{self.layout}-{self.selection}-{self.top_t}-{self.kind}"


CASES = [Case(*c) for c in itertools.product(LAYOUTS, ("global", "per_module"), TOP_TS, ("random", "ties"))]


def deltas(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(Δnew, Δold), the same in every process."""
    gen = torch.Generator().manual_seed(0)
    new, old = {}, {}
    for name, shape in SHAPES.items():
        if kind == "ties":
            pair = [torch.randint(-3, 4, shape, generator=gen).float() for _ in range(2)]
        else:
            pair = [torch.randn(shape, generator=gen) for _ in range(2)]
            for t in pair:
                t.view(-1)[torch.randperm(t.numel(), generator=gen)[: t.numel() // 8]] = 0.0
                t.view(-1)[:3] = 1e-40  # below FLT_MIN: no sign
            if name == B:
                pair = [t.bfloat16() for t in pair]
        if name == C:
            pair = [t.t().contiguous().t() for t in pair]
        new[name], old[name] = pair
    return new, old


def shards(whole: dict[str, torch.Tensor], held: dict[str, tuple[int, int] | None]) -> dict:
    return {name: whole[name] if span is None else Shard(whole[name].reshape(-1)[span[0] : span[1]], span[0])
            for name, span in held.items()}


def as_tuples(core: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    return {name: (d.indices, d.values, d.shape) for name, d in core.items()}


def run_rank(rank: int, directory: Path) -> None:
    """One rank: every case, then the error cases; results to `directory/rank<rank>.pt`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory / 'rendezvous'}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S / 2))
    results: dict[str, object] = {}
    for case in CASES:
        new, old = deltas(case.kind)
        held = LAYOUTS[case.layout][rank]
        local = select_core_sharded(shards(new, held), shards(old, held), case.top_t, case.selection,
                                    scale=case.scale, process_group=None, numels=SHAPES, chunk=CHUNK)
        results[str(case)] = {"local": as_tuples(local), "whole": as_tuples(gather_core(local, None))}
    new, old = deltas("random")
    new[B] = new[B].clone()
    new[B].view(-1)[1000] = float("nan")  # on rank 1's slice only
    overlapping = {**LAYOUTS["sliced"][rank], B: [(400, 1152), (0, 421)][rank]}
    for error_case, held in (("nan", LAYOUTS["sliced"][rank]), ("overlap", overlapping)):
        try:
            select_core_sharded(shards(new, held), shards(old, held), 0.1, process_group=None, numels=SHAPES)
        except ValueError as err:
            results[error_case] = str(err)
    torch.save(results, directory / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("distributed")
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(directory)], cwd=directory,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(WORLD)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log}"
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD)]


def assert_same(got: tuple, expected, name: str) -> None:
    indices, values, shape = got
    assert shape == expected.shape, name
    assert indices.dtype == expected.indices.dtype and torch.equal(indices, expected.indices), name
    assert torch.equal(values.view(torch.int32), expected.values.view(torch.int32)), name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sharded_core_matches_naive(ranks, case):
    new, old = deltas(case.kind)
    expected = select_core_naive(new, old, case.top_t, case.selection, scale=case.scale)
    for rank, results in enumerate(ranks):
        got = results[str(case)]
        assert set(got["whole"]) == set(SHAPES)
        for name in SHAPES:
            assert_same(got["whole"][name], expected[name], f"rank {rank} gathered {name}")
        held = LAYOUTS[case.layout][rank]
        assert set(got["local"]) == set(held)
        for name, span in held.items():
            start, stop = span or (0, new[name].numel())
            mine = (expected[name].indices >= start) & (expected[name].indices < stop)
            part = type(expected[name])(expected[name].indices[mine], expected[name].values[mine], SHAPES[name])
            assert_same(got["local"][name], part, f"rank {rank}'s part of {name}")


def test_tie_cases_split_ties():
    """The "ties" cases exercise the hand-over: the global threshold at top_t=0.1 falls inside a group of ties."""
    new, old = deltas("ties")
    x, y = (torch.cat([d[name].reshape(-1).float() for name in SHAPES]) for d in (new, old))
    scores = torch.where(x * y < 0, (x - y).abs(), 0.0)
    k = core_size(0.1, scores.numel())
    threshold = scores.sort(descending=True).values[k - 1]
    assert int((scores > threshold).sum()) < k < int((scores == threshold).sum()) + int((scores > threshold).sum())


@pytest.mark.parametrize("error_case, message", [("nan", f"module {B!r}: Δnew or Δold contains NaN"),
                                                  ("overlap", f"module {B!r}: the ranks' shards overlap")])
def test_errors_raise_on_every_rank(ranks, error_case, message):
    for results in ranks:
        assert message in results.get(error_case, "no error"), results.get(error_case)


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), Path(sys.argv[2]))
