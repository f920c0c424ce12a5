"""MLflow records of a distillation run (driver only): inputs, outputs, lineage tags."""

from __future__ import annotations

import json
from pathlib import Path

from r2d import run_tags as T
from r2d.config import flatten
from r2d.data.splits import prompts_digest, source_specs
from r2d.distill.store import location


def log_inputs(mlflow, cfg, prompts: list[dict]) -> None:
    """Params from the resolved config, the prompt set as a dataset input, and lineage tags."""
    import pandas as pd

    params = flatten({k: cfg.to_dict()[k] for k in ("model", "data", "distill")})
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    frame = pd.DataFrame([{k: p.get(k, "") for k in ("prompt_id", "prompt", "source", "label", "attack")}
                          for p in prompts])
    from mlflow.data.code_dataset_source import CodeDatasetSource

    digest = prompts_digest(prompts)
    # The prompts come from code plus config, not from a file: say so instead of a fake path.
    source = CodeDatasetSource({"function": "r2d.data.splits.training_prompts", "sources": source_specs(cfg),
                                "eval_fraction": cfg.data.eval_fraction, "seed": cfg.data.seed})
    dataset = mlflow.data.from_pandas(frame, source=source, name="prompts", digest=digest)
    mlflow.log_input(dataset, context="prompts")
    d = cfg.distill
    mlflow.set_tags({T.STAGE: "distill", T.CONFIG_DIGEST: cfg.digest(), T.GIT_COMMIT: T.git_commit(),
                     T.TEACHER: d.teacher.source, T.TAGGER: d.tagger, T.SYSTEM_PROMPT_ID: d.system_prompt_id,
                     T.PROMPT_SOURCES: json.dumps(source_specs(cfg)), T.PROMPTS_DIGEST: digest})


def log_outputs(mlflow, cfg, manifest: dict, stats: dict) -> None:
    """Metrics (rows, drops, pivots, tokens/s), the manifest artifact and the traces lineage tags."""
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
    mlflow.log_dict(manifest, "manifest.json")
    uri = location(cfg.distill.output_dir)
    uri = Path(uri).as_uri() if "://" not in uri else uri
    mlflow.set_tags({T.TRACES_URI: uri, T.TRACES_DIGEST: manifest["digest"]})
