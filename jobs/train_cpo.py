"""Train the student on the distilled traces: SFT + Contrastive Pivot Optimization on Ray Train.

    python jobs/train_cpo.py --config jobs/configs/tiny.yaml train.max_steps=10
    ray job submit --working-dir . -- python jobs/train_cpo.py --config jobs/configs/tiny.yaml

Resubmitting with the same train.run_name resumes from its latest checkpoint. At the
end the merged model is registered as ``models:/<tracking.registered_model>@challenger``.
"""

import json
import sys
import time


def main(argv=None) -> int:
    from r2d.config import exit_on_config_error, parse_job_args
    from r2d.runtime import init_mlflow, init_ray
    from r2d.train.trainer import run_training

    # 1. config
    cfg, _ = parse_job_args(argv, __doc__)

    # 2. runtime: Ray (local or RAY_ADDRESS) and MLflow
    init_ray(num_cpus=cfg.resources.num_cpus)
    init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)

    # 3. work: train, checkpoint, register
    started = time.perf_counter()
    with exit_on_config_error("train_cpo.py"):  # the run name may hold checkpoints of other settings
        outcome = run_training(cfg)

    # 4. report
    if outcome.reused:
        print(f"train: run {outcome.mlflow_run_id} already trained this model on these traces with these "
              f"settings; reusing version {outcome.model_version} (nothing trained)")
    report = {"steps": outcome.steps, "planned_steps": outcome.planned_steps, "reused": outcome.reused,
              "mlflow_run_id": outcome.mlflow_run_id, "model_version": outcome.model_version,
              "model_uri": f"models:/{cfg.tracking.registered_model}@challenger" if outcome.model_version else "",
              "checkpoint": outcome.checkpoint_path, "wall_s": round(time.perf_counter() - started, 1),
              "last_metrics": {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))}}
    print(json.dumps(report, indent=2))
    return 0 if outcome.steps == outcome.planned_steps else 1


if __name__ == "__main__":
    sys.exit(main())
