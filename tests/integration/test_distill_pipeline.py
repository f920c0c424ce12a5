"""The distillation pipeline on a tiny model: Parquet plus manifest, and a resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r2d.distill import store
from r2d.config import load_config
from pipelines.distill import training_set
from r2d.data.splits import training_prompts

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _overrides(model_dir: Path, out: Path, n: int, extra: list[str] = ()) -> list[str]:
    return [f"data.sources=[{{name: benign, limit: {n}}}, {{name: harmbench, split: val, limit: {n}}}]",
            "data.heldout_categories=[]", "data.eval_fraction=0.2", f"model.source={model_dir}", f"distill.teacher.source={model_dir}",
            "distill.engine={kind: transformers, batch_size: 4, concurrency: 1, num_cpus: 1}",
            "distill.sampling.max_tokens=16", f"distill.output_dir={out}", "resources.num_cpus=2", *extra]


def test_pipeline_writes_traces_with_the_schema(ray_session, tiny_model_dir, tmp_path):
    from pipelines.distill import run_distillation

    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", _overrides(tiny_model_dir, tmp_path / "traces", 5,
                                                                 ["distill.chunk_size=3"]))
    prompts = training_prompts(cfg)
    assert 6 <= len(prompts) <= 10
    manifest, stats = run_distillation(cfg, prompts, {"mlflow_run_id": "test"})

    table = store.read_table(tmp_path / "traces")
    rows = table.to_pylist()
    assert table.schema.names == list(store.COLUMNS) and len(store.parquet_files(tmp_path / "traces")) >= 2
    assert len(rows) + sum(manifest["drops"].values()) + manifest["errors"] == len(prompts)
    assert sorted(r["prompt_id"] for r in rows) == sorted({r["prompt_id"] for r in rows})
    assert stats["generated_tokens"] > 0 and stats["written"] == len(rows)
    for row in rows:
        assert len(row["reasoning_steps"]) == len(row["step_pivots"]) >= 1
        # Reasoning written for the prompt (origin annotation/repaired) has no teacher pivots to align.
        assert len(row["teacher_pivots"]) == len(row["reasoning_steps"]) or row["origin"] != "teacher"
        assert row["answer"].strip() and row["n_tokens"] > 0 and row["tagger"] == "rules"
        if row["label"] == "harmful":  # a random model never refuses: every harmful row is a repaired refusal
            assert row["repaired"] and row["answer_pivot"] == "[UNSAFE]" and "[UNSAFE]" in row["step_pivots"]
        else:
            assert row["answer_pivot"] == "[SAFE]"
    on_disk = json.loads((tmp_path / "traces" / "manifest.json").read_text())
    assert on_disk["rows"] == len(rows) and on_disk["mlflow_run_id"] == "test"
    assert on_disk["digest"] == store.digest(store.read_table(tmp_path / "traces"))
    assert on_disk["config"]["distill"]["teacher"]["source"] == str(tiny_model_dir)
    assert sum(on_disk["by_label"].values()) == len(rows)


def _job(cfg_overrides: list[str], env: dict) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "jobs/distill.py"), "--config", str(ROOT / "jobs/configs/tiny.yaml"),
           *cfg_overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_killed_job_resumes_without_losing_or_duplicating(state_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "traces"
    overrides = _overrides(tiny_model_dir, out, 4, ["distill.chunk_size=1", "distill.max_regenerations=0",
                                                    "distill.sampling.max_tokens=96",
                                                    "distill.engine.batch_size=1"])
    # what the job distils: the training side, a share wrapped in tiny.yaml's attacks (with ids of their own)
    expected = {p["prompt_id"] for p in training_set(load_config(ROOT / "jobs/configs/tiny.yaml", overrides))}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    env.pop("RAY_ADDRESS", None)  # the job starts its own local Ray

    # 1. run, and kill the whole process group as soon as the first chunk is committed
    job = _job(overrides, env)
    deadline = time.time() + 240
    while not list((out / "_committed").glob("chunk-*")) and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    ended = job.poll() is not None
    os.killpg(job.pid, signal.SIGKILL)
    log, _ = job.communicate(timeout=30)
    assert not ended or job.returncode == 0, f"the first run failed:\n{log[-3000:]}"
    first = store.read_table(out, ["prompt_id"]).column("prompt_id").to_pylist()
    assert 1 <= len(first) < len(expected), "the kill came too late to test a resume"

    # 2. run again to the end
    job = _job(overrides, env)
    log, _ = job.communicate(timeout=300)
    assert job.returncode == 0, log[-3000:]
    assert "distillation summary" in log

    ids = store.read_table(out, ["prompt_id"]).column("prompt_id").to_pylist()
    dropped = {d["prompt_id"] for d in store.read_drops(out)}
    assert len(ids) == len(set(ids)), "a prompt was written twice"
    assert set(ids) | dropped == expected, "a prompt was lost"
    assert set(first) <= set(ids)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == len(ids) and manifest["last_run"]["skipped_existing"] == len(first)
    assert len(manifest["mlflow_run_ids"]) >= 1 and manifest["mlflow_run_id"] == manifest["mlflow_run_ids"][-1]

    from mlflow import MlflowClient

    from r2d import run_tags as T
    run = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_run(manifest["mlflow_run_id"])
    assert run.data.tags[T.TRACES_DIGEST] == manifest["digest"]
    assert run.data.tags[T.STAGE] == "distill" and run.data.metrics["rows"] == len(ids)
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["prompts"]
