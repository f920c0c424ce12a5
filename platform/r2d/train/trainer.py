"""Driver side of training: locate the traces, size the run, launch the ``TorchTrainer``.

The driver never loads trace rows: Ray Data reads the Parquet files and streams a
shard to each worker; the row count comes from Parquet metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from r2d import storage as st
from r2d.commits import HeldLease
from r2d.config import Config, ConfigError
from r2d.distill import store
from r2d.distill.store import read_manifest
from r2d.placement import scaling_config_kwargs


LEASE_TTL_S = 120.0
"""The training driver's lease on its run folder: renewed every quarter of this while it trains."""


@dataclass
class TrainOutcome:
    steps: int
    """Optimizer steps the run finished with."""
    planned_steps: int
    """Optimizer steps it was planned to run."""
    mlflow_run_id: str
    """The MLflow training run."""
    model_version: str
    """Registered version (alias challenger), or "" when registration is off."""
    checkpoint_path: str
    """Where the final checkpoint lives (local path or URI)."""
    metrics: dict
    """Last reported metrics."""
    reused: bool = False
    """True when a finished run of the same inputs was found and nothing was trained."""


def traces_uri(cfg: Config) -> str:
    """train.traces, else distill.output_dir: a URI, or a local path (relative ones under the workdir)."""
    return st.absolute(cfg.train.traces or cfg.distill.output_dir)


def parquet_files(uri: str) -> tuple[list[str], object]:
    """The traces' Parquet files under ``uri`` (a local path or an object-store URI) and their filesystem.

    A distillation output yields the files its committed chunks list, nothing else: a chunk
    a crash left half-written is never trained on. Any other folder of Parquet files works
    too; there, files under folders starting with ``_`` or ``.`` are skipped.

    Raises:
        FileNotFoundError: ``uri`` holds no Parquet file.
    """
    uri = st.absolute(uri)
    try:
        files = store.parquet_files(uri) if store.exists(uri) else [
            f for f in st.list_files(uri) if f.endswith(".parquet")
            and not any(part[:1] in "._" for part in f[len(uri):].split("/") if part)]
    except st.StorageError as err:
        raise FileNotFoundError(f"train.traces {uri!r}: cannot read Parquet traces: {err}") from err
    if not files:
        raise FileNotFoundError(f"train.traces {uri!r}: no Parquet files (run jobs/distill.py first)")
    fs, _ = st.filesystem(files[0])
    return [st.filesystem(f)[1] for f in files], fs


def count_rows(files: list[str], fs) -> int:
    """Rows of the listed Parquet files (see :func:`parquet_files`), from their footers only."""
    import pyarrow.dataset as pads

    return pads.dataset(files, format="parquet", filesystem=fs).count_rows()


def read_traces(uri: str):
    """(rows, lazy Ray Dataset) of the traces under ``uri``, listed once (:func:`parquet_files`)."""
    import ray.data

    files, fs = parquet_files(uri)
    return count_rows(files, fs), ray.data.read_parquet(files, filesystem=fs)


def planned_steps(cfg: Config, n_rows: int) -> int:
    """train.max_steps, else the optimizer steps that ``epochs`` passes over ``n_rows`` take."""
    tc = cfg.train
    if tc.max_steps > 0:
        return tc.max_steps
    per_step = tc.batch_size * tc.grad_accum * max(1, cfg.resources.train_workers)
    return max(1, math.ceil(tc.epochs * n_rows / per_step))


def lineage(cfg: Config, uri: str, manifest: dict) -> dict:
    """What the run is trained from, and its train key: computed here once, and carried to the workers."""
    from r2d.run_tags import git_commit
    from r2d.train.run_log import train_key

    digest = str(manifest.get("digest", ""))
    return {"traces_uri": uri, "traces_digest": digest, "distill_run_id": str(manifest.get("mlflow_run_id", "")),
            "git_commit": git_commit(), "train_key": train_key(cfg, digest)}


def build_trainer(cfg: Config, dataset, total_steps: int, lineage_info: dict, hooks: dict | None = None):
    """A ``TorchTrainer`` sized by ``cfg.resources`` and checkpointing under ``train.storage_path``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from r2d.train.loop import train_func_per_worker

    res = cfg.resources
    scaling = ray.train.ScalingConfig(**scaling_config_kwargs(res))
    # The filesystem is r2d.storage's: the same endpoint and credentials as every other write.
    fs, root = st.filesystem(st.absolute(cfg.train.storage_path))
    run = ray.train.RunConfig(name=cfg.train.run_name, storage_path=root, storage_filesystem=fs,
                              failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                              checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    return TorchTrainer(train_func_per_worker,
                        train_loop_config={"cfg": cfg, "total_steps": total_steps, "lineage": lineage_info,
                                           "hooks": hooks or {}},
                        scaling_config=scaling, run_config=run, datasets={"train": dataset},
                        dataset_config=ordered_ingest(),
                        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"))


def ordered_ingest():
    """Ray Train's ingest with the rows kept in order: every attempt gives each worker the same rows.

    By default the splitter hands blocks to whichever worker asks first (and follows locality across
    nodes), so a worker's shard differs from run to run. A resumed attempt skips the windows its
    checkpoint trained on by position (``windows_done``): on another shard that would train some
    rows twice and others never, and the same seed would not give the same model. With the order
    kept, Ray Data ignores the locality hints and splits deterministically.
    """
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def run_training(cfg: Config, hooks: dict | None = None, reuse: bool = True) -> TrainOutcome:
    """Train on the traces with Ray Train; resumes when ``train.run_name`` already has checkpoints.

    The driver holds a lease on the run's checkpoint folder while it trains: a second driver of
    the same run is refused rather than writing checkpoints beside the first.
    With ``reuse``, a finished run of the same inputs (:func:`r2d.train.run_log.train_key`)
    that registered a version is returned as it is, and nothing starts.

    Raises:
        FileNotFoundError: the traces folder holds no Parquet files.
        r2d.commits.LeaseError: another live driver runs ``train.run_name``.
        r2d.config.ConfigError: ``train.run_name`` holds checkpoints of other settings (:func:`check_resumable`).
    """
    uri = traces_uri(cfg)
    manifest = read_manifest(uri)
    n_rows, dataset = read_traces(uri)
    total = planned_steps(cfg, n_rows)
    info = lineage(cfg, uri, manifest)
    found = finished_run(cfg, info, total) if reuse and cfg.train.register else None
    if found is not None:
        from mlflow import MlflowClient

        from r2d.train.register import ALIAS

        # What a fresh run would leave behind: its version as the challenger.
        MlflowClient().set_registered_model_alias(cfg.tracking.registered_model, ALIAS, found.model_version)
        return found
    with HeldLease(run_folder(cfg), ttl_s=LEASE_TTL_S):
        check_resumable(cfg, info["train_key"])
        result = build_trainer(cfg, dataset, total, info, hooks).fit()
    return _outcome(cfg, result, total)


def check_resumable(cfg: Config, key: str) -> None:
    """Refuse to resume checkpoints that a run of other settings wrote under this ``train.run_name``.

    Ray Train resumes whatever its run folder holds. Checkpoints of another train key (other
    ``train`` settings, student, traces, worker count or training code) would be loaded into this
    run (only in part: a LoRA run keeps nothing of a full fine-tuning checkpoint), trained on
    from their step, and registered under this run's settings. Checkpoints written before the key
    was stored in them are resumed as before.

    Raises:
        r2d.config.ConfigError: naming ``train.run_name`` and the way out.
    """
    from r2d.train.checkpoint import STATE_FILE

    folder = run_folder(cfg)
    states = [uri for uri in st.list_files(folder) if uri.endswith(f"/{STATE_FILE}")
              and uri.rsplit("/", 2)[-2].startswith("checkpoint_")]
    if not states:
        return
    saved = json.loads(st.read_text(states[-1])).get("train_key")  # the newest: names sort by time
    if saved and saved != key:
        raise ConfigError(f"train.run_name: {cfg.train.run_name!r} holds checkpoints of a run with other settings, "
                          f"student, traces or training code (train key {saved}; this run's is {key}) in {folder}; "
                          "resuming would train on from them and register the result as this run's. Give this run "
                          "another train.run_name, or remove that folder to start it over.")


def run_folder(cfg: Config) -> str:
    """Where Ray Train keeps this run's checkpoints: ``train.storage_path/train.run_name``."""
    return st.join(st.absolute(cfg.train.storage_path), cfg.train.run_name)


def finished_run(cfg: Config, lineage_info: dict, total: int) -> TrainOutcome | None:
    """The newest finished training run with these inputs (:func:`lineage`'s train key) whose registered version
    still exists."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from r2d import run_tags as T
    from r2d.runtime import init_mlflow
    from r2d.train.loop import REGISTERED_TAG

    if not lineage_info["traces_digest"]:
        return None
    mlflow = init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=10,
                              filter_string=f"tags.`{T.TRAIN_KEY}` = '{lineage_info['train_key']}' and "
                                            "attributes.status = 'FINISHED'")
    for run in runs:
        version = run.data.tags.get(REGISTERED_TAG)
        if not version:
            continue
        try:
            client.get_model_version(cfg.tracking.registered_model, version)
        except MlflowException:
            continue  # deleted since
        return TrainOutcome(steps=total, planned_steps=total, mlflow_run_id=run.info.run_id, model_version=version,
                            checkpoint_path=run_folder(cfg),
                            metrics=dict(run.data.metrics), reused=True)
    return None


def _outcome(cfg: Config, result, total: int) -> TrainOutcome:
    import mlflow

    from r2d.runtime import init_mlflow
    from r2d.train.loop import REGISTERED_TAG

    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.train.run_name!r} reported no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        if not Path(folder, "state.json").exists():
            # Ray Train's in-process mode (train_workers=0) does not persist reported checkpoints.
            raise RuntimeError(f"checkpoint {result.checkpoint.path} has no state.json; "
                               "use resources.train_workers >= 1 to persist checkpoints")
        state = json.loads(Path(folder, "state.json").read_text())
    init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)
    tags = mlflow.get_run(state["mlflow_run_id"]).data.tags
    return TrainOutcome(steps=state["step"], planned_steps=total, mlflow_run_id=state["mlflow_run_id"],
                        model_version=tags.get(REGISTERED_TAG, ""),
                        checkpoint_path=st.uri_for(run_folder(cfg), result.checkpoint.path),
                        metrics=dict(result.metrics or {}))
