"""LoRA dropout that draws where the zeros fall instead of a coin for every element.

peft draws a fresh Bernoulli mask over the input of every adapted projection, each step. On CPU
torch's ``bernoulli_`` costs several nanoseconds an element, and at the recipe's p = 0.05 it was
17.5% of a packed SFT+CPO step, for a mask that is 95% ones
(``benchmarks/results/profiles/train-packed_step-torch-dropout.txt``; 2.6% with this module,
``train-packed_step.txt``).

The same distribution can be drawn from the gaps between zeros. Elements dropped independently
with probability p are exactly a run of Geometric(p) gaps: the first zero sits at position
gap_1 - 1, the next one gap_2 further along, and so on. Drawing the gaps costs one uniform per
*zero* (p n of them) instead of one per element, and the backward pass keeps those p n positions
instead of a mask of n::

    gap  ~ Geometric(p), P(gap = k) = (1 - p)^(k - 1) p, k >= 1     (torch's geometric_)
    zero = cumsum(gap) - 1                                          kept while < n

Only the draw differs from ``nn.Dropout``; the output is ``x / (1 - p)`` with the drawn elements
zeroed, the same law element by element and jointly. On a GPU torch's fused dropout kernel is
cheap and finding where the gaps stop would wait on the device, so tensors off the CPU take
``torch.nn.functional.dropout``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_SPARE_SD = 6.0
"""Gaps drawn beyond the expected count, in standard deviations; a shortfall draws again."""


def dropped_positions(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted flat positions in ``[0, n)``, each present independently with probability ``p``."""
    if n <= 0 or p <= 0:
        return torch.empty(0, dtype=torch.long)
    pieces, last = [], -1
    while last < n - 1:
        left = n - 1 - last
        want = max(1, int(left * p + _SPARE_SD * math.sqrt(left * p * (1 - p)) + 16))
        gaps = torch.empty(want, dtype=torch.long).geometric_(p, generator=generator)
        pos = gaps.cumsum_(0).add_(last)
        inside = int(torch.searchsorted(pos, n))
        pieces.append(pos[:inside])
        if inside < want:
            break
        last = int(pos[-1])
    return torch.cat(pieces)


def _scale_and_zero(t: torch.Tensor, zeros: torch.Tensor, scale: float) -> torch.Tensor:
    out = t.mul(scale).contiguous()
    out.view(-1).index_fill_(0, zeros, 0)
    return out


class _Drop(torch.autograd.Function):
    """y = x * scale, zeroed at ``zeros``; the gradient is the same map (it is linear and diagonal)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, zeros: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(zeros)
        ctx.scale = scale
        return _scale_and_zero(x, zeros, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (zeros,) = ctx.saved_tensors
        return _scale_and_zero(grad, zeros, ctx.scale), None, None


def sparse_dropout(x: torch.Tensor, p: float, training: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the zeros drawn by their gaps (CPU tensors)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return nn.functional.dropout(x, p, True)
    return _Drop.apply(x, dropped_positions(x.numel(), p, generator), 1.0 / (1.0 - p))


class SparseDropout(nn.Module):
    """Drop-in for ``nn.Dropout(p)``; see the module docstring."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_sparse_dropout(model) -> None:
    """Swap every LoRA layer's ``nn.Dropout`` for :class:`SparseDropout` (peft builds them with no hook to choose)."""
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if isinstance(table, nn.ModuleDict):
            for name, layer in list(table.items()):
                if type(layer) is nn.Dropout:
                    table[name] = SparseDropout(layer.p)
