"""Evaluate one or more models for jailbreak resistance, over-refusal and discrimination.

    python jobs/evaluate.py --config jobs/configs/tiny.yaml --model bundled:smollm2-135m --suite jailbreak
    python jobs/evaluate.py --config jobs/configs/tiny.yaml --model bundled:smollm2-135m \
        --model models:/r2d@champion --model models:/r2d@challenger --prompt-only-baseline \
        --suite harmful --suite jailbreak --suite over_refusal --suite benign --output eval.json

--model: a folder, models:/name@alias, bundled:<name>, a hub id, or an http(s):// OpenAI-compatible endpoint.
--suite: harmful | jailbreak | over_refusal | benign, or a CSV/JSONL/JSON/Parquet file with prompt + label.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from r2d.config import help_text, load_config_or_exit
    from r2d.eval.contamination import ContaminationError
    from r2d.eval.evaluate import evaluate_models
    from r2d.eval.report import side_by_side
    from r2d.eval.suites import SuiteError

    # 1. config and arguments
    parser = argparse.ArgumentParser(description=__doc__, epilog="config fields:\n" + help_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None,
                        help="YAML config file (defaults when omitted); repeat to lay an override file over it")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.max_per_suite=16")
    parser.add_argument("--model", action="append", default=[], help="model to evaluate (repeatable)")
    parser.add_argument("--suite", action="append", default=[], help="suite name or file (repeatable; "
                        "default eval.suites)")
    parser.add_argument("--output", default=None, help="write the numbers as JSON to this file")
    parser.add_argument("--prompt-only-baseline", action="store_true",
                        help="add R2D-p: model.source with the safety system prompt, no training")
    parser.add_argument("--traces", default=None, help="traces dataset for the contamination check "
                        "(default eval.traces, else distill.output_dir)")
    parser.add_argument("--allow-contamination", action="store_true", default=None,
                        help="report numbers even when prompts overlap the training traces")
    parser.add_argument("--out-dir", default=None, help="report folder (default under eval.output_dir)")
    parser.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging")
    parser.add_argument("--no-reuse", action="store_true", help="evaluate again even when an evaluation of the "
                        "same model, suites and settings exists")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config_or_exit(args.config, args.overrides, parser.prog)
    if not args.model and not args.prompt_only_baseline:
        parser.error("pass at least one --model (or --prompt-only-baseline)")

    # 2. evaluate (suites, contamination check, generation, judging, report, MLflow)
    try:
        results = evaluate_models(cfg, args.model, args.suite or None, output=args.output,
                                  prompt_only_baseline=args.prompt_only_baseline, traces=args.traces,
                                  allow_contamination=args.allow_contamination, out_dir=args.out_dir,
                                  log_mlflow=not args.no_mlflow, reuse=not args.no_reuse)
    except (ContaminationError, SuiteError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2

    # 3. report
    print(side_by_side(results))
    first = next(iter(results.values()))
    print(f"\nreport: {first['report']}")
    for name, entry in results.items():
        if entry.get("reused"):
            print(f"already evaluated: reused run {entry['run_id']} for {name} (same model, suites and settings)")
        elif entry.get("run_id"):
            print(f"mlflow run for {name}: {entry['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
