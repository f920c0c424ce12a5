"""The gap-drawn LoRA dropout: the law of its zeros, its values and gradients, and its place in peft's layers.

Every draw is seeded, so these tests are deterministic; the bounds are five standard deviations
wide, so another seed passes too, and a biased draw (an off-by-one at either end, a gap law that is
not geometric, a lost tail) fails by many.
"""

import math

import pytest
import torch
from torch import nn

from r2d.config import load_config
from r2d.train import dropout as drop
from r2d.train.dropout import SparseDropout, dropped_positions, sparse_dropout
from r2d.train.model import build_model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _within(count: float, n: int, p: float, sds: float = 5.0) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def _gaps(pos: torch.Tensor) -> torch.Tensor:
    """Distances between successive zeros, the first counted from position -1."""
    return torch.diff(pos, prepend=torch.tensor([-1]))


def test_the_zeros_are_as_many_as_independent_coins_would_drop():
    n, p = 1_000_000, 0.05
    pos = dropped_positions(n, p, _gen(0))
    assert _within(len(pos), n, p)
    assert bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 0 and int(pos[-1]) < n


def test_the_gaps_between_zeros_are_geometric():
    """P(gap = k) = (1 - p)^(k - 1) p; Pearson's chi-square over k = 1..40 and the tail, 40 degrees of freedom.

    For 40 degrees of freedom chi-square has mean 40 and sd sqrt(80) ~ 8.9; 100 is 6.7 sd out.
    """
    n, p = 2_000_000, 0.05
    gaps = _gaps(dropped_positions(n, p, _gen(1)))
    total = len(gaps)
    chi2 = 0.0
    for k in range(1, 42):
        expected = total * ((1 - p) ** (k - 1) * p if k <= 40 else (1 - p) ** 40)
        seen = int((gaps == k).sum()) if k <= 40 else int((gaps > 40).sum())
        chi2 += (seen - expected) ** 2 / expected
    assert chi2 < 100, chi2


@pytest.mark.parametrize("spare", [drop._SPARE_SD, -1e9], ids=["spare gaps", "one gap a draw"])
def test_every_position_is_dropped_with_p_the_ends_too_and_independently(monkeypatch, spare):
    """With one gap a draw, every zero ends a draw and the next one starts from it: the seams must not show."""
    monkeypatch.setattr(drop, "_SPARE_SD", spare)
    n, p, draws = 6, 0.3, 4000
    gen = _gen(2)
    hits, pairs = torch.zeros(n), torch.zeros(n - 1)
    for _ in range(draws):
        mask = torch.zeros(n)
        mask[dropped_positions(n, p, gen)] = 1
        hits += mask
        pairs += mask[:-1] * mask[1:]
    for count in hits.tolist():
        assert _within(count, draws, p), hits
    for count in pairs.tolist():
        assert _within(count, draws, p * p), pairs


def test_a_short_first_draw_draws_again_to_the_end(monkeypatch):
    """A first draw that covers about half the row: the rest is drawn, and the second half is dropped at p too."""
    n, p = 200_000, 0.05
    monkeypatch.setattr(drop, "_SPARE_SD", -0.5 * n * p / math.sqrt(n * p * (1 - p)))
    pos = dropped_positions(n, p, _gen(3))
    assert bool((pos[1:] > pos[:-1]).all()) and int(pos[-1]) < n
    assert _within(int((pos < n // 2).sum()), n // 2, p)
    assert _within(int((pos >= n // 2).sum()), n // 2, p)


def test_values_are_scaled_and_zeroed_where_drawn_and_the_gradient_follows():
    p = 0.2
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(5)
    y = sparse_dropout(x, p)
    torch.manual_seed(5)
    zeros = dropped_positions(x.numel(), p)
    keep = torch.ones(x.numel())
    keep[zeros] = 0
    keep = keep.view_as(x)
    torch.testing.assert_close(y, x.detach() * keep * (1 / (1 - p)), rtol=0, atol=0)
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * keep * (1 / (1 - p)), rtol=0, atol=0)


def test_a_non_contiguous_input_is_dropped_by_its_logical_order():
    x = torch.arange(1.0, 401.0).view(20, 20).t()  # transposed: not contiguous
    torch.manual_seed(6)
    y = sparse_dropout(x, 0.5)
    torch.manual_seed(6)
    zeros = dropped_positions(400, 0.5)
    assert set(torch.nonzero(y.reshape(-1) == 0).flatten().tolist()) == set(zeros.tolist())
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * 2)


def test_eval_mode_and_p_zero_pass_the_input_through():
    x = torch.randn(8, 8)
    layer = SparseDropout(0.5).eval()
    assert layer(x) is x
    assert sparse_dropout(x, 0.0) is x
    with pytest.raises(ValueError, match="p must be in"):
        SparseDropout(1.0)


def test_the_mean_of_many_draws_is_the_input():
    """Inverted dropout keeps the expectation: E[y] = x (1 - p) / (1 - p)."""
    x = torch.full((200_000,), 3.0)
    y = sparse_dropout(x, 0.05, generator=_gen(7))
    assert abs(float(y.mean()) - 3.0) < 5 * 3.0 / 0.95 * math.sqrt(0.05 * 0.95 / 200_000)


@pytest.fixture(scope="module")
def sparse_model(tiny_model_dir):
    cfg = load_config(None, [f"model.source={tiny_model_dir}", "train.lora.dropout=0.1",
                             "train.lora.sparse_dropout=true"])
    model, _, _ = build_model(cfg)
    return model


def test_every_lora_layer_draws_its_dropout_by_gaps(sparse_model, tiny_model_dir):
    layers = [m for m in sparse_model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    cfg = load_config(None, [f"model.source={tiny_model_dir}", "train.lora.dropout=0.1"])
    reference, _, _ = build_model(cfg)
    torch_layers = [m for m in reference.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    assert len(layers) == len(torch_layers) >= 5
    assert all(type(m.lora_dropout["default"]) is SparseDropout and m.lora_dropout["default"].p == 0.1
               for m in layers)
    assert all(type(m.lora_dropout["default"]) is nn.Dropout for m in torch_layers)


def test_a_lora_projection_in_training_uses_the_drawn_zeros(sparse_model):
    """y = W x + s B A (x * keep / (1 - p)), with keep read back from the same seed."""
    layer = next(m for m in sparse_model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict))
    layer.train()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    with torch.no_grad():
        b.weight.copy_(torch.randn_like(b.weight) * 0.1)  # peft starts B at zero, which would hide the adapter
    x = torch.randn(3, 7, a.in_features)
    torch.manual_seed(8)
    y = layer(x)
    torch.manual_seed(8)
    keep = torch.ones(x.numel())
    keep[dropped_positions(x.numel(), 0.1)] = 0
    dropped = x * keep.view_as(x) / 0.9
    expected = layer.base_layer(x) + b(a(dropped)) * layer.scaling["default"]
    torch.testing.assert_close(y, expected)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + b(a(x)) * layer.scaling["default"])
