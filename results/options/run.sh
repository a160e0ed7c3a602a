#!/usr/bin/env bash
# Issue 16, one recipe with the new instruments, from the repository root: stage 1 as in results/real/issue9.sh, then
# stage 2 with the option objective (--kl_rows options), label remapping 0.5 and 4 queries per demonstration set,
# judged every 40 steps on held-out meta-train tasks where zero-shot beats the one-class floor (MEND with gold and
# with random labels). One thread: the ceiling run shares the 2-core machine. Then class2class with the committed
# protocol (100 examples, seeds 100 and 13): MEND, MEND with random labels, and the truncated baseline.
set -euo pipefail
D=../shared/data
R=results/options
BUDGETS="--k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
COMMON="--data $D --llm smollm2-135m --distiller layers:4 --n_vectors 32 $BUDGETS --batch 1 --warmup 20 --schedule constant --log_interval 10 --val_items 8 --threads 1"
mkdir -p runs $R
timed() { local t=$(date +%s); "$@"; echo "$(( $(date +%s) - t )) s: $*" >> $R/times.txt; }
timed python train.py --stage pretrain $COMMON --c4_max_tokens 320 --lr 2e-4 --max_steps 200 --eval_interval 100 --out runs/stage1.pt > /dev/null
cp runs/stage1.log $R/stage1.log
timed python train.py --stage finetune --partition class2class --val_tasks 4 --val_task_examples 40 $COMMON \
  --init runs/stage1.pt --kl_rows options --relabel 0.5 --queries_per_demo 4 --lr 1e-4 --max_steps 120 --eval_interval 40 \
  --out runs/options.pt > /dev/null
cp runs/options.log $R/mend.log
EVAL="--partition class2class --data $D --max_examples 100 --seeds 100,13 --threads 1"
timed python eval.py $EVAL --methods mend --ckpt runs/options.pt --out $R/eval_mend.json 2>&1 | grep -v "Loading weights" > $R/eval_mend.log
timed python eval.py $EVAL --methods mend --ckpt runs/options.pt --perturb random_labels --out $R/eval_mend_random.json 2>&1 | grep -v "Loading weights" > $R/eval_mend_random.log
timed python eval.py $EVAL --methods truncated --n_vectors 32 $BUDGETS --out $R/eval_truncated.json 2>&1 | grep -v "Loading weights" > $R/eval_truncated.log
