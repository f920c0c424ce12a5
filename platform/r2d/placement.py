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

Where jobs read and write (local paths, ``s3://``, ``gs://``) is :mod:`r2d.storage`'s.

All functions are pure (no Ray calls) so they are tested without a cluster.
"""

from __future__ import annotations

from typing import Any

from r2d.config import Config, EngineConfig, ResourcesConfig, ServeConfig


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


def actor_options(engine: EngineConfig) -> dict[str, Any]:
    """Ray actor options for an engine held in one actor: its CPUs, and its GPUs (all its TP ranks)."""
    opts: dict[str, Any] = {"num_cpus": engine.num_cpus}
    if engine.num_gpus > 0:
        opts["num_gpus"] = float(engine_gpus(engine)) if engine.kind == "vllm" else engine.num_gpus
    return opts


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
    """``.options()`` keyword arguments for the engine deployment: replicas or autoscaling, the replica's resources.

    The transformers engine batches up to ``engine.batch_size`` requests in one forward
    pass, so a replica must be allowed at least that many at once.
    """
    engine = serve.engine
    # A vLLM replica (Ray Serve LLM's LLMServer) only relays: its engine's CPUs and GPUs are its
    # placement group's (vllm_placement_group_config). A transformers replica computes in its own actor.
    actor = {"num_cpus": 0} if engine.kind == "vllm" else actor_options(engine)
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


def config_engines(cfg: Config) -> dict[str, EngineConfig]:
    """Every engine a config runs, by dotted name; endpoints (kind openai) need no cluster resources."""
    engines = {"distill.engine": cfg.distill.engine, "eval.engine": cfg.eval.engine, "serve.engine": cfg.serve.engine}
    if cfg.distill.tagger == "guard":
        engines["distill.guard_engine"] = cfg.distill.guard_engine
    if cfg.eval.judge != "refusal":
        engines["eval.judge_engine"] = cfg.eval.judge_engine
    return {name: e for name, e in engines.items() if e.kind != "openai"}


def recipe_fit_problems(cfg: Config, cluster: dict) -> list[str]:
    """Requests of ``cfg`` that no node type of ``cluster`` can satisfy, one line each; empty means it fits.

    Checks: each engine replica (teacher, guard, evaluation, judge, serving) fits on one node
    type, and a tensor-parallel group fits the GPUs of one node; each training worker fits on
    a node type; the training worker group fits the cluster's maximum capacity.
    """
    nodes = cluster_node_types(cluster)
    problems: list[str] = []
    most_gpus = max((int(n["resources"].get("GPU", 0)) for n in nodes.values()), default=0)
    for name, engine in config_engines(cfg).items():
        tp = engine.tensor_parallel_size
        if engine.num_gpus > 0 and engine.kind == "vllm" and tp > most_gpus:
            problems.append(f"{name}.tensor_parallel_size: {tp} needs {tp} GPUs on one node; "
                            f"the largest node type has {most_gpus}")
            continue
        request = _engine_request(engine)
        if name == "serve.engine" and engine.kind != "vllm":  # a vLLM replica's is its placement group's
            actor = serve_deployment_options(cfg.serve)["ray_actor_options"]
            request = {"CPU": actor["num_cpus"], "GPU": actor.get("num_gpus", 0)}
        if not any(_fits(request, n["resources"]) for n in nodes.values()):
            problems.append(f"{name}: one replica needs {request}, which no node type provides")
    res = cfg.resources
    per_worker = scaling_config_kwargs(res)["resources_per_worker"]
    hosts = {k: n for k, n in nodes.items() if _fits(per_worker, n["resources"], res.accelerator_type)}
    if not hosts:
        what = f" of accelerator type {res.accelerator_type}" if res.accelerator_type else ""
        problems.append(f"resources: one training worker needs {per_worker}{what}, which no node type provides")
    else:
        # How many workers the cluster can hold at most, node by node.
        capacity = sum(n["max_workers"] * min(int(n["resources"].get(k, 0) // v) for k, v in per_worker.items() if v)
                       for n in hosts.values())
        if capacity < max(res.train_workers, 1):
            problems.append(f"resources.train_workers: {res.train_workers} workers of {per_worker} "
                            f"exceed the cluster's capacity of {capacity}")
    return problems


def cluster_max_nodes(cluster: dict) -> int:
    """The most nodes a launcher config can have at once: the head plus every worker type's maximum."""
    return sum(n["max_workers"] for n in cluster_node_types(cluster).values())
