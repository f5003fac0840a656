#!/bin/bash
# The checks only a GPU shows, as one prepared script for a short GPU lease (cspine and its dependencies importable
# by $PY, default python3; figures go to $OUT, default /tmp/gpu-checks):
#
#   benchmarks/gpu_checks.sh speed MODEL        study -> result on CUDA and on the machine's CPUs (same study, same
#                                               invocation: bench_predict.py); CUDA's answers against the CPU's
#                                               (tests/test_gpu.py); classifier img/s (bench_cls.py) at the shipped
#                                               recipe's crops and at S 96 with a stride-1 stem
#   benchmarks/gpu_checks.sh classifier LITE0   the fixed classifier benchmark (bench_classifier.py), network alone,
#                                               ImageNet lite0 (the `pretrained` extra's .pth): S 96 / stride 1 fold
#                                               0, the CPU sessions' S 64 / stride 2 fold 0 beside it, then folds 1-4
#                                               of S 96 (each call scores the test set with the folds it has)
#
# MODEL is a bundle (`cspine demo`'s cspine-demo/model). Without an installed cspine: PYTHONPATH=src plus what the
# machine lacks (session 26's H200 image lacked MONAI, pydicom, python-gdcm, pylibjpeg with its openjpeg and rle
# plugins, and nibabel: carried as wheels). Results of that run: benchmarks/cls_results.md, session 26.
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

speed() {
    local model=$1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    for dev in cuda cpu; do
        timeout 200 $PY benchmarks/bench_predict.py --model "$model" --device $dev --keep /tmp/gpu-checks-study \
            --json "$OUT/predict_$dev.json" > "$OUT/predict_$dev.log" 2>&1
        echo "predict on $dev: rc $?"; tail -1 "$OUT/predict_$dev.log"
    done
    timeout 120 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1
    echo "tests/test_gpu.py: rc $?"; tail -3 "$OUT/test_gpu.log"
    local cls="timeout 60 $PY benchmarks/bench_cls.py --device cuda --threads 8 --seq-encoder efficientnet-lite0
               --seq-width 1 --seed-size 96 --seed-batch 64 --steps 10 --slices 10 --batch 4"
    { $cls --size 64 --seq-stem-stride 2; $cls --size 96 --seq-stem-stride 1; } > "$OUT/cls_speed.log" 2>&1
    grep -v "^{" "$OUT/cls_speed.log"
}

classifier() {
    local lite0=$1 epochs=${EPOCHS:-12}
    local bench="$PY benchmarks/bench_classifier.py --out /tmp/gpu-checks-bc --runs network --device cuda
                 --threads 8 --workers 16 --epochs $epochs"
    local flags="--encoder efficientnet-lite0 --pretrained $lite0 --lr 3e-4 --patience $epochs --batch-size 4 --workers 8"
    run() {  # tag, fold, crop flags
        $bench --tag "$1" --cls-args "$flags $3 --fold $2" > "$OUT/$1-f$2.log" 2>&1
        echo "$1 fold $2: rc $? at $(date +%T)"; grep "^| network" "$OUT/$1-f$2.log"
        cp /tmp/gpu-checks-bc/results.json "$OUT/results-$1-f$2.json"
    }
    run s96 0 "--size 96 --stem-stride 1"
    run s64 0 "--size 64 --stem-stride 2"
    for fold in 1 2 3 4; do run s96 $fold "--size 96 --stem-stride 1"; done
}

case ${1:-} in
    speed) speed "$2" ;;
    classifier) classifier "$2" ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
esac
