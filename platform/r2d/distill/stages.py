"""Distillation's row and chunk stages: plain callables, tested by calling them.

Row schema through them (the Ray Data graph in ``pipelines/distill.py`` calls them)::

    prompt row    {prompt_id, prompt, source, label, category, lookalike, reference, attack}
    + engine      generated_text, num_generated_tokens, gen_error           (r2d.engines)
    parse_and_tag + reasoning_steps, teacher_pivots, answer, truncated,
                    synthesised, needs_regeneration                          (tagging, repair)
    finalize      -> keep: a traces row (r2d.distill.store.SCHEMA) | drop: {prompt_id, label,
                    reason, detail} | error: {prompt_id, error}
    commit        a chunk: finalized, guard re-tagged (tagger guard), written (store)
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from r2d.distill import reasoning, repair, store, tagging
from r2d.pivots import Trace, render_conversation

PROMPT_KEYS = ("prompt_id", "prompt", "source", "label", "category", "lookalike", "reference", "attack",
               "intent", "target", "deciding")


def parse_and_tag(row: dict, max_tokens: int) -> dict:
    """Ray Data map stage: the teacher's text as steps, with a candidate answer and flags."""
    row = dict(row)
    got = tagging.teacher_steps(row.get("generated_text") or "", row["label"])
    row["reasoning_steps"] = got.steps
    row["teacher_pivots"] = got.teacher_pivots
    row["answer"] = got.answer
    row["truncated"] = int(row.get("num_generated_tokens") or 0) >= max_tokens
    row["synthesised"] = got.synthesised
    row["needs_regeneration"] = not row.get("gen_error") and repair.needs_regeneration(row["label"], got.answer)
    return row


def finalize(row: dict, cfg, student_tok) -> tuple[str, dict]:
    """Apply the repair rules and the filters; returns (keep|drop|error, trace row or record).

    The teacher's trace is kept when it reasoned and its answer stands. Otherwise the answer is
    repaired by the rules (:mod:`r2d.distill.repair`) and the reasoning is written for the prompt
    (:mod:`r2d.distill.reasoning`): from its annotations, else from the prompt itself. The
    trace's ``origin`` says which.
    """
    d = cfg.distill
    if row.get("gen_error"):
        return "error", {"prompt_id": row["prompt_id"], "error": str(row["gen_error"])[:500]}
    if not str(row.get("prompt") or "").strip():
        return "drop", _drop(row, repair.EMPTY_PROMPT)
    if row["label"] == "harmful":
        action, answer, repaired = repair.decide_harmful(row["answer"], d.on_unrepaired, reasoning.refusal(row))
    else:
        action, answer, repaired = repair.decide_benign(row["answer"], bool(row["truncated"]),
                                                        row.get("reference") or "", d.use_references)
        if action == repair.BENIGN_UNUSABLE and not (row.get("generated_text") or "").strip():
            action = repair.EMPTY_OUTPUT
    if action not in ("keep", "repair"):
        return "drop", _drop(row, action)
    steps = [str(s) for s in row["reasoning_steps"]]
    if steps and not repaired and not row.get("synthesised"):
        origin = "teacher"
        pivots, answer_pivot = tagging.rules_tag(steps, row["label"], str(row["prompt"]))
    else:
        origin, steps, pivots = reasoning.written_reasoning(row)
        answer_pivot = pivots[-1]
    try:
        trace = Trace(steps, pivots, answer, answer_pivot)
    except ValueError as err:
        return "drop", _drop(row, repair.MALFORMED, str(err))
    n_tokens = len(student_tok(render_conversation(student_tok, row["prompt"], trace)).input_ids)
    if n_tokens > d.max_trace_tokens:
        return "drop", _drop(row, repair.TOO_LONG)
    return "keep", {**{k: str(row.get(k) or "") for k in ("prompt_id", "prompt", "source", "label")},
                    "attack": row.get("attack") or "none", "teacher": d.teacher.source,
                    "system_prompt_id": d.system_prompt_id, "reasoning_steps": steps, "step_pivots": pivots,
                    "teacher_pivots": [str(p) for p in row["teacher_pivots"]], "answer": answer,
                    "answer_pivot": answer_pivot, "tagger": d.tagger, "repaired": repaired or origin != "teacher",
                    "origin": origin, "n_tokens": n_tokens, "created_at": store.now()}


def _drop(row: dict, reason: str, detail: str = "") -> dict:
    return {"prompt_id": row["prompt_id"], "label": row["label"], "reason": reason, "detail": detail}


def commit(rows: list[dict], cfg, student_tok, tag: str, stats: Counter) -> None:
    """Finalize, (guard re-tag,) and write one chunk; count what happened."""
    d = cfg.distill
    out: dict[str, list] = {"keep": [], "drop": [], "error": []}
    for row in rows:
        action, record = finalize(row, cfg, student_tok)
        out[action].append(record)
    if d.tagger == "guard" and out["keep"]:
        greedy = dataclasses.replace(d.sampling, temperature=0.0, max_tokens=16, repetition_penalty=1.0)
        out["keep"] = tagging.guard_tag(out["keep"], d.guard, d.guard_engine, greedy)
    store.write_chunk(out["keep"], out["drop"], d.output_dir, tag)
    store.append_errors(out["error"], d.output_dir)
    stats.update(written=len(out["keep"]), dropped=len(out["drop"]), errors=len(out["error"]),
                 synthesised=sum(bool(r["synthesised"]) for r in rows))
