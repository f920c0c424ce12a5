"""The distillation graph: training prompts → teacher → steps → tags → repaired traces (Parquet).

One pass is a streaming Ray Data graph, consumed by the driver chunk by chunk::

    ray.data.from_items(prompt rows)                      one block per engine batch
    -> r2d.engines.generate(teacher, system prompt)       engine actors live for the pass
    -> map(r2d.distill.stages.parse_and_tag)              num_cpus=0: never waits behind the engines
    -> map(r2d.distill.stages.Finalize)                   repair, filter, count tokens: one record per row
    -> [map_batches(r2d.distill.guard.GuardStage)]        tagger guard: the run's guard engines re-tag steps
    -> blocks streamed to the driver, chunk_size rows at a time:
       r2d.distill.stages.commit                          keep, drop and error records: one commit
    harmful prompts still answered -> the same again with the stronger instruction

The driver holds the lease on ``distill.output_dir`` for the whole run (a second driver of the
same output is refused), and the guard engines live for the whole run (they load once, not
once per pass or chunk). Row schema: :mod:`r2d.distill.stages`. Re-running skips prompt_ids
already committed; a crash costs at most the chunk in flight. When every prompt is committed already by the same teacher,
prompt, tagger and sampling, :func:`run` starts nothing and returns the manifest (``reused``); a folder whose traces
were made under other trace-defining settings is refused (:func:`changed_settings`), never topped up.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections import Counter

from r2d import commits
from r2d.config import ConfigError
from r2d.data.attacks import attacked_share
from r2d.data.splits import select_balanced, training_prompts
from r2d.distill import guard, run_log, store
from r2d.distill.stages import FIRST_PASS, PROMPT_KEYS, Finalize, commit, parse_and_tag
from r2d.distill.teacher import stronger_prompt, system_prompt
from r2d.engines import generate
from r2d.runtime import init_mlflow

MANIFEST_EVERY_S = 30.0
"""Rewrite the manifest at most this often while a run goes on (it reads every committed chunk)."""


_SAME_TRACES = ("teacher", "system_prompt_id", "tagger", "guard", "sampling", "max_regenerations", "on_unrepaired",
                "use_references", "max_trace_tokens", "analysis_order", "attacks", "attack_fraction", "refusals")
"""The distillation settings that make the traces what they are (output folder and sizes aside)."""


def run(cfg) -> tuple[dict, dict]:
    """Distil the training prompts into ``cfg.distill.output_dir``; returns (manifest, run stats).

    Stats carry ``reused`` when the traces were all there already (nothing ran, no new MLflow run).

    Raises:
        r2d.config.ConfigError: ``distill.output_dir`` holds traces made under other settings.
        r2d.commits.LeaseError: another live driver is writing ``distill.output_dir``.
    """
    d = cfg.distill
    # Resuming under other settings would mix two kinds of traces under a manifest naming one.
    existing = store.read_manifest(d.output_dir)
    changed = changed_settings(existing, cfg) if existing else {}
    if changed:
        diffs = "; ".join(f"{k}: {there!r} there, {here!r} here" for k, (there, here) in changed.items())
        raise ConfigError(f"distill.output_dir: {d.output_dir} holds traces made with other settings ({diffs}); "
                          "give these settings their own distill.output_dir, or delete that folder to distil again")
    # 1. prompts: the training side of the split evaluation also uses; never the held-out side
    reports: list = []
    prompts = training_set(cfg, reports)
    if existing and not store.pending(prompts, d.output_dir):
        return existing, {"reused": True, "skipped_existing": len(prompts), "attempted": 0}
    # 2. the output: this driver alone writes it, until the run ends (a second one is refused here)
    with commits.HeldLease(store.location(d.output_dir), ttl_s=d.lease_ttl_s) as lease:
        # 3. tracking: one MLflow run per distillation, on the driver
        mlflow = init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)
        with mlflow.start_run(run_name=f"distill-{d.system_prompt_id}") as active:
            run_log.log_inputs(mlflow, cfg, prompts)
            history = store.read_manifest(d.output_dir).get("mlflow_run_ids", [])
            extra = {"mlflow_run_id": active.info.run_id, "mlflow_run_ids": [*history, active.info.run_id],
                     "prompt_sources": [r.as_dict() for r in reports]}

            # 4. work: stream chunks to Parquet, skipping prompt_ids already committed
            manifest, stats = run_distillation(cfg, prompts, extra, lease)

            # 5. report: metrics, the manifest artifact and the traces' lineage tags
            run_log.log_outputs(mlflow, cfg, manifest, stats)
    return manifest, stats


def training_set(cfg, reports: list | None = None) -> list[dict]:
    """The prompts distillation turns into traces: the training side, balanced and capped at
    ``distill.max_prompts``, a share wrapped in ``distill.attacks``.

    Raises:
        r2d.config.ConfigError: naming ``distill.attacks`` when an attack is unknown.
    """
    d = cfg.distill
    prompts = select_balanced(training_prompts(cfg, reports), d.max_prompts)
    try:
        return attacked_share(prompts, d.attacks, d.attack_fraction, seed=cfg.data.seed)
    except ValueError as err:
        raise ConfigError(f"distill.attacks: {err}") from None


def changed_settings(manifest: dict, cfg) -> dict[str, tuple]:
    """The trace-defining settings (:data:`_SAME_TRACES`) that differ between a manifest and ``cfg``:
    {dotted name: (recorded, current)}, down to the key that differs inside a section. A setting a
    manifest predates counts as its default."""
    recorded = (manifest.get("config") or {}).get("distill") or {}
    current, defaults = cfg.to_dict()["distill"], dataclasses.asdict(type(cfg.distill)())
    changed: dict[str, tuple] = {}
    for key in _SAME_TRACES:
        there, here = recorded.get(key, defaults[key]), current[key]
        if isinstance(there, dict) and isinstance(here, dict):
            changed |= {f"{key}.{k}": (there.get(k), here.get(k)) for k in sorted({*there, *here})
                        if there.get(k) != here.get(k)}
        elif there != here:
            changed[key] = (there, here)
    return changed


def generated_rows(prompts: list[dict], cfg, system: str, last_pass: bool = True, guards: list | None = None):
    """Lazy dataset: prompt rows -> teacher generation -> parsed -> finalized records [-> guard re-tagged]."""
    import ray

    d = cfg.distill
    # One block per engine batch: every actor gets work, and finished rows stream out early.
    blocks = max(1, -(-len(prompts) // d.engine.batch_size))
    items = [{**{k: p.get(k, "") for k in PROMPT_KEYS}, FIRST_PASS: p.get(FIRST_PASS, "")} for p in prompts]
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = generate(ds, d.teacher, d.engine, d.sampling, system_prompt=system)
    # The prompt's own fields come from the driver's rows, not from what the engine handed back:
    # a row the engine rejected (a prompt past the context) can return without them.
    asked = {p["prompt_id"]: {k: p.get(k, "") for k in PROMPT_KEYS} for p in prompts}
    ds = ds.map(_restore_prompt, fn_kwargs={"asked": ray.put(asked)}, num_cpus=0)
    # Parsing is light: with no CPU reserved it never waits behind the engine actors.
    ds = ds.map(parse_and_tag, fn_kwargs={"max_tokens": d.sampling.max_tokens}, num_cpus=0)
    # So is finalizing, and it reserves no CPU either: an engine may hold every CPU of the node.
    ds = ds.map(Finalize, fn_constructor_kwargs={"cfg": cfg, "last_pass": last_pass},
                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    if guards:
        ds = ds.map_batches(guard.GuardStage, fn_constructor_kwargs={"guards": guards},
                            compute=ray.data.ActorPoolStrategy(size=len(guards)), num_cpus=0,
                            batch_size=d.guard_engine.batch_size, batch_format="numpy")
    return ds


_ASKED: dict = {}
"""The driver's prompt fields by prompt_id, fetched once per worker process and pass."""


def _restore_prompt(row: dict, asked) -> dict:
    import ray

    if isinstance(asked, dict):  # already resolved by Ray
        return {**row, **asked[row["prompt_id"]]}
    key = asked.hex()
    if key not in _ASKED:
        _ASKED.clear()
        _ASKED[key] = ray.get(asked)
    return {**row, **_ASKED[key][row["prompt_id"]]}


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


def run_distillation(cfg, prompts: list[dict], extra: dict | None = None,
                     lease: commits.HeldLease | None = None) -> tuple[dict, dict]:
    """Distil every prompt not yet committed, streaming chunk by chunk; returns run statistics.

    Pass 0 uses the system prompt; each further pass (``max_regenerations``) re-generates,
    with the stronger instruction, the harmful prompts the previous pass left answered.
    A row is committed as soon as its last pass is done, so a crash costs at most one chunk
    plus the rows waiting for a re-generation (both are simply redone by the next run).

    Args:
        cfg: the resolved :class:`r2d.config.Config`.
        prompts: training prompt rows (see :mod:`r2d.data.splits`).
        extra: more manifest fields (the MLflow run id).
        lease: the lease on ``distill.output_dir`` when the caller holds it; else taken here.

    Returns:
        (manifest, statistics of this run).

    Raises:
        r2d.commits.LeaseError: another live driver is writing ``distill.output_dir``.
    """
    out = store.location(cfg.distill.output_dir)
    if lease is not None:
        return _distil(cfg, prompts, extra or {}, out, lease)
    with commits.HeldLease(out, ttl_s=cfg.distill.lease_ttl_s) as held:
        return _distil(cfg, prompts, extra or {}, out, held)


def _distil(cfg, prompts: list[dict], extra: dict, out: str, lease) -> tuple[dict, dict]:
    d = cfg.distill
    pending = store.pending(prompts, out)
    run_tag, stats = uuid.uuid4().hex[:8], Counter(skipped_existing=len(prompts) - len(pending),
                                                   attempted=len(pending))
    guards = guard.start_guards(cfg) if d.tagger == "guard" and pending else []
    engines: set[str] = set()
    number, start, busy, written_at = 0, time.perf_counter(), 0.0, time.monotonic()
    try:
        for attempt in range(d.max_regenerations + 1):
            if not pending:
                break
            system = system_prompt(d.system_prompt_id) if attempt == 0 else stronger_prompt(d.system_prompt_id)
            last, held = attempt == d.max_regenerations, []
            stats["regenerated"] += len(pending) if attempt else 0
            for chunk in _chunks(generated_rows(pending, cfg, system, last, guards), d.chunk_size):
                t0 = time.perf_counter()
                stats["generated_tokens"] += sum(int(r["tokens"]) for r in chunk)
                engines |= {r["guard_engine"] for r in chunk if r.get("guard_engine")}
                held += [json.loads(r["record"]) for r in chunk if r["kind"] == "held"]
                ready = [r for r in chunk if r["kind"] != "held"]
                if ready:
                    commit(ready, cfg, f"{run_tag}-{number:05d}", stats, lease)
                    number += 1
                    if time.monotonic() - written_at >= MANIFEST_EVERY_S:
                        store.write_manifest(out, store.manifest(out, cfg.to_dict(), extra))
                        written_at = time.monotonic()
                busy += time.perf_counter() - t0
            pending = held
    finally:
        guard.stop_guards(guards)
    stats["chunks"] = number
    if guards:
        stats["guard_engines"] = len(engines)  # engines that answered over the whole run: one each
    stats["wall_s"] = time.perf_counter() - start
    stats["driver_busy_s"] = busy  # commits, overlapping with the engines' next batches
    # End to end, engine start-up included: the figure to compare engines with.
    stats["tokens_per_s"] = stats["generated_tokens"] / stats["wall_s"] if stats["wall_s"] else 0.0
    manifest = store.manifest(out, cfg.to_dict(), {**extra, "last_run": dict(stats)})
    store.write_manifest(out, manifest)
    return manifest, dict(stats)
