#!/usr/bin/env bash
# The GPU checks, for a GPU machine lent for minutes (this project's device machines: torch
# and timm installed, no network, no zarr). Here, first: `make gpu-wheels`; there, from the
# repository root, with .whl carried along:
#
#     bash benchmarks/gpu_check.sh [STEP ...]    # results and logs under $OUT (else benchmarks/results)
#
# STEPs, in this order by default: tests (tests/test_cuda.py), cost (training cost on ViT-B
# at 224 px), step (where a LoSA step's time goes: launches or the GPU; what torch.compile,
# with and without CUDA graphs, and a CUDA graph of the whole step save), loader
# (its throughput to the GPU), extract (extraction against the bare forward, fp32 and fp16),
# sweep, cost-bf16 (the training cost under bf16 autocast). Each has its own time limit, so
# one slow step cannot cost the others their results. Measured on an H200 machine: tests
# 30 s (before its compiled-training test), cost 130 s, loader 60 s (without its GPU rows), extract 80 s, sweep 60 s, cost-bf16
# over 100 s (before cost had its compiled row; step not run there yet: its two compiles
# may take minutes, and its rows are printed as they come): all of them outlast one
# 10-minute command, so split them
# (`tests step loader`, then `cost extract sweep`, then `cost-bf16`). The device tool
# brings back 8 files at most: the figures' JSON, this log and pytest's whole output come
# back as they are, the PNGs in one png.tar, added to after each step.
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
for step in "${@:-tests cost step loader extract sweep cost-bf16}"; do
  for s in $step; do
    echo "== $s" | tee -a "$log"
    case $s in
      tests) timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/pytest.log" | tail -30 | tee -a "$log" ;;
      cost) bench 240 training_cost.py --device cuda --model vit_base --img-size 224 --n 512 ;;
      cost-bf16) bench 240 training_cost.py --device cuda --model vit_base --img-size 224 --n 512 --precision bf16 ;;
      extract) bench 100 extract_throughput.py --device cuda --model vit_base_patch16_224 --img-size 224 \
                 --n 768 --dtypes fp16,int8 --precisions fp32,fp16 --workers 8 ;;
      step) bench 300 losa_step.py --device cuda --model vit_base --img-size 224 ;;
      loader) bench 100 loader_throughput.py ;;
      sweep) bench 90 sweep_cost.py --device cuda --model vit_base --img-size 224 --epochs 1 ;;
      *) echo "unknown step $s (tests, cost, step, loader, extract, sweep, cost-bf16)"; exit 2 ;;
    esac
    (cd "$out" && compgen -G "*.png" > /dev/null && tar rf png.tar -- *.png && rm -f -- *.png)
  done
done
