"""Engine choice: a whole distillation plus evaluation-style generation, start-up included.

Each engine runs in a fresh process, from interpreter start to the last evaluation row:
import, Ray start, ``r2d.distill.run_distillation`` over N training prompts (every pass,
the re-generation of answered harmful prompts included, traces written to a temporary
folder) and ``pipelines.generate.generate_rows`` over N held-out prompts. The faster engine
is what ``jobs/configs/tiny.yaml`` should default to on this machine.

    python benchmarks/bench_engines.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, run_child, start_ray  # noqa: E402

SECTION = "engine choice"
# vLLM pays ~60 s of start-up per stage inside Ray (distillation, then evaluation) and then decodes
# several times faster. Whole runs at small sizes go to transformers (16 + 16 prompts: 100 s against
# 128 s on 2026-11-30; 32 + 32: 138 s against 170 s on 2026-12-01), while the recipe's 300 + ~190
# prompts are far past the crossover; the distill section projects the recipe from its measured
# start-ups and steady rates. 16 + 16 keeps `make bench` under 20 minutes.
SIZES = {"full": {"prompts": 16, "max_tokens": 32}, "quick": {"prompts": 8, "max_tokens": 32}}
ENGINES = {
    # Two 1-CPU actors, one torch thread each; batches of 8 give both actors work at 16 prompts.
    "transformers": [f"{stage}.engine={{kind: transformers, batch_size: 8, concurrency: 2, num_cpus: 1}}"
                     for stage in ("distill", "eval")],
    # One engine on both cores; Ray gets 3 logical CPUs so the light stages fit beside it.
    "vllm": [f"{stage}.engine.{key}" for stage in ("distill", "eval") for key in
             ("kind=vllm", "concurrency=1", "num_cpus=2", "max_model_len=1024")],
}


def child(engine: str, n: int, max_tokens: int) -> dict:
    from r2d.config import load_config
    from pipelines.distill import run_distillation
    from pipelines.generate import generate_rows
    from r2d.data.splits import heldout_prompts, select_balanced, training_prompts

    out_dir = tempfile.mkdtemp(prefix=f"r2d-bench-{engine}-")
    cfg = load_config(str(Path(__file__).resolve().parent.parent / "jobs/configs/tiny.yaml"), [
        f"distill.output_dir={out_dir}", f"distill.sampling.max_tokens={max_tokens}",
        f"eval.sampling.max_tokens={max_tokens}", *ENGINES[engine]])
    start_ray(num_cpus=3)
    t0 = time.perf_counter()
    _, stats = run_distillation(cfg, select_balanced(training_prompts(cfg), n))
    t1 = time.perf_counter()
    rows = [{"row": i, "prompt": r["prompt"]} for i, r in enumerate(select_balanced(heldout_prompts(cfg), n))]
    generated, _ = generate_rows(rows, cfg.model, cfg.eval.engine, cfg.eval.sampling)
    t2 = time.perf_counter()
    return {"engine": engine, "startup_s": t0 - STARTED, "distill_s": t1 - t0, "eval_s": t2 - t1,
            "distill_tokens": int(stats.get("generated_tokens", 0)), "regenerated": int(stats.get("regenerated", 0)),
            "written": int(stats.get("written", 0)), "eval_tokens": sum(int(r["num_generated_tokens"]) for r in generated),
            "eval_errors": sum(bool(r["gen_error"]) for r in generated)}


def run(quick: bool = False, log=print) -> list[Row]:
    size = SIZES["quick" if quick else "full"]
    here = str(Path(__file__).resolve())
    walls, results = {}, {}
    for engine in ENGINES:
        if engine == "vllm":
            try:
                import vllm  # noqa: F401
            except Exception as err:
                log(f"  vllm: skipped ({err})")
                continue
        start = time.perf_counter()
        results[engine] = run_child([here, "--child", engine, "--n", str(size["prompts"]),
                                     "--max-tokens", str(size["max_tokens"])], 1800)
        walls[engine] = time.perf_counter() - start
        r = results[engine]
        log(f"  {engine}: {walls[engine]:.0f}s whole (start-up {r['startup_s']:.0f}s, distillation {r['distill_s']:.0f}s"
            f" with {r['regenerated']} re-generated, evaluation {r['eval_s']:.0f}s)")
    note = f"{size['prompts']} distilled + {size['prompts']} evaluated prompts, {size['max_tokens']} tok"
    if len(walls) < 2:
        return [Row(SECTION, "whole distill+eval, transformers", walls.get("transformers"), "s", note=note)]
    faster = min(walls, key=walls.get)
    return [Row(SECTION, "whole distill+eval: vllm vs transformers", walls["vllm"], "s", "transformers",
                walls["transformers"], None, higher_is_better=False, note=f"{note}; faster: {faster}",
                extra={"runs": results, "walls": walls, "faster": faster})]


def main(argv: list[str] | None = None) -> int:
    from common import add_section_args, emit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_section_args(parser)
    parser.add_argument("--child", choices=sorted(ENGINES))
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.max_tokens)), flush=True)
        return 0
    emit(run(args.quick), args.rows_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
