"""Serving latency and throughput: the Serve application over HTTP against a bare ``generate`` call.

The application is the project's own (ingress with auth, limits and pivot modes in front
of one engine deployment), started from the tiny config on the bundled model, once per
engine: the batched transformers deployment and the vLLM one (continuous batching).
Closed-loop clients keep ``c`` requests in flight (c = 1, 8, 32); every request asks for
the same ``max_tokens`` with greedy decoding. The baseline is the same engine without
the server, one prompt at a time: ``model.generate`` in this process with the replica's
thread count, or ``vllm.LLM.generate`` in a child process with the replica's engine settings.
Concurrency 1 is measured in pairs: one bare request, one through the server, turn about,
both engines loaded and waiting, so a machine that slows down during the run slows both
sides alike (run one after the other, the two p50s once drifted by 17% between runs), each
request after a short untimed pause (the other engine's last request must not share its
cores); the ratios of the pairs give a median with a distribution-free 95% interval. For
vLLM the bare engine also runs 32 prompts a call: the engine's own batching, the ceiling
for the server at concurrency 32.

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

from common import (CpuSampler, PySpyAttach, Row, median, median_interval, per_second, percentile,  # noqa: E402
                    repo_path, start_ray)

SECTION = "serve"
SIZES = {"full": {"max_tokens": 24, "requests": {1: 30, 8: 24, 32: 64}},
         "quick": {"max_tokens": 16, "requests": {1: 6, 8: 8, 32: 32}}}
"""Requests per level (at 1: pairs, one bare and one served each): at 32 clients two waves at least,
so batches form in a steady state."""
MODEL = "bundled:smollm2-135m"
ENGINES = ("transformers", "vllm")


def prompt(i: int) -> str:
    return f"Tell me a fact about the number {i}."


def request_body(i: int, max_tokens: int) -> dict:
    """The chat request every client sends: prompt ``i``, greedy, ``max_tokens``."""
    return {"messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens, "temperature": 0.0}


def serve_config(port: int, engine: str = "transformers"):
    """tiny.yaml's serving on ``engine``: a vLLM deployment reserves two cores, as many as its bare baseline
    uses; a transformers replica one (one torch thread, as its baseline)."""
    from r2d.config import load_config

    cores = [f"serve.engine.num_cpus={2 if engine == 'vllm' else 1}"]
    return load_config(str(Path(__file__).resolve().parent.parent / "jobs/configs/tiny.yaml"), [
        f"serve.model={MODEL}", f"serve.engine.kind={engine}", "serve.api_key_env=", "serve.engine.batch_size=32",
        f"serve.port={port}", "serve.engine.max_model_len=512", "serve.max_tokens_limit=256",
        "serve.default_max_tokens=64", *cores])


def bare_transformers(max_tokens: int, threads: int):
    """``one(i)``: a single-prompt greedy ``generate`` in this process, returning the tokens it generated."""
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

    return one


def single_client(seconds: list[float], tokens: int) -> dict:
    """p50, p99 and requests/s of one client's sequential requests."""
    return {"p50_s": median(seconds), "p99_s": percentile(seconds, 99), "tokens": tokens,
            "req_s": per_second(len(seconds), sum(seconds))}


SETTLE_S = 1.0
"""Untimed pause before each timed request at concurrency 1. Both engines share the machine's cores, and
an engine's last request leaves it busy for a moment after it has answered: measured at ``2643332``, a
served request right after a bare one took 1.82-2.02 s (median of 8) against 1.19 s right after another
served one, while the bare side moved 1.35 -> 1.39 s; with a 1 s pause, 1.22-1.25 s and 1.36 s in either
order. Back to back, the pairs read 1.4x when the bare request went first and 0.9x when it went second."""


def paired(bare, served, n: int, settle_s: float = SETTLE_S) -> tuple[dict, dict]:
    """``n`` requests each through ``bare(i)`` and ``served(i)`` (each returns the tokens it generated),
    turn about and each side first every other time, after one untimed warm-up of each; ``settle_s``
    untimed seconds before each timed request (see :data:`SETTLE_S`).

    The served side's stats also hold ``pair_ratios``: served over bare, pair by pair (the two requests
    of a pair run a moment apart, so a machine that drifts during the run moves both)."""
    bare(0)
    served(0)
    times: dict = {bare: [], served: []}
    tokens: dict = {bare: 0, served: 0}
    for i in range(n):
        for one in (bare, served) if i % 2 == 0 else (served, bare):
            time.sleep(settle_s)
            start = time.perf_counter()
            tokens[one] += one(i)
            times[one].append(time.perf_counter() - start)
    stats = single_client(times[served], tokens[served])
    stats["pair_ratios"] = [s / b for s, b in zip(times[served], times[bare])]
    return single_client(times[bare], tokens[bare]), stats


REPLY = "r2d-bench-reply "
"""Prefix of the bare vLLM child's answers on its stdout (vLLM's own logs go to stderr)."""


class BareVLLM:
    """``LLM.generate`` in a child process that waits for commands, so the server's requests can be
    interleaved with its own while both engines stay loaded. ``bare(i)`` runs one prompt; ``batch``
    runs several in one call."""

    def __init__(self, max_tokens: int, timeout_s: float = 900) -> None:
        import queue
        import subprocess
        import tempfile
        import threading

        self._log = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", "vllm-bare", "--max-tokens", str(max_tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        self._answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._ask("", timeout_s)  # the child's first reply: the engine is loaded

    def _read(self) -> None:
        """The child's answers, in order; None when its stdout closes (it exited)."""
        for line in self._proc.stdout:
            if line.startswith(REPLY):
                self._answers.put(json.loads(line[len(REPLY):]))
        self._answers.put(None)

    def _ask(self, command: str, timeout_s: float = 600) -> dict:
        import queue

        if command:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        try:
            answer = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            answer = None
        if answer is None or "error" in answer:
            self._log.seek(0)
            raise RuntimeError(f"the bare vLLM child gave no answer to {command or 'start'!r} ({answer}):\n"
                               f"{self._log.read()[-2000:]}")
        return answer

    def __call__(self, i: int) -> int:
        return self._ask(f"one {i}")["tokens"]

    def batch(self, first: int, k: int) -> dict:
        """Prompts ``first .. first + k - 1`` in one ``generate`` call: seconds and tokens."""
        return self._ask(f"batch {first} {k}")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(60)
            except Exception:
                self._proc.kill()
        self._log.close()


def bare_vllm_child(max_tokens: int) -> None:
    """The child of :class:`BareVLLM`: the serving replica's engine settings and the same rendered token
    ids; answers ``one i`` and ``batch first k`` lines until stdin closes."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else printed (vLLM's logs) goes to stderr
    from r2d.runtime import worker_env

    for key, value in worker_env().items():
        os.environ.setdefault(key, value)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from r2d.engines.vllm_engine import engine_args
    from r2d.models import load_tokenizer, resolve_source
    from r2d.pivots import render_conversation

    cfg = serve_config(8000, "vllm")
    local = resolve_source(MODEL, cfg.model.cache_dir)
    tok = load_tokenizer(local, cfg.model.cache_dir)
    llm = LLM(model=local, tokenizer=local, **engine_args(cfg.model, cfg.serve.engine), disable_log_stats=True)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False)

    def run(first: int, k: int) -> dict:
        prompts = [TokensPrompt(prompt_token_ids=tok(render_conversation(tok, prompt(i)),
                                                     add_special_tokens=False)["input_ids"])
                   for i in range(first, first + k)]
        start = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        return {"seconds": time.perf_counter() - start, "tokens": sum(len(o.outputs[0].token_ids) for o in out)}

    print(REPLY + json.dumps({"ready": True}), file=reply)
    for line in sys.stdin:
        words = line.split() or [""]
        if words[0] == "one":
            answer = run(int(words[1]), 1)
        elif words[0] == "batch":
            answer = run(int(words[1]), int(words[2]))
        else:
            answer = {"error": f"unknown command {line!r}"}
        print(REPLY + json.dumps(answer), file=reply)


async def _load(url: str, concurrency: int, total: int, max_tokens: int) -> dict:
    """``concurrency`` closed-loop clients until ``total`` requests are done; latencies per request."""
    import httpx

    latencies: list[float] = []
    tokens = 0
    next_i = iter(range(total))

    async def client(http) -> None:
        nonlocal tokens
        for i in next_i:
            start = time.perf_counter()
            r = await http.post(url, json=request_body(i, max_tokens))
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
    pairs = levels[1].get("pair_ratios") or []
    if len(pairs) >= 6:  # the same requests read pair by pair, with how far the noise lets the median move
        low, high = median_interval(pairs)
        rows.append(Row(SECTION, f"{engine}: concurrency 1, server over bare, median of {len(pairs)} pairs",
                        median(pairs), "x",
                        note=f"95% interval of the median [{low:.2f}, {high:.2f}]; the target is read on the p50 row"))
    for c in (8, 32):
        rows.append(Row(SECTION, f"{engine}: requests/s at concurrency {c} vs 1", levels[c]["req_s"], "req/s",
                        "concurrency 1", levels[1]["req_s"], batching if c == 32 else None,
                        note=f"p50 {levels[c]['p50_s']:.2f}s, p99 {levels[c]['p99_s']:.2f}s"))
    return rows


def served_one(url: str, max_tokens: int):
    """``one(i)``: one request through the server, returning the tokens it generated."""
    import httpx

    http = httpx.Client(timeout=900)

    def one(i: int) -> int:
        r = http.post(url, json=request_body(i, max_tokens))
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    return one


def measure_server(size: dict, bare, log=print, profile_dir: str = "", engine: str = "transformers",
                   profile_if=lambda levels, bare: False) -> tuple[dict, dict, float, dict]:
    """Start the app, wait for a real generation, run each concurrency level.

    ``bare(i)`` is the engine without the server; concurrency 1 is measured in pairs with it (see the
    module doc), and on vLLM its batching ceiling too, before ``bare`` is closed and the higher levels run.

    Returns (levels, bare stats, start-up seconds, profiles): with ``profile_dir`` and
    ``profile_if(levels, bare)`` true (a target missed), shorter passes at concurrency 1 and at 32 run
    under py-spy attached to the proxy and the replicas (after the measured passes, so sampling does
    not slow them).
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
        bare_stats, levels[1] = paired(bare, served_one(url, size["max_tokens"]), size["requests"][1])
        log(f"  {engine} concurrency 1, paired: server p50 {levels[1]['p50_s']:.2f}s, bare p50 "
            f"{bare_stats['p50_s']:.2f}s")
        if hasattr(bare, "batch"):  # the engine's own batching: as many prompts a call as clients at 32
            k, total = 32, size["requests"][32]
            calls = [bare.batch(first, k) for first in range(0, total, k)]
            bare_stats["batch32_req_s"] = per_second(total, sum(c["seconds"] for c in calls))
            log(f"  {engine} bare, 32 prompts a call: {bare_stats['batch32_req_s']:.2f} req/s")
        if hasattr(bare, "close"):
            bare.close()
        for c, total in size["requests"].items():
            if c == 1:
                continue
            levels[c] = asyncio.run(_load(url, c, total, size["max_tokens"]))
            log(f"  {engine} concurrency {c}: p50 {levels[c]['p50_s']:.2f}s p99 {levels[c]['p99_s']:.2f}s "
                f"{levels[c]['req_s']:.2f} req/s {levels[c]['tok_s']:.1f} tok/s")
        profiles = {}
        for c in (1, 32) if profile_dir and profile_if(levels, bare_stats) else ():
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
    return levels, bare_stats, startup, profiles


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
    if engine == "vllm":
        bare = BareVLLM(size["max_tokens"])
        baseline, note = "bare LLM.generate p50", f"{size['max_tokens']} tok/request, greedy, engine on 2 cores, paired"
    else:
        bare = bare_transformers(size["max_tokens"], threads)
        baseline, note = ("bare generate p50",
                          f"{size['max_tokens']} tok/request, greedy, replica {threads} thread(s), paired")
    try:
        levels, bare_stats, startup, profiles = measure_server(
            size, bare, log, profile_dir, engine,
            profile_if=lambda lv, b: any(r.met is False for r in level_rows(engine, lv, b, baseline, note)))
    finally:
        if hasattr(bare, "close"):  # the bare vLLM child, also when the server failed to start
            bare.close()
    log(f"  {engine} server start-up to the first completion {startup:.0f}s")
    rows = level_rows(engine, levels, bare_stats, baseline, note)
    if "batch32_req_s" in bare_stats:
        rows += [Row(SECTION, f"{engine}: bare engine, 32 prompts a call vs 1", bare_stats["batch32_req_s"], "req/s",
                     "bare, 1 prompt a call", bare_stats["req_s"],
                     note="the engine's own batching on this machine: the ceiling of the 32-vs-1 row"),
                 Row(SECTION, f"{engine}: requests/s at concurrency 32 vs the bare engine's 32 a call",
                     levels[32]["req_s"], "req/s", "bare, 32 prompts a call", bare_stats["batch32_req_s"],
                     note="what the server keeps of the engine's batching")]
    rows.append(Row(SECTION, f"{engine}: start-up to the first real completion", startup, "s",
                    note="serve.run to the first chat completion answered"))
    rows[0].extra = {"levels": {str(k): v for k, v in levels.items()}, "bare": bare_stats, "startup_s": startup,
                     "profiles": profiles}
    return rows


def main(argv: list[str] | None = None) -> int:
    from common import add_section_args, emit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_section_args(parser)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma list of serving engines to measure")
    parser.add_argument("--child", choices=["vllm-bare"])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.child == "vllm-bare":
        bare_vllm_child(args.max_tokens)
        return 0
    emit(run(args.quick, profile_dir=args.profile_dir, engines=tuple(args.engines.split(","))), args.rows_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
