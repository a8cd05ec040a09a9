#!/usr/bin/env bash
# One prepared run on a GPU machine: the GPU tests, then the benchmarks, logs under $OUT.
# Usage (from the repository root): bash bench/gpu_check.sh [tests|mamba|sae|stream|match|circuits|rwkv ...]
set -uo pipefail
export PYTHONPATH=. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/univ-gpu}; mkdir -p "$OUT"
parts=${*:-tests mamba sae stream match circuits rwkv}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
for part in $parts; do
  case $part in
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8 ;;
    mamba) timeout 300 python3 bench/bench_mamba.py --sweep --parts 2>&1 | grep -v "^\[transformers\]" | tee "$OUT/bench_mamba.log" | grep -v "^scan {" ;;
    sae) timeout 120 python3 bench/bench_sae.py 2>&1 | grep -v Warning | tee "$OUT/bench_sae.log" ;;
    stream) timeout 420 python3 bench/bench_stream.py --size gpu 2>&1 | grep -v -e Warning -e "Writing model" | tee "$OUT/bench_stream.log" ;;
    match) timeout 240 python3 bench/bench_match.py 2>&1 | tee "$OUT/bench_match.log" ;;
    circuits) timeout 240 python3 bench/bench_circuits.py 2>&1 | tee "$OUT/bench_circuits.log" ;;
    rwkv) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_rwkv.py 2>&1 | tail -3
          timeout 240 python3 bench/bench_rwkv.py --batch 16 --len 1024 2>&1 | tee "$OUT/bench_rwkv.log" ;;
    smoke) timeout 280 python3 bench/preset_time.py smoke 2>&1 | grep -v "^\[transformers\]" | tee "$OUT/preset_smoke.log" ;;
  esac
done
