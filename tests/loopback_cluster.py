"""A multi-node Ray cluster on one machine: a head and worker nodes, each a ``ray start --block``.

Each node runs in its own process group with its own ports and temp dir, so the cluster
coexists with any other Ray on the machine and is stopped by process id, never by name.
Jobs go in through ``ray job submit`` (``r2d submit``), exactly as on a cloud cluster;
the caller never connects a driver to it, only the dashboard's HTTP API.

Used by the cluster-path tests and by ``make rehearse`` (tests/rehearsal.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODE_CPUS = 3
HEAD = "node:__internal_head__"  # the resource only the head node carries
UPLOAD_EXCLUDES = ["tests", "benchmarks", "docs"]  # besides r2d submit's own (.venv, .git, .r2d, ...)


class Timeline:
    """What happened when, relative to the cluster start; printed live and saved at the end."""

    def __init__(self, path: Path) -> None:
        self.path, self.start, self.lines = path, time.monotonic(), []

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f}s] {text}"
        self.lines.append(line)
        print(line, flush=True)
        self.path.write_text("\n".join(self.lines) + "\n")

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _set_priority(nice: int, pid: str = "self") -> None:
    """Scheduling priority of a node: its session's autogroup (where the kernel groups by session,
    plain nice values only rank processes inside their own group) and, elsewhere, the process."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0 if pid == "self" else int(pid), nice)
    except OSError:  # not allowed (no CAP_SYS_NICE): normal priority
        pass


def _boost() -> None:
    """Runs in a node's ``ray start`` right after setsid: boot at raised priority."""
    _set_priority(-15)


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class LoopbackCluster:
    """Head plus worker nodes as ``ray start --block`` subprocesses on 127.0.0.1."""

    def __init__(self, temp_dir: Path, env: dict, timeline: Timeline) -> None:
        self.temp_dir, self.env, self.timeline = temp_dir, env, timeline
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        # Every per-node port explicit: several nodes (and maybe another Ray) share this host.
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        log = open(self.temp_dir.parent / f"{self.temp_dir.name}.{name}.log", "a")
        self.nodes[name] = subprocess.Popen(
            # A temp dir per node: nodes sharing one session dir share runtime_resources/, and one
            # node's runtime-env agent re-unpacking a working_dir pulls it from under another's driver.
            [str(BIN / "ray"), "start", *args, *ports, f"--temp-dir={self.temp_dir / name}",
             "--object-store-memory=150000000", "--disable-usage-stats", "--block"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_boost)

    def _unboost(self) -> None:
        """Back to normal priority for every process of this cluster, once a node is up."""
        import psutil

        for proc in self.nodes.values():
            if proc.poll() is None:
                _set_priority(0, str(proc.pid))
        marker = str(self.temp_dir)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if marker in " ".join(p.info["cmdline"] or []) and p.nice() < 0:
                    p.nice(0)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    def _start_until(self, name: str, make_args, ready, what: str, attempts: int = 5) -> None:
        """Start a node and wait for ``ready()``; start it afresh if it dies or hangs.

        A raylet aborts when its dashboard agent has not written its port file within 15 s (fixed
        in Ray 2.60). On a busy 2-core host the agent's imports alone can take longer, so a node
        boots at raised priority (when allowed) and drops to normal once it is up; a node that
        still loses the race is started again.
        """
        for attempt in range(1, attempts + 1):
            self._start(name, make_args())
            proc = self.nodes[name]
            try:
                _wait(lambda: ready() or proc.poll() is not None, 90, what)
            except TimeoutError:
                pass
            if proc.poll() is None and ready():
                self._unboost()
                return
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            self.timeline.note(f"{name}: start attempt {attempt} failed (exit {proc.returncode}; on a busy "
                               "host the raylet gives its agents only 15 s); starting it again")
        raise RuntimeError(f"{name} did not start in {attempts} attempts; see {self.temp_dir}.{name}.log")

    def start_head(self) -> None:
        def args() -> list[str]:
            # Fresh ports on every attempt: a failed start may still hold the old ones.
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            self.address = f"http://127.0.0.1:{self.dashboard_port}"
            return ["--head", f"--port={self.gcs_port}", "--num-cpus=0", "--include-dashboard=true",
                    f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                    f"--ray-client-server-port={free_port()}"]

        self._start_until("head", args, lambda: self._dashboard_up() and HEAD in self.alive_resources(),
                          "the head node")
        self.timeline.note(f"head up: gcs 127.0.0.1:{self.gcs_port}, dashboard {self.address}")

    def _dashboard_up(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
            return True
        except urllib.error.HTTPError:  # it answered (401 under token auth): it is up
            return True
        except OSError:
            return False

    def add_worker(self, name: str) -> None:
        args = [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={NODE_CPUS}",
                f"--resources={json.dumps({name: 1})}"]
        self._start_until(name, lambda: args, lambda: name in self.alive_resources(), f"node {name} to join")
        self.timeline.note(f"node {name} joined ({NODE_CPUS} CPUs, resource {name!r})")

    def alive_resources(self) -> set[str]:
        """Resource names over the alive nodes (each worker node carries one named after it)."""
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.address, timeout=10, detail=True)
        except Exception:  # the dashboard is busy or restarting; ask again
            return set()
        return {key for n in nodes if n.state == "ALIVE" for key in (n.resources_total or {})}

    def kill_node(self, name: str) -> None:
        """SIGKILL a node's whole process group: raylet, object store, workers; no goodbye."""
        os.killpg(self.nodes[name].pid, signal.SIGKILL)
        self.nodes[name].wait(timeout=30)

    def submit(self, job_id: str, argv: list[str], env_extra: dict | None = None) -> None:
        """``r2d submit`` (ray job submit with the working dir and the git commit) of ``python argv``."""
        # No other env_vars here: the nodes carry the environment, as cluster.yaml's docker --env does.
        cmd = [sys.executable, "-m", "r2d.cli", "submit", "--address", self.address, "--submission-id", job_id,
               "--working-dir", str(ROOT), "--no-wait", *[f"--exclude={e}" for e in UPLOAD_EXCLUDES],
               "--", "python", *argv]
        for attempt in range(3):  # a freshly started head can drop the first upload while its agents come up
            out = subprocess.run(cmd, env={**self.env, **(env_extra or {})}, capture_output=True, text=True,
                                 timeout=300)
            if out.returncode == 0 or "ConnectionError" not in out.stderr or attempt == 2:
                break
            time.sleep(10)
        assert out.returncode == 0, f"r2d submit failed:\n{out.stdout}\n{out.stderr}"
        self.timeline.note(f"submitted {job_id}: python {' '.join(argv[:1])} ...")

    def driver_pid(self, job_id: str) -> int | None:
        """The process id of a running job's driver (it runs on the head, i.e. on this machine)."""
        info = self.client().get_job_info(job_id)
        driver = getattr(info, "driver_info", None)
        return int(driver.pid) if driver and driver.pid else None

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def wait_job(self, job_id: str, timeout: float, tick=None) -> str:
        """Poll until the job ends; ``tick()`` runs between polls (fault injection)."""
        client, deadline = self.client(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = str(client.get_job_status(job_id)).split(".")[-1]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                log = self.timeline.path.parent / f"{job_id}.log"
                log.write_text(client.get_job_logs(job_id))
                self.timeline.note(f"{job_id} ended: {status} (driver log: {log})")
                return status
            if tick:
                tick()
            time.sleep(0.5)
        client.stop_job(job_id)
        (self.timeline.path.parent / f"{job_id}.log").write_text(client.get_job_logs(job_id))
        raise TimeoutError(f"{job_id} still running after {timeout:.0f}s:\n{self.logs(job_id)[-3000:]}")

    def logs(self, job_id: str) -> str:
        return self.client().get_job_logs(job_id)

    def stop(self) -> None:
        """Stop our nodes by process group, then anything left that runs from our temp dir."""
        import psutil

        for proc in self.nodes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        marker = str(self.temp_dir)
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            try:
                if marker in " ".join(p.info["cmdline"] or []) or (p.info["cwd"] or "").startswith(marker):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue


def node_env(work: Path, extra: dict | None = None) -> dict:
    """The environment every node (and so every job driver and worker) runs with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Ray 2.60 turns token auth on for a head that finds ~/.ray/auth_token, but a joining
    # `ray start --address` only sends it when RAY_AUTH_MODE=token is set explicitly. This private
    # test cluster opts out, so the nodes and the HTTP clients here need no token.
    env["RAY_AUTH_MODE"] = "disabled"
    # Honoured where Ray reads it: more time for a node's agents to register on a loaded host.
    env["RAY_agent_register_timeout_ms"] = "120000"
    # Every node sees the whole machine's memory, most of it other programs': Ray's monitor would kill
    # this cluster's workers for memory it does not use. The kernel's OOM killer still guards the host.
    env["RAY_memory_monitor_refresh_ms"] = "0"
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "R2D_WORKDIR": str(work), "MLFLOW_DISABLE_TELEMETRY": "true",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def start_cluster(work: Path, env: dict, timeline: Timeline, workers=("worker_a", "worker_b")) -> LoopbackCluster:
    """A head (no CPUs: control plane and job drivers) and ``workers`` of NODE_CPUS logical CPUs each."""
    import tempfile

    # Ray's socket paths live under the temp dir and must stay short (the AF_UNIX limit is 107).
    temp_dir = Path(tempfile.mkdtemp(prefix="r2d-ray-", dir="/tmp"))
    cluster = LoopbackCluster(temp_dir, env, timeline)
    try:
        cluster.start_head()
        for name in workers:
            cluster.add_worker(name)
    except BaseException:
        cluster.stop()
        raise
    return cluster
