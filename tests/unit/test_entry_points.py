"""Every entry point answers a bad config with one line naming the field, exit status 2, no traceback.

Each runs as the user runs it, in its own process; all fail at config load, before Ray,
MLflow or a model start, so they run side by side in a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ["--config", "jobs/configs/tiny.yaml"]
ENTRY_POINTS = {
    "distill": ["jobs/distill.py", *CONFIG],
    "train": ["jobs/train_cpo.py", *CONFIG],
    "evaluate": ["jobs/evaluate.py", *CONFIG, "--model", "bundled:smollm2-135m"],
    "promote": ["jobs/promote.py", *CONFIG],
    "serve": ["jobs/serve.py", *CONFIG],
    "ablation": ["jobs/ablation.py", *CONFIG],
    "demo": ["jobs/demo.py", *CONFIG, "--fast"],
    "r2d promote": ["-m", "r2d.cli", "promote", *CONFIG],
    "r2d lineage": ["-m", "r2d.cli", "lineage", "models:/r2d@champion", *CONFIG],
}
BAD = {"train.no_such_field=1": "train.no_such_field: unknown key, expected one of [",
       "train.max_steps=-3": "train.max_steps: got -3, expected an integer >= 0",
       "serve.request_timeout_s=0": "serve.request_timeout_s: got 0.0, expected a number of seconds in (0, 86400]"}
# One bad value per entry point, each kind (unknown key, range, the serving section) on several.
CASES = [(name, list(BAD)[i % len(BAD)]) for i, name in enumerate(ENTRY_POINTS)]


@pytest.fixture(scope="module")
def runs() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    procs = {(name, bad): subprocess.Popen([sys.executable, *ENTRY_POINTS[name], bad], cwd=ROOT, env=env, text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, bad in CASES}
    return {key: (proc.wait(timeout=300), *proc.communicate()) for key, proc in procs.items()}


@pytest.mark.parametrize("name, bad", CASES)
def test_a_bad_config_is_one_line_and_exit_2(runs, name, bad):
    code, out, err = runs[(name, bad)]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert BAD[bad] in lines[0] and ": error: " in lines[0], lines[0]
