"""The demo's story as a Markdown report with charts: traces → training curves → safety → promotion → API.

Pure functions over what the stages return (the manifest, MLflow metric histories, the
evaluation JSON, the promotion decision), so the report can be rebuilt from MLflow later.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from r2d.eval.report import TRAINED_NOTE, trained_mark  # noqa: E402

_RATES = (("asr", "ASR (harmful + jailbreak)"), ("over_refusal", "over-refusal (benign)"),
          ("over_refusal_lookalike", "over-refusal (look-alikes)"), ("discrimination", "discrimination"))


def metric_history(run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of a run's metrics from MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient()
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def plot_curves(history: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """Loss terms on the left axis, pivot accuracy on the right."""
    if not any(history.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key in ("loss", "sft_loss", "cpo_loss", "verdict_loss"):  # verdict_loss: with train.verdict_weight > 0
        if history.get(key):
            steps, values = zip(*history[key])
            ax.plot(steps, values, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if history.get("pivot_acc"):
        right = ax.twinx()
        steps, values = zip(*history["pivot_acc"])
        right.plot(steps, values, color="black", linestyle="--", label="pivot accuracy")
        right.set_ylim(0, 1.05)
        right.set_ylabel("pivot accuracy")
        right.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("Training: SFT + CPO")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_safety(results: dict[str, dict], path: Path, title: str = "Safety on held-out prompts") -> Path:
    """Grouped bars per model with 95% interval whiskers: ASR, over-refusal, discrimination."""
    models = list(results)
    keys = [(k, label) for k, label in _RATES if any(results[m].get(k) is not None for m in models)]
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, model in enumerate(models):
        values, lows, highs = [], [], []
        for key, _ in keys:
            value = results[model].get(key)
            lo, hi = results[model].get(f"{key}_ci") or (value, value)
            value = 0.0 if value is None else value
            values.append(value)
            lows.append(max(0.0, value - (lo if lo is not None else value)))
            highs.append(max(0.0, (hi if hi is not None else value) - value))
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, values, width, yerr=[lows, highs], capsize=3, label=model)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels([label for _, label in keys], fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
    ax.set_title(f"{title} (95% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any, ci: Any = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.2f}"
    if ci and None not in ci:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text


def safety_table(results: dict[str, dict]) -> str:
    rows = ["| model | judge | n harmful / benign | ASR | over-refusal | look-alike over-refusal | discrimination "
            "| restated (benign) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, r in results.items():
        rows.append(f"| {model} | {r.get('judge', '?')} | {r.get('n_harmful')} / {r.get('n_benign')} | "
                    f"{_fmt(r.get('asr'), r.get('asr_ci'))} | {_fmt(r.get('over_refusal'), r.get('over_refusal_ci'))} | "
                    f"{_fmt(r.get('over_refusal_lookalike'), r.get('over_refusal_lookalike_ci'))} | "
                    f"{_fmt(r.get('discrimination'), r.get('discrimination_ci'))} | {_fmt(r.get('benign_restated'))} |")
    return "\n".join(rows)


def attack_table(results: dict[str, dict], trained: Sequence[str] = ()) -> str:
    attacks = sorted({a for r in results.values() for a in (r.get("asr_by_attack") or {})})
    rows = ["| attack | " + " | ".join(results) + " |", "| --- |" + " --- |" * len(results)]
    for attack in attacks:
        cells = [_fmt((r.get("asr_by_attack") or {}).get(attack)) for r in results.values()]
        rows.append(f"| {trained_mark(attack, trained)} | " + " | ".join(cells) + " |")
    return "\n".join(rows + (["", TRAINED_NOTE] if set(trained) & set(attacks) else []))


def write_report(out_dir: str | Path, *, config: dict, manifest: dict, history: dict, results: dict[str, dict],
                 decision: dict, answers: list[dict], run_ids: dict[str, str], timings: dict[str, float],
                 commit: str) -> Path:
    """Write ``demo-report.md`` plus its PNG charts into ``out_dir``; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(history, out / "training_curves.png")
    ood = {model: {**r["ood"], "judge": r.get("judge")} for model, r in results.items() if r.get("ood")}
    ood_bars = plot_safety(ood, out / "safety_ood.png", "Out of distribution: categories never trained on") \
        if ood else None
    bars = plot_safety(results, out / "safety.png", "In distribution: held-out prompts of the training sources")
    lines = [f"# R2D demo report\n\nCommit `{commit}`. Stage timings (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".\n",
             "## 1. Traces\n", f"{manifest.get('rows')} traces; by label {manifest.get('by_label')}.",
             f"Step pivots {manifest.get('step_pivots')}; answer pivots by label "
             f"{manifest.get('by_label_answer_pivot')}; repaired {manifest.get('repaired')}; "
             f"drops {manifest.get('drops')}.",
             f"Who wrote the reasoning, by label (teacher, the prompts' annotations, or the prompt-based "
             f"repair): {manifest.get('by_origin')}.\n",
             "## 2. Training\n"]
    lines.append(f"![training curves]({curves.name})\n" if curves else "No training metrics were found.\n")
    if ood:
        lines += ["## 3. Safety out of distribution (leads: whole categories never trained on)\n",
                  safety_table(ood), "", "*Restated*: benign prompts answered with nothing but the request's "
                  "words and the reasoning's framing (\"It acts on a zero-day exploit.\"): not refusals, so "
                  "over-refusal does not count them, and no help either.", "",
                  f"![safety out of distribution]({ood_bars.name})\n"]
    lines += [f"## {'4' if ood else '3'}. Safety in distribution (held-out prompts of the training sources)\n",
              safety_table(results), "", f"![safety]({bars.name})\n", "ASR by attack:\n",
              attack_table(results, (config.get("distill") or {}).get("attacks") or ()), "",
              "## Promotion\n", f"Decision: **{decision.get('decision', 'n/a')}**. {decision.get('reason', '')}\n",
              "## The API\n"]
    for answer in answers:
        lines.append(f"**{answer['label']}** prompt: {answer['prompt']!r}\n\n> {answer['content']!r}\n\n"
                     f"(pivots {answer.get('pivots')}, guarded {answer.get('guarded')})\n")
    lines += ["## MLflow\n"] + [f"- {stage}: run `{run_id}`" for stage, run_id in run_ids.items()]
    lines += ["\n## Config\n", "```json", json.dumps(config, indent=1, default=str), "```"]
    path = out / "demo-report.md"
    path.write_text("\n".join(lines))
    return path
