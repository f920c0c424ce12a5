"""The LM head and cross-entropy without the [tokens, vocabulary] logits.

The reference step computes logits for every position, upcasts them, takes a log-softmax
and keeps all three for the backward pass; peft's trainable pivot rows then get their
gradient from the whole [vocabulary, hidden] weight gradient, of which five rows are kept.
With a 49k vocabulary that is a fifth of a 135M model's matmuls, and memory that grows
with tokens x vocabulary. Here instead:

- only positions with a label go through the head (the prompt's do not);
- they go in chunks, and each chunk's gradient is taken in the forward pass (as Liger's
  fused linear cross-entropy does), so a chunk's logits die with the chunk and none is
  recomputed;
- a frozen head weight gets no gradient; trainable rows (peft's ``trainable_token_indices``)
  get theirs from their own columns only;
- CPO needs z[t+] - z[t-] at pivot positions only: the hidden states there times the pivot rows.

peft's trainable-token layers rebuild the whole embedding matrix on every call, from row
indices they copy to the device each time (a wait for the GPU). The hidden-state forward
(:func:`enable_hidden_states`) embeds the tokens itself and never calls the LM head, so a
packed step reads nothing back from the device until its metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class Head:
    """The output layer as weights: ``logits = h @ weight.T``, with ``rows`` replaced by ``delta``."""

    weight: torch.Tensor
    """[vocabulary, hidden]; frozen under LoRA, trained in full fine-tuning."""
    rows: list[int]
    """Vocabulary rows whose weights are ``delta`` instead (peft's trainable tokens), or []."""
    delta: torch.Tensor | None
    """[len(rows), hidden] trainable rows, or None."""

    def rows_of(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), hidden] effective rows for ``ids``, in the graph of whatever trains them."""
        return torch.stack([(self.delta[self.rows.index(i)] if i in self.rows else self.weight[i]).float()
                            for i in ids])


def _unwrap(model):
    return getattr(model, "module", model)  # DDP


def _token_rows(layer):
    """(base layer, trainable rows, their weights) of a layer peft's ``trainable_token_indices`` may wrap."""
    adapter = getattr(layer, "token_adapter", None)  # peft's TrainableTokensWrapper
    if adapter is None:
        return layer, [], None
    if len(adapter.active_adapters) != 1:
        raise ValueError(f"train.chunked_ce: expected one active token adapter, got {adapter.active_adapters}")
    name = adapter.active_adapters[0]
    return adapter.base_layer, list(adapter.token_indices[name]), adapter.trainable_tokens_delta[name]


def head_of(model) -> Head:
    """The causal LM's output layer as a :class:`Head`.

    Raises:
        ValueError: a head this path cannot reproduce exactly (a bias, an adapter on the head,
            logits scaled or soft-capped by the model): set train.chunked_ce=false.
    """
    inner = _unwrap(model)
    head, rows, delta = _token_rows(inner.get_output_embeddings())
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ValueError(f"train.chunked_ce: the LM head must be a bias-free nn.Linear, got {type(head).__name__}; "
                         "set train.chunked_ce=false")
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    scaled = [a for a in _LOGIT_TRANSFORMS if getattr(config, a, None) not in (None, 1, 1.0)]
    if scaled:
        raise ValueError(f"train.chunked_ce: the model transforms its logits ({scaled}); set train.chunked_ce=false")
    return Head(head.weight, rows, delta)


@lru_cache(maxsize=16)
def _on_device(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Built once per model and device (the first step's one copy), then reused without a copy.
    return torch.tensor(values, dtype=torch.long, device=device)


@lru_cache(maxsize=16)
def _row_lookup(rows: tuple[int, ...], vocab: int, device: torch.device) -> torch.Tensor:
    lookup = torch.full((vocab,), -1, dtype=torch.long)
    lookup[list(rows)] = torch.arange(len(rows))
    return lookup.to(device)


def embed(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings, trainable rows included, without rebuilding the embedding matrix.

    Raises:
        ValueError: an embedding this cannot reproduce (scaled, max-norm, sparse).
    """
    layer, rows, delta = _token_rows(_unwrap(model).get_input_embeddings())
    if type(layer) is not torch.nn.Embedding or layer.max_norm is not None or layer.sparse:
        raise ValueError(f"train.chunked_ce: the input embedding must be a plain nn.Embedding, got "
                         f"{type(layer).__name__}; set train.chunked_ce=false")
    out = F.embedding(input_ids, layer.weight, layer.padding_idx)
    if not rows:
        return out
    k = _row_lookup(tuple(rows), layer.weight.shape[0], input_ids.device)[input_ids]
    own = F.embedding(k.clamp(min=0), delta.to(out.dtype))  # peft casts the rows to the weight's dtype too
    return torch.where((k >= 0)[..., None], own, out)


def enable_hidden_states(model) -> None:
    """Let ``model(..., r2d_hidden=True)`` return the final hidden states [B, T, hidden], not logits.

    The call has to go through ``model`` itself, not its inner decoder: DDP's wrapper prepares the
    gradient all-reduce in its own forward. Only this instance's ``forward`` changes (its
    parameters, state dict and merged export do not); without ``r2d_hidden`` it is the original.
    """
    original = model.forward

    def forward(*args, r2d_hidden: bool = False, **kwargs):
        if not r2d_hidden:
            return original(*args, **kwargs)
        decoder = model.get_base_model().get_decoder() if hasattr(model, "get_base_model") else model.get_decoder()
        input_ids = kwargs.pop("input_ids")
        return decoder(inputs_embeds=embed(model, input_ids), **kwargs).last_hidden_state

    model.forward = forward
    model.r2d_hidden_states = True


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i w_i * CE(h_i @ W.T, y_i)``, gradients taken chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, delta, rows, targets, weights, chunk):
        need_h, need_w, need_d = ctx.needs_input_grad[:3]
        acc = torch.promote_types(torch.float32, hidden.dtype)  # softmax and sums: float32 at least
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_d = torch.zeros_like(delta, dtype=acc) if need_d else None
        # peft casts the rows to the weight's dtype before using them; so does this.
        rows_w = None if delta is None else delta.to(weight.dtype)
        for a in range(0, hidden.shape[0], chunk):
            h, y, w = hidden[a:a + chunk], targets[a:a + chunk], weights[a:a + chunk].to(acc)
            logits = h @ weight.T
            if delta is not None:
                logits.index_copy_(1, rows, h @ rows_w.T)
            logits = logits.to(acc)
            lse = torch.logsumexp(logits, dim=1)
            total += ((lse - logits.gather(1, y[:, None]).squeeze(1)) * w).sum()
            if not (need_h or need_w or need_d):
                continue
            # d(w * CE)/d logits = w * (softmax - onehot), built in place over the chunk's logits.
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(y), device=y.device), y] -= 1
            g = g.mul_(w[:, None]).to(hidden.dtype)
            g_rows = None
            if delta is not None:
                g_rows = g[:, rows]
                g.index_fill_(1, rows, 0)  # those columns came from delta, not from the weight
                if need_d:
                    grad_d += (g_rows.T @ h).to(acc)
            if need_h:
                grad_h[a:a + chunk] = g @ weight + (g_rows @ rows_w if g_rows is not None else 0)
            if need_w:
                grad_w += (g.T @ h).to(acc)
        ctx.grads = (grad_h, grad_w, grad_d)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if delta is None else delta.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        del ctx.grads
        return (*grads, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, head: Head, targets: torch.Tensor, weights: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """Weighted cross-entropy of the head's logits, never holding more than ``chunk`` rows of them.

    Args:
        hidden: [M, hidden] final hidden states at the positions that predict ``targets``.
        head: the output layer (:func:`head_of`).
        targets: [M] token ids.
        weights: [M] float32 weight of each position's NLL (the objective's normalisation).
        chunk: rows of logits computed at a time.

    Returns:
        Scalar float32 ``sum_i weights_i * -log softmax(hidden_i @ W.T)[targets_i]``; its
        gradient reaches ``hidden``, a trainable weight and the trainable rows.
    """
    rows = _on_device(tuple(head.rows), hidden.device) if head.rows else None
    delta = head.delta if head.rows else None
    return _LinearCrossEntropy.apply(hidden, head.weight, delta, rows, targets, weights, max(1, chunk))


def pivot_logits(hidden: torch.Tensor, head: Head, ids: list[int]) -> torch.Tensor:
    """[P, len(ids)] float32 logits of ``ids`` only (CPO's z), computed in float32 from [P, hidden] states."""
    return hidden.float() @ head.rows_of(ids).float().T


def token_logprobs(hidden: torch.Tensor, head: Head, targets: torch.Tensor) -> torch.Tensor:
    """[R] float32 ``log softmax(hidden_i @ W.T)[targets_i]``, with full logits for these few rows only."""
    logits = hidden @ head.weight.T
    if head.rows:
        rows = _on_device(tuple(head.rows), hidden.device)
        logits = logits.index_copy(1, rows, hidden @ head.delta.to(head.weight.dtype).T)
    return logits.float().log_softmax(dim=1).gather(1, targets[:, None]).squeeze(1)


def forward_targets(model, batch: dict, ids: list[int], chunk: int, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward pass over a targets batch (``r2d.train.packing``).

    Args:
        model: the causal LM (possibly DDP-wrapped); with ``chunk``, one built with
            :func:`enable_hidden_states` (``build_model`` does it for ``train.chunked_ce``).
        batch: a device batch from ``packing.collate_packed`` or ``packing.collate_padded``.
        ids: the pivot ids CPO contrasts (``LossSettings.class_ids``).
        chunk: rows per chunk of the LM head; 0 computes the full logits (the reference's way).
        weights: [M] float32 weight of each target's NLL.

    Returns:
        ``(sft, z, verdict_logp)``: the weighted NLL sum (scalar), the pivot logits [P, len(ids)],
        and the log-probabilities [R] of the verdict term's scored tokens (None without the term).
    """
    verdict = "verdict_pos" in batch
    kwargs = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        kwargs.update(position_ids=batch["position_ids"], cu_seq_lens_q=batch["cu_seq_lens"],
                      cu_seq_lens_k=batch["cu_seq_lens"], max_length_q=batch["max_length"],
                      max_length_k=batch["max_length"])
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    if not chunk:
        full = model(**kwargs).logits.flatten(0, 1)
        logits = full.index_select(0, batch["target_pos"]).float()
        sft = (F.cross_entropy(logits, batch["target_ids"], reduction="none") * weights).sum()
        verdict_logp = None
        if verdict:
            scored = full.index_select(0, batch["verdict_pos"]).float().log_softmax(dim=1)
            verdict_logp = scored.gather(1, batch["verdict_ids"][:, None]).squeeze(1)
        return sft, logits.index_select(0, batch["pivot_idx"])[:, ids], verdict_logp
    # No logits inside the forward: the hidden states come out, the head runs here in chunks. DDP
    # still sees one forward and gets every gradient in one backward (FSDP is refused by the config).
    if not getattr(_unwrap(model), "r2d_hidden_states", False):
        raise ValueError("a chunked LM head needs the model built with train.chunked_ce=true (enable_hidden_states)")
    states = model(**kwargs, r2d_hidden=True).flatten(0, 1)
    hidden = states.index_select(0, batch["target_pos"])
    head = head_of(model)
    sft = linear_cross_entropy(hidden, head, batch["target_ids"], weights, chunk)
    verdict_logp = token_logprobs(states.index_select(0, batch["verdict_pos"]), head,
                                  batch["verdict_ids"]) if verdict else None
    return sft, pivot_logits(hidden.index_select(0, batch["pivot_idx"]), head, ids), verdict_logp
