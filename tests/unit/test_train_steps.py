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
