"""The benchmark's statistics and scoring: bootstrap intervals against known answers, the generation scorer against
hand-made answers, batched generation against one-at-a-time generation, and the data splits."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import scoring
import torch
from conftest import DATA_DIR
from harness import EditRequest, Splits, generate_old_answers
from intervals import bootstrap_mean, paired_difference
from neighbourhood import classify
from reporting import METRICS, goal_lines, pair_differences, sequential_goal_lines, tradeoff_lines
from tiny_models import TOY_FACTS, tiny_llama, tiny_tokenizer

# --- intervals ------------------------------------------------------------------------------------------------------


def test_constant_data_has_a_zero_width_interval():
    stat = bootstrap_mean([[0.3] * 50, [0.3] * 40])
    assert stat["lo"] == stat["mean"] == stat["hi"] == pytest.approx(0.3)
    assert stat["per_seed"] == pytest.approx([0.3, 0.3])


def test_bernoulli_interval_matches_the_normal_approximation():
    p, n = 0.3, 10_000
    values = (np.random.default_rng(1).random(n) < p).astype(float)
    stat = bootstrap_mean([values])
    mean = values.mean()
    half = 1.959964 * math.sqrt(mean * (1 - mean) / n)
    assert stat["mean"] == pytest.approx(mean)
    assert stat["lo"] == pytest.approx(mean - half, abs=0.1 * half)
    assert stat["hi"] == pytest.approx(mean + half, abs=0.1 * half)


def test_seed_spread_widens_the_interval_and_the_mean_is_of_seed_means():
    within = [np.full(100, 50.0) + np.arange(100) % 2]  # one seed, tiny spread
    across = [np.full(100, 40.0) + np.arange(100) % 2, np.full(50, 60.0) + np.arange(50) % 2]
    narrow, wide = bootstrap_mean(within), bootstrap_mean(across)
    assert wide["mean"] == pytest.approx((40.5 + 60.5) / 2)
    assert wide["hi"] - wide["lo"] > 10 * (narrow["hi"] - narrow["lo"])
    assert bootstrap_mean(across) == wide  # fixed RNG: the same data give the same interval


def test_paired_difference_of_identical_inputs_is_exactly_zero():
    values = [list(np.random.default_rng(2).random(30)), list(np.random.default_rng(3).random(20))]
    stat = paired_difference(values, values)
    assert stat["mean"] == stat["lo"] == stat["hi"] == 0.0 and stat["per_seed"] == [0.0, 0.0]
    shifted = [[v + 5.0 for v in seed] for seed in values]
    assert paired_difference(shifted, values)["lo"] == pytest.approx(5.0)


def test_paired_difference_needs_the_same_units():
    with pytest.raises(ValueError, match="same seeds and units"):
        paired_difference([[1.0, 2.0]], [[1.0]])


def test_transform_maps_mean_and_bounds():
    stat = bootstrap_mean([[0.1, 0.2, 0.3]], transform=lambda x: 100 * math.expm1(x))
    assert stat["mean"] == pytest.approx(100 * math.expm1(0.2))
    assert stat["lo"] <= stat["mean"] <= stat["hi"]


# --- verdicts ------------------------------------------------------------------------------------------------------


def stat(mean: float, lo: float, hi: float) -> dict:
    return {"mean": mean, "lo": lo, "hi": hi}


def diff(rel: dict, gen: dict, loc: dict) -> dict:
    return {"reliability": rel, "generality": gen, "locality": loc,
            "gen_reliability": rel, "gen_generality": gen, "gen_locality": loc}


def test_locality_is_at_equal_reliability_only_when_the_reliability_difference_is_small_and_not_significant():
    lines = tradeoff_lines({
        "A": diff(stat(0.5, -1.0, 2.0), stat(0, 0, 0), stat(20, 10, 30)),
        "B": diff(stat(-5.0, -9.0, -1.0), stat(0, 0, 0), stat(40, 30, 50)),
        "C": diff(stat(-3.0, -8.0, 2.0), stat(0, 0, 0), stat(40, 30, 50)),  # not significant, but 3 points lower
    })
    assert lines[0] == ("- A − Full-FT, locality at equal reliability (teacher-forced): +20.0 [+10.0, +30.0] "
                        "(reliability +0.5 [-1.0, +2.0])")
    assert "at lower reliability" in lines[2] and "at lower reliability" in lines[4]
    assert len(lines) == 6


def test_batch_goals_need_the_locality_interval_above_zero():
    met = goal_lines({"DFT_FT": diff(stat(-0.5, -2, 1), stat(-1.5, -4, 1), stat(12, 1, 20))})
    assert len(met) == 6 and all(line.endswith("— met") for line in met)
    missed = goal_lines({"DFT_FT": diff(stat(-1.5, -3, 0), stat(-2.5, -5, 0), stat(12, -1, 25))})
    assert all(line.endswith("— missed") for line in missed)
    assert goal_lines({"LoRA": diff(stat(0, 0, 0), stat(0, 0, 0), stat(0, 0, 0))}) == []


def test_dft_lora_is_paired_with_lora_when_both_ran():
    def values(shift: float) -> dict:
        return {metric: [[shift + v for v in (1.0, 2.0, 3.0)]] for metric in METRICS}

    pairs = pair_differences({"LoRA": values(0.0), "DFT_LoRA": values(10.0), "Full-FT": values(5.0)})
    assert list(pairs) == ["DFT_LoRA − LoRA"] and pairs["DFT_LoRA − LoRA"]["locality"]["lo"] == pytest.approx(10.0)
    assert pair_differences({"LoRA": values(0.0), "Full-FT": values(5.0)}) == {}


def test_sequential_goals_compare_the_last_point_with_every_rival():
    def after(rel: float, loc: float, kl: float) -> dict:
        return {"after": [{"edits": 5}, {"edits": 10, "reliability": stat(rel, rel, rel),
                                         "locality": stat(loc, loc, loc), "capability": stat(kl, kl, kl)}]}

    lines = sequential_goal_lines({"DFT_FT": after(95, 85, 0.1), "Full-FT": after(99, 60, 0.5),
                                   "LoRA": after(90, 50, 0.05)})
    assert lines[0].startswith("- DFT_FT after 10 edits, reliability ≥ 90") and lines[0].endswith("missed")
    assert lines[1].endswith("met")  # locality 85 ≥ 80, above 60 and 50
    assert lines[2].endswith("missed (larger than LoRA's)")


@pytest.mark.parametrize(("answer", "expected"), [
    ("French", "unchanged"),
    ("English, of course", "own new target"),
    ("German", "another new target"),
    ("Latin", "other"),
])
def test_locality_answers_are_classed_by_where_they_went(answer, expected):
    assert classify(answer, reference="French", own="English", others=["German", "Dutch"]) == expected


# --- generation scoring ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "target", "expected"), [
    ("Rome, of course", "Rome", True),  # a match: the answer begins with the target's words
    ("rome", "Rome", True),
    ("Dickensian", "Dickens", False),  # a near miss: a longer word is not the target
    ("the U.S. Army", "U.S. Army", False),
    ("U.S. Army", "U.S. Army", True),
    ("", "Mars", False),
])
def test_matches(answer, target, expected):
    assert scoring.matches(answer, target) is expected


def test_cut_answer_cuts_like_generate_old_answers():
    assert scoring.cut_answer(" Paris. It is big") == "Paris"
    assert scoring.cut_answer("Walter Sobchak\nnext") == "Walter Sobchak"
    assert scoring.cut_answer("St. Louis") == "St"  # the old answers' cut, kept as it is


def toy_tokenizer():
    """A word-level tokenizer whose vocabulary covers every id of tiny_llama (96), so any generated id decodes."""
    words = sorted({w for fact in TOY_FACTS for v in fact.values() for w in v.split()})
    filler = [f"w{i}" for i in range(94 - len(words))]
    return tiny_tokenizer([" ".join(words + filler)])


def test_batched_generation_equals_one_prompt_at_a_time():
    model, tokenizer = tiny_llama(torch.float64), toy_tokenizer()
    prompts = ["the sky is", "the capital of france is", "grass is", "the author of hamlet is", "snow is"]
    budgets = [4, 6, 3, 5, 6]
    batched = scoring.greedy_answers(model, tokenizer, prompts, budgets, batch_size=4)
    assert batched == scoring.greedy_answers(model, tokenizer, prompts, budgets, batch_size=1)
    assert batched == [generate_old_answers(model, tokenizer, [p], b)[0] for p, b in zip(prompts, budgets)]
    assert all(batched)


def test_scorer_scores_hand_made_answers(monkeypatch):
    """Generated answers replaced by hand-made ones: a match, a near miss, a wrong answer; locality answers that
    are unchanged (up to case and punctuation), changed, and unchanged."""
    model, tokenizer = tiny_llama(torch.float64), toy_tokenizer()
    requests = [EditRequest(**fact) for fact in TOY_FACTS]
    unedited = {"the sky is": "blue", "grass is": "green", "snow is": "white"}
    monkeypatch.setattr(scoring, "greedy_answers", lambda m, t, prompts, budgets, **kw: [unedited[p] for p in prompts])
    scorer = scoring.Scorer(model, tokenizer, requests, ["the sky is blue", "snow is white"])
    edited = {"the capital of france is": "Rome, of course", "france has its capital in": "rome",
              "the author of hamlet is": "Dickensian", "hamlet was written by": "dickens",
              "the largest planet is": "jupiter", "the biggest planet is": "mars",
              "the sky is": "Blue.", "grass is": "red", "snow is": "white"}
    monkeypatch.setattr(scoring, "greedy_answers", lambda m, t, prompts, budgets, **kw: [edited[p] for p in prompts])
    scores = scorer(model)
    assert scores["gen_reliability"] == [100.0, 0.0, 0.0]
    assert scores["gen_generality"] == [100.0, 100.0, 100.0]
    assert scores["gen_locality"] == [100.0, 0.0, 100.0]
    assert scores["locality"] == [100.0] * 3  # teacher-forced, the unedited model against itself
    assert scores["capability"] == pytest.approx([0.0, 0.0], abs=1e-3)  # KL of a model to itself (fp16 reference)
    assert scores["nll_change"] == pytest.approx([0.0, 0.0], abs=1e-2)
    part = scorer(model, retained=[0, 2], local=[1])
    assert part["gen_reliability"] == [100.0, 0.0] and part["gen_locality"] == [0.0]
    assert len(part["reliability"]) == 2 and len(part["locality"]) == 1


# --- data splits ----------------------------------------------------------------------------------------------------

FILES = {"zsre": "zsre_mend-800.json", "counterfact": "counterfact-edit-10k.json"}


@pytest.mark.skipif(not all(os.path.exists(os.path.join(DATA_DIR, f)) for f in FILES.values()),
                    reason=f"benchmark data not found in {DATA_DIR}")
@pytest.mark.parametrize("fmt", list(FILES))
def test_splits_are_disjoint_and_counterfact_edits_come_from_positions_below_6000(fmt):
    path = Path(DATA_DIR) / FILES[fmt]
    splits = Splits.of(path, fmt)
    assert len(splits.tuning) == 100
    assert not {r.prompt for r in splits.tuning} & {r.prompt for r in splits.report}
    seed0, seed1 = splits.draw("report", 0, 50), splits.draw("report", 1, 50)
    assert not {r.prompt for r in seed0} & {r.prompt for r in seed1}
    if fmt == "counterfact":
        assert len(splits.tuning) + len(splits.report) == 6000
    else:
        assert len(splits.report) == 698
        with pytest.raises(ValueError, match="holds 698 requests"):
            splits.draw("report", 3, 200)
