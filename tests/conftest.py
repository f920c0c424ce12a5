"""Shared fixtures: one tiny real model, one local Ray session and a private MLflow per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 random Llama with the SmolLM2 tokenizer and the pivot vocabulary."""
    from r2d.models import make_tiny_llama

    # R2D_TEST_TOKENIZER: another tokenizer source (a folder) where the bundled package is not installed.
    tokenizer = os.environ.get("R2D_TEST_TOKENIZER", "bundled:smollm2-135m")
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", tokenizer)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    """A private workdir for .r2d/ state (MLflow sqlite, artifacts, checkpoints)."""
    path = tmp_path_factory.mktemp("r2d-state")
    os.environ["R2D_WORKDIR"] = str(path)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path / 'mlflow.db'}"
    return path


@pytest.fixture(scope="session")
def ray_session(state_dir):
    """One local Ray for the whole run: each start costs several seconds."""
    import ray

    from r2d.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
