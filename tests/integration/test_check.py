"""``r2d check``: it passes on every shipped recipe and names each planted mistake in one line.

The object store is a real S3-protocol server (moto) holding the recipe's bucket; the Hugging
Face Hub is a stand-in for its metadata API (tests/fake_hub.py), reached through HF_ENDPOINT.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_hub import fake_hub
from s3_server import s3_environment

from r2d.cli import main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "jobs/configs/qwen2.5-7b.yaml")
TINY = str(ROOT / "jobs/configs/tiny.yaml")
CLUSTER = str(ROOT / "cluster.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The recipe's bucket on moto and the stand-in Hub, for the whole module."""
    tmp = tmp_path_factory.mktemp("check")
    saved = dict(os.environ)
    with s3_environment("r2d-artifacts") as s3, fake_hub() as hub:
        os.environ.update({"HF_ENDPOINT": hub, "R2D_WORKDIR": str(tmp),
                           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"})
        yield {"s3": s3, "hub": hub, "tmp": tmp}
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def online(monkeypatch):
    """The Hub as reachable (the test session runs offline; huggingface_hub reads that at import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _check(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    code = main(["check", *argv])
    lines = capsys.readouterr().out.splitlines()
    return code, [line for line in lines if line.startswith("FAIL ")], lines


def test_the_recipe_passes_as_a_user_runs_it(world):
    """`r2d check` in a fresh process, as after `ray up`: the recipe against cluster.yaml."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-m", "r2d.cli", "check", "--config", RECIPE, "--cluster", CLUSTER],
                         env=env, capture_output=True, text=True, timeout=300, cwd=world["tmp"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout and "r2d check: ready" in out.stderr
    assert "note distill.guard.source: meta-llama/Llama-Guard-3-8B downloads from the Hugging Face Hub at run time " \
           "(gated: the nodes need HF_TOKEN with access)" in out.stdout
    assert "note data.sources[0]: Hub dataset tatsu-lab/alpaca has the mapped columns" in out.stdout


@pytest.mark.parametrize("config", [TINY, RECIPE], ids=["tiny", "qwen2.5-7b"])
def test_every_shipped_recipe_passes(world, online, capsys, config):
    code, fails, lines = _check(capsys, "--config", config, *(["--cluster", CLUSTER] if config == RECIPE else []))
    assert code == 0 and not fails, lines


def _tp8_on_4_gpu_nodes(tmp: Path) -> str:
    cluster = yaml.safe_load(Path(CLUSTER).read_text())
    smaller = copy.deepcopy(cluster)
    for name in ("gpu_teacher", "gpu_train"):
        smaller["available_node_types"][name]["resources"]["GPU"] = 4
    path = tmp / "cluster-4gpu.yaml"
    path.write_text(yaml.safe_dump(smaller))
    return str(path)


PLANTED = {
    "missing column": (["data.sources.0.column=prompt_text"], None,
                       "FAIL data.sources[0]: hf:tatsu-lab/alpaca: no 'prompt_text' column (the prompt); "
                       "columns found: ['instruction', 'input', 'output', 'text']"),
    "node-local storage with two nodes": (["train.storage_path=/var/r2d/checkpoints"], None,
                                          "FAIL train.storage_path: got '/var/r2d/checkpoints', a node-local path, "
                                          "but the run spans several nodes"),
    "tensor parallel 8 on a 4-GPU node type": ([], _tp8_on_4_gpu_nodes,
                                               "FAIL distill.engine.tensor_parallel_size: 8 needs 8 GPUs on one "
                                               "node; the largest node type has 4"),
    "unknown model id": (["distill.teacher.source=deepseek-ai/DeepSeek-R1-Distill-Llama-700B"], None,
                         "FAIL distill.teacher.source: 'deepseek-ai/DeepSeek-R1-Distill-Llama-700B' is not a model on "
                         "the Hugging Face Hub"),
}


@pytest.mark.parametrize("mistake", sorted(PLANTED))
def test_a_planted_mistake_is_one_clear_line(world, online, capsys, mistake):
    overrides, cluster, expected = PLANTED[mistake]
    cluster_file = cluster(world["tmp"]) if cluster else CLUSTER
    code, fails, lines = _check(capsys, "--config", RECIPE, "--cluster", cluster_file, *overrides)
    assert code == 1 and len(fails) == 1, lines
    assert fails[0].startswith(expected), fails[0]


def test_an_unwritable_bucket_is_one_clear_line(world, online, capsys, monkeypatch):
    for key, value in world["s3"]["read_only"].items():  # a user who may read the bucket, not write it
        monkeypatch.setenv(key, value)
    code, fails, lines = _check(capsys, "--config", RECIPE, "--cluster", CLUSTER)
    assert code == 1 and len(fails) == 1, lines
    assert fails[0].startswith("FAIL distill.output_dir, train.storage_path, eval.output_dir: s3://r2d-artifacts is "
                               "not writable: write s3://r2d-artifacts/"), fails[0]
    assert "access denied" in fails[0]
