"""Serving latency and throughput: the Serve application over HTTP against a bare ``generate`` call.

The application is the project's own (ingress with auth, limits and pivot modes in front
of one engine deployment), started from the tiny config on the bundled model, once per
engine: the batched transformers deployment and the vLLM one (continuous batching).
Closed-loop clients keep ``c`` requests in flight (c = 1, 8, 32); every request asks for
the same ``max_tokens`` with greedy decoding. The baseline is the same engine without
the server, one prompt at a time: ``model.generate`` in this process with the replica's
thread count, or ``vllm.LLM.generate`` in a fresh process with the replica's engine settings.

    python benchmarks/bench_serving.py [--quick] [--engines transformers,vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (CpuSampler, PySpyAttach, Row, median, per_second, percentile, repo_path, run_child,  # noqa: E402
                    start_ray)

SECTION = "serve"
SIZES = {"full": {"max_tokens": 24, "requests": {1: 8, 8: 24, 32: 64}, "bare": 6},
         "quick": {"max_tokens": 16, "requests": {1: 4, 8: 8, 32: 32}, "bare": 4}}
"""Requests per level: at 32 clients two waves at least, so batches form in a steady state."""
MODEL = "bundled:smollm2-135m"
ENGINES = ("transformers", "vllm")


def prompt(i: int) -> str:
    return f"Tell me a fact about the number {i}."


def serve_config(port: int, engine: str = "transformers"):
    """tiny.yaml's serving on ``engine``; a vLLM deployment reserves (and its threads are bound to) two
    cores, as many as its bare baseline uses."""
    from r2d.config import load_config

    cores = ["serve.engine.num_cpus=2"] if engine == "vllm" else []
    return load_config(str(Path(__file__).resolve().parent.parent / "jobs/configs/tiny.yaml"), [
        f"serve.model={MODEL}", f"serve.engine.kind={engine}", "serve.api_key_env=", "serve.engine.batch_size=32",
        f"serve.port={port}", "serve.engine.max_model_len=512", "serve.max_tokens_limit=256",
        "serve.default_max_tokens=64", *cores])


def bare_latencies(n: int, max_tokens: int, threads: int) -> dict:
    """Latency of ``n`` single-prompt greedy ``generate`` calls in this process (after one warm-up)."""
    import torch

    from r2d.models import load_model
    from r2d.pivots import render_conversation
    from r2d.runtime import set_threads

    set_threads(threads)
    model, tok = load_model(MODEL, "float32")
    model.eval()

    def one(i: int) -> int:
        enc = tok(render_conversation(tok, prompt(i)), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tok.pad_token_id)
        return out.shape[1] - enc["input_ids"].shape[1]

    return one_at_a_time(one, n)


def one_at_a_time(one, n: int) -> dict:
    """Latencies of ``one(i)`` (which returns the tokens it generated) for i = 0..n-1, after one
    untimed warm-up call: p50, p99 and requests/s of a single client."""
    one(0)
    seconds, tokens = [], 0
    for i in range(n):
        start = time.perf_counter()
        tokens += one(i)
        seconds.append(time.perf_counter() - start)
    return {"p50_s": median(seconds), "p99_s": percentile(seconds, 99), "tokens": tokens,
            "req_s": per_second(n, sum(seconds))}


def bare_vllm_latencies(n: int, max_tokens: int) -> dict:
    """Latency of ``n`` single-prompt greedy ``LLM.generate`` calls (after one warm-up), with the
    serving replica's engine settings and the same rendered token ids; run in a fresh process."""
    from r2d.runtime import worker_env

    for key, value in worker_env().items():
        os.environ.setdefault(key, value)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from r2d.models import load_tokenizer, resolve_source
    from r2d.pivots import render_conversation

    cfg = serve_config(8000, "vllm")
    local = resolve_source(MODEL, cfg.model.cache_dir)
    tok = load_tokenizer(local, cfg.model.cache_dir)
    llm = LLM(model=local, tokenizer=local, dtype=cfg.model.dtype, max_model_len=cfg.serve.engine.max_model_len,
              enforce_eager=True, disable_log_stats=True)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False)

    def one(i: int) -> int:
        ids = tok(render_conversation(tok, prompt(i)), add_special_tokens=False)["input_ids"]
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        return len(out[0].outputs[0].token_ids)

    return one_at_a_time(one, n)


async def _load(url: str, concurrency: int, total: int, max_tokens: int) -> dict:
    """``concurrency`` closed-loop clients until ``total`` requests are done; latencies per request."""
    import httpx

    latencies: list[float] = []
    tokens = 0
    next_i = iter(range(total))

    async def client(http) -> None:
        nonlocal tokens
        for i in next_i:
            body = {"messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
                    "temperature": 0.0}
            start = time.perf_counter()
            r = await http.post(url, json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=900) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99), "req_s": per_second(total, wall),
            "tok_s": per_second(tokens, wall), "tokens": tokens, "requests": total}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_pids() -> dict[str, int]:
    """PIDs of the Serve processes a request passes through: the HTTP proxy and every replica.

    Found by Ray's process titles (``ray::ServeReplica:<app>:<deployment>``,
    ``ray::ProxyActor``), which needs no dashboard.
    """
    import psutil

    pids = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith("ray::ServeReplica:") or title.startswith("ray::ProxyActor"):
            name = title.split()[0].removeprefix("ray::").split(":")[-1].lower()
            pids[f"serve-{name}"] = proc.info["pid"]
    return pids


TARGETS = {"transformers": (1.15, 4.0), "vllm": (1.05, 8.0)}
"""Per engine: latency at concurrency 1 over bare (at most); requests/s at 32 over concurrency 1 (at least).
vLLM's are those of the hand-written replica Ray Serve LLM replaced (it measured 0.99x and 9.1x)."""


def level_rows(engine: str, levels: dict, bare: dict, baseline: str, note: str) -> list[Row]:
    """One engine's rows from its concurrency levels and its bare baseline, with their targets."""
    overhead, batching = TARGETS[engine]
    rows = [Row(SECTION, f"{engine}: latency p50 at concurrency 1 vs bare", levels[1]["p50_s"], "s",
                baseline, bare["p50_s"], overhead, higher_is_better=False, note=note)]
    for c in (8, 32):
        rows.append(Row(SECTION, f"{engine}: requests/s at concurrency {c} vs 1", levels[c]["req_s"], "req/s",
                        "concurrency 1", levels[1]["req_s"], batching if c == 32 else None,
                        note=f"p50 {levels[c]['p50_s']:.2f}s, p99 {levels[c]['p99_s']:.2f}s"))
    return rows


def measure_server(size: dict, log=print, profile_dir: str = "", engine: str = "transformers",
                   profile_if=lambda levels: False) -> tuple[dict, float, dict]:
    """Start the app, wait for a real generation, run each concurrency level.

    Returns (levels, start-up seconds, profiles): with ``profile_dir`` and ``profile_if(levels)``
    true (a target missed), shorter passes at concurrency 1 and at 32 run under py-spy attached
    to the proxy and the replicas (after the measured passes, so sampling does not slow them).
    """
    import httpx
    from ray import serve

    from r2d.serve.app import build_app

    port = _free_port()
    cfg = serve_config(port, engine)
    start_ray(num_cpus=3)
    started = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="r2d-bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/chat/completions"
    deadline = time.time() + 600
    while httpx.get(f"{base}/healthz", timeout=120).status_code != 200:
        if time.time() > deadline:
            raise RuntimeError("the server never became ready")
        time.sleep(0.5)
    levels = {}
    try:
        asyncio.run(_load(url, 1, 1, size["max_tokens"]))  # warm-up request
        startup = time.perf_counter() - started  # to the first real completion, not to the first answer of /healthz
        for c, total in size["requests"].items():
            levels[c] = asyncio.run(_load(url, c, total, size["max_tokens"]))
            log(f"  {engine} concurrency {c}: p50 {levels[c]['p50_s']:.2f}s p99 {levels[c]['p99_s']:.2f}s "
                f"{levels[c]['req_s']:.2f} req/s {levels[c]['tok_s']:.1f} tok/s")
        profiles = {}
        for c in (1, 32) if profile_dir and profile_if(levels) else ():
            folder = Path(profile_dir) / f"serve-{engine}-c{c}"
            # py-spy shows the Python processes; the sampler shows every process, engine workers included.
            with PySpyAttach(_serve_pids(), folder) as spy, CpuSampler() as cpu:
                t0 = time.perf_counter()
                asyncio.run(_load(url, c, SIZES["quick"]["requests"][c], size["max_tokens"]))
                t1 = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "cpu.txt").write_text(f"# {engine} server at concurrency {c}\n{cpu.report(t0, t1)}")
            profiles[c] = {**{k: repo_path(v) for k, v in spy.paths.items()}, "cpu": repo_path(folder / "cpu.txt")}
    finally:
        serve.shutdown()
    return levels, startup, profiles


def run(quick: bool = False, log=print, profile_dir: str = "", engines: tuple[str, ...] = ENGINES) -> list[Row]:
    size = SIZES["quick" if quick else "full"]
    rows: list[Row] = []
    for engine in engines:
        try:
            rows += run_engine(engine, size, log, profile_dir)
        except Exception as err:  # one engine failing (vLLM absent, say) still leaves the other's rows
            rows.append(Row(SECTION, f"{engine}: latency p50 at concurrency 1 vs bare", None, "s",
                            note=f"failed: {str(err).strip().splitlines()[-1][:200]}"))
    return rows


def run_engine(engine: str, size: dict, log=print, profile_dir: str = "") -> list[Row]:
    """One engine's rows: the server's levels against the same engine without the server."""
    if engine == "vllm":
        import vllm  # noqa: F401  (absent: the caller turns the ImportError into a row)
    threads = max(1, int(serve_config(8000).serve.engine.num_cpus))  # what a transformers replica gets
    # The bare baseline first: whether a target was missed decides if the server is profiled.
    if engine == "vllm":
        here = str(Path(__file__).resolve())
        bare = run_child([here, "--child", "vllm-bare", "--n", str(size["bare"]), "--max-tokens",
                          str(size["max_tokens"])], 900)
        baseline, note = "bare LLM.generate p50", f"{size['max_tokens']} tok/request, greedy, engine on all cores"
    else:
        bare = bare_latencies(size["bare"], size["max_tokens"], threads)
        baseline, note = "bare generate p50", f"{size['max_tokens']} tok/request, greedy, replica {threads} thread(s)"
    levels, startup, profiles = measure_server(
        size, log, profile_dir, engine,
        profile_if=lambda lv: any(r.met is False for r in level_rows(engine, lv, bare, baseline, note)))
    log(f"  {engine} bare: p50 {bare['p50_s']:.2f}s; server start-up to the first completion {startup:.0f}s")
    rows = level_rows(engine, levels, bare, baseline, note)
    rows.append(Row(SECTION, f"{engine}: start-up to the first real completion", startup, "s",
                    note="serve.run to the first chat completion answered"))
    rows[0].extra = {"levels": {str(k): v for k, v in levels.items()}, "bare": bare, "startup_s": startup,
                     "profiles": profiles}
    return rows


def main(argv: list[str] | None = None) -> int:
    from common import add_section_args, emit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_section_args(parser)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma list of serving engines to measure")
    parser.add_argument("--child", choices=["vllm-bare"])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.child == "vllm-bare":
        print(json.dumps(bare_vllm_latencies(args.n, args.max_tokens)), flush=True)
        return 0
    emit(run(args.quick, profile_dir=args.profile_dir, engines=tuple(args.engines.split(","))), args.rows_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
