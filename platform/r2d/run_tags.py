"""MLflow tag names that tie the stages together (the lineage contract).

Every stage writes these on its run; training copies the lineage onto the registered
model version, so a served version leads back to its traces, distillation run, teacher,
tagger, prompt sources and config — and a traces digest leads forward to every model
trained on it (search runs by ``TRACES_DIGEST``).
"""

STAGE = "r2d.stage"  # distill | train | eval | promote
CONFIG_DIGEST = "r2d.config_digest"
GIT_COMMIT = "r2d.git_commit"

# distillation run
TEACHER = "r2d.teacher"
TAGGER = "r2d.tagger"
SYSTEM_PROMPT_ID = "r2d.system_prompt_id"
PROMPT_SOURCES = "r2d.prompt_sources"  # JSON list of source specs
PROMPTS_DIGEST = "r2d.prompts_digest"
TRACES_URI = "r2d.traces_uri"
TRACES_DIGEST = "r2d.traces_digest"

# training run and model version
DISTILL_RUN_ID = "r2d.distill_run_id"
TRAIN_RUN_ID = "r2d.train_run_id"
BASE_MODEL = "r2d.base_model"
TRAIN_KEY = "r2d.train_key"  # digest of a training run's inputs: model, train settings, workers, traces
PIVOT_IDS = "r2d.pivot_ids"  # JSON {"[SAFE]": id, ...}

# evaluation run
MODEL_URI = "r2d.model_uri"
MODEL_NAME = "r2d.model_name"  # registered model name, when a registry version was evaluated
MODEL_VERSION = "r2d.model_version"
EVAL_KEY = "r2d.eval_key"  # digest of what an evaluation measured: model (pinned), suites, judge, sampling
SUITE_DIGEST = "r2d.suite_digest"
JUDGE = "r2d.judge"
EVAL_CODE = "r2d.eval_code"  # digest of the source that generated and judged (r2d.eval.evaluate.eval_code)
EVAL_RUN_PREFIX = "r2d.eval_run."  # on a model version: + suite digest -> eval run id

# promotion
DECISION = "r2d.promotion.decision"  # promoted | rejected
REASON = "r2d.promotion.reason"
NUMBERS = "r2d.promotion.numbers"  # JSON
CHAMPION_HISTORY = "r2d.champion_history"  # on the registered model: JSON list of versions


COMMIT_ENV = "R2D_GIT_COMMIT"
"""Set by whoever submits a job from a checkout: under ``ray job submit --working-dir`` the
job runs in a copy without ``.git``, so the commit must travel with it."""


def git_commit(short: bool = False, mark_dirty: bool = False, cwd: str | None = None) -> str:
    """The commit the code runs from: ``$R2D_GIT_COMMIT``, else ``git rev-parse HEAD``, else "unknown".

    Args:
        short: the abbreviated hash.
        mark_dirty: append "+dirty" when the working tree has uncommitted changes.
        cwd: the checkout to ask (default: the current directory).
    """
    import os
    import subprocess

    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
        out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        if mark_dirty and subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True,
                                         timeout=10).stdout.strip():
            out += "+dirty"
        return out
    except Exception:
        return "unknown"
