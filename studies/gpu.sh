#!/usr/bin/env bash
# Everything a lent GPU should do first, in order of importance, within a time budget:
#   bash studies/gpu.sh BUDGET_SECONDS [OUT_DIR]
# 1. the CUDA tests (pytest -k cuda); 2. the train-step and inference benchmarks on this machine;
# 3. the GPU sweeps (study 1, then 2, then 3), each stopped with SIGTERM when the budget runs out
#    (a SIGINT would be ignored when this script runs in the background), which leaves its
#    current runs resumable (rerun this script to go on: finished runs are
#    skipped, the others resume exactly); 4. `bitvit report`, and the small run files (metrics,
#    config, run.json, curves; never weights) copied into OUT_DIR (default: $OUT if set) as one
#    tarball, and committed to git when this is a git checkout with BITVIT_GPU_COMMIT=1.
# Run from the repository root with bitvit installed (or PYTHONPATH=src).
set -uo pipefail
budget=${1:?usage: bash studies/gpu.sh BUDGET_SECONDS [OUT_DIR]}
out_dir=${2:-${OUT:-gpu-out}}
mkdir -p "$out_dir"
log="$out_dir/gpu.log"
deadline=$(( $(date +%s) + budget ))
left() { echo $(( deadline - $(date +%s) )); }
say() { echo "[gpu.sh $(date -u +%H:%M:%S), $(left) s left] $*" | tee -a "$log"; }
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

say "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'" \
  || { say "no CUDA device: nothing to do"; exit 2; }

say "1. CUDA tests"
timeout "$(left)" $py -m pytest -q -k cuda 2>&1 | tee -a "$log"

if [ "$(left)" -gt 300 ]; then
  say "2. benchmarks"
  timeout 300 $py benchmarks/train_step.py --device cuda --repeats 20 2>&1 | tee -a "$log"
  timeout 300 $py benchmarks/inference.py --repeats 10 2>&1 | tee -a "$log"
fi

# Study 1 answers the paper's own questions; study 2 the placement question; study 3 is the
# strong recipe. Several runs share the GPU (a paper-sized ViT uses a fraction of it).
for sweep in studies/study1-gpu.yaml studies/study2-gpu.yaml studies/study3-gpu.yaml; do
  t=$(( $(left) - 120 ))  # keep two minutes for the report and the copy
  [ "$t" -gt 60 ] || break
  say "3. $sweep for at most $t s"
  timeout --signal=TERM --kill-after=60 "$t" $py -m bitvit sweep "$sweep" --parallel 4 \
    train.device=cuda 2>&1 | tee -a "$log"
done

say "4. report and small files"
$py -m bitvit report 2>&1 | tail -1 | tee -a "$log"
files=$(ls -d results/*-gpu results/README.md 2>/dev/null)
tar czf "$out_dir/gpu-results.tar.gz" --exclude='last' --exclude='best' --exclude='.last.*' \
  --exclude='.best.*' --exclude='*.safetensors' --exclude='*.pt' $files 2>/dev/null
if [ "${BITVIT_GPU_COMMIT:-0}" = 1 ] && git rev-parse --git-dir >/dev/null 2>&1; then
  git add results && git commit -qm "GPU tier: metrics so far (studies/gpu.sh)" && say "committed"
fi
say "done"
