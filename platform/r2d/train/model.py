"""The student to train: LoRA (or full fine-tuning) with trainable pivot rows.

The pivot tokens are new rows of the embedding and the LM head. LoRA alone cannot
move them, and ``modules_to_save=["embed_tokens", "lm_head"]`` would train (and ship)
both whole matrices, which vLLM then refuses. peft's ``trainable_token_indices``
trains just those rows; merging writes them back into a plain resized vocabulary.
"""

from __future__ import annotations

import torch

from r2d.config import Config, LoraConfig
from r2d.models import load_model
from r2d.pivots import PivotIds, pivot_ids
from r2d.train.attention import VARLEN, use_varlen_attention
from r2d.train.dropout import use_sparse_dropout
from r2d.train.head import enable_hidden_states


def train_dtype(dtype: str, use_gpu: bool) -> str:
    """bf16 (or the configured dtype) on GPU; always fp32 on CPU, where bf16 is slower and lossy."""
    if not use_gpu:
        return "float32"
    return "bfloat16" if dtype in ("auto", "float32") else dtype


def _module_name(model, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError("module not found in model")


def _embeddings_tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def pivot_rows(pivots: PivotIds) -> list[int]:
    """Vocabulary rows to train: the three pivots and the think tags."""
    return sorted(set(pivots.by_token().values()))


def apply_lora(model, cfg: LoraConfig, rows: list[int]):
    """Wrap ``model`` in a peft LoRA adapter; ``rows`` of the embedding (and untied head) train too."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    tokens = None
    if cfg.train_pivot_rows:
        embed = _module_name(model, model.get_input_embeddings())
        tokens = {embed: rows}
        if not _embeddings_tied(model):  # a tied head follows the embedding by itself
            tokens[_module_name(model, model.get_output_embeddings())] = rows
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), trainable_token_indices=tokens,
                              task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=cfg.fp32_weights)
    if cfg.sparse_dropout:
        use_sparse_dropout(model)
    return model


def build_model(cfg: Config, device: torch.device | str = "cpu"):
    """Load the student, add the pivots, wrap it for training.

    Returns:
        ``(model, tokenizer, pivot_ids)``; the model is on ``device`` in train mode.
    """
    dtype = train_dtype(cfg.model.dtype, cfg.resources.use_gpu)
    model, tok = load_model(cfg.model.source, dtype, cfg.model.cache_dir, cfg.model.offline,
                            cfg.model.trust_remote_code)
    pivots = pivot_ids(tok)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    if cfg.train.packing:
        use_varlen_attention(model)
    if cfg.train.lora.enabled:
        model = apply_lora(model, cfg.train.lora, pivot_rows(pivots))
    if cfg.train.chunked_ce:
        enable_hidden_states(model)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    if cfg.train.compile:
        # Layer by layer: each decoder layer is one graph, reused by every layer of the same shape;
        # the LM head and the loss stay eager (their shapes change with every batch's targets).
        for layer in model.get_decoder().layers if hasattr(model, "get_decoder") else []:
            layer.compile(dynamic=True)
    return model, tok, pivots


def unwrap(model):
    """The model inside a DDP/FSDP wrapper."""
    return getattr(model, "module", model)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trained tensors only (adapter and pivot rows, or everything in full fine-tuning), on CPU."""
    model = unwrap(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`trainable_state` into a freshly built model.

    Raises:
        ValueError: when a saved tensor has no home in the model (another recipe's checkpoint).
    """
    model = unwrap(model)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint does not match the model: unexpected {result.unexpected_keys[:3]}")


def merged_model(model):
    """A plain transformers model with the adapter and pivot rows merged in (for export)."""
    model = unwrap(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if model.config._attn_implementation == VARLEN:  # packed training's attention; generation wants sdpa
        model.set_attn_implementation("sdpa")
    model.config.use_cache = True
    return model.eval()
