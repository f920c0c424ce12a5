"""`make demo`, twice: the second run reuses every result that exists for the same inputs and ends well.

The demo job itself, as a process, on the tiny test model and a few prompts (every stage
real, every engine transformers: distillation, one Ray Train worker, evaluation, promotion, Serve; the
second run skips serving, which produces nothing to reuse).
The second run must say that its traces, its trained version and its evaluations exist
already, reuse them instead of computing them again, and find the version already
champion: an outcome, exit 0, not a PromotionError.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from registry_chain import HARMFUL

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _demo(args: list[str], env: dict) -> tuple[str, dict[str, float]]:
    proc = subprocess.run([sys.executable, "jobs/demo.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    timings = {m[0]: float(m[1]) for m in re.findall(r"^=== (\w+): (\d+) s ===$", proc.stdout, re.M)}
    return proc.stdout, timings


def test_the_demo_runs_twice_and_reuses_what_exists(tiny_model_dir, tmp_path):
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": p, "label": "harmful"}) + "\n" for p in HARMFUL))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "R2D_WORKDIR": str(tmp_path),
           "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    env.pop("RAY_ADDRESS", None)
    tiny = str(tiny_model_dir)
    args = ["--config", "jobs/configs/tiny.yaml", "--fast", "--report-dir", str(tmp_path / "report"),
            f"model.source={tiny}", f"model.cache_dir={tmp_path / 'cache'}", f"distill.teacher.source={tiny}",
            f"data.sources=[{{name: file, path: {harmful}, label: harmful}}, {{name: benign, limit: 8}}]",
            "data.heldout_categories=[]", f"distill.output_dir={tmp_path / 'traces'}", "distill.sampling.max_tokens=16",
            "distill.engine.kind=transformers", "distill.engine.concurrency=1", "distill.engine.batch_size=8",
            "train.max_steps=2", "train.batch_size=2", "train.max_length=128", "train.checkpoint_every=2",
            f"train.storage_path={tmp_path / 'ckpt'}", "train.run_name=demo-twice", "resources.train_workers=1",
            "resources.cpus_per_worker=0.5", "resources.num_cpus=2",
            "eval.suites=[harmful, over_refusal]", "eval.max_per_suite=2", "eval.sampling.max_tokens=8",
            "eval.engine.kind=transformers", "eval.engine.concurrency=1", f"eval.output_dir={tmp_path / 'eval'}",
            "eval.allow_contamination=true", "tracking.registered_model=r2d-demo-twice", f"serve.port={port}",
            # vLLM's CPU attention has no kernel for the tiny model's head_dim 16: every engine is transformers.
            "serve.engine.kind=transformers", "serve.engine.num_cpus=1",
            # A random tiny model cannot pass the real gates: open them, this checks that every stage re-runs.
            "gates.min_discrimination=-1", "gates.max_over_refusal=1", "gates.max_asr=1", "gates.max_attack_asr=1",
            "gates.min_gain_over_base=-1"]

    first, first_s = _demo(args, env)
    assert "PROMOTED: promoted" in first and "guarded=" in first, first[-3000:]
    assert not re.search(r"^already (distilled|trained|evaluated)", first, re.M), first[-3000:]
    # The second run stops after promotion: serving has no result to reuse, and the first run served.
    second, second_s = _demo([*args, "--no-serve"], env)
    for said in ("already distilled: reusing", "already trained: reusing run", "ALREADY CHAMPION: r2d-demo-twice v1"):
        assert said in second, (said, second[-3000:])
    assert second.count("already evaluated: reusing run") == 2, second[-3000:]  # the base and the trained model
    assert (tmp_path / "report" / "demo-report.md").is_file()
    print(f"first run {first_s}, second run {second_s}")
    for stage in ("train", "evaluate"):
        assert second_s[stage] < first_s[stage], (stage, first_s, second_s)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    assert [str(v.version) for v in client.search_model_versions("name = 'r2d-demo-twice'")] == ["1"]
