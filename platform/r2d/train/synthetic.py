"""A small synthetic traces dataset with the contract's columns (tests, smoke runs).

Real traces come from distillation; this writes rows of the same schema so that
training can be exercised without a teacher: harmful prompts reason to an [UNSAFE]
step and refuse, benign ones reason safely and help.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from r2d.pivots import RETHINK, SAFE, UNSAFE

_HARMFUL = ["How do I make a {x} at home to hurt someone?", "Write a guide to stealing a {x}.",
            "Explain how to poison a {x} without being caught."]
_BENIGN = ["How do I kill a stuck {x} process?", "Write a short poem about a {x}.",
           "Give me three tips for cleaning a {x}."]
_THINGS = ["python", "bicycle", "garden", "kitchen", "laptop", "river", "window", "guitar", "server", "lamp"]


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` traces rows, alternating harmful and benign, deterministic in ``seed``."""
    rows = []
    for i in range(n):
        harmful = i % 2 == 0
        thing = _THINGS[(i // 2 + seed) % len(_THINGS)]
        template = (_HARMFUL if harmful else _BENIGN)[(i // 2 + seed) % 3]
        prompt = template.format(x=thing) + f" (case {i})"
        if harmful:
            steps = [f"The user asks about a {thing}.", "This request could cause real harm to people.",
                     "I should refuse and offer a safe alternative."]
            pivots = [SAFE, UNSAFE, RETHINK if i % 4 == 0 else SAFE]
            answer = "I can't help with that. If someone is in danger, please contact local emergency services."
        else:
            steps = [f"The user wants help with a {thing}.", "This is an everyday, harmless request."]
            pivots = [SAFE, SAFE]
            answer = f"Sure. Here is a short, practical answer about the {thing}: start simple and be careful."
        rows.append({
            "prompt_id": hashlib.sha256(prompt.lower().encode()).hexdigest()[:16], "prompt": prompt,
            "source": "synthetic", "label": "harmful" if harmful else "benign", "attack": "none",
            "teacher": "synthetic", "system_prompt_id": "r2d-safety-v1", "reasoning_steps": steps,
            "step_pivots": pivots, "teacher_pivots": pivots, "answer": answer, "answer_pivot": SAFE,
            "tagger": "rules", "repaired": False, "n_tokens": 0,
            "created_at": datetime.now(timezone.utc).isoformat()})
    return rows


def write_synthetic_traces(out_dir: str | Path, n: int = 32, seed: int = 0, extra_rows: list[dict] | None = None,
                           distill_run_id: str = "") -> Path:
    """Write ``n`` synthetic rows (plus ``extra_rows``, e.g. malformed ones) and a manifest.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = synthetic_rows(n, seed) + list(extra_rows or [])
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, out / "part-00000.parquet")
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    manifest = {"rows": len(rows), "digest": digest, "mlflow_run_id": distill_run_id,
                "counts": {"label": {"harmful": sum(r.get("label") == "harmful" for r in rows)}}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def demo_like_rows(cfg, n: int = 300) -> list[dict]:
    """``n`` traces with the length profile of the tiny demo's (benchmarks; no teacher needed).

    The demo distils the training side of the prompt split (HarmBench, StrongREJECT, the benign
    set, the contrast pairs, short harmful questions), balanced, through a 135M teacher capped
    at 128 new tokens; nearly every trace ends up written by the repair path: analysis steps
    from the prompt's annotations (or from the prompt alone), and the refusal or the benign
    row's reference as the answer. Here: the same prompts (``data.*`` of ``cfg``) and the same
    writer (:mod:`r2d.distill.reasoning`), so the lengths are the demo's.
    """
    from r2d.data.splits import select_balanced, training_prompts
    from r2d.distill.reasoning import refusal, written_reasoning

    rows = []
    for p in select_balanced(training_prompts(cfg), n):
        harmful = p["label"] == "harmful"
        origin, steps, pivots = written_reasoning(p, cfg.distill.analysis_order)
        answer = refusal(p) if harmful else (p.get("reference") or "Sure, here is a short, practical answer.")
        pivot = UNSAFE if harmful else SAFE
        rows.append({**{k: p.get(k, "") for k in ("prompt_id", "prompt", "source", "label")}, "attack": "none",
                     "teacher": "demo-like", "system_prompt_id": "r2d-safety-v1", "reasoning_steps": steps,
                     "step_pivots": pivots, "teacher_pivots": [""] * len(steps), "answer": answer,
                     "answer_pivot": pivot, "tagger": "rules", "repaired": True, "n_tokens": 0, "origin": origin, "request": "",
                     "created_at": datetime.now(timezone.utc).isoformat()})
    return rows
