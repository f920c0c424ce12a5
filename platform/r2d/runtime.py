"""Runtime: connect to Ray and MLflow the same way in every job.

- Ray: ``RAY_ADDRESS`` set means a real cluster; the ``r2d`` package then travels to
  the workers through ``runtime_env["py_modules"]``. Unset means a local Ray inside this
  process, sized for small machines.
- MLflow: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir>/.r2d/mlflow.db`` with
  artifacts in ``<workdir>/.r2d/mlartifacts``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import r2d

# vLLM on CPU: bind OpenMP to the cores, no reserved core, a small KV cache, and no hub calls.
VLLM_CPU_ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def package_dir() -> Path:
    """The folder of the ``r2d`` package (shipped to cluster workers)."""
    return Path(r2d.__file__).resolve().parent


def source_digest(*names: str) -> str:
    """A digest of the ``r2d`` package's source under ``names`` (files or folders, relative to it).

    Reuse keys carry it, so that a finished run is not reused after the code that made it changed.
    """
    return _source_digest(package_dir(), tuple(sorted(names)))


@functools.cache
def _source_digest(root: Path, names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        if not path.exists():
            raise FileNotFoundError(f"no {name!r} in the r2d package ({root})")
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def worker_env() -> dict[str, str]:
    """Environment every Ray worker gets: quiet, offline, pointed at the same MLflow."""
    env = dict(VLLM_CPU_ENV)
    cores = os.cpu_count() or 1
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    for key in ("R2D_CACHE", "HF_HOME", "R2D_WORKDIR"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def init_ray(num_cpus: int = 0, extra_env: dict[str, str] | None = None):
    """Connect to ``RAY_ADDRESS`` or start a local Ray; idempotent.

    Args:
        num_cpus: CPUs of a local Ray (0: all cores). Ignored on a cluster.
        extra_env: more environment for workers.
    """
    import ray

    if ray.is_initialized():
        return ray
    for key, value in VLLM_CPU_ENV.items():
        os.environ.setdefault(key, value)
    env = {**worker_env(), **(extra_env or {})}
    runtime_env: dict = {"env_vars": env}
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's own env_vars are already in this process's environment and
        # reach the workers; repeating a key makes Ray refuse to merge the two runtime envs.
        runtime_env["env_vars"] = {k: v for k, v in env.items() if k not in os.environ}
        runtime_env["py_modules"] = [str(package_dir())]
        ray.init(runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True, configure_logging=True, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = True
    return ray


def workdir() -> Path:
    """Root for ``.r2d/`` state: ``R2D_WORKDIR``, else the current directory."""
    return Path(os.environ.get("R2D_WORKDIR") or os.getcwd()).resolve()


def tracking_uri(uri: str = "") -> str:
    """The MLflow tracking URI: explicit, else ``MLFLOW_TRACKING_URI``, else local sqlite."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    state = workdir() / ".r2d"
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state / 'mlflow.db'}"


def artifact_root() -> str:
    return (workdir() / ".r2d" / "mlartifacts").as_uri()


def use_tracking(uri: str = "") -> str:
    """Point MLflow (and the subprocesses and Ray workers started after) at the tracking URI; creates nothing."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    resolved = tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = resolved  # Ray workers and subprocesses inherit it
    mlflow.set_tracking_uri(resolved)
    return resolved


def init_mlflow(experiment: str = "r2d", uri: str = ""):
    """Point MLflow at the tracking URI and select (or create) the experiment."""
    import mlflow

    resolved = use_tracking(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        # A sqlite store would put artifacts under ./mlruns of whatever cwd a job has.
        location = artifact_root() if resolved.startswith("sqlite:") else None
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except Exception:  # created concurrently by another job
            pass
    mlflow.set_experiment(experiment)
    return mlflow


def set_threads(num: int) -> None:
    """Size torch's intra-op pool; oversubscribing 2 cores with 2 actors halves throughput."""
    import torch

    if num > 0:
        torch.set_num_threads(num)
