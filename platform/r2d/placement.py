"""Config → Ray resource requests, and storage URIs every node can reach.

Every Ray workload asks for what the config says, so that on a cluster the autoscaler
launches the right node type (a request for 8 GPUs in one STRICT_PACK placement group can
only be met by an 8-GPU node) and on a laptop the same code asks for CPUs only.

- vLLM engines (:func:`vllm_placement_group_config`): GPUs per replica and tensor
  parallelism, which become one placement bundle per vLLM worker.
- Training (:func:`scaling_config_kwargs`): Ray Train ``ScalingConfig`` keyword arguments.
- Serving (:func:`serve_deployment_options`): replica resources and autoscaling.
- Cluster fit (:func:`recipe_fit_problems`): does a config's largest request fit the node
  types of a Ray cluster launcher config?
- Storage (:func:`validate_storage_uri`, :func:`storage_filesystem`, :func:`join_storage`):
  local paths, ``s3://`` and ``gs://`` URIs, resolved through ``pyarrow.fs``.

All functions are pure (no Ray calls) so they are tested without a cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from r2d.config import Config, ConfigError, EngineConfig, ResourcesConfig, ServeConfig

# URI schemes pyarrow.fs resolves that we support for checkpoints, traces and artifacts.
REMOTE_SCHEMES = ("s3", "gs", "gcs")


# ---------------------------------------------------------------- engines

def engine_gpus(engine: EngineConfig) -> int:
    """GPUs one engine replica occupies: tensor_parallel_size on GPU, 0 on CPU."""
    if engine.num_gpus <= 0:
        return 0
    if engine.kind == "vllm":
        # vLLM runs one worker per TP rank, each on a whole GPU.
        return engine.tensor_parallel_size
    return max(1, int(round(engine.num_gpus)))


def vllm_placement_group_config(engine: EngineConfig) -> dict[str, Any]:
    """Placement group for one vLLM engine replica (``ray.data.llm`` and ``ray.serve.llm``).

    On GPU: one ``{"GPU": 1, "CPU": 1}`` bundle per tensor-parallel rank, STRICT_PACK so that
    all ranks land on one node (TP all-reduces every layer; across nodes it crawls).
    On CPU: one bundle with the engine's CPUs. The library default bundle asks for a GPU and
    would wait forever on a CPU-only cluster.
    """
    if engine.num_gpus > 0:
        bundle = {"GPU": 1, "CPU": 1}
        return {"bundles": [dict(bundle) for _ in range(engine.tensor_parallel_size)], "strategy": "STRICT_PACK"}
    return {"bundles": [{"CPU": max(engine.num_cpus, 1)}], "strategy": "PACK"}


# ---------------------------------------------------------------- training

def scaling_config_kwargs(res: ResourcesConfig) -> dict[str, Any]:
    """Keyword arguments for ``ray.train.ScalingConfig``.

    ``train_workers == 0`` keeps the trainer in-process (fast tests); the caller should then
    skip Ray Train's worker group entirely.
    """
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    kwargs: dict[str, Any] = {"num_workers": res.train_workers, "use_gpu": res.use_gpu,
                              "resources_per_worker": per_worker}
    if res.accelerator_type and res.use_gpu:
        kwargs["accelerator_type"] = res.accelerator_type
    if res.use_gpu and res.train_workers > 1:
        # Pack DDP ranks onto as few nodes as possible: NVLink beats the network for all-reduce.
        kwargs["placement_strategy"] = "PACK"
    return kwargs


def train_total_resources(res: ResourcesConfig) -> dict[str, float]:
    """What a training run asks of the cluster in total (workers × per-worker resources)."""
    workers = max(res.train_workers, 1)
    total = {"CPU": workers * res.cpus_per_worker}
    if res.use_gpu:
        total["GPU"] = workers * res.gpus_per_worker
    return total


# ---------------------------------------------------------------- serving

def serve_deployment_options(serve: ServeConfig) -> dict[str, Any]:
    """``.options()`` keyword arguments for the engine deployment: replicas or autoscaling, resources.

    The transformers engine batches up to ``engine.batch_size`` requests in one forward
    pass, so a replica must be allowed at least that many at once.
    """
    engine = serve.engine
    actor: dict[str, Any] = {"num_cpus": engine.num_cpus}
    if engine.num_gpus > 0:
        actor["num_gpus"] = engine.num_gpus
    ongoing = serve.max_ongoing_requests
    if engine.kind == "transformers":
        ongoing = max(ongoing, engine.batch_size)
    opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": ongoing}
    if serve.max_replicas > serve.min_replicas:
        opts["autoscaling_config"] = {"min_replicas": serve.min_replicas, "max_replicas": serve.max_replicas,
                                      "target_ongoing_requests": serve.target_ongoing_requests}
    else:
        opts["num_replicas"] = serve.min_replicas
    return opts


# ---------------------------------------------------------------- cluster fit

def cluster_node_types(cluster: dict) -> dict[str, dict[str, Any]]:
    """Node types of a Ray cluster launcher config: ``{name: {"resources", "max_workers"}}``.

    The head node counts once; worker types count ``max_workers`` times.
    """
    types = cluster.get("available_node_types") or {}
    head = cluster.get("head_node_type")
    out = {}
    for name, spec in types.items():
        count = 1 if name == head else int(spec.get("max_workers", cluster.get("max_workers", 0)))
        out[name] = {"resources": dict(spec.get("resources") or {}), "max_workers": count}
    return out


def _fits(request: dict[str, float], resources: dict[str, float], accelerator: str = "") -> bool:
    if accelerator and f"accelerator_type:{accelerator}" not in resources:
        return False
    return all(resources.get(key, 0) >= value for key, value in request.items() if value > 0)


def _engine_request(engine: EngineConfig) -> dict[str, float]:
    if engine.num_gpus <= 0:
        return {"CPU": engine.num_cpus}
    # One TP group lives on one node (STRICT_PACK): all its bundles must fit together.
    return {"GPU": engine_gpus(engine), "CPU": float(engine_gpus(engine))}


def recipe_fit_problems(cfg: Config, cluster: dict) -> list[str]:
    """Requests of ``cfg`` that no node type of ``cluster`` can satisfy; empty means it fits.

    Checks: each engine replica (teacher, guard, eval) fits on one node type; the training
    worker group fits in the cluster's maximum capacity and each worker fits on a node; one
    serve replica fits on a node type.
    """
    nodes = cluster_node_types(cluster)
    problems: list[str] = []
    engines = {"distill.engine": cfg.distill.engine, "eval.engine": cfg.eval.engine}
    if cfg.distill.tagger == "guard":
        engines["distill.guard_engine"] = cfg.distill.guard_engine
    for name, engine in engines.items():
        request = _engine_request(engine)
        if not any(_fits(request, n["resources"]) for n in nodes.values()):
            problems.append(f"{name}: one replica needs {request}, which no node type provides")
    res = cfg.resources
    per_worker = scaling_config_kwargs(res)["resources_per_worker"]
    hosts = {k: n for k, n in nodes.items() if _fits(per_worker, n["resources"], res.accelerator_type)}
    if not hosts:
        problems.append(f"resources: one training worker needs {per_worker}, which no node type provides")
    else:
        # How many workers the cluster can hold at most, node by node.
        capacity = sum(n["max_workers"] * min(int(n["resources"].get(k, 0) // v) for k, v in per_worker.items() if v)
                       for n in hosts.values())
        if capacity < max(res.train_workers, 1):
            problems.append(f"resources: {res.train_workers} training workers of {per_worker} "
                            f"exceed the cluster's capacity of {capacity}")
    serve_req = serve_deployment_options(cfg.serve)["ray_actor_options"]
    serve_req = {"CPU": serve_req["num_cpus"], "GPU": serve_req.get("num_gpus", 0)}
    if not any(_fits(serve_req, n["resources"]) for n in nodes.values()):
        problems.append(f"serve: one replica needs {serve_req}, which no node type provides")
    return problems


# ---------------------------------------------------------------- storage

def storage_scheme(uri: str) -> str:
    """``"local"``, ``"s3"`` or ``"gs"`` for a storage path or URI."""
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        return "local"
    return "gs" if scheme == "gcs" else scheme


def is_remote(uri: str) -> bool:
    """True for object-store URIs (s3://, gs://), which every node of a cluster can reach."""
    return storage_scheme(uri) in ("s3", "gs")


def validate_storage_uri(uri: str, field: str) -> str:
    """Check a storage location without touching the network; return it unchanged.

    Raises:
        ConfigError: naming ``field`` for an empty value, an unsupported scheme or a URI
            without a bucket.
    """
    if not uri or not uri.strip():
        raise ConfigError(f"{field}: got {uri!r}, expected a local path or an s3:// or gs:// URI")
    parsed = urlparse(uri)
    scheme = storage_scheme(uri)
    if scheme not in ("local", "s3", "gs"):
        raise ConfigError(f"{field}: got {uri!r}, expected a local path or an s3:// or gs:// URI "
                          f"(scheme {parsed.scheme!r} is not supported)")
    if scheme != "local" and not parsed.netloc:
        raise ConfigError(f"{field}: got {uri!r}, expected a bucket name after {parsed.scheme}://")
    return uri


def absolute_storage_path(uri: str, base: str | Path | None = None) -> str:
    """Local paths made absolute (against ``base`` or the cwd); URIs unchanged.

    Ray Train needs an absolute ``storage_path``: a relative one would resolve against each
    worker's own working directory.
    """
    if is_remote(uri):
        return uri
    path = urlparse(uri).path if uri.startswith("file://") else uri
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base or os.getcwd()) / p
    return str(p.resolve())


def join_storage(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI, keeping any ``?query`` of the URI last."""
    if not is_remote(uri):
        return str(Path(uri, *parts))
    head, sep, query = uri.partition("?")
    joined = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)])
    return joined + (sep + query if sep else "")


def storage_filesystem(uri: str):
    """Resolve a location to ``(pyarrow.fs.FileSystem, path)`` for reading and writing.

    Local paths become absolute. ``s3://`` without ``?region=`` asks S3 for the bucket's
    region (one network call); pass ``?region=...`` to avoid it.
    """
    import pyarrow.fs as pafs

    validate_storage_uri(uri, "storage")
    if not is_remote(uri):
        return pafs.LocalFileSystem(), absolute_storage_path(uri)
    return pafs.FileSystem.from_uri(uri)


def check_shared_storage(uri: str, field: str, multi_node: bool) -> str:
    """Refuse node-local storage for multi-node runs; return the absolute location.

    A local path is shared only when it is a network mount (NFS, EFS), which cannot be
    told from the path: ``R2D_SHARED_FS=1`` declares it (all nodes on one machine also share).
    """
    validate_storage_uri(uri, field)
    if multi_node and not is_remote(uri) and os.environ.get("R2D_SHARED_FS") != "1":
        raise ConfigError(f"{field}: got {uri!r}, expected an s3:// or gs:// URI (or a shared mount with "
                          "R2D_SHARED_FS=1) because the run spans several nodes")
    return absolute_storage_path(uri)
