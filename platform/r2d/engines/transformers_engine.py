"""The light engine: batched Hugging Face ``generate`` in a Ray Data actor pool.

Row schema: ``{prompt_column: str | messages, ...}`` in, the same row plus
``generated_text``, ``num_generated_tokens`` and ``gen_error`` out. A row whose
generation fails keeps its other columns and carries the error; the job goes on.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from r2d.engines.rendering import (ERROR, NUM_TOKENS, TEXT, as_prompt, exempt_token_ids, render_prompt,
                                   stop_texts, strip_stop)


def make_penalty_processor(penalty: float, exempt_ids: list[int]):
    """A repetition penalty (as in CTRL / transformers) that leaves the pivot logits alone.

    Pivots recur in every step of a trained model's trace, so a plain penalty pushes the
    model away from its own format; restoring their logits after the penalty fixes that.
    """
    import torch
    from transformers import LogitsProcessor

    class PivotExemptRepetitionPenalty(LogitsProcessor):
        def __init__(self) -> None:
            self.penalty = penalty
            self.exempt = torch.tensor(exempt_ids, dtype=torch.long)

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            seen = torch.gather(scores, 1, input_ids)
            seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
            penalised = scores.scatter(1, input_ids, seen)
            if len(self.exempt):
                exempt = self.exempt.to(scores.device)
                penalised[:, exempt] = scores[:, exempt]
            return penalised

    return PivotExemptRepetitionPenalty()


class TransformersGenerator:
    """Callable class for ``ds.map_batches``: one model per actor, real batched generation."""

    def __init__(self, model_cfg, engine_cfg, sampling_cfg, system_prompt: str | None = None,
                 prompt_column: str = "prompt") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from r2d.models import require_safetensors, resolve_source
        from r2d.runtime import set_threads

        threads = engine_cfg.threads or max(1, int(engine_cfg.num_cpus))
        set_threads(threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        local = resolve_source(model_cfg.source, model_cfg.cache_dir, model_cfg.offline)
        # The folder's own tokenizer, exactly as vLLM loads it: adding pivots here would
        # give an untrained teacher mean-initialised rows instead of text it can read.
        self.tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=model_cfg.offline,
                                                       trust_remote_code=model_cfg.trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        require_safetensors(local, model_cfg.source)
        dtype = "auto" if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype)
        self.device = "cuda" if engine_cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            local, dtype=dtype, local_files_only=model_cfg.offline, use_safetensors=True,
            trust_remote_code=model_cfg.trust_remote_code).to(self.device).eval()
        self.sampling = sampling_cfg
        self.max_model_len = engine_cfg.max_model_len
        self.system_prompt = system_prompt
        self.prompt_column = prompt_column
        self.stops = stop_texts(self.tokenizer)
        self.exempt = exempt_token_ids(self.tokenizer)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        prompts = list(batch[self.prompt_column])
        texts, counts, errors = [""] * len(prompts), [0] * len(prompts), [""] * len(prompts)
        rendered: dict[int, str] = {}
        for i, value in enumerate(prompts):
            try:
                rendered[i] = render_prompt(self.tokenizer, as_prompt(value), self.system_prompt)
            except Exception as err:  # a malformed row must not stop the batch
                errors[i] = f"render: {err}"
        for i, (text, count, error) in zip(rendered, self._generate_or_split(list(rendered.values()))):
            texts[i], counts[i], errors[i] = text, count, error
        out = dict(batch)
        out[TEXT] = np.array(texts, dtype=object)
        out[NUM_TOKENS] = np.array(counts, dtype=np.int64)
        out[ERROR] = np.array(errors, dtype=object)
        return out

    def _generate_or_split(self, rendered: list[str]) -> list[tuple[str, int, str]]:
        """Generate the batch; if it raises, retry row by row so one bad row fails alone."""
        if not rendered:
            return []
        try:
            return self.generate_texts(rendered)
        except Exception as err:
            if len(rendered) == 1:
                return [("", 0, f"{type(err).__name__}: {err}")]
            return [r for text in rendered for r in self._generate_or_split([text])]

    def generate_texts(self, rendered: list[str]) -> list[tuple[str, int, str]]:
        """Batched generation of already-rendered prompts: (text, generated tokens, error)."""
        import torch

        enc = self.tokenizer(rendered, return_tensors="pt", padding=True)
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        too_long = [n + 1 > self.max_model_len for n in lengths]
        if all(too_long):
            return [("", 0, f"prompt of {n} tokens exceeds max_model_len {self.max_model_len}") for n in lengths]
        max_new = max(1, min(self.sampling.max_tokens, self.max_model_len - max(lengths)))
        kwargs = self._generation_kwargs(max_new)
        with torch.inference_mode():
            out = self.model.generate(**{k: v.to(self.device) for k, v in enc.items()}, **kwargs)
        new_tokens = out[:, enc["input_ids"].shape[1]:].cpu()
        results = []
        for row, long in zip(new_tokens, too_long):
            if long:
                results.append(("", 0, f"prompt exceeds max_model_len {self.max_model_len}"))
                continue
            ids = self._until_eos(row.tolist())
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            results.append((strip_stop(text, self.stops), len(ids), ""))
        return results

    def _generation_kwargs(self, max_new: int) -> dict:
        import torch

        s = self.sampling
        kwargs: dict = {"max_new_tokens": max_new, "pad_token_id": self.tokenizer.pad_token_id,
                        "eos_token_id": self.tokenizer.eos_token_id}
        if s.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(s.seed)
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=None)
        if s.repetition_penalty != 1.0:
            kwargs["logits_processor"] = [make_penalty_processor(s.repetition_penalty, self.exempt)]
        return kwargs

    def _until_eos(self, ids: list[int]) -> list[int]:
        """Generated ids up to and including the first eos (vLLM counts the eos too)."""
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            return ids[: ids.index(eos) + 1]
        pad = self.tokenizer.pad_token_id
        while ids and ids[-1] == pad and pad != eos:
            ids = ids[:-1]
        return ids


def generate_transformers(ds, model, engine, sampling, system_prompt=None, prompt_column="prompt"):
    """Add the output columns with an actor pool of :class:`TransformersGenerator`."""
    import ray

    return ds.map_batches(
        TransformersGenerator,
        fn_constructor_kwargs={"model_cfg": model, "engine_cfg": engine, "sampling_cfg": sampling,
                               "system_prompt": system_prompt, "prompt_column": prompt_column},
        # One batch at a time per actor: generate() is synchronous, so a queued second batch only
        # waits, and the first actor up would take every batch of a small run (measured: 2 batches,
        # 2 actors, one idle) while the others are still loading the model.
        compute=ray.data.ActorPoolStrategy(size=engine.concurrency, max_tasks_in_flight_per_actor=1),
        num_cpus=engine.num_cpus,
        num_gpus=engine.num_gpus or None,
        batch_size=engine.batch_size,
        batch_format="numpy",
    )
