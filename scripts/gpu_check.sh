#!/usr/bin/env bash
# The CUDA checks and benchmarks of the quantized paths (issue 4) on a GPU machine whose python3
# already has torch and triton (the engine's other dependencies on PYTHONPATH):
#     bash scripts/gpu_check.sh OUTDIR [tune] [tests] [microbench] [decode]   (default: all)
# Writes OUTDIR/{gpu.txt, tune.txt, tune.json, tiles.json, tests.log, microbench.txt,
# gpu_decode.json, gpu_decode.txt}. The stages after `tune` use the tiles it chose.
set -u
out=${1:-gpu_out}
shift || true
stages=${*:-tune tests microbench decode}
tiles=()  # --tile-config FILE once `tune` has chosen tiles
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/gpu.txt"
for stage in $stages; do
    case $stage in
    tune)
        timeout 220 python3 scripts/gpu_tune.py --json "$out/tune.json" --tiles "$out/tiles.json" \
            2>&1 | tee "$out/tune.txt"
        [ -s "$out/tiles.json" ] && tiles=(--tile-config "$(realpath "$out/tiles.json")") ;;
    tests)  # the GPU-only tests (marked gpu), then whole files whose kernels take CUDA there
        timeout 100 python3 -m pytest -p no:cacheprovider -q -m gpu tests --ignore=tests/server \
            2>&1 | tee "$out/tests.log"
        timeout 60 python3 -m pytest -p no:cacheprovider -q tests/quantization/test_gpu_kernels.py \
            2>&1 | tee -a "$out/tests.log" ;;
    microbench)
        timeout 90 python3 -m turbollm.quantization.microbench --device cuda \
            --shapes llama2-7b --rows 1 2 4 16 64 "${tiles[@]}" 2>&1 | tee "$out/microbench.txt" ;;
    decode)
        timeout 150 python3 -m turbollm.bench.gpu_decode --rounds 2 --json "$out/gpu_decode.json" \
            "${tiles[@]}" 2>&1 \
            | tee "$out/gpu_decode.txt" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
    esac
done
