"""Losses of r2d.losses, checked against numbers derived by hand.

Vocabulary of size V = 4 throughout: 0 is a word, 1 = [SAFE], 2 = [UNSAFE],
3 = [RETHINK]. Useful values: log 2 = 0.693147, log 4 = 1.386294,
-log sigma(2) = log(1 + e^-2) = 0.126928, -log sigma(-2) = 2.126928.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from r2d.losses import cpo_loss, pivot_metrics, sft_loss, total_loss, verdict_loss, verdict_margins

WORD, SAFE, UNSAFE, RETHINK = 0, 1, 2, 3
IGN = -100
LOG2 = math.log(2)
SOFTPLUS_M2 = math.log1p(math.exp(-2))  # -log sigma(2)
SOFTPLUS_P2 = math.log1p(math.exp(2))  # -log sigma(-2)
PIVOTS = {"safe_id": SAFE, "unsafe_id": UNSAFE}


def _t(x, grad=False):
    out = torch.tensor(x, dtype=torch.float32)
    return out.requires_grad_() if grad else out


def _zero(value):
    assert_close(value, torch.tensor(0.0))


# ---------------------------------------------------------------- SFT, Eq. 3


def test_sft_flat_uniform_logits_is_log_v():
    """Uniform logits give every token p = 1/4, NLL = log 4 = 1.386294,
    whatever the target, so the flat mean is log 4."""
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[0, 1, IGN], [2, 3, 0]])
    assert_close(sft_loss(logits, labels), torch.tensor(math.log(4)))


def _uneven_split():
    """One sequence: 3 reasoning tokens with uniform logits (NLL log 4 each)
    and 1 answer token with logits [log 3, 0, 0, 0] and target 0:
    p = 3 / (3 + 1 + 1 + 1) = 1/2, NLL = log 2."""
    logits = torch.zeros(1, 4, 4)
    logits[0, 3, 0] = math.log(3)
    labels = torch.tensor([[WORD, SAFE, WORD, WORD]])
    segment = torch.tensor([[1, 1, 1, 2]])
    return logits, labels, segment


def test_sft_flat_and_eq3_differ_on_uneven_split():
    """flat: (3 log 4 + log 2) / 4 = 7/4 log 2 = 1.213008.
    eq3: mean reasoning + mean answer = log 4 + log 2 = 3 log 2 = 2.079442.
    Eq. 3 lets the one answer token weigh as much as all of the reasoning."""
    logits, labels, segment = _uneven_split()
    assert_close(sft_loss(logits, labels, mode="flat"), torch.tensor(7 / 4 * LOG2))
    assert_close(
        sft_loss(logits, labels, mode="eq3", segment=segment), torch.tensor(3 * LOG2)
    )


def test_sft_eq3_averages_over_sequences_with_tokens():
    """Row 0 is the uneven split: 3 log 2. Row 1 has reasoning only, uniform
    logits: log 4 + 0 (empty answer) = 2 log 2. Row 2 is all ignored and is
    left out of the average: (3 log 2 + 2 log 2) / 2 = 2.5 log 2 = 1.732868.
    Averaging over all 3 rows would give 5/3 log 2 = 1.155245 instead."""
    logits0, labels0, segment0 = _uneven_split()
    logits = torch.cat([logits0, torch.zeros(2, 4, 4)])
    labels = torch.cat([labels0, torch.tensor([[0, 0, IGN, IGN], [IGN] * 4])])
    segment = torch.cat([segment0, torch.tensor([[1, 1, 0, 0], [0] * 4])])
    loss = sft_loss(logits, labels, mode="eq3", segment=segment)
    assert_close(loss, torch.tensor(2.5 * LOG2))


@pytest.mark.parametrize("mode", ["flat", "eq3"])
def test_sft_ignores_masked_positions(mode):
    """Positions labelled -100 carry no loss: changing their logits by a lot
    leaves the loss unchanged, and their gradient is exactly 0."""
    torch.manual_seed(0)
    labels = torch.tensor([[IGN, IGN, 0, 1, 2], [IGN, 3, 0, IGN, IGN]])
    segment = torch.where(labels == IGN, 0, 1)
    segment[:, -1] = torch.where(labels[:, -1] == IGN, 0, 2)
    logits = torch.randn(2, 5, 4, requires_grad=True)
    loss = sft_loss(logits, labels, mode=mode, segment=segment)
    loss.backward()

    ignored = labels == IGN
    moved = logits.detach().clone()
    moved[ignored] += 10 * torch.randn_like(moved[ignored])
    assert_close(sft_loss(moved, labels, mode=mode, segment=segment), loss.detach())
    assert torch.all(logits.grad[ignored] == 0)
    assert torch.any(logits.grad[~ignored] != 0)


@pytest.mark.parametrize("mode", ["flat", "eq3"])
def test_sft_no_labelled_token_is_zero_not_nan(mode):
    """All labels -100: 0 / max(0, 1) = 0.0; backward still runs, grad 0."""
    logits = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.full((2, 3), IGN)
    loss = sft_loss(logits, labels, mode=mode, segment=torch.zeros(2, 3, dtype=torch.long))
    _zero(loss.detach())
    loss.backward()
    assert_close(logits.grad, torch.zeros_like(logits))


# ---------------------------------------------------------------- CPO, Eq. 4


def _safe_and_unsafe():
    """Position 0, label [SAFE], z[SAFE] = z[UNSAFE] = 0: margin 0 -> log 2.
    Position 1, label [UNSAFE], z[UNSAFE] = 2, z[SAFE] = 0: margin 2 -> 0.126928.
    Position 2 is a plain word and is not contrasted."""
    logits = _t([[[0, 0, 0, 0], [5, 0, 2, 0], [9, 0, 0, 0]]])
    labels = torch.tensor([[SAFE, UNSAFE, WORD]])
    return logits, labels


def test_cpo_safe_and_unsafe_positions():
    """mean of the two: (0.693147 + 0.126928) / 2 = 0.410038. The word logit 5
    at position 1 does not enter: CPO contrasts the two pivots only."""
    logits, labels = _safe_and_unsafe()
    expected = (LOG2 + SOFTPLUS_M2) / 2
    assert_close(cpo_loss(logits, labels, **PIVOTS), torch.tensor(expected))


def test_cpo_rethink_is_contrasted_with_safe_only_when_given():
    """Position 0: [SAFE], margin 0 -> log 2.
    Position 1: [RETHINK] with z[RETHINK] = 0, z[SAFE] = 2, z[UNSAFE] = 7:
    t- is [SAFE], margin -2 -> 2.126928; z[UNSAFE] plays no part.
    With rethink_id: (0.693147 + 2.126928) / 2 = 1.410038.
    Without: position 1 is not a pivot, loss = log 2 = 0.693147."""
    logits = _t([[[0, 0, 0, 0], [0, 2, 7, 0]]])
    labels = torch.tensor([[SAFE, RETHINK]])
    with_rethink = cpo_loss(logits, labels, **PIVOTS, rethink_id=RETHINK)
    assert_close(with_rethink, torch.tensor((LOG2 + SOFTPLUS_P2) / 2))
    assert_close(cpo_loss(logits, labels, **PIVOTS), torch.tensor(LOG2))


def test_cpo_mean_and_per_class_differ_with_unequal_counts():
    """Two [SAFE] positions with margin 0 (log 2 each), one [UNSAFE] with
    margin 2 (0.126928).
    mean over positions: (2 * 0.693147 + 0.126928) / 3 = 0.504407.
    per_class: mean(safe) + mean(unsafe) = 0.693147 + 0.126928 = 0.820075."""
    logits = _t([[[0, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]])
    labels = torch.tensor([[SAFE, UNSAFE, SAFE]])
    mean = cpo_loss(logits, labels, **PIVOTS, variant="mean")
    per_class = cpo_loss(logits, labels, **PIVOTS, variant="per_class")
    assert_close(mean, torch.tensor((2 * LOG2 + SOFTPLUS_M2) / 3))
    assert_close(per_class, torch.tensor(LOG2 + SOFTPLUS_M2))


def test_cpo_per_class_with_rethink_sums_three_classes():
    """[SAFE] margin 0 (log 2), [UNSAFE] margin 2 (0.126928), two [RETHINK]
    with z[SAFE] = 2 (margin -2, 2.126928 each): per_class =
    0.693147 + 0.126928 + 2.126928 = 2.947003."""
    logits = _t([[[0, 0, 0, 0], [0, 0, 2, 0], [0, 2, 0, 0], [0, 2, 0, 0]]])
    labels = torch.tensor([[SAFE, UNSAFE, RETHINK, RETHINK]])
    loss = cpo_loss(logits, labels, **PIVOTS, rethink_id=RETHINK, variant="per_class")
    assert_close(loss, torch.tensor(LOG2 + SOFTPLUS_M2 + SOFTPLUS_P2))


@pytest.mark.parametrize("variant", ["mean", "per_class"])
def test_cpo_without_pivots_is_zero_and_backward_works(variant):
    """No pivot label in the batch: loss 0.0, not NaN (0/0), and it still
    requires grad so a training step on such a batch does not crash."""
    logits = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.tensor([[WORD, IGN, WORD], [IGN, IGN, IGN]])
    loss = cpo_loss(logits, labels, **PIVOTS, rethink_id=RETHINK, variant=variant)
    assert loss.requires_grad
    _zero(loss.detach())
    loss.backward()
    assert_close(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("label, pos, neg", [(SAFE, SAFE, UNSAFE), (UNSAFE, UNSAFE, SAFE)])
def test_cpo_gradient_touches_only_the_two_pivot_logits(label, pos, neg):
    """L = -log sigma(m), m = z+ - z-. dL/dm = -(1 - sigma(m)), so
    dL/dz+ = -(1 - sigma(m)) and dL/dz- = +(1 - sigma(m)); every other vocab
    entry and every other position has gradient 0. With m = 1:
    1 - sigma(1) = 0.268941."""
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, pos] = 1.0
    logits[0, 1, WORD] = 4.0  # a large word logit must not leak into the grad
    logits.requires_grad_()
    labels = torch.tensor([[WORD, label, IGN]])
    cpo_loss(logits, labels, **PIVOTS, rethink_id=RETHINK).backward()

    g = 1 - torch.sigmoid(torch.tensor(1.0))
    expected = torch.zeros(1, 3, 4)
    expected[0, 1, pos] = -g
    expected[0, 1, neg] = g
    assert_close(logits.grad, expected)


def test_cpo_is_stable_for_huge_margins():
    """Margin -1000: -log sigma(-1000) = 1000 (softplus), not inf; margin
    +1000: 0. A naive log(sigmoid(m)) would give inf and NaN gradients."""
    logits = _t([[[0, 0, 1000, 0], [0, 0, 1000, 0]]], grad=True)
    labels = torch.tensor([[SAFE, UNSAFE]])
    loss = cpo_loss(logits, labels, **PIVOTS, variant="per_class")
    assert_close(loss, torch.tensor(1000.0))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- metrics


def test_pivot_metrics_by_hand():
    """Position 0, [SAFE]: z[SAFE] = 1 > z[UNSAFE] = 0, right, margin 1.
    Position 1, [UNSAFE]: z[SAFE] = 2 > z[UNSAFE] = 0, wrong, margin -2.
    Position 2, [RETHINK]: z = [9, 0, 1, 2]; the word logit 9 is higher, but
    the argmax runs over pivot ids only, so [RETHINK] wins: right;
    margin z[RETHINK] - z[SAFE] = 2.
    acc = 2/3, margin = (1 - 2 + 2) / 3 = 1/3, n = 3."""
    logits = _t([[[0, 1, 0, 0], [0, 2, 0, 0], [9, 0, 1, 2], [0, 0, 0, 0]]])
    labels = torch.tensor([[SAFE, UNSAFE, RETHINK, WORD]])
    metrics = pivot_metrics(logits, labels, **PIVOTS, rethink_id=RETHINK)
    assert metrics["n_pivots"] == 3
    assert metrics["pivot_acc"] == pytest.approx(2 / 3)
    assert metrics["pivot_margin"] == pytest.approx(1 / 3)
    assert isinstance(metrics["pivot_acc"], float)


def test_pivot_metrics_without_pivots_are_zero():
    metrics = pivot_metrics(torch.randn(1, 2, 4), torch.tensor([[WORD, IGN]]), **PIVOTS)
    assert metrics == {"pivot_acc": 0.0, "pivot_margin": 0.0, "n_pivots": 0}


# ---------------------------------------------------------------- total


def test_total_is_sft_plus_weighted_cpo():
    """Uniform logits, labels [WORD, SAFE, -100]: SFT = log 4 (flat mean of
    two tokens at log 4); CPO at the [SAFE] position has margin 0: log 2.
    L = log 4 + 0.5 * log 2 = 2.5 log 2 = 1.732868. The gradient is the sum
    of the parts' gradients, as both read the same logits."""
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    labels = torch.tensor([[WORD, SAFE, IGN]])
    out = total_loss(logits, labels, **PIVOTS, cpo_weight=0.5)
    assert_close(out["sft_loss"], torch.tensor(2 * LOG2))
    assert_close(out["cpo_loss"], torch.tensor(LOG2))
    assert_close(out["loss"], torch.tensor(2.5 * LOG2))

    (grad_total,) = torch.autograd.grad(out["loss"], logits, retain_graph=True)
    (grad_sft,) = torch.autograd.grad(out["sft_loss"], logits, retain_graph=True)
    (grad_cpo,) = torch.autograd.grad(out["cpo_loss"], logits)
    assert_close(grad_total, grad_sft + 0.5 * grad_cpo)


def test_total_passes_modes_through():
    """The uneven split under eq3 (3 log 2) plus per_class CPO on its one
    [SAFE] position (reasoning token 1, uniform logits: margin 0, log 2),
    lambda = 1: 4 log 2 = 2.772589."""
    logits, labels, segment = _uneven_split()
    out = total_loss(
        logits, labels, **PIVOTS, sft_mode="eq3", cpo_variant="per_class", segment=segment
    )
    assert_close(out["loss"], torch.tensor(4 * LOG2))


# ---------------------------------------------------------------- arguments

_LOGITS, _LABELS = torch.zeros(1, 2, 4), torch.tensor([[SAFE, WORD]])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sft_loss(_LOGITS, _LABELS, mode="token"), "sft mode"),
        (lambda: sft_loss(_LOGITS, _LABELS, mode="eq3"), "segment"),
        (lambda: sft_loss(_LOGITS, _LABELS, "eq3", torch.ones(1, 3)), "segment"),
        (lambda: sft_loss(_LOGITS, _LABELS[:, :1]), "labels"),
        (lambda: cpo_loss(_LOGITS, _LABELS, **PIVOTS, variant="sum"), "variant"),
        (lambda: cpo_loss(_LOGITS, _LABELS, SAFE, SAFE), "distinct"),
        (lambda: cpo_loss(_LOGITS, _LABELS, **PIVOTS, rethink_id=SAFE), "distinct"),
        (lambda: cpo_loss(_LOGITS, _LABELS, SAFE, 4), "vocabulary"),
        (lambda: pivot_metrics(_LOGITS, _LABELS, SAFE, -1), "vocabulary"),
        (lambda: total_loss(_LOGITS, _LABELS, **PIVOTS, cpo_weight=-1.0), "cpo_weight"),
    ],
)
def test_invalid_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_verdict_loss_by_hand():
    """Two traces, each scored on its answer tokens after its own verdict (+) and after the flipped one (-).

    Trace 0: own log p = -1 and -1 (sum -2), flipped -2 and -2 (sum -4): delta = -2 - (-4) = 2,
             -log sigma(2) = 0.126928.
    Trace 1: own -3, flipped -1: delta = -2, -log sigma(-2) = 2.126928 (its answer fits the flipped verdict better).
    L_V = (0.126928 + 2.126928) / 2 = 1.126928.
    Gradient: d(-log sigma(delta))/d delta = -sigma(-delta); for trace 0, -sigma(-2) = -0.119203, over 2 traces
    -0.059601 on each own token and +0.059601 on each flipped one.
    """
    logp = _t([-1.0, -1.0, -2.0, -2.0, -3.0, -1.0], grad=True)
    pair = torch.tensor([0, 0, 0, 0, 1, 1])
    sign = torch.tensor([1, 1, -1, -1, 1, -1])
    assert_close(verdict_margins(logp, pair, sign, 2), _t([2.0, -2.0]))
    loss = verdict_loss(logp, pair, sign, 2)
    assert loss.item() == pytest.approx((SOFTPLUS_M2 + SOFTPLUS_P2) / 2, abs=1e-6)
    loss.backward()
    g0 = 1 / (1 + math.exp(2)) / 2
    g1 = 1 / (1 + math.exp(-2)) / 2
    assert_close(logp.grad, _t([-g0, -g0, g0, g0, -g1, g1]))


def test_verdict_loss_without_traces_is_zero_in_the_graph():
    logp = _t([], grad=True)
    empty = torch.tensor([], dtype=torch.long)
    loss = verdict_loss(logp, empty, empty, 0)
    _zero(loss.detach())
    loss.backward()
    with pytest.raises(ValueError, match="expected logp, pair, sign"):
        verdict_loss(_t([1.0]), torch.tensor([0, 0]), torch.tensor([1]), 1)
