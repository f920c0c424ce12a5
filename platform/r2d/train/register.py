"""Export the trained model as merged weights and register it as ``challenger``.

Why merged weights, not the adapter: a PeftModel whose base is a local folder reloads
with silently re-initialised weights, and vLLM rejects (and dies on) adapters that
carry embedding or LM-head tensors, which the trained pivot rows are. A plain Hugging
Face folder with the resized vocabulary loads the same in transformers and vLLM.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from r2d import run_tags as T
from r2d.config import Config
from r2d.train.model import build_model, load_trainable_state, merged_model

ALIAS = "challenger"


def export_merged(cfg: Config, model_state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Rebuild the student on CPU, load the trained tensors, merge, and save a HF folder.

    Rebuilding from the gathered state (rather than merging the live model) works the
    same for DDP, FSDP and one process, and proves the checkpoint alone makes the model.
    """
    cpu_cfg = replace(cfg, train=replace(cfg.train, gradient_checkpointing=False))
    model, tok, _ = build_model(cpu_cfg, "cpu")
    load_trainable_state(model, model_state)
    merged = merged_model(model)
    out = Path(out_dir)
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def register(cfg: Config, folder: str | Path, run_id: str, version_tags: dict[str, str]) -> str:
    """Log ``folder`` as run artifact ``model/``, create a registry version, alias it challenger.

    Returns:
        The new version number (as a string).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = cfg.tracking.registered_model
    mlflow.log_artifacts(str(folder), artifact_path="model")
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already registered by an earlier run
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={**version_tags, T.TRAIN_RUN_ID: run_id})
    client.set_registered_model_alias(name, ALIAS, version.version)
    return str(version.version)


def export_and_register(cfg: Config, model_state: dict, run_id: str, version_tags: dict[str, str]) -> str:
    """Both steps, through a temporary folder; returns the registered version."""
    with tempfile.TemporaryDirectory(prefix="r2d-export-") as tmp:
        folder = export_merged(cfg, model_state, Path(tmp) / "model")
        (folder / "r2d_lineage.json").write_text(json.dumps(version_tags, indent=2, sort_keys=True))
        return register(cfg, folder, run_id, version_tags)
