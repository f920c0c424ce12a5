"""The paper's ablation: base, R2D-p, SFT only, SFT + CPO and the reference CPO variant, over seeds.

    python jobs/ablation.py --config jobs/configs/tiny.yaml [--seeds 0 1 2] [key=value ...]

Every variant trains on the same traces with the same budget; all are evaluated on the
same held-out prompts. Writes ``ablation/ablation.md`` and ``ablation/ablation.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from r2d.config import load_config, load_config_or_exit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="ablation")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    # 1. config: ablation models go to their own registry name, so the demo's aliases stay untouched
    base_overrides = ["tracking.registered_model=r2d-ablation", *args.overrides]
    cfg = load_config_or_exit(args.config, base_overrides, parser.prog)
    from r2d.eval.ablation import VARIANTS, aggregate, markdown_table, portable_reports, tradeoff_plot, verdict
    from r2d.eval.evaluate import evaluate_models
    from r2d.runtime import init_mlflow, init_ray
    from r2d.run_tags import git_commit
    from r2d.train.trainer import run_training

    init_ray(cfg.resources.num_cpus)
    init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every finished evaluation is saved at once: re-running the same command after a crash
    # skips them, and its training runs resume from their checkpoints (same run names).
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    partial = out / f"runs-{key}.json"
    runs: dict[str, list[dict]] = json.loads(partial.read_text()) if partial.exists() else {}

    def save(variant: str, rows: list[dict]) -> None:
        runs[variant] = rows
        partial.write_text(json.dumps(runs, indent=1, default=str))

    # 2. the untrained rows: base and R2D-p (the safety system prompt, no training)
    if "base" not in runs or "R2D-p" not in runs:
        untrained = evaluate_models(cfg, [cfg.model.source], prompt_only_baseline=True)
        save("base", [untrained[cfg.model.source]])
        save("R2D-p", [r for m, r in untrained.items() if m != cfg.model.source])

    # 3. the trained variants, seed by seed, each evaluated on the same prompts
    for seed in args.seeds:
        for variant, overrides in VARIANTS.items():
            done = runs.setdefault(variant, [])
            if any(r.get("seed") == seed for r in done):
                continue
            tag = variant.split()[0].lower() + ("-ref" if "reference" in variant else "-cpo" if "CPO" in variant else "")
            vcfg = load_config(args.config, [*base_overrides, *overrides, f"train.seed={seed}",
                                             f"train.run_name=ablation-{key}-{tag}-s{seed}"])
            outcome = run_training(vcfg)
            model = f"models:/{vcfg.tracking.registered_model}/{outcome.model_version}"
            result = evaluate_models(vcfg, [model])[model]
            save(variant, [*done, {**result, "seed": seed, "train_run_id": outcome.mlflow_run_id}])
            print(f"{variant} seed {seed}: ASR {result.get('asr')}, over-refusal {result.get('over_refusal')}, "
                  f"discrimination {result.get('discrimination')}", flush=True)
    # The report covers the seeds asked for, even when the saved file holds others from an earlier run.
    runs = {v: [r for r in runs[v] if v in ("base", "R2D-p") or r.get("seed") in args.seeds]
            for v in ("base", "R2D-p", *VARIANTS)}

    # 4. report
    table = aggregate(runs)
    tradeoff_plot(runs, out / "tradeoff.png")
    text = (f"# Ablation (commit `{git_commit()[:12]}`, seeds {args.seeds}, "
            f"{time.perf_counter() - started:.0f} s)\n\n{markdown_table(table)}\n\n**Does CPO help?** (paired by seed)"
            f"\n{verdict(runs)}\n\n![ASR against over-refusal, every run](tradeoff.png)\n")
    (out / "ablation.md").write_text(text)
    saved = {"runs": portable_reports(runs, Path.cwd()), "table": table}
    (out / "ablation.json").write_text(json.dumps(saved, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
