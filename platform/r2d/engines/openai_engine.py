"""Any OpenAI-compatible chat endpoint (a hosted reasoning model, a vLLM server) as an engine.

Requests go out from a bounded thread pool inside each Ray Data batch. 429, 5xx,
timeouts and connection errors are retried with exponential backoff. The API key is
read from the environment variable the config names and is never logged or stored
in an error message. The server applies its own chat template, so messages are sent,
not rendered text. Reasoning returned apart from the answer (``reasoning_content``,
or vLLM 0.32's ``reasoning``) is put back inside ``<think>…</think>`` so the shared
parser reads every engine's output the same way.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from r2d.engines.rendering import ERROR, NUM_TOKENS, TEXT, as_prompt, sampling_dict
from r2d.pivots import THINK_CLOSE, THINK_OPEN, build_messages

log = logging.getLogger(__name__)
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint answered with an error that retries did not cure."""


class OpenAIGenerator:
    """Callable class for ``ds.map_batches``: chat completions with retries and bounded concurrency."""

    def __init__(self, engine_cfg, sampling_cfg, system_prompt: str | None = None,
                 prompt_column: str = "prompt", model_name: str = "") -> None:
        import httpx

        self.url = engine_cfg.base_url.rstrip("/") + "/chat/completions"
        self.model = engine_cfg.api_model or model_name
        self.retries = engine_cfg.max_retries
        self.backoff = engine_cfg.retry_backoff_s
        self.workers = engine_cfg.request_concurrency
        self.system_prompt = system_prompt
        self.prompt_column = prompt_column
        self.params = sampling_dict(sampling_cfg)
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(engine_cfg.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(headers=headers, timeout=engine_cfg.timeout_s)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        prompts = list(batch[self.prompt_column])
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(self._one, prompts))
        out = dict(batch)
        out[TEXT] = np.array([r[0] for r in results], dtype=object)
        out[NUM_TOKENS] = np.array([r[1] for r in results], dtype=np.int64)
        out[ERROR] = np.array([r[2] for r in results], dtype=object)
        return out

    def _one(self, value: Any) -> tuple[str, int, str]:
        try:
            prompt = as_prompt(value)
            messages = build_messages(prompt, None, self.system_prompt) if isinstance(prompt, str) else prompt
            if isinstance(prompt, list) and self.system_prompt and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            return (*self.complete(messages), "")
        except Exception as err:  # recorded on the row; the job goes on
            return "", 0, f"{type(err).__name__}: {err}"

    def payload(self, messages: list[dict]) -> dict:
        p = self.params
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": p["max_tokens"],
                                "temperature": p["temperature"], "top_p": p["top_p"], "seed": p["seed"]}
        if p["repetition_penalty"] != 1.0:
            body["repetition_penalty"] = p["repetition_penalty"]  # vLLM's extension; others ignore it
        return body

    def complete(self, messages: list[dict]) -> tuple[str, int]:
        """POST one chat completion, retrying transient failures; returns (text, completion tokens)."""
        import httpx

        body = self.payload(messages)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.client.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as err:
                if last:
                    raise EndpointError(f"{type(err).__name__} after {attempt + 1} attempts") from None
                self._wait(attempt, type(err).__name__)
                continue
            if response.status_code in _RETRY_STATUS and not last:
                self._wait(attempt, f"HTTP {response.status_code}")
                continue
            if response.status_code >= 400:
                raise EndpointError(f"HTTP {response.status_code}: {response.text[:200]}")
            return parse_completion(response.json())
        raise EndpointError("unreachable")  # the loop returns or raises

    def _wait(self, attempt: int, why: str) -> None:
        delay = self.backoff * (2 ** attempt)
        log.warning("endpoint %s: %s; retrying in %.2fs", self.url, why, delay)
        time.sleep(delay)


def parse_completion(data: dict) -> tuple[str, int]:
    """Text (reasoning folded back into ``<think>``) and completion token count of a response."""
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"response has no choices[0].message: {str(data)[:200]}") from None
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    if reasoning and THINK_OPEN not in content:
        content = f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{content.strip()}"
    tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    return content, tokens


def generate_openai(ds, model, engine, sampling, system_prompt=None, prompt_column="prompt"):
    """Add the output columns by calling the endpoint from a small actor pool."""
    import ray

    return ds.map_batches(
        OpenAIGenerator,
        fn_constructor_kwargs={"engine_cfg": engine, "sampling_cfg": sampling, "system_prompt": system_prompt,
                               "prompt_column": prompt_column, "model_name": model.source},
        compute=ray.data.ActorPoolStrategy(size=engine.concurrency),
        # Waiting on the network uses no CPU; a fraction keeps the cores for local work.
        num_cpus=min(engine.num_cpus, 0.25),
        batch_size=engine.batch_size,
        batch_format="numpy",
    )
