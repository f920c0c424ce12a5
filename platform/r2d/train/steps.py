"""One optimizer step over an accumulation window, and the stream of windows.

Kept free of Ray so that unit tests can drive the exact code the workers run:
``windows`` turns raw traces rows into accumulation windows of collated micro-batches,
``optimizer_step`` runs one forward per micro-batch and one optimizer update.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Callable, Iterable, Iterator

import torch

from r2d.train.batching import collate, group_by_length
from r2d.train.head import forward_targets
from r2d.train.objective import LossSettings, micro_batch_counts, micro_batch_loss, target_weights, targets_loss
from r2d.train.packing import collate_packed, collate_padded, pack, to_device, unbind, with_verdict_copies
from r2d.train.tokenize import tokenize_rows

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a float64 tensor over workers (identity in a single process)."""


def no_reduce(values: torch.Tensor) -> torch.Tensor:
    return values


TOKEN_ROWS = "trainable_tokens_delta"
"""Name part of peft's trainable embedding rows (the pivot and think tokens)."""


class RowRateAdamW(torch.optim.AdamW):
    """AdamW that steps some rows of one matrix at ``multiplier`` times their group's rate, without weight decay.

    Full fine-tuning trains the new token rows inside the whole embedding matrix, one parameter, so they
    cannot have a parameter group of their own. AdamW's step is linear in the learning rate (its moments
    do not depend on it; decoupled decay is ``lr * wd * p``), so after the step the rows' change, less the
    decay, scaled by ``multiplier`` is exactly the step a group of their own at ``multiplier * lr`` and no
    decay would take — what peft's separate rows get under LoRA.
    """

    def __init__(self, params, matrix: torch.nn.Parameter, rows: list[int], multiplier: float, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.matrix, self.multiplier = matrix, multiplier
        self.rows = torch.as_tensor(sorted(set(rows)), dtype=torch.long, device=matrix.device)

    @torch.no_grad()
    def step(self, closure=None):
        # Looked up at each step: the scheduler changes its lr, and load_state_dict replaces the groups.
        group = next(g for g in self.param_groups if any(p is self.matrix for p in g["params"]))
        before = self.matrix[self.rows].clone()
        loss = super().step(closure)
        decay = group["lr"] * group["weight_decay"] * before
        self.matrix[self.rows] = before + self.multiplier * (self.matrix[self.rows] - before + decay)
        return loss


def make_optimizer(model, learning_rate: float, weight_decay: float, scheduler: str,
                   warmup_ratio: float, total_steps: int, token_lr_multiplier: float = 1.0,
                   token_rows: list[int] = ()):
    """AdamW over the trainable parameters, and a warmup + decay schedule over ``total_steps``.

    The new token rows get ``learning_rate * token_lr_multiplier`` (no weight decay: decay
    would pull them back toward zero, not toward the vocabulary), everything else ``learning_rate``.
    Under LoRA the rows are peft's own parameter; in full fine-tuning they are ``token_rows`` of the
    input embedding matrix (:class:`RowRateAdamW`).
    """
    from transformers import get_scheduler

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = [p for n, p in named if TOKEN_ROWS in n]
    rest = [p for n, p in named if TOKEN_ROWS not in n]
    groups = [{"params": rest, "lr": learning_rate, "weight_decay": weight_decay}]
    if rows:
        groups.append({"params": rows, "lr": learning_rate * token_lr_multiplier, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    # Full fine-tuning: no separate rows, the token rows are part of the trained embedding matrix.
    matrix = getattr(model, "module", model).get_input_embeddings().weight if token_rows and not rows else None
    if matrix is not None and matrix.requires_grad and token_lr_multiplier != 1.0:
        optimizer = RowRateAdamW(groups, matrix, list(token_rows), token_lr_multiplier, lr=learning_rate)
    else:
        optimizer = torch.optim.AdamW(groups, lr=learning_rate)
    name = "constant_with_warmup" if scheduler == "constant" else scheduler
    warmup = int(round(warmup_ratio * total_steps))
    return optimizer, get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def windows(rows: Iterable[dict], tokenizer, pivots, *, max_length: int, batch_size: int, grad_accum: int,
            dropped: Counter, length_grouping: bool = True, seed: int = 0,
            system: str | None = None) -> Iterator[list[list[dict]]]:
    """Yield accumulation windows: lists of ``grad_accum`` micro-batches of examples.

    The last window of a stream may be short (fewer micro-batches, or a short last
    micro-batch); the caller decides what to do with it. Malformed and too-long rows
    are skipped and counted in ``dropped``.
    """
    examples = tokenize_rows(tokenizer, rows, pivots, max_length, dropped, system)
    window: list[list[dict]] = []
    for micro in group_by_length(examples, batch_size, seed=seed, enabled=length_grouping):
        window.append(micro)
        if len(window) == grad_accum:
            yield window
            window = []
    if window:
        yield window


def is_full(window: list[list[dict]] | None, batch_size: int, grad_accum: int) -> bool:
    return window is not None and len(window) == grad_accum and all(len(m) == batch_size for m in window)


def optimizer_step(model, optimizer, scheduler, window: list[dict[str, torch.Tensor]], s: LossSettings,
                   world: int = 1, reduce: Reduce = no_reduce, max_grad_norm: float = 1.0,
                   ce_chunk: int = 0) -> dict[str, float]:
    """Forward and backward every micro-batch of ``window``, then one optimizer update.

    Args:
        window: collated micro-batches (:func:`collate_window`): padded rows (the reference
            step) or targets batches (packed rows and/or the chunked LM head).
        world: data-parallel workers; ``reduce`` sums a tensor over them.
        max_grad_norm: gradient clipping threshold (0 disables).
        ce_chunk: targets batches only: rows per chunk of the LM head, 0 for the full logits.

    Returns:
        Window metrics, already reduced over workers: ``loss``, ``sft_loss``, ``cpo_loss``,
        ``pivot_acc``, ``pivot_margin``, ``lr``, ``tokens``, ``tokens_per_s``, ``grad_norm``.
    """
    started = time.perf_counter()
    targets = "host" in window[0]
    if targets:  # counted on the host when collated: nothing to wait for
        local = torch.stack([b["host"]["counts"] for b in window])
    else:  # every micro-batch's counts, read to the host in one copy (not one wait per count)
        local = torch.stack([micro_batch_counts(b, s) for b in window]).cpu()
    counts = reduce(local.sum(dim=0))
    totals: Counter = Counter()
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        # Only the last micro-batch all-reduces gradients; the others accumulate locally.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            if targets:
                loss, parts = _targets_micro_batch(model, batch, counts, world, s, ce_chunk)
                totals["tokens"] += batch["host"]["tokens"]
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss, parts = micro_batch_loss(logits, batch, counts, world, s, mb=local[i])
                totals["tokens"] += batch["attention_mask"].sum()
            loss.backward()
        totals.update(parts)  # device tensors: summed there, read once in _window_metrics
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    if hasattr(model, "clip_grad_norm_"):  # FSDP: the norm must be taken over all shards
        grad_norm = model.clip_grad_norm_(limit)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], limit)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return _window_metrics(totals, reduce, world, lr, grad_norm, time.perf_counter() - started)


def _targets_micro_batch(model, batch: dict, counts: torch.Tensor, world: int, s: LossSettings, ce_chunk: int):
    sft_w, cpo_w = target_weights(batch["host"], counts, world, s)
    device = batch["target_ids"].device
    sft_w, cpo_w = to_device({"sft": sft_w, "cpo": cpo_w}, device).values()
    sft, z, verdict_logp = forward_targets(model, batch, s.class_ids(), ce_chunk, sft_w)
    return targets_loss(sft, z, batch, cpo_w, s, verdict_logp, counts, world)


def _window_metrics(totals: Counter, reduce: Reduce, world: int, lr: float, grad_norm: torch.Tensor,
                    seconds: float) -> dict[str, float]:
    keys = ["loss", "sft_loss", "cpo_loss", "pivot_acc_sum", "pivot_margin_sum", "n_pivots", "tokens",
            "verdict_loss", "verdict_acc_sum", "n_pairs"]
    totals["grad_norm"] = grad_norm
    # The sums live on the model's device: stack them there and copy them to the host once.
    device = next((v.device for v in totals.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    values = torch.stack([torch.as_tensor(totals[k], dtype=torch.float64, device=device)
                          for k in keys + ["grad_norm"]]).cpu()  # the step's one read of the device
    grad_norm = float(values[-1])
    got = dict(zip(keys, reduce(values[:-1]).tolist()))
    n_pivots = max(got["n_pivots"], 1.0)
    verdict = {} if not got["n_pairs"] else {"verdict_loss": got["verdict_loss"] / world,
                                             "verdict_acc": got["verdict_acc_sum"] / got["n_pairs"]}
    # Each worker's loss part is scaled by world size (see objective._share): undo it.
    return {**verdict, "loss": got["loss"] / world, "sft_loss": got["sft_loss"] / world, "cpo_loss": got["cpo_loss"] / world,
            "pivot_acc": got["pivot_acc_sum"] / n_pivots, "pivot_margin": got["pivot_margin_sum"] / n_pivots,
            "n_pivots": got["n_pivots"], "lr": lr, "tokens": got["tokens"],
            "tokens_per_s": got["tokens"] / max(seconds, 1e-9), "grad_norm": grad_norm, "step_s": seconds}


def collate_window(window: list[list[dict]], pad_id: int, device, settings: LossSettings | None = None,
                   packing: bool = False, micro_batch_tokens: int = 0, targets: bool = False) -> list[dict]:
    """Tensors for one window, on ``device``.

    Args:
        window: micro-batches of tokenized examples (:func:`windows`).
        settings: the loss settings (the pivot ids); needed for packing or targets.
        packing: lay the window's examples end to end, re-cut into micro-batches of at most
            ``micro_batch_tokens`` tokens (``r2d.train.packing``).
        targets: padded rows with the targets view (the chunked LM head without packing).
            Neither: the reference step's padded rows (``batching.collate``).
    """
    verdict = settings is not None and settings.verdict_weight > 0
    if packing:
        examples = [e for micro in window for e in micro]
        units = with_verdict_copies(examples, settings) if verdict else examples
        return [to_device(collate_packed(unbind(m), settings), device) for m in pack(units, micro_batch_tokens)]
    if targets:
        return [to_device(collate_padded(unbind(with_verdict_copies(micro, settings)) if verdict else micro,
                                         pad_id, settings), device) for micro in window]
    return [collate(micro, pad_id, device) for micro in window]
