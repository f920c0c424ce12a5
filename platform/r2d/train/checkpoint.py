"""Training checkpoints: trained tensors, optimizer, scheduler, step and data position.

A checkpoint is a plain folder that Ray Train copies to ``storage_path`` (local,
s3:// or gs://)::

    model.pt      trained tensors only (adapter + pivot rows; all weights in full fine-tuning)
    optimizer.pt  AdamW state, keyed by parameter name
    scheduler.pt  learning-rate scheduler state
    state.json    step, epoch, windows done in the epoch, MLflow run id, dropped-row counts

``torch.distributed.checkpoint.state_dict`` keys everything by parameter name and
gathers FSDP shards, so the same files serve DDP, FSDP and a single process.

Every file loads with ``weights_only=True``: tensors and plain containers only. A full
unpickle would run whatever code a file names, and checkpoint storage (a bucket, an NFS
share) is written by more hands than the code is; such a file is refused with
:class:`CheckpointError`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

STATE_FILE = "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint file holds more than tensors and plain containers (or is not a torch file at all)."""


def _load_tensors(path: Path):
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: refused to load: it is not a plain tensor checkpoint (weights_only "
                              f"loading failed: {str(err).splitlines()[0][:300]}). A planted or foreign file? "
                              "Only tensors and plain containers are loaded from checkpoints.") from None


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
        CheckpointError: a file holds anything but tensors and plain containers.
    """
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {STATE_FILE}; not a training checkpoint")
    model_state = _load_tensors(folder / "model.pt")
    optim_state = _load_tensors(folder / "optimizer.pt")
    scheduler_state = _load_tensors(folder / "scheduler.pt")
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(scheduler_state)
    return json.loads((folder / STATE_FILE).read_text())
