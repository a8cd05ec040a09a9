#!/usr/bin/env bash
# One prepared run on a GPU machine: the GPU tests, then every benchmark, logs under $OUT.
# Usage (from the repository root): bash bench/gpu_check.sh
set -uo pipefail
export PYTHONPATH=. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/univ-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 120 python3 bench/bench_mamba.py --sweep 2>&1 | grep -v "^\[transformers\]" | tee "$OUT/bench_mamba.log"
timeout 120 python3 bench/bench_sae.py 2>&1 | tee "$OUT/bench_sae.log"
