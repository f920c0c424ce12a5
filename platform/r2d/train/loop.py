"""The per-worker training function that Ray Train runs on every worker.

Plain PyTorch; the only Ray lines are flagged ``# [1]`` … ``# [4]``:
[1] wrap the model for DDP/FSDP, [2] resume from the latest checkpoint,
[3] read this worker's shard of the traces, [4] report metrics and checkpoints.

Workers stay in lockstep: before every optimizer step they all-reduce the window's
normalisers together with a "my shard ran dry" flag, so all of them end an epoch on
the same step and none is left waiting in a collective for a peer that stopped.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter

import torch
import torch.distributed as dist

from r2d.config import Config
from r2d.runtime import set_threads
from r2d.train import checkpoint, run_log
from r2d.train.model import build_model, pivot_rows
from r2d.train.objective import LossSettings
from r2d.train.tokenize import DROP_MALFORMED, DROP_NO_LABELS, DROP_TOO_LONG
from r2d.train.steps import collate_window, is_full, make_optimizer, optimizer_step, windows

REGISTERED_TAG = "r2d.registered_version"
"""Run tag holding the model version this training run registered."""


def _reduce_sum(world: int):
    def reduce(values: torch.Tensor) -> torch.Tensor:
        if world == 1 or not dist.is_initialized():
            return values
        # gloo and nccl both reduce float64 on CPU/GPU tensors of the backend's device
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        out = values.to(device)
        dist.all_reduce(out)
        return out.cpu()
    return reduce


def loss_settings(cfg: Config, pivots) -> LossSettings:
    return LossSettings(safe_id=pivots.safe, unsafe_id=pivots.unsafe,
                        rethink_id=pivots.rethink if cfg.train.cpo_rethink else None,
                        cpo_weight=cfg.train.cpo_weight, sft_mode=cfg.train.sft_mode,
                        cpo_variant=cfg.train.cpo_variant, verdict_weight=cfg.train.verdict_weight,
                        verdict_tokens=cfg.train.verdict_tokens,
                        pivot_ids=(pivots.safe, pivots.unsafe, pivots.rethink))


def _maybe_die(hooks: dict, step: int, rank: int) -> None:
    """Test hook: kill this worker process once, at ``kill_at_step`` (a marker file makes it once)."""
    marker = hooks.get("kill_marker")
    if hooks.get("kill_at_step") == step and rank == hooks.get("kill_rank", 0) and marker \
            and not os.path.exists(marker):
        open(marker, "w").close()
        # Ray Train learns of reported checkpoints when it polls the workers (every ~2 s);
        # a crash before that poll would lose the checkpoint the test wants to resume from.
        time.sleep(hooks.get("kill_delay_s", 0))
        os._exit(1)  # a hard crash: no exception handling, no cleanup, like an OOM kill


def _global_counts(dropped: Counter, reduce) -> dict[str, int]:
    """Dropped-row counts summed over workers (a collective: every worker calls it)."""
    reasons = (DROP_MALFORMED, DROP_TOO_LONG, DROP_NO_LABELS)
    totals = reduce(torch.tensor([float(dropped[r]) for r in reasons], dtype=torch.float64)).tolist()
    return {r: int(n) for r, n in zip(reasons, totals)}


def _save_and_report(model, optimizer, scheduler, state: dict, metrics: dict, rank: int) -> None:
    import ray.train

    model_state, optim_state = checkpoint.gather(model, optimizer)  # collective under FSDP
    with tempfile.TemporaryDirectory(prefix="r2d-ckpt-") as tmp:
        ckpt = None
        if rank == 0:
            checkpoint.save(tmp, model_state, optim_state, scheduler, state)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "step": state["step"], "epoch": state["epoch"]}, checkpoint=ckpt)  # [4]


def train_func_per_worker(config: dict) -> None:
    """Train SFT + CPO on this worker's shard of the traces.

    Args:
        config: ``cfg`` (a :class:`r2d.config.Config`), ``total_steps`` (planned optimizer
            steps), ``lineage`` (traces uri/digest, distillation run, git commit) and
            ``hooks`` (test-only fault injection).
    """
    import ray.train
    import ray.train.torch

    # 1. config, rank, device
    cfg: Config = config["cfg"]
    tc, total_steps, hooks = cfg.train, config["total_steps"], config.get("hooks") or {}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.resources.use_gpu:
        set_threads(max(1, int(cfg.resources.cpus_per_worker)))
    torch.manual_seed(tc.seed)
    device = ray.train.torch.get_device()

    # 2. model, optimizer, schedule
    model, tok, pivots = build_model(cfg, device)
    strategy_kwargs = {"use_orig_params": True} if tc.strategy == "fsdp" else None  # LoRA: mixed requires_grad
    model = ray.train.torch.prepare_model(model, parallel_strategy=tc.strategy,  # [1]
                                          parallel_strategy_kwargs=strategy_kwargs)
    optimizer, scheduler = make_optimizer(model, tc.learning_rate, tc.weight_decay, tc.scheduler,
                                          tc.warmup_ratio, total_steps, tc.pivot_lr_multiplier, pivot_rows(pivots))

    # 3. resume from the latest checkpoint, if this run has one
    # train_key: what the driver checks before resuming (r2d.train.trainer.check_resumable)
    state = {"step": 0, "epoch": 0, "windows_done": 0, "mlflow_run_id": None, "dropped": {},
             "train_key": config["lineage"]["train_key"]}
    resumed = ray.train.get_checkpoint()  # [2]
    if resumed is not None:
        with resumed.as_directory() as folder:
            state.update(checkpoint.load(folder, model, optimizer, scheduler))
    start_step = state["step"]

    # 4. tracking, on rank 0 only
    pivot_map = {k: int(v) for k, v in pivots.by_token().items()}
    if rank == 0:
        state["mlflow_run_id"] = run_log.start_run(cfg, config["lineage"], pivot_map, state["mlflow_run_id"])
        if resumed is not None:
            run_log.log_metrics({"resumed_from_step": start_step}, step=start_step)

    # 5. data: this worker's shard of the traces, streamed
    shard = ray.train.get_dataset_shard("train")  # [3]
    settings, reduce = loss_settings(cfg, pivots), _reduce_sum(world)
    # Dropped rows are counted in epoch 0 only (later epochs see the same rows). A resume
    # inside epoch 0 re-reads the epoch from its start and so recounts; after epoch 0 the
    # checkpoint's global counts stand, held by rank 0 so that the final sum is right.
    dropped = Counter(state["dropped"]) if state["epoch"] > 0 and rank == 0 else Counter()
    metrics: dict = {}

    # 6. train: epochs until the planned number of optimizer steps
    while state["step"] < total_steps:
        counter = dropped if state["epoch"] == 0 else Counter()
        stream = windows(shard.iter_rows(), tok, pivots, max_length=tc.max_length, batch_size=tc.batch_size,
                         grad_accum=tc.grad_accum, dropped=counter, length_grouping=tc.length_grouping,
                         seed=tc.seed + state["epoch"])
        for _ in range(state["windows_done"]):  # data position: skip what the checkpoint already trained on
            next(stream, None)
        stepped = False
        while state["step"] < total_steps:
            window = next(stream, None)
            dry = torch.tensor([0.0 if is_full(window, tc.batch_size, tc.grad_accum) else 1.0], dtype=torch.float64)
            if reduce(dry).item() > 0:  # some worker's shard ran dry: everyone starts the next epoch
                break
            _maybe_die(hooks, state["step"] + 1, rank)
            batches = collate_window(window, tok.pad_token_id, device, settings, packing=tc.packing,
                                     micro_batch_tokens=tc.micro_batch_tokens, targets=tc.chunked_ce)
            metrics = optimizer_step(model, optimizer, scheduler, batches, settings, world, reduce,
                                     ce_chunk=tc.ce_chunk_tokens if tc.chunked_ce else 0)
            state["step"] += 1
            state["windows_done"] += 1
            stepped = True
            if rank == 0 and state["step"] % tc.log_every == 0:
                run_log.log_metrics({**metrics, "epoch": state["epoch"]}, step=state["step"])
            if state["step"] % tc.checkpoint_every == 0 or state["step"] == total_steps:
                state["dropped"] = _global_counts(dropped, reduce)
                _save_and_report(model, optimizer, scheduler, state, metrics, rank)
        if state["step"] < total_steps:
            if not stepped and state["windows_done"] == 0:
                raise RuntimeError(f"an epoch gave no full step: fewer usable traces than train.batch_size "
                                   f"({tc.batch_size}) x train.grad_accum ({tc.grad_accum}) x workers ({world}); "
                                   f"dropped rows: {dict(dropped)}")
            state["epoch"] += 1
            state["windows_done"] = 0

    # 7. export merged weights and register them as challenger (rank 0)
    _finish(cfg, model, optimizer, state, rank, config["lineage"], pivot_map, dropped, reduce)


def _finish(cfg: Config, model, optimizer, state: dict, rank: int, lineage: dict, pivot_map: dict,
            dropped: Counter, reduce) -> None:
    import mlflow

    from r2d.train.register import export_and_register

    model_state, _ = checkpoint.gather(model, optimizer)  # collective under FSDP
    totals = _global_counts(dropped, reduce)  # collective
    if rank != 0:
        return
    run_log.log_metrics({f"dropped_{r}": n for r, n in totals.items()}, step=state["step"])
    run = mlflow.get_run(state["mlflow_run_id"])
    # A resubmitted, already finished run must not register a second version.
    if cfg.train.register and REGISTERED_TAG not in run.data.tags:
        version = export_and_register(cfg, model_state, state["mlflow_run_id"],
                                      run_log.lineage_tags(cfg, lineage, pivot_map))
        mlflow.set_tag(REGISTERED_TAG, version)
    run_log.end_run()
