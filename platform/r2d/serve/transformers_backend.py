"""The transformers engine: concurrent requests share one batched ``generate`` call.

:class:`TransformersEngine` is plain Python (tested without Ray). It renders each
conversation with :func:`r2d.pivots.render_conversation`, pads the batch on the left
and runs ``model.generate`` in a thread while a streamer hands every step's tokens
back to the event loop, so a batch streams token by token::

    [GenRequest, ...] -> stream_batch -> per step: [Delta | StopIteration, ...]

One request never fails its batch: a row whose sampling values or prompt the engine
cannot run answers with its own error delta, and the others generate. A row stops (a
stopping criterion per row, read inside ``generate``) at its own ``max_tokens``, at its
deadline, or when its client is gone (:meth:`TransformersEngine.cancel`); ``generate``
ends when every row has stopped.

:class:`TransformersServer` is the Serve deployment: ``@serve.batch`` gathers
concurrent calls into one ``stream_batch``.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass

from ray import serve

from r2d.config import EngineConfig, ModelConfig
from r2d.serve.replica import EngineCalls, Reloader, first_answer, load_at_start, poll_reload
from r2d.serve.schemas import Delta, GenRequest, deliver, token_logprob

log = logging.getLogger("r2d.serve")
_END = object()


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    version: str
    eos_ids: frozenset


class _StepStreamer:
    """A transformers streamer that forwards each generated step's token ids to an asyncio queue.

    Each item is ``(token per row, log-probabilities per row)``; the second is None unless a
    :func:`_row_logprobs` recorder is given, whose entry for a row is ``(the token's logprob, [(id, logprob)]
    of the row's most likely tokens)``, or None for a row that did not ask.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, on_step=None, recorder=None) -> None:
        self._loop, self._queue, self._prompt_seen, self._on_step = loop, queue, False, on_step
        self._recorder = recorder

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call carries the prompt ids
            self._prompt_seen = True
            return
        if self._on_step is not None:
            self._on_step()
        tokens = value.reshape(-1).tolist()
        lps = self._recorder.read(tokens) if self._recorder is not None else None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (tokens, lps))

    def end(self) -> None:
        pass


def _row_logprobs(tops: list[int | None]):
    """A logits processor that records the model's log-probabilities at each step for the rows that asked
    (``tops[i]``: how many most likely tokens row ``i`` wants; None: none at all).

    It runs first, on the raw logits, so the numbers are the model's own (before penalties and
    temperature), as vLLM reports them by default; the streamer then reads the sampled token's.
    """
    import torch
    from transformers import LogitsProcessor

    wanted = [i for i, k in enumerate(tops) if k is not None]
    most = max((tops[i] for i in wanted), default=0)

    class RowLogprobs(LogitsProcessor):
        last = None

        def __call__(self, input_ids, scores):
            self.last = torch.log_softmax(scores[wanted].float(), dim=-1)
            return scores

        def read(self, tokens: list[int]) -> list:
            out: list = [None] * len(tops)
            if self.last is None:
                return out
            top_v, top_i = self.last.topk(most, dim=-1) if most else (None, None)
            for j, row in enumerate(wanted):
                k = tops[row]
                top = list(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist())) if k else []
                out[row] = (float(self.last[j, tokens[row]]), top)
            return out

    return RowLogprobs()


def _row_sampler(temperatures: list[float], top_ps: list[float]):
    """A logits processor giving each row its own temperature and top-p (0 = greedy row)."""
    import torch
    from transformers import LogitsProcessor

    class RowSampling(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, float("-inf"))
            for i, (temp, top_p) in enumerate(zip(temperatures, top_ps)):
                if temp <= 0:
                    out[i, scores[i].argmax()] = 0.0
                    continue
                row = scores[i] / temp
                if top_p < 1.0:
                    sorted_vals, order = row.sort(descending=True)
                    cum = sorted_vals.softmax(-1).cumsum(-1)
                    drop = cum - sorted_vals.softmax(-1) > top_p  # keep the token that crosses top_p
                    row = row.clone()
                    row[order[drop]] = float("-inf")
                out[i] = row
            return out

    return RowSampling()


def row_penalties(presence: list[float], frequency: list[float], prompt_len: int):
    """A logits processor applying each row's OpenAI presence and frequency penalties.

    For every token ``t`` the row's answer already holds ``c_t > 0`` times (the tokens after
    ``prompt_len``, never the prompt's), its logit drops by ``presence + frequency * c_t``, as
    OpenAI documents and vLLM does. Runs before sampling, so greedy rows see it too.
    """
    import torch
    from transformers import LogitsProcessor

    pres = torch.tensor(presence, dtype=torch.float32).unsqueeze(1)
    freq = torch.tensor(frequency, dtype=torch.float32).unsqueeze(1)

    class RowPenalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            made = input_ids[:, prompt_len:]
            counts = torch.zeros_like(scores).scatter_add_(1, made, torch.ones_like(made, dtype=scores.dtype))
            return scores - (pres.to(scores) * (counts > 0) + freq.to(scores) * counts)

    return RowPenalties()


def _row_stop(checks: list, prompt_len: int, max_tokens: list[int]):
    """A stopping criterion with a verdict per row: its own max_tokens reached, or ``checks[i]()`` true."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class RowStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            made = input_ids.shape[1] - prompt_len
            return torch.tensor([made >= limit or check() for check, limit in zip(checks, max_tokens)],
                                dtype=torch.bool, device=input_ids.device)

        def __deepcopy__(self, memo):  # shares the live cancellation state, never a copy of it
            return self

    return StoppingCriteriaList([RowStop()])


class TransformersEngine:
    """A causal LM behind a batched, streaming ``generate``; the model can be swapped live.

    Args:
        source: any model source :mod:`r2d.models` resolves (``models:/r2d@champion``, a folder…).
        dtype: weights dtype.
        cache_dir: model cache.
        max_model_len: longest prompt plus completion accepted.
        threads: torch threads (0 leaves torch's default).
    """

    def __init__(self, source: str, dtype: str = "float32", cache_dir: str | None = None,
                 max_model_len: int = 2048, threads: int = 0) -> None:
        from r2d.runtime import set_threads

        set_threads(threads)
        self.source, self.dtype, self.cache_dir, self.max_model_len = source, dtype, cache_dir, max_model_len
        self.ready = False
        self._cancelled: set[str] = set()
        self._running: set[str] = set()
        """Request ids whose ``generate`` thread is still running."""
        self.steps = 0
        """Decoding steps run since start (all batches): what the engine has spent."""
        _, self._current = load_at_start(source, self.load)
        self.reloader = Reloader(self, source)

    @property
    def version(self) -> str:
        return self._current.version

    def load(self, version: str) -> _Loaded:
        from r2d.models import load_model

        model, tok = load_model(version, self.dtype, self.cache_dir)
        model.eval()
        tok.padding_side = "left"  # decoder-only batches are padded on the left
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
        log.info("loaded model %s", version)
        return _Loaded(model, tok, version, frozenset(i for i in eos_ids if i is not None))

    def info(self) -> dict:
        return {"source": self.source, "version": self._current.version, "ready": self.ready, "engine": "transformers",
                "active": len(self._running), "steps": self.steps, "reload_failures": self.reloader.failures}

    async def reload(self, force: bool = False) -> dict:
        """Load the model the source points at now, warm it up, then swap it in (:class:`Reloader`)."""
        return await self.reloader.reload(force)

    async def warm(self, loaded: _Loaded) -> None:
        """One real generation on ``loaded`` before it takes traffic."""
        req = GenRequest(messages=[{"role": "user", "content": "Hello"}], max_tokens=1)
        async with aclosing(self._stream_batch(loaded, [req])) as steps:
            async for step in steps:
                if step[0] is not StopIteration and step[0].error:
                    raise RuntimeError(f"warm-up generation failed: {step[0].error}")

    def swap(self, loaded: _Loaded) -> _Loaded:
        old, self._current = self._current, loaded  # in-flight batches hold their own reference
        return old

    def retire(self, old: _Loaded) -> None:
        pass  # freed when the last batch holding it ends

    def discard(self, loaded: _Loaded) -> None:
        pass

    def cancel(self, request_id: str) -> None:
        """Stop generating for a request whose client is gone (a no-op once it has finished)."""
        if request_id in self._running:
            self._cancelled.add(request_id)

    async def warmup(self) -> bool:
        """Run one real generation; readiness means this has succeeded once."""
        if not self.ready:
            req = GenRequest(messages=[{"role": "user", "content": "Hello"}], max_tokens=1)
            async for _ in self.stream_one(req):
                pass
        return self.ready

    async def stream_one(self, req: GenRequest):
        """Stream one request's deltas (a batch of one); closing the stream stops its generation."""
        async with aclosing(self.stream_batch([req])) as steps:
            async for step in steps:
                if step[0] is StopIteration:
                    return
                yield step[0]

    async def stream_batch(self, reqs: list[GenRequest]):
        """Generate for a batch; yield one list per step with a Delta (or StopIteration when done) per request."""
        async with aclosing(self._stream_batch(self._current, reqs)) as steps:
            async for step in steps:
                yield step
        if not self.ready:
            self.ready = True
            first_answer(self)

    async def _stream_batch(self, cur: _Loaded, reqs: list[GenRequest]):
        prompts, errors = self._encode(cur, reqs)
        live = [i for i, err in enumerate(errors) if err is None]
        if len(live) < len(reqs):  # rejected rows answer at once, the rest still generate
            yield [Delta("", "error", error=err[0], param=err[1]) if err else Delta("") for err in errors]
        if not live:
            return
        async with aclosing(self._generate(cur, reqs, live, prompts)) as steps:
            async for step in steps:
                yield [step.get(i, StopIteration) for i in range(len(reqs))]

    def _encode(self, cur: _Loaded, reqs: list[GenRequest]) -> tuple[list, list]:
        from r2d.pivots import render_conversation

        prompts, errors = [], []
        for req in reqs:
            ids, err = None, None
            bad = req.sampling_error()
            if bad:
                err = (bad, bad.split(":", 1)[0])
            else:
                try:
                    ids = cur.tokenizer(render_conversation(cur.tokenizer, req.messages), add_special_tokens=False)
                    n = len(ids["input_ids"])
                    if n + req.max_tokens > self.max_model_len:
                        err = (f"prompt ({n} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's "
                               f"context of {self.max_model_len} tokens", None)
                except Exception as exc:  # a template that rejects the roles, for instance
                    ids, err = None, (f"cannot render the conversation: {exc}", "messages")
            prompts.append(ids)
            errors.append(err)
        return prompts, errors

    def _should_stop(self, req: GenRequest) -> bool:
        return req.request_id in self._cancelled or req.past_deadline()

    async def _generate(self, cur: _Loaded, reqs: list[GenRequest], live: list[int], prompts: list):
        """Run generate in a thread; yield {row: Delta} per step for rows still running."""
        tok = cur.tokenizer
        batch = tok.pad({"input_ids": [prompts[i]["input_ids"] for i in live]}, return_tensors="pt")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        kwargs = self._sampling_kwargs([reqs[i] for i in live], batch["input_ids"].shape[1])
        recorder = None
        if any(reqs[i].logprobs is not None for i in live):
            recorder = _row_logprobs([reqs[i].logprobs for i in live])
            kwargs["logits_processor"] = [recorder, *kwargs.get("logits_processor", [])]
        kwargs["stopping_criteria"] = _row_stop([lambda r=reqs[i]: self._should_stop(r) for i in live],
                                                batch["input_ids"].shape[1], [reqs[i].max_tokens for i in live])
        max_new = max(reqs[i].max_tokens for i in live)
        ids = {reqs[i].request_id for i in live}
        self._running |= ids
        done = loop.run_in_executor(None, self._run_generate, cur.model, batch, kwargs, max_new, tok,
                                    _StepStreamer(loop, queue, self._count_step, recorder), loop, queue)
        done.add_done_callback(lambda _: self._finished(ids))
        state = {i: {"ids": [], "sent": "", "open": True} for i in live}
        n_prompt = {i: len(prompts[i]["input_ids"]) for i in live}
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                step = {}
                tokens, lps = item
                for j, (row, token) in enumerate(zip(live, tokens)):
                    st = state[row]
                    if not st["open"]:
                        continue
                    step[row] = self._advance(tok, cur, st, token, reqs[row].max_tokens, n_prompt[row],
                                              lps[j] if lps else None)
                    if st["open"] and self._should_stop(reqs[row]):  # deadline or client gone: cut here
                        st["open"] = False
                        step[row].finish_reason = "length"
                if step:
                    yield step
            await done
            for row in live:  # generate stopped (all rows ended) before some row saw its own end
                if state[row]["open"]:
                    yield {row: Delta("", "length", n_prompt[row], len(state[row]["ids"]))}
        finally:
            if not done.done():  # the consumer left early: stop every row of this call
                self._cancelled |= ids & self._running

    def _count_step(self) -> None:
        self.steps += 1

    def _finished(self, ids: set[str]) -> None:
        self._running -= ids
        self._cancelled -= ids

    @staticmethod
    def _advance(tok, cur: _Loaded, st: dict, token: int, max_tokens: int, n_prompt: int, lp=None) -> Delta:
        if token in cur.eos_ids:  # ends the answer; not part of it, so it has no log-probability entry
            st["open"] = False
            return Delta("", "stop", n_prompt, len(st["ids"]), logprobs=[] if lp is not None else None)
        st["ids"].append(token)
        text = tok.decode(st["ids"], skip_special_tokens=False)
        # Hold back a trailing replacement char: a multi-byte character is still arriving.
        delta = text[len(st["sent"]):] if text.startswith(st["sent"]) and not text.endswith("\ufffd") else ""
        st["sent"] += delta
        finish = None
        if len(st["ids"]) >= max_tokens:
            st["open"] = False
            finish = "length"
        entries = None
        if lp is not None:
            def piece(i: int) -> str:
                return tok.decode([i], skip_special_tokens=False)

            entries = [token_logprob(piece(token), lp[0], [(piece(i), v) for i, v in lp[1]])]
        return Delta(delta, finish, n_prompt, len(st["ids"]), logprobs=entries)

    @staticmethod
    def _run_generate(model, batch, kwargs, max_new, tok, streamer, loop, queue) -> None:
        import torch

        try:
            with torch.inference_mode():
                model.generate(**batch, **kwargs, max_new_tokens=max_new, streamer=streamer,
                               pad_token_id=tok.pad_token_id)
            loop.call_soon_threadsafe(queue.put_nowait, _END)
        except BaseException as err:  # surfaced to the awaiting requests, never swallowed
            loop.call_soon_threadsafe(queue.put_nowait, err)

    @staticmethod
    def _sampling_kwargs(reqs: list[GenRequest], prompt_len: int) -> dict:
        import torch

        temps = [r.temperature for r in reqs]
        seeds = [r.seed for r in reqs if r.seed is not None]
        if seeds:
            torch.manual_seed(seeds[0])
        processors = []
        if any(r.presence_penalty or r.frequency_penalty for r in reqs):
            processors.append(row_penalties([r.presence_penalty for r in reqs], [r.frequency_penalty for r in reqs],
                                            prompt_len))
        sample = not all(t <= 0 for t in temps)
        if sample:
            processors.append(_row_sampler(temps, [r.top_p for r in reqs]))
        kwargs = {"do_sample": sample, "temperature": None, "top_p": None, "top_k": None}
        return {**kwargs, "logits_processor": processors} if processors else kwargs


@serve.deployment(name="r2d-transformers")
class TransformersServer(EngineCalls):
    """Serve deployment around :class:`TransformersEngine`: ``@serve.batch`` fills ``engine.batch_size``."""

    async def __init__(self, source: str, model: ModelConfig, engine: EngineConfig, batch_wait_s: float = 0.02,
                       reload_poll_s: float = 0.0, reload_backoff_s: float = 30.0) -> None:
        threads = engine.threads or (max(1, int(engine.num_cpus)) if engine.num_cpus else 0)
        self.engine = await asyncio.to_thread(TransformersEngine, source, model.dtype, model.cache_dir,
                                              engine.max_model_len, threads)
        self._batched.set_max_batch_size(engine.batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_s)
        self._poller = (asyncio.create_task(poll_reload(self.engine.reloader, reload_poll_s, reload_backoff_s))
                        if reload_poll_s > 0 else None)

    async def generate(self, req: GenRequest):
        # A real async generator: Serve's streaming handle rejects the sync function @serve.batch returns.
        try:
            async with aclosing(deliver(self._batched(req), req.stream)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:  # cancelled by the ingress (client gone): the batch goes on, this row stops
            self.engine.cancel(req.request_id)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _batched(self, reqs: list[GenRequest]):
        async for step in self.engine.stream_batch(reqs):
            yield step
