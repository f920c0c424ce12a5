"""The paper's ablation (base, R2D-p, SFT only, SFT + CPO, the reference CPO variant), or any
recipe experiment, over seeds.

    python jobs/ablation.py --config jobs/configs/tiny.yaml [--seeds 0 1 2] [key=value ...]
    python jobs/ablation.py --variants jobs/variants/recipes.yaml --out recipes [--seeds 0]

Every variant is a list of config overrides on top of ``--config``; one that changes the data
mix names its own ``distill.output_dir`` and is distilled first when its traces are missing.
All variants are evaluated on the same prompts (the suites of ``--config``), out of
distribution first. Writes ``<out>/ablation.md``, ``<out>/ablation.json`` and the trade-off plots
(a folder, or an s3:// / gs:// prefix).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from r2d.config import exit_on_config_error, load_config, load_config_or_exit
    from r2d.eval.ablation import VARIANTS, load_variants

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="ablation", help="output folder or s3:// / gs:// prefix")
    parser.add_argument("--variants", default="", help="YAML: {baseline: NAME, variants: {NAME: [overrides]}}")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    variants, baseline = load_variants(args.variants) if args.variants else (VARIANTS, "SFT only")

    # 1. config: ablation models go to their own registry name, so the demo's aliases stay untouched
    base_overrides = ["tracking.registered_model=r2d-ablation", *args.overrides]
    cfg = load_config_or_exit(args.config, base_overrides, parser.prog)
    from pipelines.distill import run as distill
    from r2d import storage as st
    from r2d.distill.store import read_table
    from r2d.eval.ablation import aggregate, markdown_table, portable_reports, tradeoff_plot, verdict
    from r2d.eval.evaluate import evaluate_models
    from r2d.runtime import init_mlflow, init_ray
    from r2d.run_tags import git_commit
    from r2d.train.trainer import run_training

    init_ray(cfg.resources.num_cpus)
    init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)
    started = time.perf_counter()
    out = st.absolute(args.out) if "://" in args.out else args.out
    # Every finished evaluation is saved at once: re-running the same command after a crash
    # skips them, and its training runs resume from their checkpoints (same run names).
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    partial = st.join(out, f"runs-{key}.json")
    runs: dict[str, list[dict]] = json.loads(st.read_text(partial)) if st.exists(partial) else {}

    def save(variant: str, rows: list[dict]) -> None:
        runs[variant] = rows
        st.write_text(partial, json.dumps(runs, indent=1, default=str))

    # 2. the untrained rows: base and R2D-p (the safety system prompt, no training)
    if "base" not in runs or "R2D-p" not in runs:
        untrained = evaluate_models(cfg, [cfg.model.source], prompt_only_baseline=True)
        save("base", [untrained[cfg.model.source]])
        save("R2D-p", [r for m, r in untrained.items() if m != cfg.model.source])

    # 3. the trained variants, seed by seed, each evaluated on the same prompts
    for seed in args.seeds:
        for variant, overrides in variants.items():
            done = runs.setdefault(variant, [])
            if any(r.get("seed") == seed for r in done):
                continue
            tag = hashlib.sha256(variant.encode()).hexdigest()[:6]
            vcfg = load_config(args.config, [*base_overrides, *overrides, f"train.seed={seed}",
                                             f"train.run_name=ablation-{key}-{tag}-s{seed}"])
            if read_table(vcfg.distill.output_dir, ["prompt_id"]).num_rows == 0:
                with exit_on_config_error(parser.prog):  # its folder may hold traces of other settings
                    distill(vcfg)  # a variant with its own data mix distils its own traces once
            with exit_on_config_error(parser.prog):  # its run name may hold checkpoints of other settings
                outcome = run_training(vcfg)
            model = f"models:/{vcfg.tracking.registered_model}/{outcome.model_version}"
            # The same prompts for every variant: the base config's suites; contamination against its own traces.
            result = evaluate_models(cfg, [model], traces=vcfg.distill.output_dir)[model]
            save(variant, [*done, {**result, "seed": seed, "train_run_id": outcome.mlflow_run_id}])
            ood = result.get("ood") or {}
            print(f"{variant} seed {seed}: OOD ASR {ood.get('asr')}, over-refusal {ood.get('over_refusal')}, "
                  f"discrimination {ood.get('discrimination')}, restated {ood.get('benign_restated')}; "
                  f"in distribution ASR {result.get('asr')}, "
                  f"over-refusal {result.get('over_refusal')}, discrimination {result.get('discrimination')}",
                  flush=True)
    # The report covers the seeds asked for, even when the saved file holds others from an earlier run.
    runs = {v: [r for r in runs[v] if v in ("base", "R2D-p") or r.get("seed") in args.seeds]
            for v in ("base", "R2D-p", *variants)}

    # 4. report
    table = aggregate(runs)
    with tempfile.TemporaryDirectory(prefix="r2d-ablation-") as tmp:
        for name, ood in (("tradeoff.png", False), ("tradeoff-ood.png", True)):
            tradeoff_plot(runs, Path(tmp) / name, ood=ood)
            st.write_bytes(st.join(out, name), (Path(tmp) / name).read_bytes())
    text = (f"# Ablation (commit `{git_commit()[:12]}`, seeds {args.seeds}, "
            f"{time.perf_counter() - started:.0f} s)\n\n{markdown_table(table)}\n\n**Against {baseline}** "
            f"(paired by seed)\n{verdict(runs, baseline)}\n\n"
            "![ASR against over-refusal out of distribution, every run](tradeoff-ood.png)\n"
            "![ASR against over-refusal in distribution, every run](tradeoff.png)\n")
    st.write_text(st.join(out, "ablation.md"), text)
    saved = {"runs": portable_reports(runs, Path.cwd()), "table": table}
    st.write_text(st.join(out, "ablation.json"), json.dumps(saved, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
