"""Training throughput in real (non-padding) tokens/s: our step against its baselines.

One process, the same student (the tiny config's LoRA + trainable pivot rows), the same
traces, batch and max length:

- our SFT+CPO step (``r2d.train.steps.optimizer_step``) against our SFT-only step
  (``cpo_weight=0``, the ablation) — what CPO costs;
- against a plain Hugging Face-style loop (same model, HF's own loss, AdamW, batches in
  arrival order — no length grouping): the floor any trainer must beat;
- against TRL's ``SFTTrainer`` when ``trl`` is importable (optional; not a dependency).

Our variants and the plain loop run step by step in turn on the same windows, so the
machine's noise falls on all of them alike. Traces vary in length (1–4× the reasoning
steps) like real ones, which is where length grouping pays.

    python benchmarks/bench_train.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, cuda_available, per_second, repo_path, torch_profile  # noqa: E402

SECTION = "train"
SIZES = {"full": {"rows": 64, "steps": 6}, "quick": {"rows": 32, "steps": 4}}
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}
"""Dense bf16 peak per GPU, for MFU."""


def traces_rows(n: int) -> list[dict]:
    """``n`` traces rows of varied length: the synthetic rows with their reasoning repeated 1–4 times."""
    from r2d.train.synthetic import synthetic_rows

    rows = synthetic_rows(n, seed=1)
    for i, row in enumerate(rows):
        k = 1 + (i * 7) % 4
        row["reasoning_steps"] = [s for _ in range(k) for s in row["reasoning_steps"]]
        row["step_pivots"] = [p for _ in range(k) for p in row["step_pivots"]]
        row["teacher_pivots"] = list(row["step_pivots"])
    return rows


def train_config(use_gpu: bool, overrides: list[str] = ()):
    """The tiny config, on GPU if asked, with ``key=value`` overrides (a bigger batch, another model)."""
    from r2d.config import load_config

    extra = ["resources.use_gpu=true", "resources.gpus_per_worker=1"] if use_gpu else []
    return load_config(str(Path(__file__).resolve().parent.parent / "jobs/configs/tiny.yaml"),
                       extra + list(overrides))


def random_model(arch: str, tokenizer: str) -> str:
    """A random stand-in with the shape of ``arch`` (``r2d.models.RANDOM_ARCHS``), built once in the cache."""
    from r2d.models import RANDOM_ARCHS, cache_root, make_tiny_llama

    if arch not in RANDOM_ARCHS:
        raise SystemExit(f"--arch: unknown {arch!r}, expected one of {sorted(RANDOM_ARCHS)}")
    return str(make_tiny_llama(cache_root() / f"random-{arch}", tokenizer, dtype="bfloat16", **RANDOM_ARCHS[arch]))


class Variant:
    """One model + optimizer trained by one kind of step, timed step by step."""

    def __init__(self, name: str, cfg, device, step_fn) -> None:
        from r2d.train.model import build_model
        from r2d.train.steps import make_optimizer

        self.name, self.step_fn, self.device = name, step_fn, device
        self.model, self.tok, self.pivots = build_model(cfg, device)
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg.train.learning_rate, 0.0, "constant", 0.0,
                                                        1000)
        self.seconds, self.tokens = [], []

    def step(self, window, record: bool) -> None:
        sync = _sync(self.device)
        start = time.perf_counter()
        self.step_fn(self, window)
        sync()
        if record:
            self.seconds.append(time.perf_counter() - start)
            self.tokens.append(sum(float(b["attention_mask"].sum()) for b in window))

    @property
    def tok_s(self) -> float:
        return per_second(sum(self.tokens), sum(self.seconds))


def torch_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _sync(device):
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def _ours(settings):
    from r2d.train.steps import optimizer_step

    def step(v: Variant, window) -> None:
        optimizer_step(v.model, v.optimizer, v.scheduler, window, settings)
    return step


def _plain(v: Variant, window) -> None:
    """A plain HF-style step: the model's own shifted cross-entropy, backward, clip, AdamW."""
    import torch

    for batch in window:
        out = v.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        (out.loss / len(window)).backward()
    torch.nn.utils.clip_grad_norm_([p for p in v.model.parameters() if p.requires_grad], 1.0)
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)


def _windows(rows, v: Variant, cfg, grouping: bool) -> list:
    from r2d.train.steps import collate_window, windows

    t = cfg.train
    stream = windows(rows, v.tok, v.pivots, max_length=t.max_length, batch_size=t.batch_size,
                     grad_accum=t.grad_accum, dropped=Counter(), length_grouping=grouping, seed=t.seed)
    return [collate_window(w, v.tok.pad_token_id, v.device) for w in stream]


def run_ours_and_plain(cfg, rows, steps: int, device) -> tuple[dict[str, Variant], dict]:
    """SFT+CPO, SFT-only and the plain loop, one step each in turn; the first step is warm-up."""
    import dataclasses

    from r2d.train.loop import loss_settings

    variants = {}
    for name, weight in (("sft+cpo", 1.0), ("sft-only", 0.0)):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cpo_weight=weight))
        probe = Variant(name, c, device, None)
        probe.step_fn = _ours(loss_settings(c, probe.pivots))
        variants[name] = probe
    variants["plain"] = Variant("plain", cfg, device, _plain)
    grouped = _windows(rows, variants["sft+cpo"], cfg, grouping=True)
    arrival = _windows(rows, variants["plain"], cfg, grouping=False)
    padding = {"grouped": _padding(grouped), "arrival": _padding(arrival)}
    n = min(steps, len(grouped), len(arrival))
    if str(device).startswith("cuda"):
        # Untimed pass first: the first step at each new shape pays for the caching allocator's
        # new blocks and cuBLAS's plans, which the variants in the same process then share.
        for i in range(n):
            for name, v in variants.items():
                v.step(arrival[i] if name == "plain" else grouped[i], record=False)
    order = list(variants)
    for i in range(n):
        # Each variant goes first in turn, so none always pays (or dodges) what a step leaves behind.
        for name in order[i % len(order):] + order[:i % len(order)]:
            variants[name].step(arrival[i] if name == "plain" else grouped[i], record=i > 0)
    return variants, padding


def _padding(windows: list) -> float:
    """Fraction of the computed positions that are padding."""
    real = sum(float(b["attention_mask"].sum()) for w in windows for b in w)
    total = sum(b["attention_mask"].numel() for w in windows for b in w)
    return 1 - real / max(total, 1)


def run_trl(cfg, rows, steps: int, device) -> dict | None:
    """TRL's SFTTrainer on the same PEFT model, rows, batch and max length; None without trl."""
    try:
        from trl import SFTConfig, SFTTrainer
    except Exception:
        return None
    from datasets import Dataset
    from transformers import TrainerCallback

    from r2d.pivots import render_assistant
    from r2d.train.model import build_model
    from r2d.train.tokenize import row_to_trace

    # TRL's fused LM head reads ``lm_head.bias``, which peft's trainable-token wrapper (our
    # pivot rows) does not expose: TRL gets the same LoRA without the pivot rows, a little
    # less work per step than ours.
    lora = dataclasses.replace(cfg.train.lora, train_pivot_rows=False)
    model, tok, _ = build_model(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora=lora)), device)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": render_assistant(row_to_trace(r))}]}
                              for r in rows])
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)()
            marks.append(time.perf_counter())

    t = cfg.train
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="r2d-bench-trl-"), per_device_train_batch_size=t.batch_size,
                     gradient_accumulation_steps=t.grad_accum, max_length=t.max_length, max_steps=steps,
                     learning_rate=t.learning_rate, lr_scheduler_type="constant", report_to="none",
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=not cuda_available(),
                     bf16=cuda_available(), dataloader_num_workers=0, seed=t.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[Clock()])
    lengths = [min(len(x), t.max_length) for x in trainer.train_dataset["input_ids"]]
    trainer.train()
    per_row = sum(lengths) / len(lengths)
    measured = len(marks) - 1  # the first step is warm-up, as for ours
    seconds = marks[-1] - marks[0]
    tokens = per_row * t.batch_size * t.grad_accum * measured
    return {"tok_s": per_second(tokens, seconds), "steps": measured, "mean_row_tokens": per_row,
            "note": "LoRA without pivot rows; tokens = mean row length x rows per step"}


def flops_per_token(model) -> float:
    """Matmul FLOPs per trained token: 2N forward, 2N for the input gradients, 2 per trainable weight.

    Full fine-tuning gives the usual 6N; LoRA, whose frozen weights need no weight gradient,
    about 4N. Attention's sequence-length term is left out, as in the usual 6N.
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4.0 * total + 2.0 * trainable


def _mfu(v: Variant, device) -> float | None:
    """Model FLOPs utilisation: FLOPs per token x tokens/s over the GPU's bf16 peak (None on CPU)."""
    import torch

    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    peak = next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)
    if peak is None:
        return None
    return flops_per_token(v.model) * v.tok_s / peak


def run(quick: bool = False, log=print, profile_dir: Path | None = None, gpu: bool = False,
        overrides: list[str] = (), label: str = "") -> list[Row]:
    """The training section; ``gpu`` runs it on CUDA in bf16 (skipped without CUDA).

    ``overrides`` change the tiny config (``train.batch_size=16``, ``model.source=...``);
    ``label`` names such a variant in the section's name.
    """
    section = SECTION + ("-gpu" if gpu else "") + (f"[{label}]" if label else "")
    if gpu and not cuda_available():
        return [Row(section, "training on GPU", None, "tok/s", note="skipped: no CUDA")]
    size = SIZES["quick" if quick else "full"]
    cfg = train_config(gpu, overrides)
    device = "cuda" if gpu else "cpu"
    if not gpu:
        from r2d.runtime import set_threads
        import os

        set_threads(os.cpu_count() or 1)
    rows = traces_rows(size["rows"])
    variants, padding = run_ours_and_plain(cfg, rows, size["steps"], device)
    for v in variants.values():
        log(f"  {v.name}: {v.tok_s:.0f} tok/s over {len(v.seconds)} steps")
    log(f"  padding: {padding['grouped']:.1%} with length grouping, {padding['arrival']:.1%} in arrival order")
    trl = run_trl(cfg, rows, size["steps"], device)
    ours, sft, plain = variants["sft+cpo"], variants["sft-only"], variants["plain"]
    lora = f"LoRA r={cfg.train.lora.r}" if cfg.train.lora.enabled else "full fine-tuning"
    note = f"batch {cfg.train.batch_size}, max_length {cfg.train.max_length}, {lora}"
    out = [
        Row(section, "SFT+CPO step vs SFT-only step", ours.tok_s, "tok/s", "sft-only", sft.tok_s, 0.95, note=note,
            extra={"padding": padding, "steps": len(ours.seconds)}),
        Row(section, "SFT+CPO step vs plain HF loop (no grouping)", ours.tok_s, "tok/s", "plain loop", plain.tok_s,
            1.0),
    ]
    if trl is not None:
        log(f"  TRL SFTTrainer: {trl['tok_s']:.0f} tok/s over {trl['steps']} steps")
        out.append(Row(section, "SFT+CPO step vs TRL SFTTrainer", ours.tok_s, "tok/s", "TRL SFTTrainer",
                       trl["tok_s"], 1.0, note=trl["note"], extra=trl))
    else:
        out.append(Row(section, "SFT+CPO step vs TRL SFTTrainer", None, "tok/s", note="skipped: trl not installed"))
    mfu = _mfu(ours, device)
    if mfu is not None:
        out.append(Row(section, "MFU (matmul FLOPs x tokens/s / bf16 peak)", mfu, "fraction",
                       note=f"{flops_per_token(ours.model) / 1e9:.2f} GFLOP/token; {torch_name()}"))
    missed = [r for r in out if r.met is False]
    if (missed or gpu) and profile_dir is not None:
        # On the GPU the profile is kept whatever the targets: it is where MFU's shortfall shows.
        window = _windows(rows, ours, cfg, grouping=True)[0]
        name = re.sub(r"[^\w.-]+", "_", section) + "-sft_cpo_step.txt"
        path = torch_profile(lambda: ours.step_fn(ours, window), profile_dir / name,
                             sort_by="device_time_total" if gpu else "cpu_time_total")
        for r in missed or out[-1:]:
            r.extra["profile"] = repo_path(path)
    return out


def main(argv: list[str] | None = None) -> int:
    from common import add_section_args, emit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_section_args(parser)
    parser.add_argument("--gpu", action="store_true", help="also run on CUDA in bf16 (skipped without a GPU)")
    parser.add_argument("--gpu-only", action="store_true", help="run on CUDA only, not on the CPU first")
    parser.add_argument("--arch", default="", help="train a random stand-in of this shape (smollm2-135m, "
                        "smollm2-1.7b) instead of the bundled model: throughput does not depend on the weights")
    parser.add_argument("--tokenizer", default="bundled:smollm2-135m", help="tokenizer source for --arch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the tiny config, e.g. train.batch_size=16 (repeatable)")
    args = parser.parse_args(argv)
    overrides = list(args.set)
    if args.arch:
        overrides.append(f"model.source={random_model(args.arch, args.tokenizer)}")
    label = ",".join([args.arch] + args.set) if overrides else ""
    rows = [] if args.gpu_only else run(args.quick, profile_dir=Path(args.profile_dir), overrides=overrides,
                                        label=label)
    if args.gpu or args.gpu_only:
        rows += run(args.quick, profile_dir=Path(args.profile_dir), gpu=True, overrides=overrides, label=label)
    emit(rows, args.rows_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
