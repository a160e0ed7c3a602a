#!/usr/bin/env bash
# Issue 22: where each stage-2 run starts. One step at lr 0 (so the gate stays at 0 and nothing moves), then the
# validation that results/seeds/run.sh logs every 50 steps: the labels base alone (--base labels), and the stage-1
# distiller that the paper's MEND starts from (--base none). From the repository root, after stage 1.
set -euo pipefail
D=../shared/data
R=results/seeds
BUDGETS="--k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
COMMON="--data $D --llm smollm2-135m --distiller layers:4 --n_vectors 32 $BUDGETS --batch 1 --warmup 20 --schedule constant --log_interval 10 --val_items 8 --threads 1"
for base in labels none; do
  rm -f runs/start_$base.log
  python train.py --stage finetune $COMMON --relabel 0.5 --queries_per_demo 4 --lr 0 --max_steps 1 --eval_interval 1 --partition class2class --init runs/seeds_stage1.pt --base $base --out runs/start_$base.pt > /dev/null
  grep "val reference\|val loss" runs/start_$base.log | sed "s/^/base $base: /"
done | tee $R/start.log
