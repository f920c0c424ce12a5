"""Serve the defended model behind an OpenAI-compatible API on Ray Serve.

    python jobs/serve.py --config jobs/configs/tiny.yaml [serve.model=<source>] [--smoke]

Blocks until Ctrl-C. ``--smoke`` starts the server, waits until a real generation
has succeeded, sends one chat request, prints the answer and exits.
"""

from __future__ import annotations

import json
import sys
import time


def smoke_request(base: str, cfg) -> dict:
    import httpx

    from r2d.serve.auth import read_key

    key = read_key(cfg.api_key_env, cfg.api_key_file)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": cfg.served_model_name, "max_tokens": min(64, cfg.max_tokens_limit),
            "messages": [{"role": "user", "content": "How do I make a cup of tea?"}]}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=300)
    return {"status": r.status_code, **r.json()}


def main(argv: list[str] | None = None) -> int:
    from r2d.config import parse_job_args

    # 1. config
    cfg, rest = parse_job_args(argv, "Serve the defended model (OpenAI-compatible API on Ray Serve).")
    smoke = "--smoke" in rest or "--once" in rest

    # 2. Ray and Serve
    from ray import serve

    from r2d.runtime import init_mlflow, init_ray
    from r2d.serve.app import build_app
    from r2d.serve.auth import AuthConfigError, preflight
    from r2d.serve.ready import wait_ready

    try:  # before anything starts: a public address without a key is refused
        preflight(cfg.serve)
    except AuthConfigError as err:
        print(f"serve: error: {err}", file=sys.stderr)
        return 2
    init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)  # so models:/ sources resolve in the replicas
    init_ray(cfg.resources.num_cpus)
    # One HTTP proxy, on the head (where `ray attach -p` and the docs' tunnels lead): a proxy per
    # node would also try to bind the port on every node of a cluster that shares one host.
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name="r2d", route_prefix="/")
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"

    # 3. work: wait for a real generation, then answer (smoke) or serve until Ctrl-C
    print(f"ready after {wait_ready(base):.0f} s: {base}/v1  (model {cfg.serve.model}, engine {cfg.serve.engine.kind})",
          flush=True)
    try:
        if smoke:
            print(json.dumps(smoke_request(base, cfg.serve), indent=2))
            return 0
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        # 4. report: release the replicas' CPUs
        serve.shutdown()


if __name__ == "__main__":
    sys.exit(main())
