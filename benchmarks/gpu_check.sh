#!/usr/bin/env bash
# Every GPU check in one command, for a GPU machine lent for minutes (this project's device
# machines: torch and timm installed, no network, no zarr). Here, first: `make gpu-wheels`;
# there, from the repository root, with .whl carried along:
#
#     bash benchmarks/gpu_check.sh          # results and logs under $OUT (else benchmarks/results)
#
# Runs the CUDA tests (tests/test_cuda.py), then the GPU figures of issue #6: training cost
# on ViT-B at 224 px, extraction against the bare forward in fp32 and fp16, and the sweep.
# Each step has its own time limit, so one slow step cannot cost the others their results.
set -uo pipefail
out=$(realpath -m "${OUT:-benchmarks/results}")
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site"  # this tree's code; the wheel gives featcache's version
fi
export PYTHONUNBUFFERED=1 BENCH_RESULTS=$out
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, timm, zarr; print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__)"
  timeout 180 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py
} 2>&1 | tee "$out/gpu_check.log"
cd benchmarks
step() { timeout "$1" python3 "${@:2}" 2>&1 | grep -v "━" | tail -25 | tee -a "$out/gpu_check.log"; }
step 200 training_cost.py --device cuda --model vit_base --img-size 224 --n 512
step 150 extract_throughput.py --device cuda --model vit_base_patch16_224 --img-size 224 --n 768 \
  --dtypes fp16,int8 --precisions fp32,fp16 --workers 8
step 150 sweep_cost.py --device cuda --model vit_base --img-size 224
