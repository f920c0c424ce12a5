"""Against a real ``mlflow server`` process (sqlite backend, separate proxied artifact root).

- An unreachable server fails fast with an error naming the URI.
- Two concurrent writer processes lose and corrupt no run (server and local sqlite).
- Registry, promotion, rollback and lineage work through the server, artifacts included.
- The slow end-to-end chain runs the real jobs: distill -> train -> evaluate -> promote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import pytest
from ports import free_port
from registry_chain import HARMFUL, base_evaluation, distill, evaluation, train

from r2d import run_tags as T
from r2d.config import load_config
from r2d.tracking import TrackingError, connect

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MLFLOW = str(Path(sys.executable).parent / "mlflow")
WRITERS, RUNS_PER_WRITER = 2, 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real tracking server on a loopback port; stopped (this process only) at the end."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp}/db.sqlite",
                             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT,
                            # The job executor starts worker processes these tests never use.
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a busy 2-core machine takes minutes to import mlflow
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"mlflow server did not answer /health within 300 s: {(tmp / 'server.log').read_text()[-2000:]}")
    yield {"uri": uri, "dir": tmp}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture()
def use_server(server, monkeypatch):
    """Point this process (and its subprocesses) at the server for one test, then restore."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
    yield server
    mlflow.set_tracking_uri(previous)


def test_unreachable_server_fails_fast_and_names_the_uri(monkeypatch, capsys):
    from r2d.cli import main

    uri = f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    import mlflow  # noqa: F401  (imports are slow on a busy machine; time only the connection)

    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is unreachable"):
        connect(timeout_s=3)
    # MLflow's own retries would take minutes against a closed port.
    assert time.monotonic() - started < 8
    assert main(["lineage", "models:/r2d@champion"]) == 2
    assert f"{uri} is unreachable" in capsys.readouterr().err
    assert main(["promote", "--candidate", "models:/r2d@challenger", "--dry-run"]) == 2
    assert f"{uri} is unreachable" in capsys.readouterr().err


_WRITER = textwrap.dedent("""
    import sys
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    client = MlflowClient()
    exp, batch, writer, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    for i in range(n):
        run = client.create_run(exp, run_name=f"w{writer}-{i}", tags={"batch": batch, "writer": writer})
        rid = run.info.run_id
        client.log_batch(rid, metrics=[Metric("value", float(i * 10 + s), 0, s) for s in range(3)],
                         params=[Param("i", str(i)), Param("writer", writer)], tags=[RunTag("i", str(i))])
        client.log_text(rid, f"{writer}:{i}", "note.txt")
        client.set_terminated(rid)
""")


def _concurrent_writers(tmp: Path, uri: str) -> None:
    """Two writer processes, ~20 runs each, started together; every run must come back intact."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    batch = uuid.uuid4().hex[:8]
    exp = client.create_experiment(f"writers-{batch}", artifact_location=(tmp / f"art-{batch}").as_uri()
                                   if uri.startswith("sqlite") else None)
    script = tmp / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [subprocess.Popen([sys.executable, str(script), exp, batch, str(w), str(RUNS_PER_WRITER)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(WRITERS)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    runs = client.search_runs([exp], f"tags.batch = '{batch}'", max_results=1000)
    assert len(runs) == WRITERS * RUNS_PER_WRITER
    seen = set()
    for run in runs:
        writer, i = run.data.tags["writer"], int(run.data.params["i"])
        assert run.data.params["writer"] == writer and run.data.tags["i"] == str(i)
        assert run.info.status == "FINISHED" and run.info.run_name == f"w{writer}-{i}"
        history = client.get_metric_history(run.info.run_id, "value")
        assert sorted((m.step, m.value) for m in history) == [(s, float(i * 10 + s)) for s in range(3)]
        seen.add((writer, i))
    assert seen == {(str(w), i) for w in range(WRITERS) for i in range(RUNS_PER_WRITER)}
    sample = runs[0]
    note = client.download_artifacts(sample.info.run_id, "note.txt", str(tmp))
    assert Path(note).read_text() == f"{sample.data.tags['writer']}:{sample.data.params['i']}"


def test_concurrent_writers_against_the_server(server, tmp_path):
    _concurrent_writers(tmp_path, server["uri"])


def test_concurrent_writers_against_local_sqlite(tmp_path):
    _concurrent_writers(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")


def test_registry_promotion_and_lineage_through_the_server(use_server, tiny_model_dir, tmp_path):
    """Versions with real artifacts uploaded through the server; the jobs and the CLI as processes."""
    import mlflow

    from r2d.models import resolve_source
    from r2d.registry.promote import promote

    client = connect()
    assert client.tracking_uri == use_server["uri"]
    exp_id = mlflow.create_experiment("r2d-server-it")  # default artifact root: the server's proxy
    name = "r2d"
    client.create_registered_model(name)
    distill_run, traces = distill(mlflow, exp_id, tmp_path, "eeee5555ffff6666")
    _, v1 = train(mlflow, client, exp_id, tiny_model_dir, traces, name)
    _, v2 = train(mlflow, client, exp_id, tiny_model_dir, traces, name)
    suite = "serversuite00001"
    good = dict(asr=0.2, asr_none=0.1, over_refusal=0.2, discrimination=0.6)
    evaluation(mlflow, client, exp_id, name, v1, suite, **good)
    evaluation(mlflow, client, exp_id, name, v2, suite, **{**good, "over_refusal": 0.7, "discrimination": 0.1})
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml")
    base_evaluation(cfg, "tiny-llama", suite, asr=0.9, asr_none=0.9, over_refusal=0.0, discrimination=0.1)
    assert promote(cfg, client, f"models:/{name}/{v1}", suite_digest=suite, evaluate=False).decision.promoted
    # The registered artifacts came back through the server's artifact proxy as a loadable folder.
    folder = Path(resolve_source(f"models:/{name}@champion", cache_dir=str(tmp_path / "cache")))
    assert (folder / "config.json").read_text() == (tiny_model_dir / "config.json").read_text()

    client.set_registered_model_alias(name, "challenger", v2)
    job = [sys.executable, "jobs/promote.py", "--config", "jobs/configs/tiny.yaml", "--suite-digest", suite]
    proc = subprocess.run(job + ["--candidate", f"models:/{name}@challenger"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "over_refusal 0.700 above by 0.200: ceiling 0.500" in proc.stdout
    assert client.get_model_version(name, v2).tags[T.DECISION] == "rejected"
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1

    lineage = subprocess.run([str(Path(sys.executable).parent / "r2d"), "lineage", f"models:/{name}@champion"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert lineage.returncode == 0, lineage.stderr
    assert f"distill run  {distill_run}" in lineage.stdout
    assert "prompts      harmbench(split=all, limit=8), benign(limit=8)" in lineage.stdout


# ---------------------------------------------------------------- the real jobs, end to end


def _job(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_tiny_distill_train_evaluate_promote_against_the_server(server, tiny_model_dir, tmp_path):
    """distill -> train -> evaluate -> promote with the real jobs, each a process, all on the server."""
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": p, "label": "harmful"}) + "\n" for p in HARMFUL))
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["uri"], "R2D_WORKDIR": str(tmp_path),
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    tiny = str(tiny_model_dir)
    common = ["--config", "jobs/configs/tiny.yaml", f"model.source={tiny}", f"distill.teacher.source={tiny}",
              f"data.sources=[{{name: file, path: {harmful}, label: harmful}}, {{name: benign, limit: 8}}]",
              "data.heldout_categories=[]", "data.eval_fraction=0.25", f"distill.output_dir={tmp_path / 'traces'}",
              "distill.sampling.max_tokens=24", "distill.engine.kind=transformers", "distill.engine.concurrency=1", "distill.engine.batch_size=8",
              "train.max_steps=2", "train.batch_size=2", "train.max_length=128", "train.checkpoint_every=2",
              f"train.storage_path={tmp_path / 'ckpt'}", "train.run_name=e2e", "resources.train_workers=1",
              "resources.cpus_per_worker=0.5",
              "eval.suites=[harmful, over_refusal]", "eval.max_per_suite=4", "eval.sampling.max_tokens=16",
              "eval.engine.kind=transformers", "eval.engine.concurrency=1", f"eval.output_dir={tmp_path / 'eval'}", "resources.num_cpus=2",
              "tracking.registered_model=r2d-e2e",
              # A random tiny model cannot discriminate: loosen the gates, this checks the plumbing.
              "gates.min_discrimination=-1", "gates.max_over_refusal=1", "gates.max_asr=1",
              "gates.max_attack_asr=1", "gates.min_gain_over_base=-1"]
    _job(["jobs/distill.py", *common], env)
    manifest = json.loads((tmp_path / "traces" / "manifest.json").read_text())
    trained = _job(["jobs/train_cpo.py", *common], env)
    assert '"model_version"' in trained.stdout
    # The base model too: a first champion must beat the model it was trained from.
    _job(["jobs/evaluate.py", *common, "--model", "models:/r2d-e2e@challenger", "--model", tiny,
          "--allow-contamination"], env)
    promoted = _job(["jobs/promote.py", *common, "--candidate", "models:/r2d-e2e@challenger", "--reuse-only"], env)
    assert "PROMOTED: promoted" in promoted.stdout, promoted.stdout
    lineage = subprocess.run([str(Path(sys.executable).parent / "r2d"), "lineage", "models:/r2d-e2e@champion"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert lineage.returncode == 0, lineage.stderr
    assert f"traces       digest {manifest['digest']}" in lineage.stdout
    assert f"distill run  {manifest['mlflow_run_id']}" in lineage.stdout
    assert "prompts      file(" in lineage.stdout and "benign(" in lineage.stdout
