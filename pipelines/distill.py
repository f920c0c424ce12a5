"""The distillation graph: training prompts → teacher → steps → tags → repaired traces (Parquet).

One pass is a streaming Ray Data graph, consumed by the driver chunk by chunk::

    ray.data.from_items(prompt rows)                      one block per engine batch
    -> r2d.engines.generate(teacher, system prompt)       engine actors live for the pass
    -> map(r2d.distill.stages.parse_and_tag)              num_cpus=0: never waits behind the engines
    -> blocks streamed to the driver, chunk_size rows at a time:
       r2d.distill.stages.commit                          finalize, [guard re-tag], write (r2d.distill.store)
    harmful prompts still answered -> the same again with the stronger instruction

Row schema: :mod:`r2d.distill.stages`. Re-running skips prompt_ids already written; a crash
costs at most the chunk in flight. When every prompt is written already by the same teacher,
prompt, tagger and sampling, :func:`run` starts nothing and returns the manifest (``reused``).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

from r2d.data.splits import select_balanced, training_prompts
from r2d.distill import run_log, store
from r2d.distill.stages import PROMPT_KEYS, commit, parse_and_tag
from r2d.distill.teacher import stronger_prompt, system_prompt
from r2d.engines import generate
from r2d.models import load_tokenizer
from r2d.runtime import init_mlflow


_SAME_TRACES = ("teacher", "system_prompt_id", "tagger", "guard", "sampling", "max_regenerations", "on_unrepaired",
                "use_references", "max_trace_tokens")
"""The distillation settings that make the traces what they are (output folder and sizes aside)."""


def run(cfg) -> tuple[dict, dict]:
    """Distil the training prompts into ``cfg.distill.output_dir``; returns (manifest, run stats).

    Stats carry ``reused`` when the traces were all there already (nothing ran, no new MLflow run).
    """
    d = cfg.distill
    # 1. prompts: the training side of the split evaluation also uses; never the held-out side
    reports: list = []
    prompts = select_balanced(training_prompts(cfg, reports), d.max_prompts)
    existing = store.read_manifest(d.output_dir)
    if existing and not store.pending(prompts, d.output_dir) and _same_traces(existing, cfg):
        return existing, {"reused": True, "skipped_existing": len(prompts), "attempted": 0}

    # 2. tracking: one MLflow run per distillation, on the driver
    mlflow = init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)
    with mlflow.start_run(run_name=f"distill-{d.system_prompt_id}") as active:
        run_log.log_inputs(mlflow, cfg, prompts)
        history = store.read_manifest(d.output_dir).get("mlflow_run_ids", [])
        extra = {"mlflow_run_id": active.info.run_id, "mlflow_run_ids": [*history, active.info.run_id],
                 "prompt_sources": [r.as_dict() for r in reports]}

        # 3. work: stream chunks to Parquet, skipping prompt_ids already written
        manifest, stats = run_distillation(cfg, prompts, extra)

        # 4. report: metrics, the manifest artifact and the traces' lineage tags
        run_log.log_outputs(mlflow, cfg, manifest, stats, store.write_manifest(d.output_dir, manifest))
    return manifest, stats


def _same_traces(manifest: dict, cfg) -> bool:
    recorded = (manifest.get("config") or {}).get("distill") or {}
    current = cfg.to_dict()["distill"]
    return all(recorded.get(k) == current[k] for k in _SAME_TRACES)


def generated_rows(prompts: list[dict], cfg, system: str):
    """Lazy dataset: prompt rows -> teacher generation -> parsed and flagged rows."""
    import ray

    d = cfg.distill
    # One block per engine batch: every actor gets work, and finished rows stream out early.
    blocks = max(1, -(-len(prompts) // d.engine.batch_size))
    ds = ray.data.from_items([{k: p.get(k, "") for k in PROMPT_KEYS} for p in prompts], override_num_blocks=blocks)
    ds = generate(ds, d.teacher, d.engine, d.sampling, system_prompt=system)
    # Parsing is light: with no CPU reserved it never waits behind the engine actors.
    return ds.map(parse_and_tag, fn_kwargs={"max_tokens": d.sampling.max_tokens}, num_cpus=0)


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


def run_distillation(cfg, prompts: list[dict], extra: dict | None = None) -> tuple[dict, dict]:
    """Distil every prompt not yet written, streaming chunk by chunk; returns run statistics.

    Pass 0 uses the system prompt; each further pass (``max_regenerations``) re-generates,
    with the stronger instruction, the harmful prompts the previous pass left answered.
    A row is written as soon as its last pass is done, so a crash costs at most one chunk
    plus the rows waiting for a re-generation (both are simply redone by the next run).

    The manifest is rewritten after every chunk, over everything in the output folder.

    Args:
        cfg: the resolved :class:`r2d.config.Config`.
        prompts: training prompt rows (see :mod:`r2d.data.splits`).
        extra: more manifest fields (the MLflow run id).

    Returns:
        (manifest, statistics of this run).
    """
    d = cfg.distill
    pending = store.pending(prompts, d.output_dir)
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
        asked = {p["prompt_id"]: p for p in pending}
        for chunk in _chunks(generated_rows(pending, cfg, system), d.chunk_size):
            t0 = time.perf_counter()
            # The prompt's own fields come from the driver's rows, not from what the engine handed
            # back: a row the engine rejected (a prompt past the context) can return without them.
            chunk = [{**r, **{k: asked[r["prompt_id"]].get(k, "") for k in PROMPT_KEYS}} for r in chunk]
            stats["generated_tokens"] += sum(int(r["num_generated_tokens"]) for r in chunk)
            if attempt == 0:
                first_pass.update({r["prompt_id"]: r for r in chunk})
            # A failed re-generation falls back to the first answer (repaired below).
            chunk = [first_pass[r["prompt_id"]] if attempt and r["gen_error"] else r for r in chunk]
            ready = [r for r in chunk if last or not r["needs_regeneration"]]
            held += [r for r in chunk if not (last or not r["needs_regeneration"])]
            if ready:
                commit(ready, cfg, student_tok, f"{run_tag}-{number:05d}", stats)
                number += 1
                store.write_manifest(d.output_dir, store.manifest(d.output_dir, cfg.to_dict(), extra))
            busy += time.perf_counter() - t0
        pending = [{k: r.get(k, "") for k in PROMPT_KEYS} for r in held]
    stats["wall_s"] = time.perf_counter() - start
    stats["driver_busy_s"] = busy  # finalize + write, overlapping with the engines' next batches
    # End to end, engine start-up included: the figure to compare engines with.
    stats["tokens_per_s"] = stats["generated_tokens"] / stats["wall_s"] if stats["wall_s"] else 0.0
    manifest = store.manifest(d.output_dir, cfg.to_dict(), {**(extra or {}), "last_run": dict(stats)})
    store.write_manifest(d.output_dir, manifest)
    return manifest, dict(stats)
