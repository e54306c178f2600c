#!/usr/bin/env bash
# The GPU checks, for a GPU machine lent for minutes (this project's device machines: torch
# and timm installed, no network, no zarr). Here, first: `make gpu-wheels`; there, from the
# repository root, with .whl carried along:
#
#     bash benchmarks/gpu_check.sh [STEP ...]    # results and logs under $OUT (else benchmarks/results)
#
# STEPs, in this order by default: tests (tests/test_cuda.py), cost and cost-bf16 (training
# cost on ViT-B at 224 px, fp32 and bf16 autocast), extract (extraction against the bare
# forward, fp32 and fp16), sweep. Each has its own time limit, so one slow step cannot cost
# the others their results; together they can outlast one 10-minute command: run
# `tests cost cost-bf16`, then `extract sweep`. Each figure writes 2 files, the log 1.
set -uo pipefail
out=$(realpath -m "${OUT:-benchmarks/results}")
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site"  # this tree's code; the wheel gives featcache's version
fi
export PYTHONUNBUFFERED=1 BENCH_RESULTS=$out
log="$out/gpu_check.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
# every step needs these: without them, say which is missing once rather than fail each step
python3 -c "import torch, timm, zarr, featcache, sidetrain
print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__)" 2>&1 | tee -a "$log" ||
  { echo "an import failed: rerun \`make gpu-wheels\` here and carry .whl along" | tee -a "$log"; exit 1; }
bench() { (cd benchmarks && timeout "$1" python3 "${@:2}") 2>&1 | grep -v "━" | tail -25 | tee -a "$log"; }
for step in "${@:-tests cost cost-bf16 extract sweep}"; do
  for s in $step; do
    echo "== $s" | tee -a "$log"
    case $s in
      tests) timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -30 | tee -a "$log" ;;
      cost) bench 150 training_cost.py --device cuda --model vit_base --img-size 224 --n 512 ;;
      cost-bf16) bench 150 training_cost.py --device cuda --model vit_base --img-size 224 --n 512 --precision bf16 ;;
      extract) bench 200 extract_throughput.py --device cuda --model vit_base_patch16_224 --img-size 224 \
                 --n 768 --dtypes fp16,int8 --precisions fp32,fp16 --workers 8 ;;
      sweep) bench 200 sweep_cost.py --device cuda --model vit_base --img-size 224 ;;
      *) echo "unknown step $s (tests, cost, cost-bf16, extract, sweep)"; exit 2 ;;
    esac
  done
done
