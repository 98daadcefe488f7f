#!/usr/bin/env bash
# Checks of mabl on a CUDA GPU, in one go (a few minutes on an H200):
#   1. tests/test_cuda.py: CPU == GPU numerics, training on the GPU, GPU checkpoint -> CPU;
#   2. a SMAX 3m smoke training with --device cuda (the learner on the GPU, JAX's SMAX on the CPU),
#      then `mabl eval --device cpu` of the checkpoint it wrote;
#   3. benchmarks/learner_speed.py --device cuda (the paper-preset update, 3/8/27 agents);
#   4. the whole test suite on a machine where `run.device=auto` picks the GPU.
# Usage: bash benchmarks/cuda_check.sh OUT_DIR   (mabl importable: installed, or PYTHONPATH=src)
# Each step's output goes to OUT_DIR/<step>.txt; the script goes on after a failed step and
# exits non-zero if any failed.
set -u
out=${1:?usage: cuda_check.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
fail=0
step() {  # step NAME SECONDS CMD...
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0)) s"
    tail -n 4 "$out/$name.txt"
    [ $rc -eq 0 ] || fail=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step test_cuda 240 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py
run=$(mktemp -d)/smax3m_cuda
step smoke_train 200 $py -m mabl.cli train --env smax:3m --preset fast --steps 1500 --seed 0 --device cuda \
    --run-dir "$run" --set run.eval_every=1000 --set run.eval_episodes=4 --set run.progress=false
step eval_on_cpu 120 $py -m mabl.cli eval "$run" --device cpu --episodes 10
step learner_speed 200 $py benchmarks/learner_speed.py --device cuda --agents 3 8 27 --output "$out/learner_speed_cuda.md"
step test_suite 420 $py -m pytest -q -p no:cacheprovider tests
exit $fail
