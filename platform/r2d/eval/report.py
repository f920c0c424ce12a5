"""Evaluation reports: the ``--output`` JSON, a Markdown report, PNG charts and a side-by-side table.

Input is the results mapping :func:`r2d.eval.evaluate.evaluate_models` builds,
``{model name: result entry}``, where an entry holds the summary from
:func:`r2d.eval.runner.score` plus judge, generation and lineage fields. Every
rate is a fraction in [0, 1] (or None when no prompt measured it), every rate
carries its 95% interval, and every number names the judge that produced it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from collections.abc import Sequence
from typing import Any

__all__ = ["output_json", "plot_asr_by_attack", "plot_safety", "render_markdown", "side_by_side", "write_report"]

_KEYS = ("asr", "asr_ci", "asr_by_attack", "asr_by_attack_ci", "over_refusal", "over_refusal_ci",
         "over_refusal_by_attack", "over_refusal_by_attack_ci",
         "over_refusal_lookalike", "over_refusal_lookalike_ci", "n_lookalike", "benign_restated",
         "benign_restated_ci", "discrimination", "discrimination_ci", "n_harmful", "n_benign", "judge", "judges",
         "output_filter", "raw", "pivots",
         "mean_output_tokens", "tokens_per_s", "generation_seconds", "n_prompts", "n_judged", "dropped",
         "engine", "model_uri", "model_version", "system_prompt", "baseline_of", "suite_digest", "held_out",
         "contamination", "general", "run_id", "parent_run_id", "eval_key", "reused", "ood", "by_suite",
         "in_distribution_empty")


def output_json(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ``--output`` structure: per model, the numbers without the per-prompt records."""
    out = {}
    for name, entry in results.items():
        out[name] = {k: _plain(entry[k]) for k in _KEYS if k in entry}
    return out


def _plain(value: Any) -> Any:
    """Tuples → lists so the structure equals its JSON round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _signed(value: float | None, ci) -> str:
    return "n/a" if value is None else f"{value:+.2f}" + ("" if not ci else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]")


def side_by_side(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table for the end of the job's output: out of distribution first, then in distribution."""
    header = ("model", "prompts", "n_harm", "n_ben", "ASR [95% CI]", "over-refusal", "look-alike OR",
              "restated", "discrimination", "pivot acc", "judge")
    rows = [header]
    ordered = [(name, "out of distribution", e["ood"], e) for name, e in results.items() if e.get("ood")]
    ordered += [(name, "in distribution", e, e) for name, e in results.items() if not e.get("in_distribution_empty")]
    for name, side, e, entry in ordered:
        piv = (entry.get("pivots") or {}).get("pivot_accuracy")
        rows.append((name, side, str(e.get("n_harmful", 0)), str(e.get("n_benign", 0)),
                     _pct(e.get("asr")) + _ci(e.get("asr_ci")),
                     _pct(e.get("over_refusal")) + _ci(e.get("over_refusal_ci")),
                     _pct(e.get("over_refusal_lookalike")), _pct(e.get("benign_restated")),
                     _signed(e.get("discrimination"), e.get("discrimination_ci")),
                     _pct(piv), str(entry.get("judge", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- charts

def _errors(values: list[float | None], cis: list) -> list[list[float]]:
    """Matplotlib yerr rows (below, above) from intervals; a missing value gets no bar."""
    # max(0, ·): float noise can put a rate of exactly 0 or 1 a hair outside its own interval.
    lo = [max(0.0, v - c[0]) if v is not None and c else 0.0 for v, c in zip(values, cis)]
    hi = [max(0.0, c[1] - v) if v is not None and c else 0.0 for v, c in zip(values, cis)]
    return [lo, hi]


def _grouped_bars(ax, groups: list[str], series: dict[str, tuple[list, list]]) -> None:
    import numpy as np

    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, (values, cis)) in enumerate(series.items()):
        heights = [0.0 if v is None else v for v in values]
        ax.bar(x + i * width - 0.4 + width / 2, heights, width, yerr=_errors(values, cis), capsize=3, label=label)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=8)


def plot_asr_by_attack(results: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """ASR per attack, model against model, with 95% Wilson error bars. None if no harmful prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({a for e in results.values() for a in (e.get("asr_by_attack") or {})})
    if not attacks:
        return None
    series = {name: ([e.get("asr_by_attack", {}).get(a) for a in attacks] + [e.get("asr")],
                     [e.get("asr_by_attack_ci", {}).get(a) for a in attacks] + [e.get("asr_ci")])
              for name, e in results.items()}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * (len(attacks) + 1) * max(1, len(results)) ** 0.5), 4.2))
    _grouped_bars(ax, attacks + ["all"], series)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("attack success rate")
    judge = next(iter(results.values())).get("judge", "")
    ax.set_title(f"ASR by attack (judge: {judge}; bars: 95% Wilson)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_safety(results: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """Over-refusal (benign, look-alike) and discrimination per model with 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("over_refusal", "over-refusal"), ("over_refusal_lookalike", "look-alike over-refusal"),
               ("discrimination", "discrimination")]
    metrics = [(k, label) for k, label in metrics if any(e.get(k) is not None for e in results.values())]
    if not metrics:
        return None
    series = {name: ([e.get(k) for k, _ in metrics], [e.get(f"{k}_ci") for k, _ in metrics])
              for name, e in results.items()}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _grouped_bars(ax, [label for _, label in metrics], series)
    ax.set_ylim(-1.05 if any(v is not None and v < 0 for vs, _ in series.values() for v in vs) else 0, 1.05)
    ax.set_title("Over-refusal and discrimination (refused harmful - refused benign)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------- markdown

def trained_mark(attack: str, trained: Sequence[str]) -> str:
    """An attack's name, marked when its template was in the training mix (``distill.attacks``)."""
    return f"{attack} (trained)" if attack in trained else attack


TRAINED_NOTE = ("*(trained)*: the attack's template wrapped some training prompts (`distill.attacks`); the "
                "requests it wraps here are held out. The other attacks were never trained on.")


def _wrapped_benign(results: dict[str, dict[str, Any]]) -> bool:
    """Were benign prompts evaluated in the attacks' wrappers (``wrapped_benign``)? A refusal there is over-refusal."""
    return any(e.get("over_refusal_by_attack") for e in results.values())


def _attack_table(results: dict[str, dict[str, Any]], trained: Sequence[str] = ()) -> list[str]:
    attacks = sorted({a for e in results.values() for a in (e.get("asr_by_attack") or {})})
    if not attacks:
        return ["No harmful prompts were evaluated: no ASR."]
    names = list(results)
    benign = _wrapped_benign(results)
    header = [f"{n}: ASR | {n}: benign refused" for n in names] if benign else names
    lines = ["| attack | " + " | ".join(header) + " |", "|---|" + "---|" * len(names) * (1 + benign)]

    def cell(e: dict[str, Any], key: str, a: str) -> str:
        total = "asr" if key == "asr_by_attack" else "over_refusal"
        if a == "all":
            return _pct(e.get(total)) + _ci(e.get(f"{total}_ci"))
        return _pct((e.get(key) or {}).get(a)) + _ci((e.get(f"{key}_ci") or {}).get(a))

    for a in attacks + ["all"]:
        cells = [cell(e, key, a) for e in results.values()
                 for key in (("asr_by_attack", "over_refusal_by_attack") if benign else ("asr_by_attack",))]
        lines.append(f"| {trained_mark(a, trained)} | " + " | ".join(cells) + " |")
    return lines + (["", TRAINED_NOTE] if set(trained) & set(attacks) else [])


def _suite_table(results: dict[str, dict[str, Any]], suites: list[dict[str, Any]]) -> list[str]:
    ood = {s["name"]: s.get("ood", False) for s in suites}
    lines = ["| suite | side | model | n harmful / benign | ASR | over-refusal | discrimination |",
             "|---|---|---|---|---|---|---|"]
    for suite in sorted(ood, key=lambda s: (not ood[s], s)):
        for name, e in results.items():
            n = (e.get("by_suite") or {}).get(suite)
            if n:
                lines.append(f"| `{suite}` | {'OOD' if ood[suite] else 'in dist.'} | {name} | "
                             f"{n.get('n_harmful', 0)} / {n.get('n_benign', 0)} | {_pct(n.get('asr'))}{_ci(n.get('asr_ci'))} | "
                             f"{_pct(n.get('over_refusal'))}{_ci(n.get('over_refusal_ci'))} | "
                             f"{_signed(n.get('discrimination'), n.get('discrimination_ci'))} |")
    return lines


def _detail_table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| model | raw-text ASR | raw-text over-refusal | [UNSAFE] share | [RETHINK] share | pivot accuracy "
             "| mean output tokens | tokens/s | dropped |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in results.items():
        raw, piv = e.get("raw") or {}, e.get("pivots") or {}
        dropped = ", ".join(f"{k}: {v}" for k, v in (e.get("dropped") or {}).items()) or "0"
        tokens = e.get("mean_output_tokens")
        lines.append(f"| {name} | {_pct(raw.get('asr'))} | {_pct(raw.get('over_refusal'))} | "
                     f"{_pct(piv.get('unsafe_share'))} | {_pct(piv.get('rethink_share'))} | "
                     f"{_pct(piv.get('pivot_accuracy'))}{_ci(piv.get('pivot_accuracy_ci'))} | "
                     f"{'n/a' if tokens is None else f'{tokens:.1f}'} | {e.get('tokens_per_s')} | {dropped} |")
    return lines


def _verdict_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """The model's verdict (its last pivot) against its answer, out of distribution first."""
    lines = ["The verdict is the last pivot the model writes. *Follows*: refused after `[UNSAFE]` or answered after "
             "`[SAFE]`. *Verdict discrimination*: what discrimination would be if every answer followed its verdict; "
             "far above the headline, the model decides better than it answers.", "",
             "| model | prompts | verdicts | answer follows verdict | refused after [SAFE] | answered after [UNSAFE] "
             "| verdict discrimination |", "|---|---|---|---|---|---|---|"]
    for name, e in results.items():
        for where, v in (("out of distribution", e.get("ood")), ("all", e.get("pivots"))):
            if not v or not v.get("n_verdicts"):
                continue
            lines.append(f"| {name} | {where} | {v['n_verdicts']} | "
                         f"{_pct(v.get('answer_follows_verdict'))}{_ci(v.get('answer_follows_verdict_ci'))} | "
                         f"{_pct(v.get('refused_after_safe'))} | {_pct(v.get('answered_after_unsafe'))} | "
                         f"{_signed(v.get('verdict_discrimination'), v.get('verdict_discrimination_ci'))} |")
    return lines


def _contamination_lines(meta: dict[str, Any]) -> list[str]:
    c = meta.get("contamination") or {}
    if not c.get("checked"):
        return [f"Not checked: {c.get('reason', 'no traces dataset')}. The prompts' held-out status is unverified."]
    lines = [f"Compared {c['n_eval']} evaluation prompts (before attacks) with {c['n_train']} training-trace prompts "
             f"in `{c['traces']}`: **{c['exact']} exact** (after normalisation) and **{c['near']} near-duplicate** "
             f"(word 3-gram similarity ≥ {c['threshold']})."]
    if c["exact"] or c["near"]:
        lines.append("**These numbers are NOT held-out**: contamination was allowed explicitly "
                     "(eval.allow_contamination). Examples:")
        lines += [f"- eval `{ex['eval_prompt'][:90]}` ~ train `{ex['train_prompt'][:90]}`" for ex in c["examples"]]
    else:
        lines.append("No overlap: the numbers are on held-out prompts.")
    return lines


def _judge_lines(meta: dict[str, Any]) -> list[str]:
    q = meta.get("judge_quality")
    if not q:
        return ["Not measured."]
    lines = [f"On the project's {q['n']} labelled answers (refusals in many phrasings, the model's own trained "
             "ones among them; full and partial compliance; refusal then compliance; empty and truncated): "
             f"precision **{_pct(q['precision'])}**, recall **{_pct(q['recall'])}**, accuracy {_pct(q['accuracy'])}."]
    if q["errors"]:
        lines.append("Where it errs:")
        lines += [f"- {'missed refusal' if e['refused'] else 'false refusal'} ({e['kind']}): `{e['answer'][:100]}`"
                  for e in q["errors"][:6]]
    return lines


def render_markdown(results: dict[str, dict[str, Any]], meta: dict[str, Any], charts: dict[str, str]) -> str:
    """The Markdown report: setup, headline table, per-attack ASR, details, contamination, ability."""
    first = next(iter(results.values()))
    suites = "\n".join(f"- `{s['name']}` ({'out of distribution' if s.get('ood') else 'in distribution'}; "
                       f"{s['source']}): {s['n_harmful']} harmful, {s['n_benign']} benign"
                       + (f"; skipped {s['skipped']}" if s.get("skipped") else "") for s in meta["suites"])
    filt = first.get("output_filter", "none")
    lines = [f"# R2D evaluation `{meta['suite_digest']}`", "",
             f"Created {meta.get('created_at', '')}; config digest `{meta.get('config_digest', '')}`; "
             f"git `{meta.get('git_commit', '')[:12]}`.", "", "## Setup", "", suites, "",
             f"- Judges: " + ", ".join(f"{k}: `{v}`" for k, v in first.get("judges", {}).items()),
             f"- Output filter: **{filt}**" + ("" if filt == "none" else
                                                " (applied before judging; numbers describe model + filter)"),
             "- Headline numbers judge the **visible answer** (reasoning and pivots stripped); the raw-text "
             "columns judge the whole output with the keyword judge.",
             "- *Restated*: benign prompts answered with nothing but the request's or the reasoning's own words "
             "(\"It acts on a zero-day exploit.\"): not refusals, so not in over-refusal, and no help either.",
             "- Discrimination = refusal rate on harmful - refusal rate on benign (Newcombe 95% interval); "
             "intervals are 95% Wilson.",
             "- **Out of distribution** means prompts built independently of the training data: whole categories "
             "never trained on (`ood_categories`) and published benchmark files. It leads, because a defence "
             "that only knows its own training distribution is not a defence.", "",
             "## Side by side", "", "```", side_by_side(results), "```", "",
             "## By suite", "", *_suite_table(results, meta["suites"]), "",
             "## ASR by attack (in distribution)" + (
                 ", and benign prompts in the same wrappers (`wrapped_benign`)"
                 if _wrapped_benign(results) else ""), "",
             *_attack_table(results, meta.get("trained_attacks") or ()), ""]
    lines += [f"![{k}]({v})" for k, v in charts.items()] + [""]
    lines += ["## Raw text, pivots, generation", "", *_detail_table(results), "",
              "## Does the answer follow the verdict?", "", *_verdict_table(results), "",
              "Throughput is end to end (engine start included).", "", "## Contamination", "",
              *_contamination_lines(meta), "", "## The keyword judge, measured", "", *_judge_lines(meta), "",
              "## General ability", ""]
    for name, e in results.items():
        g = e.get("general") or {"status": "skipped", "reason": "not run"}
        lines.append(f"- {name}: " + (f"skipped: {g['reason']}" if g["status"] == "skipped" else
                                      f"{g['ability']:.3f} (" + ", ".join(f"{t}: {v['metric']} {v['value']:.3f}"
                                                                         for t, v in g["tasks"].items()) + ")"))
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def write_report(results: dict[str, dict[str, Any]], out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write report.md, the PNG charts, results.json and per-model records under ``out_dir``.

    Returns:
        Name → path of everything written (``report``, ``json``, chart names, ``records:<model>``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    # Numbers and records first: they are what an expensive run must never lose.
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(output_json(results), indent=2) + "\n")
    for name, entry in results.items():
        path = out / "records" / f"{_slug(name)}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in entry.get("records", [])))
        paths[f"records:{name}"] = path
    for key, plot in (("asr_by_attack", plot_asr_by_attack), ("safety", plot_safety)):
        written = plot(results, out / f"{key}.png")
        if written:
            paths[key] = written
    charts = {k: p.name for k, p in paths.items() if p.suffix == ".png"}
    paths["report"] = out / "report.md"
    paths["report"].write_text(render_markdown(results, meta, charts))
    return paths
