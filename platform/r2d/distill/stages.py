"""Distillation's row and chunk stages: plain callables, tested by calling them.

Row schema through them (the Ray Data graph in ``pipelines/distill.py`` calls them)::

    prompt row    {prompt_id, prompt, source, label, category, lookalike, reference, attack, ...,
                   first_pass}                                               ("" on the first pass)
    + engine      generated_text, num_generated_tokens, gen_error           (r2d.engines)
    parse_and_tag + reasoning_steps, teacher_pivots, answer, truncated,
                    synthesised, needs_regeneration                          (tagging, repair)
    Finalize      -> {prompt_id, kind, record (JSON), tokens, synthesised} where kind and record are
                    keep: a traces row (r2d.distill.store.SCHEMA) | drop: {prompt_id, label, reason,
                    detail} | error: {prompt_id, error} | held: the prompt row, for a re-generation
    [GuardStage]  keep records re-tagged by the guard (tagger guard; r2d.distill.guard)
    commit        (driver) a chunk's keep, drop and error records committed together (store)
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime

from r2d.distill import reasoning, repair, store, tagging
from r2d.pivots import Trace, render_conversation

PROMPT_KEYS = ("prompt_id", "prompt", "source", "label", "category", "lookalike", "reference", "attack",
               "intent", "target", "deciding", "request")
FIRST_PASS = "first_pass"
"""Column of a re-generated prompt's row: the first answer (JSON), the fallback when re-generation fails."""


def parse_and_tag(row: dict, max_tokens: int) -> dict:
    """Ray Data map stage: the teacher's text as steps, with a candidate answer and flags.

    A failed re-generation falls back to the prompt's first answer (repaired later if it must be).
    """
    row = dict(row)
    if row.get("gen_error") and row.get(FIRST_PASS):
        first = json.loads(row[FIRST_PASS])
        row.update(generated_text=first["generated_text"], num_generated_tokens=first["num_generated_tokens"],
                   gen_error="")
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
        action, answer, repaired = repair.decide_harmful(row["answer"], d.on_unrepaired,
                                                         reasoning.refusal(row, d.refusals))
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
        origin, steps, pivots = reasoning.written_reasoning(row, d.analysis_order)
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
                    "origin": origin, "n_tokens": n_tokens, "created_at": store.now(),
                    "request": str(row.get("request") or "")}


def _drop(row: dict, reason: str, detail: str = "") -> dict:
    return {"prompt_id": row["prompt_id"], "label": row["label"], "reason": reason, "detail": detail}


class Finalize:
    """Ray Data stage: repair and filter each row into its record (the student's tokenizer loaded once).

    On a pass that is not the last, a harmful prompt still answered is ``held`` for the next
    pass, with its first answer kept as the fallback.
    """

    def __init__(self, cfg, last_pass: bool) -> None:
        from r2d.models import load_tokenizer

        self.cfg, self.last_pass = cfg, last_pass
        self.tokenizer = load_tokenizer(cfg.model.source, cfg.model.cache_dir, cfg.model.offline)

    def __call__(self, row: dict) -> dict:
        if not self.last_pass and row["needs_regeneration"]:
            first = row.get(FIRST_PASS) or json.dumps({"generated_text": row.get("generated_text") or "",
                                                       "num_generated_tokens": int(row.get("num_generated_tokens")
                                                                                   or 0)})
            kind, record = "held", {**{k: row.get(k, "") for k in PROMPT_KEYS}, FIRST_PASS: first}
        else:
            kind, record = finalize(row, self.cfg, self.tokenizer)
        return {"prompt_id": row["prompt_id"], "kind": kind, "record": json.dumps(record, default=str),
                "tokens": int(row.get("num_generated_tokens") or 0), "synthesised": bool(row.get("synthesised"))}


def commit(rows: list[dict], cfg, tag: str, stats: Counter, lease=None) -> None:
    """Commit one chunk of finalized rows (keep, drop and error records together); count what happened."""
    out: dict[str, list] = {"keep": [], "drop": [], "error": []}
    for row in rows:
        record = json.loads(row["record"])
        if row["kind"] == "keep":
            record["created_at"] = datetime.fromisoformat(record["created_at"])
        out[row["kind"]].append(record)
    store.commit_chunk(out["keep"], out["drop"], out["error"], cfg.distill.output_dir, tag, lease)
    stats.update(written=len(out["keep"]), dropped=len(out["drop"]), errors=len(out["error"]),
                 synthesised=sum(bool(r["synthesised"]) for r in rows))
