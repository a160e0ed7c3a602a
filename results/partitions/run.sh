#!/usr/bin/env bash
# Issue 16, "where ICL helps this LLM most": zero-shot, ICL and the last 32 demonstration tokens (truncated) on other
# partitions' test tasks, 50 examples, seed 100, the committed budgets, one thread. (class2class and nonpara2para are
# in results/eval_*_baselines.json; nonclass2class shares class2class's test tasks and nonqa2qa qa2qa's.)
set -euo pipefail
R=results/partitions
for p in "$@"; do
  t=$(date +%s)
  python eval.py --partition $p --data ../shared/data --methods zeroshot,icl,truncated --n_vectors 32 --max_examples 50 \
    --seeds 100 --k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384 --threads 1 \
    --out $R/eval_$p.json 2>&1 | grep --line-buffered -v "Loading weights" > $R/eval_$p.log
  echo "$(( $(date +%s) - t )) s: eval.py --partition $p (zeroshot, icl, truncated; 50 examples, seed 100)" >> $R/times.txt
done
