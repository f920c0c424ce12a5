"""Training losses of Reasoning-to-Defend (Zhu et al. 2025, arXiv 2502.12970).

Pure functions on one logits tensor [B, T, V], already shifted so that
``logits[:, t]`` predicts ``labels[:, t]``; ``labels`` [B, T] holds
``IGNORE_INDEX`` where no loss is taken (prompt, padding). ``sft_loss`` is
Eq. 3, ``cpo_loss`` is Eq. 4, ``total_loss`` is ``L_SFT + lambda * L_CPO``.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of a token that carries no loss, as in ``torch.nn.CrossEntropyLoss``."""

REASONING = 1
"""``segment`` value of a token inside ``<think>...</think>``."""

ANSWER = 2
"""``segment`` value of a token of the final answer."""

SFT_MODES = ("flat", "eq3")
CPO_VARIANTS = ("mean", "per_class")


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    # clamp keeps an empty mask at 0 / 1 = 0 instead of 0 / 0 = NaN
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "flat",
    segment: torch.Tensor | None = None,
) -> torch.Tensor:
    """Supervised fine-tuning loss on the labelled tokens (paper Eq. 3).

    Args:
        logits: [B, T, V], ``logits[:, t]`` predicts ``labels[:, t]``.
        labels: [B, T] target ids, ``IGNORE_INDEX`` where no loss is taken.
        mode: ``"flat"`` is the reference code's mean NLL over every labelled
            token of the batch. ``"eq3"`` is the paper's Eq. 3: per sequence,
            mean NLL over reasoning tokens plus mean NLL over answer tokens
            (an empty part adds 0), averaged over sequences with any token.
            Long reasoning then no longer drowns out a short answer.
        segment: [B, T] ints, ``REASONING`` (1), ``ANSWER`` (2) or 0 (no
            loss, even if labelled). Required for ``"eq3"``.

    Returns:
        Scalar float32 loss; 0.0 (not NaN, still in the graph) if no token
        is labelled.

    Raises:
        ValueError: unknown ``mode``, ``"eq3"`` without ``segment``, or
            mismatched shapes.
    """
    if mode not in SFT_MODES:
        raise ValueError(f"sft mode must be one of {SFT_MODES}, got {mode!r}")
    if mode == "eq3" and segment is None:
        raise ValueError("sft mode 'eq3' needs segment (1 = reasoning, 2 = answer)")
    _check_shapes(logits, labels)
    # reduction="none" leaves 0 loss and 0 gradient at ignored positions
    nll = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape).float()
    labelled = labels != IGNORE_INDEX
    if mode == "flat":
        return _masked_mean(nll, labelled)

    if segment.shape != labels.shape:
        raise ValueError(
            f"segment must match labels {tuple(labels.shape)}, got {tuple(segment.shape)}"
        )
    per_seq = torch.zeros_like(nll[:, 0])
    has_token = torch.zeros_like(labelled[:, 0])
    for part in (REASONING, ANSWER):
        in_part = labelled & (segment == part)
        per_seq = per_seq + _masked_mean(nll, in_part, dim=1)
        has_token = has_token | in_part.any(dim=1)
    return _masked_mean(per_seq, has_token)


def _pivot_ids(safe_id, unsafe_id, rethink_id, vocab):
    ids = [safe_id, unsafe_id] + ([] if rethink_id is None else [rethink_id])
    if len(set(ids)) != len(ids):
        raise ValueError(f"pivot ids must be distinct, got {ids}")
    if not all(0 <= tok < vocab for tok in ids):
        raise ValueError(f"pivot ids {ids} must lie in the vocabulary [0, {vocab})")
    return ids


def _pivot_margins(logits, labels, safe_id, unsafe_id, rethink_id):
    """Margins z[t+] - z[t-] at pivot positions, their true ids, and their z.

    [SAFE] and [UNSAFE] are each other's opposite. [RETHINK] is contrasted
    with [SAFE]: a step that should be reconsidered must not be called safe,
    whereas [UNSAFE] is close to its meaning and is not pushed away.
    """
    _check_shapes(logits, labels)
    ids = _pivot_ids(safe_id, unsafe_id, rethink_id, logits.shape[-1])
    opposite = {safe_id: unsafe_id, unsafe_id: safe_id, rethink_id: safe_id}
    mask = torch.zeros_like(labels, dtype=torch.bool)
    contrast = torch.full_like(labels, IGNORE_INDEX)
    for true_id in ids:
        here = labels == true_id
        mask |= here
        contrast.masked_fill_(here, opposite[true_id])
    # One nonzero (a wait for the GPU) for the three gathers, not one per boolean index.
    where = mask.nonzero(as_tuple=True)
    true_ids, other_ids = labels[where], contrast[where]
    # upcast only the gathered rows: bf16 would round away the small margins
    # CPO works on, and N pivot rows are cheap next to the [B, T, V] logits
    z = logits[where].float()
    margin = z.gather(1, true_ids[:, None]) - z.gather(1, other_ids[:, None])
    return margin.squeeze(1), true_ids, z


def cpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    safe_id: int,
    unsafe_id: int,
    rethink_id: int | None = None,
    variant: str = "mean",
) -> torch.Tensor:
    """Contrastive Pivot Optimization loss (paper Eq. 4).

    At every position whose label is a pivot, ``-log sigmoid(z[t+] - z[t-])``
    with ``z`` the logits there, ``t+`` the true pivot and ``t-`` its
    opposite: [SAFE] <-> [UNSAFE]. With ``rethink_id``, [RETHINK] positions
    are contrasted with [SAFE] too; without it they are not contrasted.

    Args:
        logits: [B, T, V], ``logits[:, t]`` predicts ``labels[:, t]``.
        labels: [B, T] target ids.
        safe_id, unsafe_id: token ids of [SAFE] and [UNSAFE].
        rethink_id: token id of [RETHINK], or None to leave it out.
        variant: ``"mean"`` averages over all pivot positions of the batch,
            Eq. 4's expectation. ``"per_class"`` is the reference code's
            variant: the mean within each pivot class, summed over the classes
            present, so rare [UNSAFE] pivots weigh as much as common [SAFE].

    Returns:
        Scalar loss; 0.0 that still requires grad if there is no pivot.

    Raises:
        ValueError: unknown ``variant``, equal or out-of-range pivot ids, or
            mismatched shapes.
    """
    if variant not in CPO_VARIANTS:
        raise ValueError(f"cpo variant must be one of {CPO_VARIANTS}, got {variant!r}")
    margin, true_ids, _ = _pivot_margins(logits, labels, safe_id, unsafe_id, rethink_id)
    if margin.numel() == 0:
        # keeps backward() and DDP's gradient hooks working on pivot-free batches
        return logits.sum().float() * 0
    per_pivot = -F.logsigmoid(margin)
    if variant == "mean":
        return per_pivot.mean()
    return sum(per_pivot[true_ids == tok].mean() for tok in true_ids.unique())


@torch.no_grad()
def pivot_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    safe_id: int,
    unsafe_id: int,
    rethink_id: int | None = None,
) -> dict:
    """``pivot_metrics`` as sums left on the logits' device, for a step that sums them over
    micro-batches and reads them once (each ``.item()`` waits for the GPU).

    Returns:
        ``pivot_acc_sum`` and ``pivot_margin_sum`` (0-d tensors) and ``n_pivots`` (int).
    """
    margin, true_ids, z = _pivot_margins(logits, labels, safe_id, unsafe_id, rethink_id)
    if margin.numel() == 0:
        zero = torch.zeros((), device=logits.device)
        return {"pivot_acc_sum": zero, "pivot_margin_sum": zero, "n_pivots": 0}
    ids = _pivot_ids(safe_id, unsafe_id, rethink_id, logits.shape[-1])
    ids = torch.tensor(ids, device=z.device)
    predicted = ids[z[:, ids].argmax(dim=1)]
    return {"pivot_acc_sum": (predicted == true_ids).float().sum(), "pivot_margin_sum": margin.sum(),
            "n_pivots": int(margin.numel())}


def pivot_metrics(logits: torch.Tensor, labels: torch.Tensor, safe_id: int, unsafe_id: int,
                  rethink_id: int | None = None) -> dict:
    """How well the model picks the pivot at pivot positions (no gradient).

    Arguments as in ``cpo_loss``.

    Returns:
        ``pivot_acc``: fraction of pivot positions where the argmax over the
        pivot ids alone is the label; ``pivot_margin``: mean of the Eq. 4
        margin ``z[t+] - z[t-]`` (both floats, 0.0 without pivots, so that
        logging never meets NaN); ``n_pivots``: int count of pivot positions.
    """
    sums = pivot_sums(logits, labels, safe_id, unsafe_id, rethink_id)
    n = max(sums["n_pivots"], 1)
    return {"pivot_acc": sums["pivot_acc_sum"].item() / n, "pivot_margin": sums["pivot_margin_sum"].item() / n,
            "n_pivots": sums["n_pivots"]}


def total_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    safe_id: int,
    unsafe_id: int,
    rethink_id: int | None = None,
    cpo_weight: float = 1.0,
    sft_mode: str = "flat",
    cpo_variant: str = "mean",
    segment: torch.Tensor | None = None,
) -> dict:
    """R2D training objective ``L = L_SFT + lambda * L_CPO`` (paper Eq. 3 + Eq. 4).

    Both terms read the same logits, so one forward pass serves both.

    Args:
        logits, labels, segment: as in ``sft_loss``.
        safe_id, unsafe_id, rethink_id: as in ``cpo_loss``.
        cpo_weight: lambda, 1.0 in the paper; 0 gives the no-CPO ablation.
        sft_mode: ``mode`` of ``sft_loss``.
        cpo_variant: ``variant`` of ``cpo_loss``.

    Returns:
        ``{"loss", "sft_loss", "cpo_loss"}``, scalar tensors.

    Raises:
        ValueError: negative ``cpo_weight``, or any error of the two losses.
    """
    if cpo_weight < 0:
        raise ValueError(f"cpo_weight must be >= 0, got {cpo_weight}")
    sft = sft_loss(logits, labels, mode=sft_mode, segment=segment)
    cpo = cpo_loss(logits, labels, safe_id, unsafe_id, rethink_id, variant=cpo_variant)
    return {"loss": sft + cpo_weight * cpo, "sft_loss": sft, "cpo_loss": cpo}


def verdict_margins(logp: torch.Tensor, pair: torch.Tensor, sign: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Per trace, ``delta_q`` of :func:`verdict_loss`: the scored tokens' log-probabilities summed with their signs.

    Args:
        logp: [R] log-probabilities of the scored answer tokens, in both contexts.
        pair: [R] which trace (0 .. n_pairs - 1) each token belongs to.
        sign: [R] +1 for a token scored after the trace's own verdict, -1 after the flipped one.
        n_pairs: number of traces.

    Returns:
        [n_pairs] float32 margins.
    """
    if not (logp.shape == pair.shape == sign.shape) or logp.dim() != 1:
        raise ValueError(f"expected logp, pair, sign [R], got {tuple(logp.shape)}, {tuple(pair.shape)}, "
                         f"{tuple(sign.shape)}")
    delta = torch.zeros(n_pairs, dtype=torch.float32, device=logp.device)
    return delta.index_add(0, pair, logp.float() * sign.to(torch.float32))


def verdict_loss(logp: torch.Tensor, pair: torch.Tensor, sign: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Verdict-following loss: the answer must depend on the verdict written before it.

    Not in the paper: the project's addition, for a student that decides well and then answers
    against its own decision (README, "Recipe experiments"). For each trace q, with ``a`` its
    first answer tokens and ``v`` its verdict (the last reasoning pivot, [SAFE] or [UNSAFE]),

        delta_q = log p(a | context, v) - log p(a | context, opposite of v)
        L_V = mean_q -log sigmoid(delta_q)

    so a refusal grows more likely after [UNSAFE] than after [SAFE], and a real answer the other
    way round. Only the trace's own answer is scored, under both verdicts: no answer is ever
    trained after a verdict it does not belong to. Arguments as in :func:`verdict_margins`.

    Returns:
        Scalar float32 loss, the mean over traces; 0.0 still in the graph with no trace.
    """
    if n_pairs == 0:
        return logp.sum().float() * 0
    return -F.logsigmoid(verdict_margins(logp, pair, sign, n_pairs)).mean()
