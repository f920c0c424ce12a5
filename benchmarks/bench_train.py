"""Training throughput in real (non-padding) tokens/s: the packed step against today's and the baselines.

One process, the same student (the tiny config's LoRA + trainable pivot rows), the same traces
and windows (``batch_size x grad_accum`` traces a step). Variants:

- ``padded``: today's step, the reference (padded rows grouped by length, full logits);
- ``packed``: packed padding-free rows cut by ``micro_batch_tokens``, the chunked LM head and the
  gap-drawn LoRA dropout (``train.packing`` + ``train.chunked_ce`` + ``train.lora.sparse_dropout``);
  ``packed, full logits`` is the packing alone, ``packed, torch dropout`` all but the dropout;
- ``packed, SFT only`` (``cpo_weight=0``): what CPO costs on the packed step; on CPU, ``packed,
  verdict term`` (``verdict_weight=1``) what the verdict-following term costs;
- a plain Hugging Face-style loop (the model's own loss, AdamW), on the same padded rows and
  on the same packed rows (position ids only: transformers' own packed-sequence mask);
- TRL's ``SFTTrainer`` when ``trl`` is importable (the bench extra), padded and with its own
  best-fit-decreasing packing into blocks of ``micro_batch_tokens``.
On CUDA, also the packed step with bf16 adapters, with ``torch.compile``, and with gradient
checkpointing: the knobs a GPU run chooses by measurement.

The traces have the tiny demo's length profile (``r2d.train.synthetic.demo_like_rows``: the
training side's real prompts, one teacher-length step, the repaired answer). Our variants and the
plain loops run step by step in turn on the same windows, so the machine's noise falls on all of
them alike.

    python benchmarks/bench_train.py [--quick]
    python benchmarks/bench_train.py --gpu-only --arch smollm2-1.7b --set train.batch_size=32
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
SIZES = {"full": {"rows": 160, "steps": 6}, "quick": {"rows": 96, "steps": 4}}
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}
"""Dense bf16 peak per GPU, for MFU."""
PACKED = {"packing": True, "chunked_ce": True, "lora.sparse_dropout": True}
REFERENCE = {"packing": False, "chunked_ce": False, "lora.sparse_dropout": False}
VARIANTS = {
    "padded": (REFERENCE, "ours"),
    "packed": (PACKED, "ours"),
    "packed, full logits": ({**REFERENCE, "packing": True}, "ours"),
    "packed, torch dropout": ({**PACKED, "lora.sparse_dropout": False}, "ours"),
    "packed, SFT only": ({**PACKED, "cpo_weight": 0.0}, "ours"),
    "plain loop": (REFERENCE, "plain"),
    "plain loop, packed": (REFERENCE, "plain, packed"),
}
"""name -> (train.* overrides, step kind: ours, plain, or plain on packed rows with transformers' own attention)."""
CPU_VARIANTS = {
    "packed, verdict term": ({**PACKED, "verdict_weight": 1.0, "micro_batch_tokens": 2048}, "ours"),
}
"""Recipe choices weighed on CPU only (the GPU checks have a fixed time budget)."""
GPU_VARIANTS = {
    "packed, bf16 adapters": ({**PACKED, "lora.fp32_weights": False}, "ours"),
    "packed, compiled": ({**PACKED, "compile": True}, "ours"),
    "packed, checkpointing": ({**PACKED, "gradient_checkpointing": True}, "ours"),
}


SHAPE = ["train.lora.enabled=true", "train.verdict_weight=0", "train.micro_batch_tokens=4096"]
"""The student every variant was measured on (LoRA r = 16: the gap-drawn dropout is LoRA's), the objective every
variant can run (the padded reference has no verdict term) and the packed budget, whatever tiny.yaml says (it
fine-tunes every weight with the verdict term); ``packed, verdict term`` adds the term."""


def train_config(use_gpu: bool, overrides: list[str] = ()):
    """The tiny config, on GPU if asked, with ``key=value`` overrides (a bigger batch, another model)."""
    from r2d.config import load_config

    extra = ["resources.use_gpu=true", "resources.gpus_per_worker=1"] if use_gpu else []
    return load_config(str(Path(__file__).resolve().parent.parent / "jobs/configs/tiny.yaml"),
                       SHAPE + extra + list(overrides))


def with_train(cfg, overrides: dict):
    """``cfg`` with ``train.*`` fields replaced (``lora.x`` keys reach ``train.lora``)."""
    lora = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("lora.")}
    plain = {k: v for k, v in overrides.items() if not k.startswith("lora.")}
    train = dataclasses.replace(cfg.train, **plain, lora=dataclasses.replace(cfg.train.lora, **lora))
    return dataclasses.replace(cfg, train=train)


def random_model(arch: str, tokenizer: str) -> str:
    """A random stand-in with the shape of ``arch`` (``r2d.models.RANDOM_ARCHS``), built once in the cache."""
    from r2d.models import RANDOM_ARCHS, cache_root, make_tiny_llama

    if arch not in RANDOM_ARCHS:
        raise SystemExit(f"--arch: unknown {arch!r}, expected one of {sorted(RANDOM_ARCHS)}")
    return str(make_tiny_llama(cache_root() / f"random-{arch}", tokenizer, dtype="bfloat16", **RANDOM_ARCHS[arch]))


class Variant:
    """One model + optimizer trained by one kind of step on its own layout of the windows, timed step by step."""

    def __init__(self, name: str, cfg, device, kind: str) -> None:
        from r2d.train.loop import loss_settings
        from r2d.train.model import build_model
        from r2d.train.steps import make_optimizer

        self.name, self.cfg, self.device, self.kind = name, cfg, device, kind
        self.model, self.tok, self.pivots = build_model(cfg, device)
        self.settings = loss_settings(cfg, self.pivots)
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg.train.learning_rate, 0.0, "constant", 0.0,
                                                        1000)
        self.seconds, self.tokens, self.windows = [], [], []

    def prepare(self, windows: list) -> None:
        """Collate the shared windows (lists of micro-batches of examples) the way this variant trains on them."""
        from r2d.train.steps import collate_window

        t = self.cfg.train
        if self.kind.startswith("plain"):
            self.windows = [_plain_window(w, self.tok.pad_token_id, self.device, self.kind == "plain, packed",
                                          t.micro_batch_tokens) for w in windows]
        else:
            self.windows = [collate_window(w, self.tok.pad_token_id, self.device, self.settings, packing=t.packing,
                                           micro_batch_tokens=t.micro_batch_tokens, targets=t.chunked_ce)
                            for w in windows]

    def step(self, i: int, record: bool) -> None:
        from r2d.train.steps import optimizer_step

        window, sync = self.windows[i], _sync(self.device)
        start = time.perf_counter()
        if self.kind.startswith("plain"):
            _plain(self, window)
        else:
            t = self.cfg.train
            optimizer_step(self.model, self.optimizer, self.scheduler, window, self.settings,
                           ce_chunk=t.ce_chunk_tokens if t.chunked_ce else 0)
        sync()
        if record:
            self.seconds.append(time.perf_counter() - start)
            self.tokens.append(_real_tokens(window))

    @property
    def tok_s(self) -> float:
        return per_second(sum(self.tokens), sum(self.seconds))


def _real_tokens(window: list[dict]) -> float:
    return float(sum(b["host"]["tokens"] if "host" in b else b["real_tokens"] if "real_tokens" in b
                     else b["attention_mask"].sum() for b in window))


def torch_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _sync(device):
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def _plain_window(window: list[list[dict]], pad_id: int, device, packed: bool, budget: int) -> list[dict]:
    """The plain loop's batches: padded rows as they come, or the same packed rows as ours with labels and
    position ids only (transformers then builds its own packed-sequence mask)."""
    import torch

    from r2d.losses import IGNORE_INDEX
    from r2d.train.batching import collate
    from r2d.train.packing import pack

    if not packed:
        return [{**collate(m, pad_id, device)} for m in window]
    out = []
    for micro in pack([e for m in window for e in m], budget):
        ids = [t for e in micro for t in e["input_ids"]]
        # A trace's first token never carries a label, so no position predicts across a boundary.
        labels = [t for e in micro for t in [IGNORE_INDEX] + e["labels"][1:]]
        positions = [p for e in micro for p in range(len(e["input_ids"]))]
        out.append({"input_ids": torch.tensor([ids], device=device), "labels": torch.tensor([labels], device=device),
                    "position_ids": torch.tensor([positions], device=device), "real_tokens": len(ids)})
    return out


def _plain(v: Variant, window) -> None:
    """A plain HF-style step: the model's own shifted cross-entropy, backward, clip, AdamW."""
    import torch

    for batch in window:
        inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in batch}
        (v.model(**inputs).loss / len(window)).backward()
    torch.nn.utils.clip_grad_norm_([p for p in v.model.parameters() if p.requires_grad], 1.0)
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)


def shared_windows(cfg, rows, v: Variant) -> list:
    """The windows every variant trains on: examples grouped by length as the training loop does."""
    from r2d.train.steps import windows

    t = cfg.train
    return list(windows(rows, v.tok, v.pivots, max_length=t.max_length, batch_size=t.batch_size,
                        grad_accum=t.grad_accum, dropped=Counter(), length_grouping=True, seed=t.seed))


def run_variants(cfg, rows, steps: int, device, gpu: bool, log=print, knobs: bool = True
                 ) -> tuple[dict[str, Variant], dict]:
    """Every variant one step in turn, each going first in turn; the first step is warm-up."""
    specs = {**VARIANTS, **(CPU_VARIANTS if not gpu else {}), **(GPU_VARIANTS if gpu and knobs else {})}
    variants, failed = {}, {}
    for name, (overrides, kind) in specs.items():
        try:
            variants[name] = Variant(name, with_train(cfg, overrides), device, kind)
        except Exception as err:  # an optional knob that does not work here must not sink the section
            failed[name] = f"{type(err).__name__}: {err}"[:300]
    windows = shared_windows(cfg, rows, variants["padded"])
    windows = [w for w in windows if sum(len(m) for m in w) == cfg.train.batch_size * cfg.train.grad_accum]
    for v in variants.values():
        v.prepare(windows)
    n = min(steps, len(windows))
    if gpu:
        # Untimed pass first: the first step at each new shape pays for the caching allocator's new
        # blocks, cuBLAS's plans and compilation, which the variants in the process then share.
        for i in range(n):
            for name, v in list(variants.items()):
                _guarded(variants, failed, name, lambda: v.step(i, record=False))
    order = list(variants)
    for i in range(n):
        for name in order[i % len(order):] + order[:i % len(order)]:
            if name in variants:
                _guarded(variants, failed, name, lambda: variants[name].step(i, record=i > 0))
    for name, why in failed.items():
        log(f"  {name}: failed ({why})")
    return variants, {"failed": failed, "padding": _padding(variants["padded"].windows),
                      "traces_per_step": cfg.train.batch_size * cfg.train.grad_accum,
                      "micro_batches": {k: len(v.windows[0]) if v.windows else 0 for k, v in variants.items()}}


def _guarded(variants: dict, failed: dict, name: str, fn) -> None:
    try:
        fn()
    except Exception as err:
        failed[name] = f"{type(err).__name__}: {err}"[:300]
        variants.pop(name)


def _padding(windows: list) -> float:
    """Fraction of the computed positions that are padding."""
    real = sum(float(b["attention_mask"].sum()) for w in windows for b in w)
    total = sum(b["attention_mask"].numel() for w in windows for b in w)
    return 1 - real / max(total, 1)


def run_trl(cfg, rows, steps: int, device, packed: bool) -> dict | None:
    """TRL's SFTTrainer on the same PEFT model, rows and traces a step; None without trl.

    ``packed``: TRL's own best-fit-decreasing packing into blocks of ``micro_batch_tokens``, one block a
    micro-batch (padding-free; transformers' packed-sequence mask).
    """
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
    base = with_train(cfg, {**REFERENCE, "lora.train_pivot_rows": False})
    model, tok, _ = build_model(base, device)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": render_assistant(row_to_trace(r))}]}
                              for r in rows])
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)()
            marks.append(time.perf_counter())

    t = cfg.train
    shape = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "max_length": t.micro_batch_tokens,
             "packing": True} if packed else \
        {"per_device_train_batch_size": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
         "max_length": t.max_length}
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="r2d-bench-trl-"), max_steps=steps,
                     learning_rate=t.learning_rate, lr_scheduler_type="constant", report_to="none",
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=not cuda_available(),
                     bf16=cuda_available(), dataloader_num_workers=0, seed=t.seed, **shape)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    trainer.train()
    per_block = sum(lengths) / len(lengths)
    measured = len(marks) - 1  # the first step is warm-up, as for ours
    seconds = marks[-1] - marks[0]
    rows_a_step = 1 if packed else t.batch_size * t.grad_accum
    tokens = per_block * rows_a_step * measured
    note = ("LoRA without pivot rows; " + (f"bfd packing into {t.micro_batch_tokens}-token blocks, "
                                            f"{per_block:.0f} tokens a block" if packed else
                                            "tokens = mean row length x rows a step"))
    return {"tok_s": per_second(tokens, seconds), "steps": measured, "mean_block_tokens": per_block, "note": note}


def flops_per_token(model) -> float:
    """Matmul FLOPs per trained token: 2N forward, 2N for the input gradients, 2 per trainable weight.

    Full fine-tuning gives the usual 6N; LoRA, whose frozen weights need no weight gradient,
    about 4N. Attention's sequence-length term is left out, as in the usual 6N. Model FLOPs, not
    hardware FLOPs: the chunked head skips the unlabelled positions and is still credited with them.
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


def _rows(section: str, variants: dict[str, Variant], info: dict, trl: dict, cfg, device, trl_asked: bool
          ) -> list[Row]:
    t = cfg.train
    lora = f"LoRA r={t.lora.r}" if t.lora.enabled else "full fine-tuning"
    note = (f"{info['traces_per_step']} traces a step (batch {t.batch_size} x accum {t.grad_accum}), max_length "
            f"{t.max_length}, micro_batch_tokens {t.micro_batch_tokens}, {lora}")
    tok_s = {name: v.tok_s for name, v in variants.items()}
    got = lambda name: tok_s.get(name)  # noqa: E731
    out = [Row(section, "packed SFT+CPO step vs today's padded step", got("packed"), "tok/s", "padded step",
               got("padded"), 1.3, note=note, extra=info),
           Row(section, "packed step with full logits vs padded step (packing alone)", got("packed, full logits"),
               "tok/s", "padded step", got("padded")),
           Row(section, "packed step vs the same with torch's dropout (the gap-drawn dropout alone)", got("packed"),
               "tok/s", "packed, torch dropout", got("packed, torch dropout")),
           Row(section, "packed SFT+CPO vs packed SFT only (what CPO costs)", got("packed"), "tok/s",
               "packed SFT only", got("packed, SFT only"), 0.95),
           Row(section, "packed SFT+CPO vs plain HF loop (padded rows)", got("packed"), "tok/s",
               "plain loop", got("plain loop"), 1.0),
           Row(section, "packed SFT+CPO vs plain HF loop on the same packed rows", got("packed"), "tok/s",
               "plain loop, packed", got("plain loop, packed"), 1.0)]
    for key, label in (("padded", "padded"), ("packed", "packed")):
        r = trl.get(key)
        out.append(Row(section, f"packed SFT+CPO vs TRL SFTTrainer ({label})", got("packed") if r else None, "tok/s",
                       f"TRL {label}" if r else "", r["tok_s"] if r else None, 1.0 if r else None,
                       note=r["note"] if r else "skipped: " + ("trl not installed" if trl_asked else "--skip-trl"),
                       extra=r or {}))
    if "packed, verdict term" in variants:
        out.append(Row(section, "packed step with the verdict term (mu = 1, 2,048-token micro-batches) vs without "
                       "(its cost; tokens are the traces', not their flipped copies)", got("packed, verdict term"),
                       "tok/s", "packed", got("packed")))
    for name in GPU_VARIANTS:
        if name in variants:
            out.append(Row(section, f"{name} vs packed", got(name), "tok/s", "packed", got("packed")))
    for name in ("packed", "padded", *[n for n in GPU_VARIANTS if n in variants]):
        mfu = _mfu(variants[name], device) if name in variants else None
        if mfu is not None:
            out.append(Row(section, f"MFU, {name} (model FLOPs x tokens/s / bf16 peak)", mfu, "fraction",
                           note=f"{flops_per_token(variants[name].model) / 1e9:.2f} GFLOP/token; {torch_name()}"))
    return out


def run(quick: bool = False, log=print, profile_dir: Path | None = None, gpu: bool = False,
        overrides: list[str] = (), label: str = "", trl: bool = True, knobs: bool = True) -> list[Row]:
    """The training section; ``gpu`` runs it on CUDA in bf16 (skipped without CUDA).

    ``overrides`` change the tiny config (``train.batch_size=16``, ``model.source=...``);
    ``label`` names such a variant in the section's name; ``trl`` and ``knobs`` (the GPU-only
    variants) can be left out to save time.
    """
    from r2d.train.synthetic import demo_like_rows

    section = SECTION + ("-gpu" if gpu else "") + (f"[{label}]" if label else "")
    if gpu and not cuda_available():
        return [Row(section, "training on GPU", None, "tok/s", note="skipped: no CUDA")]
    size = SIZES["quick" if quick else "full"]
    cfg = train_config(gpu, overrides)
    device = "cuda" if gpu else "cpu"
    if not gpu:
        import os

        from r2d.runtime import set_threads

        set_threads(os.cpu_count() or 1)
    # Enough traces for every timed step plus the warm-up one (the training side holds 731 prompts).
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    rows = demo_like_rows(cfg, max(size["rows"], int(1.1 * per_step * (size["steps"] + 1))))
    variants, info = run_variants(cfg, rows, size["steps"], device, gpu, log, knobs)
    for v in variants.values():
        log(f"  {v.name}: {v.tok_s:.0f} tok/s over {len(v.seconds)} steps")
    log(f"  padding of the padded step: {info['padding']:.1%}; micro-batches a step: {info['micro_batches']}")
    trl_rows = {}
    for packed in (False, True) if trl else ():
        try:
            got = run_trl(cfg, rows, size["steps"], device, packed)
        except Exception as err:
            got = None
            log(f"  TRL ({'packed' if packed else 'padded'}) failed: {type(err).__name__}: {err}")
        if got is not None:
            trl_rows["packed" if packed else "padded"] = got
            log(f"  TRL SFTTrainer ({'packed' if packed else 'padded'}): {got['tok_s']:.0f} tok/s")
    out = _rows(section, variants, info, trl_rows, cfg, device, trl)
    missed = [r for r in out if r.met is False]
    if (missed or gpu) and profile_dir is not None and "packed" in variants:
        # On the GPU the profile is kept whatever the targets: it is where MFU's shortfall shows.
        ours = variants["packed"]
        name = re.sub(r"[^\w.-]+", "_", section) + "-packed_step.txt"
        path = torch_profile(lambda: ours.step(0, record=False), profile_dir / name,
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
    parser.add_argument("--skip-trl", action="store_true", help="leave TRL's SFTTrainer out")
    parser.add_argument("--skip-knobs", action="store_true", help="leave the GPU-only variants out (bf16 adapters, "
                        "compile, checkpointing)")
    args = parser.parse_args(argv)
    overrides = list(args.set)
    if args.arch:
        overrides.append(f"model.source={random_model(args.arch, args.tokenizer)}")
    label = ",".join([args.arch] + args.set) if overrides else ""
    kwargs = {"profile_dir": Path(args.profile_dir), "overrides": overrides, "label": label, "trl": not args.skip_trl,
              "knobs": not args.skip_knobs}
    rows = [] if args.gpu_only else run(args.quick, **kwargs)
    if args.gpu or args.gpu_only:
        rows += run(args.quick, gpu=True, **kwargs)
    emit(rows, args.rows_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
