"""The R2D objective over an accumulation window (one optimizer step).

``r2d.losses`` gives means over ONE micro-batch. Averaging those means over the
micro-batches of a window would weigh a 30-token micro-batch like a 900-token one,
so batch 8 × accumulation 1 and batch 1 × accumulation 8 would train differently.
Instead each micro-batch's mean is re-weighted by its share of the window's
normaliser (tokens for flat SFT, sequences for Eq. 3, pivots for CPO), counted over
every micro-batch of every worker before the first backward pass. The sum of the
re-weighted terms is then exactly the window's loss, however it is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r2d.losses import ANSWER, IGNORE_INDEX, REASONING, cpo_loss, pivot_sums, total_loss, verdict_margins

# Positions of the window counts in the tensor that is all-reduced across workers.
N_TOKENS, N_SEQS, N_SAFE, N_UNSAFE, N_RETHINK, N_PAIRS = range(6)


@dataclass(frozen=True)
class LossSettings:
    safe_id: int
    unsafe_id: int
    rethink_id: int | None
    """[RETHINK]'s id when it is contrasted too (train.cpo_rethink), else None."""
    cpo_weight: float = 1.0
    sft_mode: str = "flat"
    cpo_variant: str = "mean"
    verdict_weight: float = 0.0
    """mu of the verdict-following term (``losses.verdict_loss``); 0 leaves it out."""
    verdict_tokens: int = 8
    """Answer tokens the verdict-following term scores."""
    pivot_ids: tuple[int, ...] = ()
    """Every pivot id a step may end with ([SAFE], [UNSAFE], [RETHINK]), to find a trace's verdict."""

    def class_ids(self) -> list[int]:
        ids = [self.safe_id, self.unsafe_id]
        return ids + ([self.rethink_id] if self.rethink_id is not None else [])


def shifted(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and segments aligned with ``logits[:, :-1]`` (position t predicts token t + 1)."""
    return batch["labels"][:, 1:], batch["segment"][:, 1:]


def micro_batch_counts(batch: dict[str, torch.Tensor], s: LossSettings) -> torch.Tensor:
    """Normalisers of one micro-batch: labelled tokens, Eq. 3 sequences, pivots per class."""
    labels, segment = shifted(batch)
    labelled = labels != IGNORE_INDEX
    in_parts = labelled & ((segment == REASONING) | (segment == ANSWER))
    # One stack on the batch's device: no per-count copy to the host (each would wait for the GPU).
    rethink = (labels == s.rethink_id).sum() if s.rethink_id is not None else torch.zeros_like(labelled.sum())
    return torch.stack([labelled.sum(), in_parts.any(dim=1).sum(), (labels == s.safe_id).sum(),
                        (labels == s.unsafe_id).sum(), rethink, torch.zeros_like(rethink)]).to(torch.float64)


def _share(part: torch.Tensor | float, whole: torch.Tensor | float, world: int) -> float:
    # DDP averages gradients over workers, so each worker's share is scaled up by world
    # size; the average then equals the loss normalised by the global count.
    whole = float(whole)
    return 0.0 if whole == 0 else float(part) * world / whole


def _cpo_term(logits, labels, mean_cpo, mb: torch.Tensor, window: torch.Tensor, world: int, s: LossSettings):
    if s.cpo_variant == "mean":
        return mean_cpo * _share(mb[N_SAFE:N_PAIRS].sum(), window[N_SAFE:N_PAIRS].sum(), world)
    # per_class: a mean within each class, summed over the classes; each class mean is
    # normalised by its own window count so that the split does not matter either.
    term = logits.sum().float() * 0
    for index, class_id in zip((N_SAFE, N_UNSAFE, N_RETHINK), s.class_ids()):
        only = torch.where(labels == class_id, labels, torch.full_like(labels, IGNORE_INDEX))
        loss = cpo_loss(logits, only, s.safe_id, s.unsafe_id, s.rethink_id, variant="mean")
        term = term + loss * _share(mb[index], window[index], world)
    return term


def micro_batch_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], window: torch.Tensor,
                     world: int, s: LossSettings, mb: torch.Tensor
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
    """This micro-batch's part of the window loss, from the logits of its one forward pass.

    Args:
        logits: [B, T, V] model output for ``batch["input_ids"]`` (unshifted).
        batch: the collated micro-batch.
        window: summed :func:`micro_batch_counts` of the whole window, over all workers, on the host.
        world: number of data-parallel workers.
        s: loss settings.
        mb: this micro-batch's own :func:`micro_batch_counts`, on the host.

    Returns:
        ``(loss, parts)``: the tensor to call ``backward`` on, and its ``sft_loss``,
        ``cpo_loss``, ``loss`` parts plus ``pivot_acc_sum``/``pivot_margin_sum``/
        ``n_pivots`` (sums, to be reduced over the window), as detached 0-d tensors left
        on the device (``n_pivots`` an int) so that the step reads them once, at its end.
    """
    logits = logits[:, :-1]
    labels, segment = shifted(batch)
    means = total_loss(logits, labels, safe_id=s.safe_id, unsafe_id=s.unsafe_id, rethink_id=s.rethink_id,
                       cpo_weight=s.cpo_weight, sft_mode=s.sft_mode, cpo_variant="mean", segment=segment)
    index = N_TOKENS if s.sft_mode == "flat" else N_SEQS
    sft = means["sft_loss"] * _share(mb[index], window[index], world)
    cpo = _cpo_term(logits, labels, means["cpo_loss"], mb, window, world, s)
    loss = sft + s.cpo_weight * cpo
    parts = {"loss": loss.detach(), "sft_loss": sft.detach(), "cpo_loss": cpo.detach(),
             **pivot_sums(logits, labels, s.safe_id, s.unsafe_id, s.rethink_id)}
    return loss, parts


def target_weights(host: dict, window: torch.Tensor, world: int, s: LossSettings
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's weight in the SFT term and each pivot's in the CPO term, on the host.

    The same re-weighting as :func:`micro_batch_loss`, written per position: the window's
    loss is linear in every token's NLL and every pivot's ``-log sigmoid`` margin, with
    coefficients the host knows before the step (flat: 1 / window tokens; Eq. 3: 1 / the
    token's part of its trace / window traces; CPO: 1 / window pivots, or 1 / the pivot's
    class count for ``per_class``), each times ``world`` as in :func:`_share`.

    Args:
        host: the ``host`` part of a targets batch (``r2d.train.packing``).
        window: summed counts of the window over all workers.

    Returns:
        ``(sft_weights [M], cpo_weights [P])``, float32 on the CPU.
    """
    inverse = lambda n: torch.where(n > 0, world / n.clamp(min=1), torch.zeros_like(n))  # noqa: E731
    seq, seg = host["target_seq"], host["target_seg"]
    if s.sft_mode == "flat":
        sft = inverse(window[N_TOKENS]).expand(seq.shape).clone()
    else:
        in_parts = (seg == REASONING) | (seg == ANSWER)
        group = seq * 3 + seg  # one group per (trace, segment)
        sizes = torch.bincount(group[in_parts], minlength=3 * host["n_traces"]).to(torch.float64)
        sft = torch.where(in_parts, inverse(window[N_SEQS]) / sizes[group].clamp(min=1), 0.0)
    if s.cpo_variant == "mean":
        cpo = inverse(window[N_SAFE:N_PAIRS].sum()).expand(host["pivot_class"].shape).clone()
    else:
        cpo = inverse(window[N_SAFE + host["pivot_class"]])
    return sft.float(), cpo.float()


def targets_loss(sft: torch.Tensor, z: torch.Tensor, batch: dict, cpo_weights: torch.Tensor, s: LossSettings,
                 verdict_logp: torch.Tensor | None = None, window: torch.Tensor | None = None, world: int = 1
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
    """This micro-batch's part of the window loss from ``head.forward_targets``'s outputs.

    Args:
        sft: the weighted NLL sum (the SFT term, already normalised by the window).
        z: [P, len(class_ids)] float32 pivot logits at the pivot positions.
        batch: the device batch (``pivot_true``, ``pivot_other``; ``verdict_pair``/``verdict_sign``
            with the verdict term).
        cpo_weights: [P] each pivot's weight (:func:`target_weights`), on the device.
        verdict_logp: [R] log-probabilities of the verdict term's scored tokens, or None without it.
        window, world: the window's counts and the workers, for the verdict term's normaliser.

    Returns:
        As :func:`micro_batch_loss`: the tensor to call ``backward`` on, and its parts.
    """
    true = z.gather(1, batch["pivot_true"][:, None]).squeeze(1)
    margin = true - z.gather(1, batch["pivot_other"][:, None]).squeeze(1)
    cpo = (-F.logsigmoid(margin) * cpo_weights).sum()  # Eq. 4, each pivot weighed by the window
    loss = sft + s.cpo_weight * cpo
    with torch.no_grad():
        correct = (z.argmax(dim=1) == batch["pivot_true"]).float().sum()
    parts = {"loss": loss.detach(), "sft_loss": sft.detach(), "cpo_loss": cpo.detach(), "pivot_acc_sum": correct,
             "pivot_margin_sum": margin.detach().sum(), "n_pivots": int(margin.shape[0])}
    if verdict_logp is not None:
        n_pairs = int(batch["host"]["counts"][N_PAIRS])
        margins = verdict_margins(verdict_logp, batch["verdict_pair"], batch["verdict_sign"], n_pairs)
        # Each trace weighs 1 / the window's traces, as every other term is normalised by its window.
        verdict = -F.logsigmoid(margins).sum() * _share(1, window[N_PAIRS], world)
        loss = loss + s.verdict_weight * verdict
        parts.update(loss=loss.detach(), verdict_loss=verdict.detach(),
                     verdict_acc_sum=(margins.detach() > 0).float().sum(), n_pairs=n_pairs)
    return loss, parts
