"""Distillation generation throughput: our pipeline against plain loops on the same prompts.

Same run, same prompts, same model, greedy decoding, same ``max_tokens``:

- transformers: our Ray Data actor pool (the config's engine settings) against a plain
  single-process ``model.generate`` loop at batch 1 and at its best batch (8/16/32);
- vLLM: our ``ray.data.llm`` pipeline against bare ``vllm.LLM.generate`` (each in a fresh
  process, so start-up is measured; reported apart from steady state).

The engines stop at end-of-turn like the real pipeline does (our sampling config has no
``min_tokens``), so the work is equal only because greedy decoding gives the same tokens
everywhere; the generated-token totals are reported beside every figure to show it.

    python benchmarks/bench_distill.py [--quick]            # this section alone
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CpuSampler, Row, median, per_second, repo_path, run_child, start_ray, timed  # noqa: E402

SECTION = "distill"
# Without prefix caching every transformers prompt re-computes the 278-token safety system
# prompt (338 tokens a rendered prompt on average), so the transformers comparisons run on the first
# 24 of the 64 prompts; batch 32 was measured slower than 8 and 16 (12 against 30 and 22 tok/s,
# benchmarks/results/2026-11-30 first run) and is left out, and 48 tokens a prompt keep `make bench`
# under 20 minutes.
SIZES = {"full": {"prompts": 64, "hf_prompts": 24, "max_tokens": 48, "batch1_prompts": 4, "batches": (8, 16),
                  "repeats": 1},
         "quick": {"prompts": 16, "hf_prompts": 16, "max_tokens": 32, "batch1_prompts": 4, "batches": (8, 16),
                   "repeats": 1}}
VLLM_MAX_MODEL_LEN = 1024


# ---------------------------------------------------------------- shared inputs

def tiny_config(overrides: list[str] | None = None):
    from r2d.config import load_config

    return load_config(str(Path(__file__).resolve().parent.parent / "jobs/configs/tiny.yaml"), overrides or [])


TRANSFORMERS = ["distill.engine={kind: transformers, batch_size: 12, concurrency: 2, num_cpus: 1}"]
"""The transformers actor pool measured here (tiny.yaml's own engine is vLLM, the faster one): a
batch of 12 splits the 24 prompts evenly over the two actors (16 would leave one with 8)."""


MAX_PROMPT_CHARS = 1500
"""Longer prompts (a few HarmBench contextual rows) do not fit vLLM's 1,024-token context with
the system prompt; the real pipeline drops them, bare ``LLM.generate`` raises, so none are used."""


def bench_prompts(n: int) -> list[dict]:
    """``n`` distillation prompts (half harmful, half benign) from the tiny config's training split."""
    from r2d.data.splits import select_balanced, training_prompts

    fits = [r for r in training_prompts(tiny_config()) if len(r["prompt"]) <= MAX_PROMPT_CHARS]
    rows = select_balanced(fits, n)
    if len(rows) < n:
        raise RuntimeError(f"only {len(rows)} training prompts available, {n} wanted")
    return [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "label": r["label"]} for r in rows]


def system_text() -> str:
    from r2d.distill.teacher import system_prompt

    return system_prompt(tiny_config().distill.system_prompt_id)


def sampling_cfg(max_tokens: int):
    from r2d.config import SamplingConfig

    return SamplingConfig(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0)


# ---------------------------------------------------------------- baselines

class PlainLoop:
    """The baseline: one process, the whole machine's threads, ``model.generate`` over batches in order."""

    def __init__(self, local_model: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.tok = AutoTokenizer.from_pretrained(local_model)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(local_model, dtype=torch.float32).eval()

    def render(self, prompts: list[dict], system: str) -> list[str]:
        from r2d.engines.rendering import render_prompt

        return [render_prompt(self.tok, p["prompt"], system) for p in prompts]

    def run(self, rendered: list[str], batch_size: int, max_tokens: int) -> dict:
        """Generate every prompt; returns generated tokens (up to and with eos) and seconds."""
        import torch

        eos, tokens = self.tok.eos_token_id, 0
        start = time.perf_counter()
        for i in range(0, len(rendered), batch_size):
            enc = self.tok(rendered[i:i + batch_size], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, temperature=None,
                                          top_p=None, top_k=None, pad_token_id=self.tok.pad_token_id,
                                          eos_token_id=eos)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                tokens += row.index(eos) + 1 if eos in row else len(row)
        seconds = time.perf_counter() - start
        return {"tokens": tokens, "seconds": seconds, "tok_s": per_second(tokens, seconds)}


def pipeline_run(prompts: list[dict], engine, max_tokens: int, system: str) -> dict:
    """Our pipeline (``r2d.engines.generate`` on a Ray dataset), actor start-up included."""
    import ray

    from r2d.engines import generate

    model = tiny_config().distill.teacher
    start = time.perf_counter()
    first = None
    rows = []
    ds = generate(ray.data.from_items(prompts), model, engine, sampling_cfg(max_tokens), system_prompt=system)
    for row in ds.iter_rows():
        first = first if first is not None else time.perf_counter() - start
        rows.append(row)
    seconds = time.perf_counter() - start
    tokens = sum(int(r["num_generated_tokens"]) for r in rows)
    window = engine_stage_window(ds)
    engine_s = window[1] - window[0] if window else None
    return {"tokens": tokens, "seconds": seconds, "tok_s": per_second(tokens, seconds), "first_row_s": first,
            "errors": sum(bool(r["gen_error"]) for r in rows), "rows": len(rows), "engine_s": engine_s,
            "engine_tok_s": per_second(tokens, engine_s) if engine_s else None, "engine_window": window}


ENGINE_STAGES = ("vLLMEngineStageUDF", "TransformersGenerator")


def engine_stage_window(ds) -> tuple[float, float] | None:
    """``time.perf_counter`` times of the generation stage's first batch start and last batch end.

    Ray Data times every batch inside the actor, so the window is the pipeline's steady
    state: actor start-up and model loading come before the first batch starts. (The
    monotonic clock is shared by every process of the machine.)
    """
    pending = [ds.get_stats_summary()]
    while pending:
        summary = pending.pop()
        for op in summary.operators_stats:
            if any(name in op.operator_name for name in ENGINE_STAGES) and op.earliest_start_time:
                return op.earliest_start_time, op.latest_end_time
        pending += summary.parents
    return None


# ---------------------------------------------------------------- vLLM children (fresh processes)

def _vllm_engine(batch_size: int):
    from r2d.config import EngineConfig

    # Both cores for the one engine; Ray is started with 3 logical CPUs so the 0.25-CPU
    # render/tokenize stages still fit beside the engine's 2-CPU bundle.
    return EngineConfig(kind="vllm", batch_size=batch_size, concurrency=1, num_cpus=2,
                        max_model_len=VLLM_MAX_MODEL_LEN)


def child_vllm_bare(n: int, max_tokens: int, cpu_profile: str = "") -> dict:
    """Bare ``vllm.LLM.generate`` on the same rendered prompts: start-up and steady state apart."""
    from r2d.runtime import VLLM_CPU_ENV

    for key, value in {**VLLM_CPU_ENV, "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}.items():
        os.environ.setdefault(key, value)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from r2d.engines.rendering import render_prompt
    from r2d.models import resolve_source

    local = resolve_source(tiny_config().distill.teacher.source)
    tok = AutoTokenizer.from_pretrained(local)
    rendered = [render_prompt(tok, p["prompt"], system_text()) for p in bench_prompts(n)]
    llm, startup = timed(lambda: LLM(model=local, dtype="float32", enforce_eager=True,
                                     max_model_len=VLLM_MAX_MODEL_LEN))
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0, skip_special_tokens=False)
    with CpuSampler() as cpu:
        t0 = time.perf_counter()
        outs = llm.generate(rendered, params, use_tqdm=False)
        t1 = time.perf_counter()
    seconds, tokens = t1 - t0, sum(len(o.outputs[0].token_ids) for o in outs)
    _write_cpu_profile(cpu, (t0, t1), cpu_profile, "bare LLM.generate")
    return {"startup_s": startup, "seconds": seconds, "tokens": tokens, "tok_s": per_second(tokens, seconds)}


def child_vllm_pipeline(n: int, max_tokens: int, batch_size: int, cpu_profile: str = "") -> dict:
    """Our vLLM pipeline (``ray.data.llm``) end to end, Ray start excluded, engine start included."""

    start_ray(num_cpus=3)
    with CpuSampler() as cpu:
        result = pipeline_run(bench_prompts(n), _vllm_engine(batch_size), max_tokens, system_text())
    if result["engine_window"]:
        _write_cpu_profile(cpu, result["engine_window"], cpu_profile, "our pipeline's engine stage")
    return result


def _write_cpu_profile(cpu: CpuSampler, window: tuple[float, float], path: str, what: str) -> None:
    """Save who used the cores during ``window`` (the generation itself) to ``path``, if given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"# {what}\n{cpu.report(*window)}")


# ---------------------------------------------------------------- the section

def _loop_figures(loop: PlainLoop, prompts: list[dict], size: dict) -> dict:
    rendered = loop.render(prompts, system_text())
    loop.run(rendered[:2], 2, 4)  # warm-up: first-call allocations must not count
    out = {"batch1": loop.run(rendered[: size["batch1_prompts"]], 1, size["max_tokens"])}
    for b in size["batches"]:
        runs = [loop.run(rendered, b, size["max_tokens"]) for _ in range(size["repeats"])]
        out[f"batch{b}"] = {**runs[0], "tok_s": median([r["tok_s"] for r in runs])}
    return out


def run_transformers(size: dict, log=print) -> list[Row]:
    """Our transformers pipeline against the plain loop at batch 1 and at its best batch."""
    from r2d.models import resolve_source

    cfg = tiny_config(TRANSFORMERS)
    prompts = bench_prompts(size["prompts"])[: size["hf_prompts"]]
    loop = PlainLoop(resolve_source(cfg.distill.teacher.source), threads=os.cpu_count() or 1)
    base = _loop_figures(loop, prompts, size)
    del loop
    for name, fig in base.items():
        log(f"  plain loop {name}: {fig['tok_s']:.1f} tok/s ({fig['tokens']} tokens in {fig['seconds']:.1f}s)")
    best = max((k for k in base if k != "batch1"), key=lambda k: base[k]["tok_s"])
    start_ray(num_cpus=3)
    ours_runs = [pipeline_run(prompts, cfg.distill.engine, size["max_tokens"], system_text())
                 for _ in range(size["repeats"])]
    ours = {**ours_runs[0], "tok_s": median([r["tok_s"] for r in ours_runs])}
    log(f"  ours (transformers, {_engine_text(cfg.distill.engine)}): {ours['tok_s']:.1f} tok/s "
        f"({ours['tokens']} tokens in {ours['seconds']:.1f}s, generation stage {ours['engine_s'] or 0:.1f}s, "
        f"first row {ours['first_row_s']:.1f}s)")
    note = f"{len(prompts)} prompts x {size['max_tokens']} tok, {_engine_text(cfg.distill.engine)}"
    return [
        Row(SECTION, "ours transformers vs plain loop batch 1", ours["tok_s"], "tok/s", "plain batch 1",
            base["batch1"]["tok_s"], 3.0, note=note, extra={"ours": ours, "baseline": base}),
        Row(SECTION, f"ours transformers vs plain loop best batch ({best})", ours["tok_s"], "tok/s",
            f"plain {best}", base[best]["tok_s"], 0.9, note="actor start-up included"),
        Row(SECTION, f"ours transformers steady vs plain loop best batch ({best})", ours["engine_tok_s"], "tok/s",
            f"plain {best}", base[best]["tok_s"], None, note="ours: the generation stage's first batch start to "
                                                             "last batch end (Ray Data stats)"),
    ]


def _engine_text(engine) -> str:
    return f"{engine.concurrency} actors x {engine.num_cpus:g} CPU, batch {engine.batch_size}"


def run_vllm(size: dict, base: dict | None, log=print, profile_dir: str = "") -> list[Row]:
    """Our vLLM pipeline against bare vLLM and against the plain transformers loop; a failure becomes a row."""
    try:
        import vllm  # noqa: F401
    except Exception as err:  # vLLM absent or broken: the rows say so instead of failing the run
        return [Row(SECTION, "vllm pipeline vs bare vllm", None, "tok/s", note=f"skipped: {err}")]
    try:
        return _vllm_rows(size, base, log, profile_dir)
    except Exception as err:
        return [Row(SECTION, "vllm pipeline vs bare vllm", None, "tok/s",
                    note=f"failed: {str(err).strip().splitlines()[-1][:200]}")]


def _vllm_rows(size: dict, base: dict | None, log=print, profile_dir: str = "") -> list[Row]:
    here = str(Path(__file__).resolve())
    n, max_tokens, batch = size["prompts"], size["max_tokens"], tiny_config().distill.engine.batch_size
    # Who used the cores while each generated: the process-level profile of the steady-state row.
    cpu = {k: str(Path(profile_dir) / f"distill-vllm-{k}.cpu.txt") if profile_dir else "" for k in ("bare", "pipeline")}
    bare = run_child([here, "--child", "vllm-bare", "--n", str(n), "--max-tokens", str(max_tokens),
                      "--cpu-profile", cpu["bare"]], 900)
    log(f"  bare vLLM: start {bare['startup_s']:.1f}s, {bare['tok_s']:.1f} tok/s steady "
        f"({bare['tokens']} tokens in {bare['seconds']:.1f}s)")
    ours = run_child([here, "--child", "vllm-pipeline", "--n", str(n), "--max-tokens", str(max_tokens),
                      "--batch", str(batch), "--cpu-profile", cpu["pipeline"]], 900)
    ours_startup = ours["seconds"] - (ours["engine_s"] or 0.0)
    log(f"  ours (vllm via ray.data.llm): {ours['tokens']} tokens in {ours['seconds']:.1f}s end to end, "
        f"engine stage {ours['engine_s'] or 0:.1f}s, first row {ours['first_row_s']:.1f}s, errors {ours['errors']}")
    bare_total = bare["startup_s"] + bare["seconds"]
    rows = [
        Row(SECTION, "vllm pipeline vs bare vllm, steady state", ours["engine_tok_s"], "tok/s", "bare generate",
            bare["tok_s"], 0.9, note=f"{n} prompts x {max_tokens} tok; ours: the engine stage's first batch start "
                                     f"to last batch end (Ray Data stats)",
            extra={"ours": ours, "bare": bare, "profile": [repo_path(p) for p in cpu.values() if Path(p).is_file()]}),
        Row(SECTION, "vllm pipeline vs bare vllm, start-up included", per_second(ours["tokens"], ours["seconds"]),
            "tok/s", "bare LLM() + generate", per_second(bare["tokens"], bare_total), None,
            note=f"start-up: bare LLM() {bare['startup_s']:.0f}s; ours (3 actors, engine, rest of the wall) "
                 f"{ours_startup:.0f}s"),
    ]
    if base:
        # tiny.yaml's engine is vLLM, so this is "our pipeline" as users run it. The plain loop ran on
        # the first half of the same prompts (rates, not totals, are compared).
        best = max((k for k in base if k != "batch1"), key=lambda k: base[k]["tok_s"])
        ours_tok_s = per_second(ours["tokens"], ours["seconds"])
        note = f"ours: {n} prompts, start-up included; plain loop: first {size['hf_prompts']} of them"
        rows += [
            Row(SECTION, "ours (vllm, the default) vs plain loop batch 1", ours_tok_s, "tok/s", "plain batch 1",
                base["batch1"]["tok_s"], 3.0, note=note),
            Row(SECTION, f"ours (vllm, the default) vs plain loop best batch ({best})", ours_tok_s, "tok/s",
                f"plain {best}", base[best]["tok_s"], 0.9, note=note),
            Row(SECTION, "bare vllm steady vs best plain transformers batch", bare["tok_s"], "tok/s",
                f"plain {best}", base[best]["tok_s"], None, note="informative: which engine decodes faster"),
        ]
    return rows


def projection_row(transformers: dict, vllm: dict) -> Row:
    """Both pipelines' start-up and steady rate from this run, scaled to tiny.yaml's distillation.

    A pipeline's time is start-up (its wall minus its generation stage) plus the recipe's
    tokens at its steady rate; the tokens are prompts x max_tokens, an upper bound for both.
    """
    d = tiny_config().distill
    tokens = d.max_prompts * d.sampling.max_tokens

    def projected(run: dict) -> float:
        return (run["seconds"] - run["engine_s"]) + tokens / run["engine_tok_s"]

    ours_vllm, ours_hf = projected(vllm), projected(transformers)
    return Row(SECTION, f"tiny.yaml's distillation projected ({d.max_prompts} prompts x {d.sampling.max_tokens} tok): "
               "vllm vs transformers pipeline", ours_vllm, "s", "transformers", ours_hf, None,
               higher_is_better=False, note="start-up + tokens / steady rate, both measured above",
               extra={"tokens": tokens})


def run(quick: bool = False, log=print, profile_dir: str = "") -> list[Row]:
    size = SIZES["quick" if quick else "full"]
    rows = run_transformers(size, log)
    rows += run_vllm(size, rows[0].extra["baseline"], log, profile_dir)
    runs = [r.extra.get("ours") for r in rows if r.extra.get("ours")]
    if len(runs) == 2 and all(r.get("engine_tok_s") for r in runs):
        rows.append(projection_row(*runs))
    return rows


def main(argv: list[str] | None = None) -> int:
    from common import add_section_args, emit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_section_args(parser)
    parser.add_argument("--child", choices=["vllm-bare", "vllm-pipeline", "ours-transformers"])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cpu-profile", default="", help="children: save who used the cores while generating")
    args = parser.parse_args(argv)
    if args.child == "vllm-bare":
        print(json.dumps(child_vllm_bare(args.n, args.max_tokens, args.cpu_profile)), flush=True)
    elif args.child == "vllm-pipeline":
        print(json.dumps(child_vllm_pipeline(args.n, args.max_tokens, args.batch, args.cpu_profile)), flush=True)
    elif args.child == "ours-transformers":  # for profiling: the pipeline alone
        start_ray(num_cpus=3)
        result = pipeline_run(bench_prompts(args.n), tiny_config(TRANSFORMERS).distill.engine, args.max_tokens,
                              system_text())
        print(json.dumps(result), flush=True)
    else:
        emit(run(args.quick, profile_dir=args.profile_dir), args.rows_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
