#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one call with a deadline (bench/README.md, "GPU"):
# the CUDA tests, the command line on CUDA, the benchmark against diffusers, then the same with torch.compile.
#
#   OUT=/tmp/gpu-run bash bench/gpu.sh [SECONDS]      # default 560 s in all
#
# Wheels under .whl/ (packages the GPU machine's image lacks: diffusers, omegaconf, invisible-watermark...)
# are installed first when present. Logs, results and two demo grids go to $OUT.
set -u
cd "$(dirname "$0")/.."
budget=${1:-560}
start=$(date +%s)
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
left() { echo $(( budget - ($(date +%s) - start) )); }
step() {  # step NAME SECONDS CMD...: run with at most SECONDS (and never past the deadline)
  local name=$1 limit=$2; shift 2
  local l; l=$(left); (( l < limit )) && limit=$l
  if (( limit < 20 )); then echo "== $name: skipped, $l s left"; return; fi
  echo "== $name (at most $limit s, $(left) s left)"
  timeout "$limit" "$@"; echo "== $name: exit $?"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/bench.log"

step tests 200 python3 -m pytest -q -rs tests/test_accel.py tests/test_backends.py::test_fp32_attention_on_cuda_half \
  tests/test_samplers.py::test_same_seed_same_noise_on_another_device \
  tests/test_cli_images.py::test_device_and_precision_choices 2>&1 | tee "$OUT/pytest.log" | tail -25

for precision in autocast half; do
  rm -rf "/tmp/demo-$precision"
  step "demo on cuda, --precision $precision" 60 python3 scripts/txt2img.py --demo --device cuda --cuda_graphs --precision "$precision" \
    --outdir "/tmp/demo-$precision" --n_samples 4 --n_iter 1 --seed 7 --prompt "a red circle on a white background" \
    2>&1 | tail -3
  cp "/tmp/demo-$precision/grid-0000.png" "$OUT/demo-$precision.png" 2>/dev/null
done

step checkpoint 90 python3 bench/make_checkpoint.py
step bench 330 python3 bench/run.py --device cuda --cuda-graphs --levers --repeats 20 --images 2 2>&1 | tee -a "$OUT/bench.log" | grep -v "^    "
cp bench/results/cuda.json "$OUT/" 2>/dev/null
step "bench --compile" 600 python3 bench/run.py --device cuda --cuda-graphs --compile --skip-e2e --repeats 20 --name cuda-compile \
  2>&1 | tee "$OUT/compile.log" | grep -v "^    " | tail -12
cp bench/results/cuda-compile.json "$OUT/" 2>/dev/null
echo "== done in $(( $(date +%s) - start )) s"
