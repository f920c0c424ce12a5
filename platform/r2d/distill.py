"""Safety-aware reasoning distillation, one chunk of prompts at a time.

One pass (a streaming Ray Data graph, consumed by the driver)::

    prompt rows -> generate(teacher, system prompt)        r2d.engines (actors live for the pass)
                -> parse_and_tag                            r2d.tagger
                -> streamed to the driver, chunk_size rows at a time:
                   finalize: repair / drop / count tokens   r2d.repair, r2d.tagger.rules_tag
                   [guard re-tagging]                       r2d.tagger.guard_tag
                   write_chunk (Parquet via Ray Data)       r2d.traces
    harmful prompts still answered -> the same again with the stronger instruction

:func:`run_distillation` skips prompt_ids already written and calls back after every
chunk (the pipeline rewrites the manifest there).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import Counter

from r2d import repair, tagger, traces
from r2d.config import flatten
from r2d.pivots import Trace, render_conversation
from r2d.teacher import stronger_prompt, system_prompt

PROMPT_KEYS = ("prompt_id", "prompt", "source", "label", "category", "lookalike", "reference", "attack")


def parse_and_tag(row: dict, max_tokens: int) -> dict:
    """Ray Data map stage: the teacher's text as steps, with a candidate answer and flags."""
    row = dict(row)
    got = tagger.teacher_steps(row.get("generated_text") or "", row["label"])
    row["reasoning_steps"] = got.steps
    row["teacher_pivots"] = got.teacher_pivots
    row["answer"] = got.answer
    row["truncated"] = int(row.get("num_generated_tokens") or 0) >= max_tokens
    row["synthesised"] = got.synthesised
    row["needs_regeneration"] = not row.get("gen_error") and repair.needs_regeneration(row["label"], got.answer)
    return row


def generated_rows(prompts: list[dict], cfg, system: str):
    """Lazy dataset: prompt rows -> teacher generation -> parsed and flagged rows."""
    import ray

    from r2d.engines import generate

    d = cfg.distill
    # One block per engine batch: every actor gets work, and finished rows stream out early.
    blocks = max(1, -(-len(prompts) // d.engine.batch_size))
    ds = ray.data.from_items([{k: p.get(k, "") for k in PROMPT_KEYS} for p in prompts], override_num_blocks=blocks)
    ds = generate(ds, d.teacher, d.engine, d.sampling, system_prompt=system)
    # Parsing is light: with no CPU reserved it never waits behind the engine actors.
    return ds.map(parse_and_tag, fn_kwargs={"max_tokens": d.sampling.max_tokens}, num_cpus=0)


def finalize(row: dict, cfg, student_tok) -> tuple[str, dict]:
    """Apply the repair rules and the filters; returns (keep|drop|error, trace row or record)."""
    d = cfg.distill
    if row.get("gen_error"):
        return "error", {"prompt_id": row["prompt_id"], "error": str(row["gen_error"])[:500]}
    steps = [str(s) for s in row["reasoning_steps"]]
    if row["label"] == "harmful":
        action, answer, repaired = repair.decide_harmful(row["answer"], d.on_unrepaired)
    else:
        action, answer, repaired = repair.decide_benign(row["answer"], bool(row["truncated"]),
                                                        row.get("reference") or "", d.use_references)
        if action == repair.BENIGN_UNUSABLE and not (row.get("generated_text") or "").strip():
            action = repair.EMPTY_OUTPUT
    if action not in ("keep", "repair"):
        return "drop", _drop(row, action)
    if not steps:
        return "drop", _drop(row, repair.NO_PIVOTS)
    pivots, answer_pivot = tagger.rules_tag(steps, row["label"], str(row["prompt"]))
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
                    "answer_pivot": answer_pivot, "tagger": d.tagger, "repaired": repaired,
                    "n_tokens": n_tokens, "created_at": traces.now()}


def _drop(row: dict, reason: str, detail: str = "") -> dict:
    return {"prompt_id": row["prompt_id"], "label": row["label"], "reason": reason, "detail": detail}


def _chunks(ds, size: int):
    """Rows of a streaming dataset, ``size`` at a time, as soon as their blocks are done.

    ``iter_rows`` is not used: its prefetch window holds each block back until the next ones
    exist, so with a few slow engine blocks in flight nothing would be committed until the
    end. Reading the output blocks as they arrive keeps the crash window at one chunk.
    """
    import ray
    from ray.data.block import BlockAccessor

    chunk: list[dict] = []
    for bundle in ds.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            for row in BlockAccessor.for_block(ray.get(entry.ref)).iter_rows(public_row_format=True):
                chunk.append(dict(row))
                if len(chunk) == size:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def _commit(rows: list[dict], cfg, student_tok, tag: str, stats: Counter) -> None:
    """Finalize, (guard re-tag,) and write one chunk; count what happened."""
    d = cfg.distill
    out: dict[str, list] = {"keep": [], "drop": [], "error": []}
    for row in rows:
        action, record = finalize(row, cfg, student_tok)
        out[action].append(record)
    if d.tagger == "guard" and out["keep"]:
        greedy = dataclasses.replace(d.sampling, temperature=0.0, max_tokens=16, repetition_penalty=1.0)
        out["keep"] = tagger.guard_tag(out["keep"], d.guard, d.guard_engine, greedy)
    traces.write_chunk(out["keep"], out["drop"], d.output_dir, tag)
    traces.append_errors(out["error"], d.output_dir)
    stats.update(written=len(out["keep"]), dropped=len(out["drop"]), errors=len(out["error"]),
                 synthesised=sum(bool(r["synthesised"]) for r in rows))


def run_distillation(cfg, prompts: list[dict], extra: dict | None = None) -> tuple[dict, dict]:
    """Distil every prompt not yet written, streaming chunk by chunk; returns run statistics.

    Pass 0 uses the system prompt; each further pass (``max_regenerations``) re-generates,
    with the stronger instruction, the harmful prompts the previous pass left answered.
    A row is written as soon as its last pass is done, so a crash costs at most one chunk
    plus the rows waiting for a re-generation (both are simply redone by the next run).

    The manifest is rewritten after every chunk, over everything in the output folder.

    Args:
        cfg: the resolved :class:`r2d.config.Config`.
        prompts: training prompt rows (see :mod:`r2d.prompt_sets`).
        extra: more manifest fields (the MLflow run id).

    Returns:
        (manifest, statistics of this run).
    """
    from r2d.models import load_tokenizer

    d = cfg.distill
    pending = traces.pending(prompts, d.output_dir)
    student_tok = load_tokenizer(cfg.model.source, cfg.model.cache_dir, cfg.model.offline)
    run_tag, stats = uuid.uuid4().hex[:8], Counter(skipped_existing=len(prompts) - len(pending),
                                                   attempted=len(pending))
    first_pass: dict[str, dict] = {}
    number, start, busy = 0, time.perf_counter(), 0.0
    for attempt in range(d.max_regenerations + 1):
        if not pending:
            break
        system = system_prompt(d.system_prompt_id) if attempt == 0 else stronger_prompt(d.system_prompt_id)
        last, held = attempt == d.max_regenerations, []
        stats["regenerated"] += len(pending) if attempt else 0
        for chunk in _chunks(generated_rows(pending, cfg, system), d.chunk_size):
            t0 = time.perf_counter()
            stats["generated_tokens"] += sum(int(r["num_generated_tokens"]) for r in chunk)
            if attempt == 0:
                first_pass.update({r["prompt_id"]: r for r in chunk})
            # A failed re-generation falls back to the first answer (repaired below).
            chunk = [first_pass[r["prompt_id"]] if attempt and r["gen_error"] else r for r in chunk]
            ready = [r for r in chunk if last or not r["needs_regeneration"]]
            held += [r for r in chunk if not (last or not r["needs_regeneration"])]
            if ready:
                _commit(ready, cfg, student_tok, f"{run_tag}-{number:05d}", stats)
                number += 1
                traces.write_manifest(d.output_dir, traces.manifest(d.output_dir, cfg.to_dict(), extra))
            busy += time.perf_counter() - t0
        pending = [{k: r.get(k, "") for k in PROMPT_KEYS} for r in held]
    stats["wall_s"] = time.perf_counter() - start
    stats["driver_busy_s"] = busy  # finalize + write, overlapping with the engines' next batches
    # End to end, engine start-up included: the figure to compare engines with.
    stats["tokens_per_s"] = stats["generated_tokens"] / stats["wall_s"] if stats["wall_s"] else 0.0
    manifest = traces.manifest(d.output_dir, cfg.to_dict(), {**(extra or {}), "last_run": dict(stats)})
    traces.write_manifest(d.output_dir, manifest)
    return manifest, dict(stats)


# ---------------------------------------------------------------- MLflow (driver only)

def log_inputs(mlflow, cfg, prompts: list[dict]) -> None:
    """Params from the resolved config, the prompt set as a dataset input, and lineage tags."""
    import json

    import pandas as pd

    from r2d import tags
    from r2d.prompt_sets import prompts_digest, source_specs

    params = flatten({k: cfg.to_dict()[k] for k in ("model", "data", "distill")})
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    frame = pd.DataFrame([{k: p.get(k, "") for k in ("prompt_id", "prompt", "source", "label", "attack")}
                          for p in prompts])
    from mlflow.data.code_dataset_source import CodeDatasetSource

    digest = prompts_digest(prompts)
    # The prompts come from code plus config, not from a file: say so instead of a fake path.
    source = CodeDatasetSource({"function": "r2d.prompt_sets.training_prompts", "sources": source_specs(cfg),
                                "eval_fraction": cfg.data.eval_fraction, "seed": cfg.data.seed})
    dataset = mlflow.data.from_pandas(frame, source=source, name="prompts", digest=digest)
    mlflow.log_input(dataset, context="prompts")
    d = cfg.distill
    mlflow.set_tags({tags.STAGE: "distill", tags.CONFIG_DIGEST: cfg.digest(), tags.GIT_COMMIT: tags.git_commit(),
                     tags.TEACHER: d.teacher.source, tags.TAGGER: d.tagger, tags.SYSTEM_PROMPT_ID: d.system_prompt_id,
                     tags.PROMPT_SOURCES: json.dumps(source_specs(cfg)), tags.PROMPTS_DIGEST: digest})


def log_outputs(mlflow, cfg, manifest: dict, stats: dict, manifest_path) -> None:
    """Metrics (rows, drops, pivots, tokens/s), the manifest artifact and the traces lineage tags."""
    from pathlib import Path

    from r2d import tags

    metrics = {"rows": manifest["rows"], "repaired": manifest["repaired"],
               "teacher_pivots_missing": manifest["teacher_pivots_missing"], "errors": manifest["errors"],
               "tokens_per_s": stats.get("tokens_per_s", 0.0), "generated_tokens": stats.get("generated_tokens", 0),
               "regenerated": stats.get("regenerated", 0), "written_this_run": stats.get("written", 0),
               "wall_s": stats.get("wall_s", 0.0)}
    metrics.update({f"drops.{k}": v for k, v in manifest["drops"].items()})
    total = sum(manifest["step_pivots"].values()) or 1
    for pivot, count in manifest["step_pivots"].items():
        name = pivot.strip("[]").lower()
        metrics[f"pivots.{name}"] = count
        metrics[f"pivots.{name}_share"] = count / total
    metrics.update({f"rows.{k}": v for k, v in manifest["by_label"].items()})
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.log_artifact(str(manifest_path))
    uri = Path(cfg.distill.output_dir).resolve().as_uri()
    mlflow.set_tags({tags.TRACES_URI: uri, tags.TRACES_DIGEST: manifest["digest"]})
