"""Distil safety-aware reasoning traces from a teacher model.

    python jobs/distill.py --config jobs/configs/tiny.yaml [distill.max_prompts=64 ...]
"""

from __future__ import annotations

import sys



def summary(manifest: dict, stats: dict) -> str:
    lines = [
        "distillation summary",
        f"  output        {manifest['config']['distill']['output_dir']}",
        f"  rows          {manifest['rows']}  {manifest['by_label']}",
        f"  this run      attempted {stats.get('attempted', 0)}, written {stats.get('written', 0)}, "
        f"dropped {stats.get('dropped', 0)}, errors {stats.get('errors', 0)}, "
        f"skipped (already written) {stats.get('skipped_existing', 0)}",
        f"  drops         {manifest['drops']}",
        f"  step pivots   {manifest['step_pivots']}",
        f"  answer pivots {manifest['by_label_answer_pivot']}",
        f"  repaired      {manifest['repaired']}   teacher wrote no pivots: {manifest['teacher_pivots_missing']}",
        f"  generation    {stats.get('generated_tokens', 0)} tokens in {stats.get('wall_s', 0):.0f} s "
        f"= {stats.get('tokens_per_s', 0):.1f} tok/s end to end (re-generated {stats.get('regenerated', 0)}, "
        f"assessment step written for {stats.get('synthesised', 0)})",
        f"  digest        {manifest['digest'][:16]}   mlflow run {manifest.get('mlflow_run_id')}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from r2d.config import exit_on_config_error, parse_job_args
    from r2d.runtime import init_ray

    # 1. config
    cfg, _ = parse_job_args(argv, description=__doc__)
    # 2. cluster
    init_ray(cfg.resources.num_cpus)
    # 3. work
    from pipelines.distill import run

    with exit_on_config_error("distill"):  # the output folder may hold traces made under other settings
        manifest, stats = run(cfg)
    # 4. report
    if stats.get("reused"):
        print(f"distill: every prompt is distilled already in {cfg.distill.output_dir} by the same teacher and "
              f"settings; reusing its {manifest['rows']} traces (nothing generated)")
    print(summary(manifest, stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
