#!/usr/bin/env bash
# Issue 15, the ceiling of the channel on class2class, from the repository root: per test task (seed 100, the first 50
# test examples), zero-shot, ICL, the last 32 demonstration tokens (truncated) and 32 vectors fitted to the LLM
# reading the demonstrations (20 Adam steps of 8 unlabeled inputs of the task's other seeds' training files). One
# thread, so a training run can share the 2-core machine. The protocol is the committed baselines' (budgets of
# results/real/issue9.sh). Add --ckpt CKPT for MEND and MEND refined.
set -euo pipefail
mkdir -p results/ceiling
t=$(date +%s)
python analyze.py --ceiling --data ../shared/data --partition class2class --max_examples 50 --seeds 100 \
  --k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384 --n_vectors 32 \
  --fit_steps 20 --threads 1 --out results/ceiling/class2class.json "$@" 2>&1 | grep --line-buffered -v "Loading weights" \
  | tee results/ceiling/class2class.log
echo "$(( $(date +%s) - t )) s: analyze.py --ceiling class2class $*" >> results/ceiling/times.txt
