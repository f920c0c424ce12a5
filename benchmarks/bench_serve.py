"""Serving throughput: sequential requests against 32 concurrent clients (dynamic batching).

    python benchmarks/bench_serve.py --config jobs/configs/tiny.yaml serve.model=bundled:smollm2-135m \
        [--requests 32] [--max-tokens 32] [--json out.json]

Without ``serve.model`` it serves a tiny random Llama built on the spot. Prints tokens/s
for both phases and their ratio; concurrent requests share ``generate`` passes, so the
ratio shows what ``@serve.batch`` buys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time


async def _one(client, url: str, i: int, max_tokens: int) -> int:
    body = {"messages": [{"role": "user", "content": f"Tell me a fact about the number {i}."}],
            "max_tokens": max_tokens, "r2d_mode": "show"}
    r = await client.post(url, json=body)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def _phase(url: str, n: int, max_tokens: int, concurrent: bool) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        started = time.time()
        if concurrent:
            tokens = await asyncio.gather(*(_one(client, url, i, max_tokens) for i in range(n)))
        else:
            tokens = [await _one(client, url, i, max_tokens) for i in range(n)]
        seconds = time.time() - started
    return {"requests": n, "tokens": sum(tokens), "seconds": round(seconds, 2),
            "tok_per_s": round(sum(tokens) / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/tiny.yaml")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args, overrides = parser.parse_known_args(argv)

    # 1. config: a tiny model unless serve.model is given
    from r2d.config import load_config
    from r2d.models import make_tiny_llama

    if not any(o.startswith("serve.model=") for o in overrides):
        overrides.append(f"serve.model={make_tiny_llama(tempfile.mkdtemp() + '/tiny')}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(args.config, [*overrides, "serve.engine=transformers", "serve.api_key_env=",
                                    f"serve.batch_max_size={args.requests}", f"serve.port={port}"])

    # 2. serve
    import httpx
    from ray import serve

    from r2d.runtime import init_ray
    from r2d.serve.app import build_app

    init_ray(cfg.resources.num_cpus)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="r2d-bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    while httpx.get(f"{base}/healthz", timeout=60).status_code != 200:
        time.sleep(0.5)

    # 3. measure: sequential, then all at once
    url = f"{base}/v1/chat/completions"
    try:
        sequential = asyncio.run(_phase(url, args.requests, args.max_tokens, concurrent=False))
        concurrent = asyncio.run(_phase(url, args.requests, args.max_tokens, concurrent=True))
    finally:
        serve.shutdown()

    # 4. report
    result = {"model": cfg.serve.model, "max_tokens": args.max_tokens, "sequential": sequential,
              "concurrent": concurrent, "ratio": round(concurrent["tok_per_s"] / sequential["tok_per_s"], 2)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
