"""`ray job submit` of the training job against a separate local `ray start --head` cluster.

The cluster gets its own temp dir and ports, so it coexists with the test session's
Ray. It is stopped by terminating the `ray start --block` process this test started;
`ray stop` would stop every Ray on the machine.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ports import free_port

from r2d.train.synthetic import write_synthetic_traces

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXCLUDES = [".venv", ".venv/**", ".r2d", ".r2d/**", ".git", ".git/**", "**/__pycache__", "*.egg-info",
            ".pytest_cache", "benchmarks/results/**"]


def _wait_for_dashboard(address: str, head: subprocess.Popen, log_path: Path, timeout: float = 240) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}: {log_path.read_text()[-2000:]}")
        try:
            # /api/jobs/ answers only once the job manager is up, later than /api/version
            if httpx.get(f"{address}/api/jobs/", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"no Ray dashboard at {address} after {timeout} s")


def _submit(argv: list[str], env: dict, tries: int = 3) -> subprocess.CompletedProcess:
    # A freshly started head can drop the first upload while its agents come up: retry.
    for attempt in range(tries):
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or "ConnectionError" not in proc.stderr or attempt == tries - 1:
            return proc
        time.sleep(15)
    return proc


def test_ray_job_submit_trains_on_a_ray_start_cluster(state_dir, tiny_model_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    traces = write_synthetic_traces(tmp_path / "traces", 16)
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway loopback cluster; token auth would 401 the probes
    temp_dir = tempfile.mkdtemp(prefix="r2dray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash = free_port(), free_port()
    # Every fixed default port (agent 52365, client 10001, ...) may belong to another Ray here.
    ports = [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "ray-client-server-port")]
    log = open(tmp_path / "ray-start.log", "w")
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             f"--temp-dir={temp_dir}", "--include-dashboard=true",
                             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", *ports],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(address, head, tmp_path / "ray-start.log")
        runtime_env = {"excludes": EXCLUDES,
                       "env_vars": {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
                                    "R2D_WORKDIR": str(tmp_path), "HF_HUB_OFFLINE": "1",
                                    "MLFLOW_DISABLE_TELEMETRY": "true"}}
        submit = _submit(
            [str(bin_dir / "ray"), "job", "submit", "--address", address, "--no-wait", "--working-dir", ".",
             "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "jobs/train_cpo.py", "--config", "jobs/configs/tiny.yaml",
             f"model.source={tiny_model_dir}", f"train.traces={traces}", "train.max_steps=2",
             "train.batch_size=4", "train.grad_accum=1", "train.checkpoint_every=1", "train.register=false",
             f"train.storage_path={tmp_path / 'ckpt'}", "train.run_name=submitted"],
            env)
        assert submit.returncode == 0, submit.stderr[-2000:]
        job_id = next(w.strip("'") for line in submit.stdout.splitlines() for w in line.split()
                      if w.strip("'").startswith("raysubmit_"))
        client = JobSubmissionClient(address)
        deadline = time.time() + 600
        while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.time() < deadline, "job did not finish in 600 s"
            time.sleep(3)
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
        report = json.loads(logs[logs.rindex("\n{\n") + 1:logs.rindex("\n}") + 2])  # the job's final report
        assert report["steps"] == report["planned_steps"] == 2
        state = json.loads(Path(report["checkpoint"], "state.json").read_text())
        assert state["step"] == 2
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # our own `ray start --block` session, nothing else
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
