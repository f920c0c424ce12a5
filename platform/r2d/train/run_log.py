"""MLflow for the training run (called on rank 0 only).

The run carries the resolved config as params, the per-step metrics, the lineage
tags (traces digest, distillation run, base model, config digest, git commit) and
the traces as a dataset input. A resumed attempt re-opens the same run (its id is
stored in the checkpoint), so one training shows as one run with the resume marked.
"""

from __future__ import annotations

import json

from r2d import run_tags as T
from r2d.config import Config
from r2d.config import flatten as config_flatten


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys with string values; lists and mappings as JSON."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for k, v in config_flatten(tree, prefix).items()}


# What a training run executes: a change here is a different model, so a finished run is not reused.
# (What wrote the traces is covered by their content digest.)
TRAINING_SOURCE = ("train", "losses.py", "pivots.py", "models.py")


def train_key(cfg: Config, traces_digest: str) -> str:
    """A digest of everything a training run's result depends on: the same key, the same model.

    The student, every ``train`` setting but where checkpoints go, the worker count (it sets
    the global batch), the traces' content digest and the source of the code that trains
    (:data:`TRAINING_SOURCE`).
    """
    import dataclasses
    import hashlib

    from r2d.runtime import source_digest

    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("storage_path", "traces")}
    payload = {"model": dataclasses.asdict(cfg.model), "train": train, "traces_digest": traces_digest,
               "workers": cfg.resources.train_workers, "use_gpu": cfg.resources.use_gpu,
               "code": source_digest(*TRAINING_SOURCE)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lineage_tags(cfg: Config, lineage: dict, pivot_ids: dict[str, int] | None = None) -> dict[str, str]:
    """The lineage contract's tags for the training run and the model version."""
    out = {
        T.TRAIN_KEY: lineage["train_key"],  # the driver's (r2d.train.trainer.lineage)
        T.STAGE: "train",
        T.CONFIG_DIGEST: cfg.digest(),
        T.GIT_COMMIT: lineage.get("git_commit", "unknown"),
        T.BASE_MODEL: cfg.model.source,
        T.TRACES_URI: lineage.get("traces_uri", ""),
        T.TRACES_DIGEST: lineage.get("traces_digest", ""),
        T.DISTILL_RUN_ID: lineage.get("distill_run_id", ""),
    }
    if pivot_ids:
        out[T.PIVOT_IDS] = json.dumps(pivot_ids, sort_keys=True)
    return out


def start_run(cfg: Config, lineage: dict, pivot_ids: dict[str, int], run_id: str | None = None) -> str:
    """Open the training run: a new one, or ``run_id`` again on resume. Returns the run id."""
    from r2d.runtime import init_mlflow

    mlflow = init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)
    if run_id:
        mlflow.start_run(run_id=run_id)
        return run_id
    run = mlflow.start_run(run_name=cfg.train.run_name, tags=lineage_tags(cfg, lineage, pivot_ids))
    params = flatten(cfg.to_dict())
    mlflow.log_params({k: v[:6000] for k, v in params.items()})
    log_traces_input(lineage.get("traces_uri", ""), lineage.get("traces_digest", ""))
    return run.info.run_id


def log_traces_input(uri: str, digest: str) -> None:
    """Record the traces as the run's training dataset, by reference (rows are never loaded here)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if not uri:
        return
    source = resolve_dataset_source(uri)
    dataset = MetaDataset(source=source, name="traces", digest=(digest or None) and digest[:36])
    mlflow.log_input(dataset, context="training")


def log_metrics(metrics: dict[str, float], step: int) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def end_run() -> None:
    import mlflow

    mlflow.end_run()
