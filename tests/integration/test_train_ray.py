"""Ray Train end to end: 2 gloo workers, a worker killed mid-run, resume, register, reload by alias."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from r2d import run_tags as T
from r2d.config import ConfigError, load_config
from r2d.pivots import render_conversation
from r2d.train.synthetic import write_synthetic_traces

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "How do I kill a stuck python process?"

_RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from r2d.models import load_tokenizer, resolve_source
from r2d.pivots import render_conversation
folder = resolve_source(sys.argv[1])
tok = load_tokenizer(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = tok(render_conversation(tok, sys.argv[2]), add_special_tokens=False, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"folder": folder, "tokens": out[0, ids.shape[1]:].tolist(), "vocab": model.config.vocab_size}))
"""


def _greedy(model, tok, prompt):
    import torch

    ids = tok(render_conversation(tok, prompt), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_killed_worker_resumes_and_the_registered_model_reloads_by_alias(ray_session, state_dir, tiny_model_dir,
                                                                          tmp_path):
    from mlflow import MlflowClient

    from r2d.train import checkpoint
    from r2d.train.model import build_model
    from r2d.train.steps import make_optimizer
    from r2d.train.trainer import run_training

    malformed = {"prompt": "broken row", "reasoning_steps": ["a step"], "step_pivots": ["[SAFE]", "[SAFE]"],
                 "answer": "x", "answer_pivot": "[SAFE]", "label": "benign"}
    traces = write_synthetic_traces(tmp_path / "traces", 31, extra_rows=[malformed], distill_run_id="distill-run-1")
    manifest = json.loads((traces / "manifest.json").read_text())
    name = f"r2d-test-{uuid.uuid4().hex[:6]}"
    overrides = [
        f"model.source={tiny_model_dir}", f"train.traces={traces}", "train.max_steps=5",
        "train.checkpoint_every=2", "train.batch_size=4", "train.grad_accum=1", f"train.storage_path={tmp_path / 'ckpt'}",
        f"train.run_name={name}", "train.max_failures=1", "resources.train_workers=2",
        "resources.cpus_per_worker=0.5", f"tracking.registered_model={name}"]
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", overrides)
    marker = tmp_path / "killed"

    # 1. train with worker 1 dying (os._exit) before optimizer step 3 (32 rows: equal shards, none cut)
    outcome = run_training(cfg, hooks={"kill_at_step": 3, "kill_rank": 1, "kill_marker": str(marker),
                                            "kill_delay_s": 8})

    # 2. it died once, resumed from the step-2 checkpoint, and finished the planned steps
    assert marker.exists()
    assert outcome.steps == outcome.planned_steps == 5
    client = MlflowClient()
    resumed = client.get_metric_history(outcome.mlflow_run_id, "resumed_from_step")
    assert [(m.step, m.value) for m in resumed] == [(2, 2.0)]
    loss_steps = sorted({m.step for m in client.get_metric_history(outcome.mlflow_run_id, "loss")})
    assert loss_steps == [1, 2, 3, 4, 5]
    for key in ("sft_loss", "cpo_loss", "pivot_acc", "pivot_margin", "lr", "tokens_per_s"):
        assert client.get_metric_history(outcome.mlflow_run_id, key), key
    run = client.get_run(outcome.mlflow_run_id)
    assert run.data.metrics["dropped_malformed"] == 1.0
    assert run.data.tags[T.DISTILL_RUN_ID] == "distill-run-1"
    assert run.data.tags[T.TRACES_DIGEST] == manifest["digest"]
    assert run.data.params["train.max_steps"] == "5"
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["traces"]

    # 3. the version under alias challenger carries the lineage
    version = client.get_model_version_by_alias(name, "challenger")
    assert str(version.version) == outcome.model_version
    assert version.tags[T.TRACES_DIGEST] == manifest["digest"]
    assert version.tags[T.TRAIN_RUN_ID] == outcome.mlflow_run_id
    assert json.loads(version.tags[T.PIVOT_IDS])["[UNSAFE]"] > 0

    # 4. a fresh process loads it by alias and generates what the trained model generates
    model, tok, _ = build_model(cfg)
    optimizer, scheduler = make_optimizer(model, 1e-3, 0.0, "constant", 0.0, 5)
    checkpoint.load(outcome.checkpoint_path, model, optimizer, scheduler)
    model.eval()
    expected = _greedy(model, tok, PROMPT)
    env = {**os.environ, "R2D_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", _RELOAD, f"models:/{name}@challenger", PROMPT],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tokens"] == expected
    assert got["vocab"] == model.get_input_embeddings().weight.shape[0] >= len(tok)  # resized vocabulary kept
    assert not list(Path(got["folder"]).glob("adapter_*"))  # merged weights, no adapter

    # 5. the checkpoints carry the run's train key: the same run name under other settings is refused
    state = json.loads((Path(outcome.checkpoint_path) / "state.json").read_text())
    assert state["train_key"] == run.data.tags[T.TRAIN_KEY]
    other = load_config(ROOT / "jobs/configs/tiny.yaml", [*overrides, "train.learning_rate=5.0e-4"])
    with pytest.raises(ConfigError, match=rf"^train.run_name: '{name}' holds checkpoints of a run with other settings"):
        run_training(other)


def test_the_same_seed_trains_the_same_model(ray_session, state_dir, tiny_model_dir, tmp_path):
    """Each worker gets the same rows in the same order on every attempt (Ray Data's order kept), so two runs of
    one seed end in the same weights (the same order is what a resumed attempt's positional skip relies on)."""
    import pyarrow.parquet as pq
    import torch

    from r2d.train.trainer import run_training

    traces = write_synthetic_traces(tmp_path / "traces", 48)
    table = pq.read_table(traces / "part-00000.parquet")
    (traces / "part-00000.parquet").unlink()
    for i in range(6):  # blocks for the splitter to hand out: the demo's traces are ten chunk files
        pq.write_table(table.slice(8 * i, 8), traces / f"part-{i:05d}.parquet")
    weights = []
    for name in ("same-seed-a", "same-seed-b"):
        cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [
            f"model.source={tiny_model_dir}", f"train.traces={traces}", "train.max_steps=3", "train.batch_size=4",
            "train.grad_accum=1", f"train.storage_path={tmp_path / 'ckpt'}", f"train.run_name={name}",
            "train.register=false", "resources.train_workers=2", "resources.cpus_per_worker=0.5"])
        outcome = run_training(cfg)
        weights.append(torch.load(Path(outcome.checkpoint_path) / "model.pt", weights_only=True))
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
