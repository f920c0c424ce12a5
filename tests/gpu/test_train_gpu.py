"""The training step on CUDA in bf16, without Ray: what each GPU worker of the trainer runs.

The CPU suite checks the step's arithmetic in fp32; here the same step runs in bf16 on the
GPU: its losses must match fp32's within bf16 rounding, and repeated steps must learn.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from r2d.config import load_config
from r2d.train.loop import loss_settings
from r2d.train.model import build_model
from r2d.train.steps import collate_window, make_optimizer, optimizer_step, windows
from r2d.train.synthetic import synthetic_rows

pytestmark = [pytest.mark.gpu]


def _step_runner(model_dir, gpu: bool):
    cfg = load_config(None, [f"model.source={model_dir}", "train.lora.dropout=0.0", "train.learning_rate=1e-2",
                             "train.warmup_ratio=0.0", "train.scheduler=constant", f"resources.use_gpu={gpu}",
                             f"resources.gpus_per_worker={int(gpu)}"])
    device = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    model, tok, pivots = build_model(cfg, device)
    optimizer, scheduler = make_optimizer(model, cfg.train.learning_rate, 0.0, "constant", 0.0, 100)
    stream = windows(synthetic_rows(8), tok, pivots, max_length=512, batch_size=4, grad_accum=2,
                     dropped=Counter(), length_grouping=False)
    window = collate_window(next(iter(stream)), tok.pad_token_id, device)
    settings = loss_settings(cfg, pivots)
    return model, (lambda: optimizer_step(model, optimizer, scheduler, window, settings))


def test_bf16_step_matches_fp32(tiny_model_dir):
    """At initialisation (LoRA B = 0) both runs compute the same function: same losses up to bf16 rounding."""
    gpu_model, gpu_step = _step_runner(tiny_model_dir, gpu=True)
    _, cpu_step = _step_runner(tiny_model_dir, gpu=False)
    # The frozen base weights are bf16; peft keeps the adapters' own weights in fp32.
    assert {p.dtype for p in gpu_model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert next(gpu_model.parameters()).is_cuda
    gpu, cpu = gpu_step(), cpu_step()
    for key in ("loss", "sft_loss", "cpo_loss"):
        assert math.isfinite(gpu[key])
        assert gpu[key] == pytest.approx(cpu[key], rel=3e-2, abs=1e-2), key
    assert gpu["tokens"] == cpu["tokens"]


def test_bf16_steps_learn(tiny_model_dir):
    """Ten bf16 steps on one window: the loss falls and the pivots are not unlearnt.

    In fp32 on the CPU the same ten steps take the loss from 11.4 to 10.1 and pivot accuracy
    from 0.50 to 1.00 (the tiny model is random, so it learns slowly).
    """
    _, step = _step_runner(tiny_model_dir, gpu=True)
    history = [step() for _ in range(10)]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)
    assert history[-1]["loss"] < 0.95 * history[0]["loss"]
    assert history[-1]["pivot_acc"] >= history[0]["pivot_acc"]


def _packed_runner(model_dir, *extra, rows=None):
    """A step over one window of 16 traces (batch 8 x accum 2) on the GPU in bf16, laid out as ``extra`` says."""
    cfg = load_config(None, [f"model.source={model_dir}", "train.lora.dropout=0.0", "train.max_length=512",
                             "resources.use_gpu=true", "resources.gpus_per_worker=1", *extra])
    torch.manual_seed(0)
    model, tok, pivots = build_model(cfg, "cuda")
    optimizer, scheduler = make_optimizer(model, 1e-2, 0.0, "constant", 0.0, 100)
    tc, settings = cfg.train, loss_settings(cfg, pivots)
    stream = windows(rows or synthetic_rows(16), tok, pivots, max_length=512, batch_size=8, grad_accum=2,
                     dropped=Counter(), length_grouping=False)
    window = collate_window(next(iter(stream)), tok.pad_token_id, "cuda", settings, packing=tc.packing,
                            micro_batch_tokens=tc.micro_batch_tokens, targets=tc.chunked_ce)
    chunk = tc.ce_chunk_tokens if tc.chunked_ce else 0
    return model, (lambda: optimizer_step(model, optimizer, scheduler, window, settings, ce_chunk=chunk))


def test_packed_chunked_bf16_step_matches_the_padded_step(tiny_model_dir):
    """Packed rows through PyTorch's varlen flash attention and the chunked head: the padded reference
    step's losses on the same window, within bf16 rounding (both in bf16 on the GPU)."""
    _, padded = _packed_runner(tiny_model_dir)
    _, packed = _packed_runner(tiny_model_dir, "train.packing=true", "train.chunked_ce=true",
                               "train.micro_batch_tokens=1024", "train.ce_chunk_tokens=256")
    a, b = padded(), packed()
    for key in ("loss", "sft_loss", "cpo_loss", "pivot_margin"):
        assert math.isfinite(b[key])
        assert b[key] == pytest.approx(a[key], rel=3e-2, abs=1e-2), key
    assert b["tokens"] == a["tokens"] and b["n_pivots"] == a["n_pivots"]


def test_packed_step_reads_nothing_back_from_the_gpu(tiny_model_dir, monkeypatch):
    """Under ``set_sync_debug_mode("error")`` any call that waits for the GPU raises: after one warm-up
    step (which fills the cached index tensors), a packed step runs its forwards, backwards, clipping and
    AdamW update without one; only the metrics read at its end waits."""
    from r2d.train import steps

    _, step = _packed_runner(tiny_model_dir, "train.packing=true", "train.chunked_ce=true",
                             "train.micro_batch_tokens=1024")
    step()
    read = steps._window_metrics

    def read_after_the_step(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        return read(*args, **kwargs)

    monkeypatch.setattr(steps, "_window_metrics", read_after_the_step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(metrics["loss"])


def test_packed_steps_learn_with_bf16_adapters_and_compile(tiny_model_dir):
    """The GPU knobs the benchmark measures run and learn: bf16 adapter weights, compiled decoder layers."""
    _, step = _packed_runner(tiny_model_dir, "train.packing=true", "train.chunked_ce=true",
                             "train.lora.fp32_weights=false", "train.compile=true", "train.gradient_checkpointing=true")
    history = [step() for _ in range(10)]
    assert all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < 0.95 * history[0]["loss"]
