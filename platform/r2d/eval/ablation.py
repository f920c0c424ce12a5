"""The paper's ablation on one budget: base, R2D-p, SFT only, SFT + CPO, and the reference CPO variant.

Pure aggregation lives here (tested without Ray); ``jobs/ablation.py`` runs the trainings
and evaluations. Every trained variant sees the same traces, steps and seed set, so the
only difference between "SFT only" and "SFT + CPO" is λ.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

VARIANTS: dict[str, list[str]] = {
    "SFT only": ["train.cpo_weight=0"],
    "SFT + CPO": ["train.cpo_weight=1.0", "train.cpo_variant=mean"],
    "SFT + CPO (reference variant)": ["train.cpo_weight=1.0", "train.cpo_variant=per_class"],
}
"""Trained variants: name → config overrides on top of the recipe."""
UNTRAINED = ("base", "R2D-p")
KEYS = ("asr", "over_refusal", "over_refusal_lookalike", "discrimination", "pivot_accuracy")


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation, ignoring missing values; sd is 0 for one value."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per variant: mean and sd over seeds of each headline rate and of ASR per attack."""
    table: dict[str, dict[str, Any]] = {}
    for variant, results in runs.items():
        row: dict[str, Any] = {"seeds": len(results)}
        for key in KEYS:
            row[key] = mean_sd([r.get(key) for r in results])
        attacks = sorted({a for r in results for a in (r.get("asr_by_attack") or {})})
        row["asr_by_attack"] = {a: mean_sd([(r.get("asr_by_attack") or {}).get(a) for r in results])
                                for a in attacks}
        row["discrimination_ci"] = [r.get("discrimination_ci") for r in results]
        table[variant] = row
    return table


def paired_effect(a: list[dict], b: list[dict], key: str) -> dict[str, Any]:
    """Effect of b over a on ``key``, paired by seed: mean difference, sd, and a t-interval (95%)."""
    diffs = [rb[key] - ra[key] for ra, rb in zip(a, b) if ra.get(key) is not None and rb.get(key) is not None]
    if not diffs:
        return {"key": key, "n": 0, "mean": None, "ci": None}
    mean, sd = mean_sd(diffs)
    # Student t for n-1 degrees of freedom (n ≤ 6 here); wide on purpose with 3 seeds.
    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}.get(len(diffs) - 1, 1.96)
    half = t * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
    return {"key": key, "n": len(diffs), "mean": mean, "ci": [mean - half, mean + half]}


def _cell(stat: tuple[float | None, float | None]) -> str:
    mean, sd = stat
    return "n/a" if mean is None else f"{mean:.2f} ± {sd:.2f}"


def markdown_table(table: dict[str, dict[str, Any]]) -> str:
    """A table like the paper's: ASR per attack, over-refusal, discrimination, pivot accuracy (mean ± sd)."""
    attacks = sorted({a for row in table.values() for a in row["asr_by_attack"]})
    head = ["variant", "seeds", *[f"ASR {a}" for a in attacks], "ASR", "over-refusal", "look-alike over-refusal",
            "discrimination", "pivot acc."]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for variant, row in table.items():
        cells = [variant, str(row["seeds"]), *[_cell(row["asr_by_attack"].get(a, (None, None))) for a in attacks],
                 *[_cell(row[k]) for k in KEYS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(runs: dict[str, list[dict]]) -> str:
    """Does CPO help here, and by how much? Each CPO variant paired by seed against SFT only."""
    sft = runs.get("SFT only", [])
    lines = []
    for variant in (v for v in VARIANTS if v != "SFT only"):
        parts = []
        for key, better in (("discrimination", "higher"), ("asr", "lower"), ("over_refusal", "lower")):
            eff = paired_effect(sft, runs.get(variant, []), key)
            if eff["mean"] is None:
                continue
            lo, hi = eff["ci"]
            sign = "helps" if (eff["mean"] > 0) == (better == "higher") else "hurts"
            clear = lo > 0 or hi < 0
            parts.append(f"{key}: {eff['mean']:+.3f} (95% t-interval over {eff['n']} seeds [{lo:+.3f}, {hi:+.3f}])"
                         f" → {sign}" + ("" if clear else ", not distinguishable from noise"))
        if parts:
            lines.append(f"{variant} − SFT only: " + "; ".join(parts))
    return "\n".join(f"- {line}" for line in lines) if lines else "not enough runs to compare CPO with SFT only"


def tradeoff_plot(runs: dict[str, list[dict]], path, targets: tuple[float, float] = (0.20, 0.25)) -> None:
    """Every run as a point, ASR against over-refusal, with the target corner and the no-discrimination line.

    A point below the diagonal refuses harmful prompts more often than benign ones; the
    shaded corner is the issue's target (ASR ≤ 0.20, over-refusal ≤ 0.25).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.fill_between([0, targets[1]], 0, targets[0], color="tab:green", alpha=0.12, label="target")
    ax.plot([0, 1], [1, 0], color="grey", lw=0.8, ls="--", label="no discrimination")
    for i, (variant, results) in enumerate(runs.items()):
        pts = [(r["over_refusal"], r["asr"]) for r in results
               if r.get("over_refusal") is not None and r.get("asr") is not None]
        if pts:
            ax.scatter(*zip(*pts), s=40, color=f"C{i}", label=variant, alpha=0.85)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="over-refusal (benign prompts refused)",
           ylabel="attack success rate (harmful prompts answered)", title="Held-out trade-off, one point per run")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def portable_reports(runs: dict[str, list[dict]], root: Path) -> dict[str, list[dict]]:
    """The runs with each evaluation report's path made relative to ``root`` where it lies under
    it: the ablation JSON is kept beside the code, and an absolute path names one machine."""
    base = Path(root).resolve()

    def rel(path: str) -> str:
        p = Path(path).resolve()
        return str(p.relative_to(base)) if p.is_relative_to(base) else path

    return {v: [{**r, "report": rel(r["report"])} if r.get("report") else r for r in rows] for v, rows in runs.items()}
