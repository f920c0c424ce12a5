"""The Serve application: the project's ingress in front of one engine deployment.

    HTTP -> Ingress (FastAPI from r2d.serve.api; auth, limits, pivot modes)
         -> TransformersServer (@serve.batch) | VLLMServer (Ray Serve LLM's LLMServer)

:func:`build_app` binds both from a :class:`r2d.config.Config`; :func:`app` is the
``serve run`` entry point::

    serve run r2d.serve.app:app config=jobs/configs/tiny.yaml serve.model=/path/to/model

``serve.host`` must name the address Serve binds (``http_options.host``): a non-loopback
one is refused without an API key.
"""

from __future__ import annotations

import dataclasses

from ray import serve

from r2d.placement import serve_deployment_options
from r2d.serve.api import HandleClient, create_api
from r2d.serve.auth import is_loopback, preflight
from r2d.serve.transformers_backend import TransformersServer
from r2d.serve.vllm_backend import vllm_deployment


@serve.deployment(name="r2d-ingress")
@serve.ingress()
class Ingress:
    """The HTTP front: builds the FastAPI app around a handle to the engine deployment."""

    def __init__(self, serve_cfg, engine) -> None:
        # Check the key against the address Serve really binds, not only the one the config names.
        bound = _bound_host(serve_cfg.host)
        if not is_loopback(bound):
            serve_cfg = dataclasses.replace(serve_cfg, host=bound)
        self._api = create_api(serve_cfg, HandleClient(engine))

    def __serve_build_asgi_app__(self):
        return self._api


def _bound_host(configured: str) -> str:
    """The host Serve's proxies bind (read from the Serve controller), else the configured one."""
    try:
        from ray.serve.context import _get_global_client  # no public API says where Serve listens

        return _get_global_client().http_config.host or configured
    except Exception:
        return configured


def _ingress_options(cfg) -> dict:
    # The ingress only parses JSON and relays tokens: no whole core for it on a 2-core machine.
    # No runtime_env: the keys are read by the replica itself (r2d.serve.auth), never shipped through Ray.
    return {"ray_actor_options": {"num_cpus": 0},
            "max_ongoing_requests": cfg.max_ongoing_requests * cfg.max_replicas, "num_replicas": 1}


def engine_deployment(config):
    """The bound engine deployment for ``config.serve.engine.kind``."""
    cfg = config.serve
    if cfg.engine.kind == "vllm":
        return vllm_deployment(config)
    return TransformersServer.options(**serve_deployment_options(cfg)).bind(
        source=cfg.model, model=config.model, engine=cfg.engine, reload_poll_s=cfg.reload_poll_s,
        reload_backoff_s=cfg.reload_backoff_s, batch_wait_s=cfg.batch_wait_s)


def build_app(config):
    """The whole application for a :class:`r2d.config.Config`.

    Raises:
        r2d.serve.auth.AuthConfigError: ``serve.host`` faces the network and no key is set
            (checked here for ``serve run`` and RayService, and again by the ingress replica).
    """
    preflight(config.serve)
    return Ingress.options(**_ingress_options(config.serve)).bind(config.serve, engine_deployment(config))


def app(args: dict):
    """``serve run`` builder: ``config=<yaml>`` plus dotted overrides as ``key=value`` arguments."""
    from r2d.config import load_config

    args = dict(args)
    path = args.pop("config", None)
    return build_app(load_config(path, [f"{k}={v}" for k, v in args.items()]))
