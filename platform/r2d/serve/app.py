"""The Serve application: the project's ingress in front of one engine deployment.

    HTTP -> Ingress (FastAPI from r2d.serve.api; auth, limits, pivot modes)
         -> TransformersServer (@serve.batch) | VLLMServer (AsyncLLM)

:func:`build_app` binds both from a :class:`r2d.config.Config`; :func:`app` is the
``serve run`` entry point::

    serve run r2d.serve.app:app config=jobs/configs/tiny.yaml serve.model=/path/to/model
"""

from __future__ import annotations

import os

from ray import serve

from r2d.placement import serve_deployment_options
from r2d.serve.api import HandleClient, create_api
from r2d.serve.transformers_backend import TransformersServer
from r2d.serve.vllm_backend import VLLMServer


@serve.deployment(name="r2d-ingress")
@serve.ingress()
class Ingress:
    """The HTTP front: builds the FastAPI app around a handle to the engine deployment."""

    def __init__(self, serve_cfg, engine) -> None:
        self._api = create_api(serve_cfg, HandleClient(engine))

    def __serve_build_asgi_app__(self):
        return self._api


def _ingress_options(cfg) -> dict:
    # The ingress only parses JSON and relays tokens: no whole core for it on a 2-core machine.
    actor: dict = {"num_cpus": 0}
    key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    if key:  # replicas run in Ray workers, which do not inherit this process's environment
        actor["runtime_env"] = {"env_vars": {cfg.api_key_env: key}}
    return {"ray_actor_options": actor, "max_ongoing_requests": cfg.max_ongoing_requests * cfg.max_replicas,
            "num_replicas": 1}


def engine_deployment(config):
    """The bound engine deployment for ``config.serve.engine.kind``."""
    cfg = config.serve
    common = {"source": cfg.model, "model": config.model, "engine": cfg.engine, "reload_poll_s": cfg.reload_poll_s}
    opts = serve_deployment_options(cfg)
    if cfg.engine.kind == "vllm":
        return VLLMServer.options(**opts).bind(**common)
    return TransformersServer.options(**opts).bind(batch_wait_s=cfg.batch_wait_s, **common)


def build_app(config):
    """The whole application for a :class:`r2d.config.Config`."""
    return Ingress.options(**_ingress_options(config.serve)).bind(config.serve, engine_deployment(config))


def app(args: dict):
    """``serve run`` builder: ``config=<yaml>`` plus dotted overrides as ``key=value`` arguments."""
    from r2d.config import load_config

    args = dict(args)
    path = args.pop("config", None)
    return build_app(load_config(path, [f"{k}={v}" for k, v in args.items()]))
