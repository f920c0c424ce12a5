"""The worker's optimizer step without Ray: what moves, accumulation, checkpoints, export."""

from collections import Counter

import pytest
import torch

from r2d.config import load_config
from r2d.train import checkpoint
from r2d.train.loop import loss_settings
from r2d.train.model import build_model, merged_model, pivot_rows
from r2d.train.steps import collate_window, make_optimizer, optimizer_step, windows
from r2d.train.synthetic import synthetic_rows


def _cfg(model_dir, *extra):
    return load_config(None, [f"model.source={model_dir}", "train.lora.dropout=0.0", "train.learning_rate=1e-2",
                              "train.warmup_ratio=0.0", "train.scheduler=constant", *extra])


def _setup(cfg, total_steps=10, sgd=False):
    torch.manual_seed(0)
    model, tok, pivots = build_model(cfg)
    optimizer, scheduler = make_optimizer(model, cfg.train.learning_rate, 0.0, cfg.train.scheduler,
                                          cfg.train.warmup_ratio, total_steps)
    if sgd:
        # Adam divides by sqrt(v): for the LoRA A matrices, whose first gradients are
        # ~0 (B starts at 0), float rounding noise would become full-size steps.
        # SGD keeps the comparison about the gradients themselves.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return model, tok, pivots, optimizer, scheduler


def _windows(tok, pivots, rows, batch_size, grad_accum):
    stream = windows(rows, tok, pivots, max_length=512, batch_size=batch_size, grad_accum=grad_accum,
                     dropped=Counter(), length_grouping=False)
    return [collate_window(w, tok.pad_token_id, "cpu") for w in stream]


def _train(cfg, rows, batch_size, grad_accum, steps):
    model, tok, pivots, optimizer, scheduler = _setup(cfg, sgd=True)
    settings = loss_settings(cfg, pivots)
    losses = [optimizer_step(model, optimizer, scheduler, w, settings)["loss"]
              for w in _windows(tok, pivots, rows, batch_size, grad_accum)[:steps]]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", [("flat", "mean"), ("eq3", "per_class")])
def test_batch_8_accum_1_follows_batch_1_accum_8(tiny_model_dir, mode):
    """Same 8 rows per step, split 1x8 or 8x1: same losses and same weights after 3 steps.

    Averaging per-micro-batch means would differ here, because the synthetic traces have
    different lengths and pivot counts (harmful ones have 3 steps, benign ones 2).
    """
    cfg = _cfg(tiny_model_dir, f"train.sft_mode={mode[0]}", f"train.cpo_variant={mode[1]}",
               "train.cpo_rethink=true")
    rows = synthetic_rows(24)
    loss_a, params_a = _train(cfg, rows, batch_size=8, grad_accum=1, steps=3)
    loss_b, params_b = _train(cfg, rows, batch_size=1, grad_accum=8, steps=3)
    assert len(loss_a) == len(loss_b) == 3
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert abs(loss_a[2] - loss_a[0]) > 1e-3  # the weights really moved between steps
    for name, value in params_a.items():
        torch.testing.assert_close(value, params_b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_lora_and_pivot_rows_move_frozen_weights_do_not(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    model, tok, pivots, optimizer, scheduler = _setup(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    embed_before = merged_model_copy_embeddings(model)
    settings = loss_settings(cfg, pivots)
    for w in _windows(tok, pivots, synthetic_rows(16), 4, 1)[:3]:
        optimizer_step(model, optimizer, scheduler, w, settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and any("trainable_tokens_delta" in n for n in trainable)
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        if name in trainable and ("lora_B" in name or "trainable_tokens" in name):
            assert moved, f"{name} did not move"
        if name not in trainable:
            assert not moved, f"frozen {name} moved"
    # After merging, exactly the pivot rows of the (tied) embedding changed.
    embed_after = merged_model(model).get_input_embeddings().weight.detach()
    changed = (embed_after != embed_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == pivot_rows(pivots)


def merged_model_copy_embeddings(model):
    return model.get_input_embeddings().weight.detach().clone()


def test_checkpoint_round_trip_continues_the_same_trajectory(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, "train.scheduler=cosine", "train.warmup_ratio=0.2")
    model, tok, pivots, optimizer, scheduler = _setup(cfg, total_steps=6)
    settings = loss_settings(cfg, pivots)
    batches = _windows(tok, pivots, synthetic_rows(24), 4, 1)
    for w in batches[:2]:
        optimizer_step(model, optimizer, scheduler, w, settings)
    model_state, optim_state = checkpoint.gather(model, optimizer)
    checkpoint.save(tmp_path, model_state, optim_state, scheduler, {"step": 2, "epoch": 0, "windows_done": 2})
    expected = optimizer_step(model, optimizer, scheduler, batches[2], settings)

    fresh, _, _, optimizer2, scheduler2 = _setup(cfg, total_steps=6)
    state = checkpoint.load(tmp_path, fresh, optimizer2, scheduler2)
    assert state["step"] == 2 and state["windows_done"] == 2
    got = optimizer_step(fresh, optimizer2, scheduler2, batches[2], settings)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert got["lr"] == pytest.approx(expected["lr"])
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_full_fine_tuning_trains_everything(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, "train.lora.enabled=false", "train.gradient_checkpointing=true")
    model, tok, pivots, optimizer, scheduler = _setup(cfg)
    assert all(p.requires_grad for p in model.parameters())
    before = model.get_input_embeddings().weight.detach().clone()
    optimizer_step(model, optimizer, scheduler, _windows(tok, pivots, synthetic_rows(4), 4, 1)[0],
                   loss_settings(cfg, pivots))
    assert not torch.equal(before, model.get_input_embeddings().weight)


def test_pivot_rows_get_their_own_learning_rate(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, "train.weight_decay=0.1")
    model, _, _ = build_model(cfg)
    optimizer, scheduler = make_optimizer(model, 1e-3, 0.1, "cosine", 0.0, 10, token_lr_multiplier=20.0)
    rows = {id(p) for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    by_kind = {("rows" if id(g["params"][0]) in rows else "rest"): g for g in optimizer.param_groups}
    assert rows and set(by_kind) == {"rows", "rest"}
    assert all(id(p) in rows for p in by_kind["rows"]["params"])
    assert by_kind["rest"]["lr"] == pytest.approx(1e-3) and by_kind["rest"]["weight_decay"] == 0.1
    assert by_kind["rows"]["lr"] == pytest.approx(2e-2) and by_kind["rows"]["weight_decay"] == 0.0
    for _ in range(5):  # the schedule scales both groups alike
        optimizer.step()
        scheduler.step()
    assert by_kind["rows"]["lr"] / by_kind["rest"]["lr"] == pytest.approx(20.0)
    assert len(optimizer.param_groups) == 2 and sum(len(g["params"]) for g in optimizer.param_groups) == \
        sum(1 for p in model.parameters() if p.requires_grad)


def test_row_rate_adamw_first_step_by_hand():
    """Step 1 of Adam moves each element by lr * g / (|g| + eps) = lr (bias-corrected moments are g and g^2).
    Other rows: 1 * (1 - lr * wd) - lr = 1 - 0.001 - 0.01 = 0.989. The rows 1 and 3 (x10, no decay):
    1 - 10 * 0.01 = 0.9."""
    from r2d.train.steps import RowRateAdamW

    matrix = torch.nn.Parameter(torch.ones(4, 3))
    other = torch.nn.Parameter(torch.ones(2))
    optimizer = RowRateAdamW([{"params": [other, matrix], "lr": 0.01, "weight_decay": 0.1}], matrix, [3, 1],
                             10.0, lr=0.01)
    matrix.grad, other.grad = torch.full((4, 3), 0.5), torch.full((2,), 0.5)
    optimizer.step()
    expected = torch.full((4, 3), 0.989)
    expected[[1, 3]] = 0.9
    torch.testing.assert_close(matrix.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(other.detach(), torch.full((2,), 0.989), rtol=0, atol=1e-6)


def test_row_rate_adamw_is_the_rows_own_group_at_every_step():
    """Five steps with changing gradients and a decaying rate: the rows end exactly where AdamW puts them
    as a parameter of their own at 10 x the rate without decay, the rest where a plain AdamW puts it."""
    from r2d.train.steps import RowRateAdamW

    torch.manual_seed(0)
    start, rows = torch.randn(6, 4), [0, 5]
    rest = [1, 2, 3, 4]
    matrix = torch.nn.Parameter(start.clone())
    ours = RowRateAdamW([{"params": [matrix], "lr": 1e-2, "weight_decay": 0.1}], matrix, rows, 10.0, lr=1e-2)
    own, plain = torch.nn.Parameter(start[rows].clone()), torch.nn.Parameter(start[rest].clone())
    reference = torch.optim.AdamW([{"params": [plain], "lr": 1e-2, "weight_decay": 0.1},
                                   {"params": [own], "lr": 1e-1, "weight_decay": 0.0}], lr=1e-2)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (ours, reference)]
    for step in range(5):
        grad = torch.randn(6, 4)
        matrix.grad, own.grad, plain.grad = grad.clone(), grad[rows].clone(), grad[rest].clone()
        for o, schedule in zip((ours, reference), schedules):
            o.step()
            schedule.step()
        if step == 2:  # a resume: the optimizer's and schedule's states loaded into new ones mid-run
            states = ours.state_dict(), schedules[0].state_dict()
            ours = RowRateAdamW([{"params": [matrix], "lr": 1e-2, "weight_decay": 0.1}], matrix, rows, 10.0, lr=1e-2)
            schedules[0] = torch.optim.lr_scheduler.LambdaLR(ours, lambda step: 1.0 / (1 + step))
            ours.load_state_dict(states[0])
            schedules[0].load_state_dict(states[1])
    torch.testing.assert_close(matrix.detach()[rows], own.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(matrix.detach()[rest], plain.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(matrix.detach()[rows], start[rows], atol=0.1)  # the rows did move, and far


def test_full_fine_tuning_gives_the_pivot_rows_their_own_rate(tiny_model_dir):
    """Full fine-tuning: the pivot rows of the (tied) embedding matrix step at the multiplier, the rest at the
    model's rate; LoRA keeps peft's separate rows in a group of their own; fsdp cannot slice the matrix."""
    from r2d.config import ConfigError
    from r2d.train.steps import RowRateAdamW

    cfg = _cfg(tiny_model_dir, "train.lora.enabled=false")
    model, tok, pivots = build_model(cfg)
    rows = pivot_rows(pivots)
    optimizer, scheduler = make_optimizer(model, 1e-3, 0.0, "constant", 0.0, 10, 10.0, rows)
    assert isinstance(optimizer, RowRateAdamW) and optimizer.matrix is model.get_input_embeddings().weight
    assert optimizer.rows.tolist() == sorted(rows) and len(optimizer.param_groups) == 1
    matrix = model.get_input_embeddings().weight
    before = matrix.detach().clone()
    optimizer_step(model, optimizer, scheduler, _windows(tok, pivots, synthetic_rows(4), 4, 1)[0],
                   loss_settings(cfg, pivots))
    moved = (matrix.detach() - before).abs().amax(dim=1)
    others = [i for i in range(matrix.shape[0]) if i not in rows and moved[i] > 0]
    # First Adam step: every element that has a gradient moves by lr (or 10 lr in a pivot row).
    assert moved[rows].min().item() == pytest.approx(1e-2, rel=1e-3)
    assert moved[others].max().item() == pytest.approx(1e-3, rel=1e-3)
    lora = build_model(_cfg(tiny_model_dir))[0]
    assert type(make_optimizer(lora, 1e-3, 0.0, "constant", 0.0, 10, 10.0, rows)[0]) is torch.optim.AdamW
    assert type(make_optimizer(model, 1e-3, 0.0, "constant", 0.0, 10, 1.0, rows)[0]) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="pivot_lr_multiplier"):
        load_config(None, ["train.lora.enabled=false", "train.strategy=fsdp", "train.pivot_lr_multiplier=10"])
