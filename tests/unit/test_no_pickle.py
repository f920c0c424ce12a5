"""No pickle on the way in: checkpoints load tensors only, models load from safetensors only.

Whoever can write to checkpoint storage or a model folder must not be able to run code in
the trainer or a serving replica. Each test plants a payload that would create a marker
file when unpickled, and shows it refused with an error that says why, the marker absent.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from r2d.config import EngineConfig, ModelConfig
from r2d.engines.vllm_engine import engine_args
from r2d.models import ModelSourceError, load_model
from r2d.train import checkpoint
from r2d.train.steps import make_optimizer


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _checkpoint(folder):
    model = torch.nn.Linear(4, 4)
    optimizer, scheduler = make_optimizer(model, 1e-3, 0.0, "cosine", 0.1, 10)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    model_state, optim_state = checkpoint.gather(model, optimizer)
    checkpoint.save(folder, model_state, optim_state, scheduler, {"step": 1, "epoch": 0})
    return model, optimizer, scheduler


def test_a_clean_checkpoint_round_trips(tmp_path):
    model, optimizer, scheduler = _checkpoint(tmp_path / "ckpt")
    fresh = torch.nn.Linear(4, 4)
    fresh_opt, fresh_sched = make_optimizer(fresh, 1e-3, 0.0, "cosine", 0.1, 10)
    state = checkpoint.load(tmp_path / "ckpt", fresh, fresh_opt, fresh_sched)
    assert state["step"] == 1 and torch.equal(fresh.weight, model.weight)
    assert fresh_sched.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 1


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "scheduler.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    _checkpoint(tmp_path / "ckpt")
    torch.save({"state": Payload(marker), "param_groups": []}, tmp_path / "ckpt" / name)
    fresh = torch.nn.Linear(4, 4)
    optimizer, scheduler = make_optimizer(fresh, 1e-3, 0.0, "cosine", 0.1, 10)
    with pytest.raises(checkpoint.CheckpointError, match=f"{name}: refused to load: it is not a plain tensor"):
        checkpoint.load(tmp_path / "ckpt", fresh, optimizer, scheduler)
    assert not marker.exists()


def _pickled_model(tiny_model_dir, folder, marker):
    shutil.copytree(tiny_model_dir, folder)
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "payload": Payload(marker)}, folder / "pytorch_model.bin")
    return folder


def test_a_model_with_pickle_weights_is_refused(tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = _pickled_model(tiny_model_dir, tmp_path / "model", marker)
    with pytest.raises(ModelSourceError, match="holds pytorch_model.bin; pickle weights are refused"):
        load_model(str(folder))
    from r2d.engines.transformers_engine import TransformersGenerator

    with pytest.raises(ModelSourceError, match="pickle weights are refused"):
        TransformersGenerator(ModelConfig(source=str(folder)), EngineConfig(), None)
    assert not marker.exists()


def test_vllm_loads_safetensors_only():
    assert engine_args(ModelConfig(), EngineConfig(kind="vllm"))["load_format"] == "safetensors"
    assert engine_args(ModelConfig(), EngineConfig(kind="vllm", num_gpus=1))["load_format"] == "safetensors"
