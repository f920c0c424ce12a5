"""Attention over packed rows: each trace attends to itself only.

A packed micro-batch is one row holding several traces back to back (see
``r2d.train.packing``). Attention must stay inside each trace, and must not pay for the
block-diagonal mask's empty squares: a 4,096-token row of twenty ~200-token traces would
cost twenty times the attention of the traces alone.

``cu_seq_lens`` (the trace boundaries, ``[0, n1, n1 + n2, …]``) comes with the batch, so
nothing is read back from the device:

- on CUDA in bf16/fp16, PyTorch's own variable-length flash attention
  (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.9), one kernel for the whole row;
- elsewhere (the CPU), one causal SDPA call per trace on its slice of the row.

transformers builds no mask for an implementation it does not know, and hands the
forward's keyword arguments (``cu_seq_lens_q``, ``max_length_q``) to the attention function.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F

VARLEN = "r2d_varlen"
"""Name of the packed attention in transformers' ``AttentionInterface``."""


@lru_cache(maxsize=1)
def _varlen_kernel():
    """PyTorch's varlen attention and the keywords this release's signature takes, or None before 2.9."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash_varlen(query, key, value, cu_seq_lens, max_length: int, scaling: float) -> torch.Tensor | None:
    """One kernel for the whole row, or None where this torch cannot do it as asked."""
    kernel = _varlen_kernel()
    if kernel is None:
        return None
    varlen_attn, params = kernel
    # [1, heads, T, D] -> [T, heads, D], the layout the varlen kernel takes.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    extra = {}
    if "scale" in params:
        extra["scale"] = scaling
    elif abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        return None
    # Releases differ: 2.9 takes is_causal; later ones a window ((-1, 0) is causal) and GQA.
    extra.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **extra)
    return out.unsqueeze(0)


def _per_trace(query, key, value, bounds: list[int], scaling: float) -> torch.Tensor:
    gqa = query.shape[1] != key.shape[1]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    # split, not slicing: a slice's backward writes its gradient into a zeroed copy of the whole
    # row (one memset of the row per trace, per tensor, per layer); split's backward is one cat.
    parts = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
             for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)))]
    return torch.cat(parts, dim=2).transpose(1, 2)


def varlen_attention(module, query, key, value, attention_mask, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     sliding_window: int | None = None, softcap: float | None = None, s_aux=None, **_):
    """transformers attention function for packed rows.

    Args:
        query, key, value: [1, heads, T, head_dim] (key and value may have fewer heads: GQA).
        attention_mask: unused (None): the boundaries say everything.
        cu_seq_lens_q: int32 [traces + 1] cumulative trace lengths, on the row's device; without
            it (generation on a model built for packing) one row gets plain causal SDPA.
        max_length_q: the longest trace in the row.
        sliding_window, softcap, s_aux: what some models ask of attention; refused unless they
            change nothing (a window longer than every trace).

    Returns:
        ``(output [1, T, heads, head_dim], None)``.

    Raises:
        ValueError: more than one row, or asked for what it does not do.
    """
    if cu_seq_lens_q is None:
        # Not a packed row: generation or a plain forward on a model built for packed training.
        # transformers built no padding mask for this implementation, so only one row is safe.
        if query.shape[0] != 1:
            raise ValueError(f"{VARLEN} attention without cu_seq_lens_q takes one unpadded row, got a batch of "
                             f"{query.shape[0]}; switch the model back with set_attn_implementation('sdpa')")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling)
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN} attention takes one packed row, got {query.shape[0]}")
    if dropout or softcap is not None or s_aux is not None:
        raise ValueError(f"{VARLEN} attention has no attention dropout, soft-capping or sinks; "
                         f"got dropout={dropout}, softcap={softcap}, s_aux={'set' if s_aux is not None else None}")
    if sliding_window is not None and int(max_length_q) > sliding_window:
        raise ValueError(f"{VARLEN} attention has no sliding window; a {max_length_q}-token trace exceeds "
                         f"the model's window of {sliding_window}")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        out = _flash_varlen(query, key, value, cu_seq_lens_q, int(max_length_q), scaling)
        if out is not None:
            return out, None
    bounds = cu_seq_lens_q.tolist()  # free on the CPU; on a GPU without the kernel, one read per layer
    return _per_trace(query, key, value, bounds, scaling), None


def use_varlen_attention(model) -> None:
    """Register the packed attention with transformers and switch ``model`` to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    model.set_attn_implementation(VARLEN)
