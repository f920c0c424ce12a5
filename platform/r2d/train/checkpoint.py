"""Training checkpoints: trained tensors, optimizer, scheduler, step and data position.

A checkpoint is a plain folder that Ray Train copies to ``storage_path`` (local,
s3:// or gs://)::

    model.pt      trained tensors only (adapter + pivot rows; all weights in full fine-tuning)
    optimizer.pt  AdamW state, keyed by parameter name
    scheduler.pt  learning-rate scheduler state
    state.json    step, epoch, windows done in the epoch, MLflow run id, dropped-row counts

``torch.distributed.checkpoint.state_dict`` keys everything by parameter name and
gathers FSDP shards, so the same files serve DDP, FSDP and a single process.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

STATE_FILE = "state.json"


def gather(model, optimizer) -> tuple[dict, dict]:
    """Full, CPU copies of the trained tensors and the optimizer state.

    Collective under FSDP: every worker must call it, even those that do not save.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_state_dict(model, optimizer, options=options)


def save(folder: str | Path, model_state: dict, optim_state: dict, scheduler, state: dict) -> Path:
    """Write a checkpoint folder (the caller hands it to ``ray.train.report``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model_state, folder / "model.pt")
    torch.save(optim_state, folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    return folder


def load(folder: str | Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer and scheduler in place; return the saved ``state.json``.

    Raises:
        FileNotFoundError: the folder is not a training checkpoint.
    """
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {STATE_FILE}; not a training checkpoint")
    model_state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    optim_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=False))
    return json.loads((folder / STATE_FILE).read_text())
