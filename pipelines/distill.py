"""Distillation pipeline: training prompts → teacher → steps → tags → repaired traces (Parquet).

Library parts: r2d.prompt_sets (the shared split), r2d.distill (the streaming Ray Data
graph and the resumable chunk loop), r2d.traces (schema, chunks, manifest).
"""

from __future__ import annotations

from r2d import traces
from r2d.distill import log_inputs, log_outputs, run_distillation
from r2d.prompt_sets import select_balanced, training_prompts
from r2d.runtime import init_mlflow


def run(cfg) -> tuple[dict, dict]:
    """Distil the training prompts into ``cfg.distill.output_dir``; returns (manifest, run stats)."""
    d = cfg.distill
    # 1. prompts: the training side of the split evaluation also uses; never the held-out side
    reports: list = []
    prompts = select_balanced(training_prompts(cfg, reports), d.max_prompts)

    # 2. tracking: one MLflow run per distillation, on the driver
    mlflow = init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)
    with mlflow.start_run(run_name=f"distill-{d.system_prompt_id}") as active:
        log_inputs(mlflow, cfg, prompts)
        history = traces.read_manifest(d.output_dir).get("mlflow_run_ids", [])
        extra = {"mlflow_run_id": active.info.run_id, "mlflow_run_ids": [*history, active.info.run_id],
                 "prompt_sources": [r.as_dict() for r in reports]}

        # 3. work: stream chunks to Parquet, skipping prompt_ids already written
        manifest, stats = run_distillation(cfg, prompts, extra)

        # 4. report: metrics, the manifest artifact and the traces' lineage tags
        log_outputs(mlflow, cfg, manifest, stats, traces.write_manifest(d.output_dir, manifest))
    return manifest, stats
