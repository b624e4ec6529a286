"""Summaries with intervals, results files, markdown tables, verdict lines and plots for both benchmark scripts."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from intervals import LEVEL, RESAMPLES, bootstrap_mean, paired_difference
from scoring import ANSWER_SLACK, RATE_METRICS

BASELINE = "Full-FT"
METRICS = (*RATE_METRICS, "capability")
LABELS = {"reliability": "Reliability", "generality": "Generality", "locality": "Locality",
          "gen_reliability": "Gen. reliability", "gen_generality": "Gen. generality", "gen_locality": "Gen. locality",
          "capability": "KL (nats/token)", "perplexity_change": "Perplexity change (%)"}
# values[method][metric] = per-seed lists of per-unit values, as `scoring.Scorer` returns them
Values = Mapping[str, Mapping[str, Sequence[Sequence[float]]]]


def percent_change(mean_log_ratio: float) -> float:
    """A mean NLL change (nats/token) as the change of perplexity in percent."""
    return 100.0 * math.expm1(mean_log_ratio)


def summarize(values: Mapping[str, Sequence[Sequence[float]]]) -> dict:
    """One method's `{METRIC: {"mean", "lo", "hi", "per_seed"}}`, plus `perplexity_change` from `nll_change`."""
    out = {metric: bootstrap_mean(values[metric]) for metric in METRICS}
    out["perplexity_change"] = bootstrap_mean(values["nll_change"], transform=percent_change)
    return out


def differences(values: Values) -> dict:
    """`{NAME: {METRIC: paired difference against Full-FT}}` for every other method (empty without Full-FT)."""
    if BASELINE not in values:
        return {}
    return {name: {metric: paired_difference(v[metric], values[BASELINE][metric]) for metric in METRICS}
            for name, v in values.items() if name != BASELINE}


PAIRS = (("DFT_LoRA", "LoRA"),)  # (method, the baseline it is paired with besides Full-FT)


def pair_differences(values: Values) -> dict:
    """`{"A − B": {METRIC: paired difference}}` for each pair of `PAIRS` whose methods both ran."""
    return {f"{a} − {b}": {metric: paired_difference(values[a][metric], values[b][metric]) for metric in METRICS}
            for a, b in PAIRS if a in values and b in values}


def interval(stat: Mapping[str, float], digits: int = 1) -> str:
    """`mean [lo, hi]`."""
    return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"


def digits_of(metric: str) -> int:
    return 4 if metric == "capability" else 1


def verdict_lines(diffs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """One line per method and metric: "DFT_FT − Full-FT, locality: +x [lo, hi]", and whether 0 lies outside."""
    lines = []
    for name, by_metric in diffs.items():
        for metric, d in by_metric.items():
            k = digits_of(metric)
            side = "above 0" if d["lo"] > 0 else "below 0" if d["hi"] < 0 else "includes 0"
            lines.append(f"- {name} − {BASELINE}, {metric}: {signed(d, k)} ({side})")
    return lines


SCORINGS = {"teacher-forced": ("reliability", "generality", "locality"),
            "generated": ("gen_reliability", "gen_generality", "gen_locality")}
# issue 17's batch goals for DFT against Full-FT, per scoring: reliability ≥ −1, generality ≥ −2, locality ≥ +10
# with the interval of the difference above zero
GOALS = {"reliability": -1.0, "generality": -2.0, "locality": 10.0}
EQUAL_RELIABILITY = 2.0  # points of reliability difference a locality comparison may span


def signed(d: Mapping[str, float], digits: int = 1) -> str:
    """`+mean [+lo, +hi]`."""
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def tradeoff_lines(diffs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """Per method and scoring, its locality difference against Full-FT, said to be "at equal reliability" only when
    the reliability difference is within `EQUAL_RELIABILITY` points and its interval includes 0, otherwise at higher
    or lower reliability."""
    lines = []
    for name, d in diffs.items():
        for scoring, (rel, _, loc) in SCORINGS.items():
            r, l_ = d[rel], d[loc]
            if r["lo"] <= 0 <= r["hi"] and abs(r["mean"]) <= EQUAL_RELIABILITY:
                at = "at equal reliability"
            elif r["mean"] > 0:
                at = "at higher reliability"
            else:
                at = "at lower reliability, so possibly bought with reliability"
            lines.append(f"- {name} − {BASELINE}, locality {at} ({scoring}): {signed(l_)} (reliability {signed(r)})")
    return lines


def goal_lines(diffs: Mapping[str, Mapping[str, Mapping[str, float]]], name: str = "DFT_FT",
               baseline: str = BASELINE) -> list[str]:
    """Issue 17's batch goals for `name` against `baseline` (`diffs[name]` holds the paired differences), met or
    missed, under each scoring."""
    if name not in diffs:
        return []
    lines = []
    for scoring, metrics in SCORINGS.items():
        for goal_metric, metric in zip(("reliability", "generality", "locality"), metrics):
            d, bound = diffs[name][metric], GOALS[goal_metric]
            met = d["mean"] >= bound and (goal_metric != "locality" or d["lo"] > 0)
            need = f"≥ {bound:+.0f}" + (", interval above 0" if goal_metric == "locality" else "")
            lines.append(f"- {name} − {baseline}, {goal_metric} ({scoring}), goal {need}: {signed(d)} — "
                         f"{'met' if met else 'missed'}")
    return lines


SEQUENTIAL_GOALS = {"reliability": 90.0, "locality": 80.0}  # issue 17, after all sequential edits
SEQUENTIAL_RIVALS = ("Full-FT", "LoRA", "FT-M")


def sequential_goal_lines(methods: Mapping[str, Mapping], name: str = "DFT_FT") -> list[str]:
    """Issue 17's sequential goals for `name` after all edits, met or missed: reliability over the edits so far
    ≥ 90 and locality ≥ 80 (teacher-forced), both above each rival's at the same point, and a capability KL no
    larger than theirs (means compared; intervals shown)."""
    if name not in methods:
        return []
    last = {m: r["after"][-1] for m, r in methods.items()}
    ours, rivals = last[name], [m for m in SEQUENTIAL_RIVALS if m in last]
    lines = []
    for metric, bound in SEQUENTIAL_GOALS.items():
        beaten = [m for m in rivals if ours[metric]["mean"] > last[m][metric]["mean"]]
        met = ours[metric]["mean"] >= bound and len(beaten) == len(rivals)
        against = ", ".join(f"{m} {interval(last[m][metric])}" for m in rivals)
        lines.append(f"- {name} after {ours['edits']} edits, {metric} ≥ {bound:.0f} and above {', '.join(rivals)}: "
                     f"{interval(ours[metric])} (against {against}) — {'met' if met else 'missed'}")
    kl = ours["capability"]["mean"]
    worse = [m for m in rivals if kl > last[m]["capability"]["mean"]]
    verdict = f"missed (larger than {', '.join(worse)}'s)" if worse else "met"
    lines.append(f"- {name} after {ours['edits']} edits, capability KL no larger than {', '.join(rivals)}'s: "
                 f"{interval(ours['capability'], 4)} — {verdict}")
    return lines


def metric_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]], first: str = "Method",
                 columns: Sequence[str] = (*METRICS, "perplexity_change")) -> list[str]:
    """A markdown table of `mean [lo, hi]` per row and metric."""
    lines = [f"| {first} | " + " | ".join(LABELS[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, stats in rows.items():
        lines.append(f"| {row} | " + " | ".join(interval(stats[c], digits_of(c)) for c in columns) + " |")
    return lines


def method_notes(probe: str) -> list[str]:
    """The shared paragraph on what the metrics mean."""
    return [
        f"Metrics in % with {100 * LEVEL:.0f}% intervals (hierarchical bootstrap over seeds, then requests within "
        f"each drawn seed; {RESAMPLES} resamples, fixed RNG). Reliability / Generality / Locality: EasyEdit's "
        "teacher-forced token accuracy, Locality against the unedited model's argmax tokens. Gen.: the greedy answer "
        f"(target tokens + {ANSWER_SLACK} new tokens, cut at the first line break or sentence end) matches the new "
        "target (its normalised words begin with the target's), or for locality equals the unedited model's answer. "
        "KL: mean per-token KL(unedited ‖ edited) in nats over the capability probe's texts; perplexity change on the "
        f"same texts. Probe texts: {probe}.",
        "",
    ]


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1))


def plot_batch(path: Path, methods: Mapping[str, Mapping[str, Mapping[str, float]]], title: str) -> None:
    """Metrics with interval error bars per method, KL per method, and the reliability–locality trade-off."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(19, 5), gridspec_kw={"width_ratios": [3, 1, 1.6]})
    names = list(methods)
    width = 0.8 / max(len(names), 1)
    colors = color_map(names)
    for i, name in enumerate(names):
        stats = [methods[name][m] for m in RATE_METRICS]
        axes[0].bar([j + i * width for j in range(len(RATE_METRICS))], [s["mean"] for s in stats], width,
                    yerr=error_bars(stats), capsize=2, label=name, color=colors[name])
        s = methods[name]["capability"]
        axes[1].bar(i, s["mean"], yerr=error_bars([s]), capsize=3, color=colors[name])
        for metrics, marker in ((("reliability", "locality"), "o"), (("gen_reliability", "gen_locality"), "^")):
            x, y = methods[name][metrics[0]], methods[name][metrics[1]]
            axes[2].errorbar(x["mean"], y["mean"], xerr=error_bars([x]), yerr=error_bars([y]), fmt=marker,
                             color=colors[name], capsize=2, label=f"{name} ({'generated' if marker == '^' else 'TF'})")
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(RATE_METRICS))], [LABELS[m] for m in RATE_METRICS])
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{title}: metrics (95% intervals)")
    axes[1].set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes[1].set_title("Capability probe: KL (nats/token)")
    axes[2].set_xlabel("Reliability (%)")
    axes[2].set_ylabel("Locality (%)")
    axes[2].set_title("Reliability–locality (o: teacher-forced, ^: generated)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sequential(path: Path, methods: Mapping[str, Mapping], title: str) -> None:
    """Per metric, each method's curve over the edits made so far, with its interval band."""
    plt = pyplot()
    panels = ("reliability", "generality", "locality", "gen_reliability", "gen_locality", "capability")
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    colors = color_map(list(methods))
    for ax, metric in zip(axes.flat, panels):
        for name, result in methods.items():
            after = result["after"]
            x = [p["edits"] for p in after]
            ax.plot(x, [p[metric]["mean"] for p in after], "o-", color=colors[name], label=name, markersize=3)
            ax.fill_between(x, [p[metric]["lo"] for p in after], [p[metric]["hi"] for p in after],
                            color=colors[name], alpha=0.2)
        ax.set_xlabel("edits so far")
        ax.set_title(LABELS[metric] + (" (over edits so far)" if metric in ("reliability", "generality",
                                                                               "gen_reliability") else ""))
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def error_bars(stats: Sequence[Mapping[str, float]]) -> list[list[float]]:
    """matplotlib's asymmetric error bars (below, above) of `mean [lo, hi]` stats."""
    return [[s["mean"] - s["lo"] for s in stats], [s["hi"] - s["mean"] for s in stats]]


def color_map(names: Sequence[str]) -> dict[str, str]:
    palette = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
