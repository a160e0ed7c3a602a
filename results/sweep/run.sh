#!/usr/bin/env bash
# Issue 10, section 3 at CPU scale, from the repository root after results/real/issue9.sh (it needs results/real/mend.pt):
#  - distillation length l: stage 2 alone with the recipe of results/real/issue9.sh (label remapping 0.5, lr 1e-4) for
#    an equal budget of 100 steps per point, l in 4 16 32 64 (a short run: the curves of results/real show the
#    signal still rising at 900 steps, so this compares the start of learning, not converged models);
#  - demonstrations K: the trained results/real/mend.pt (K=16 in training) and vanilla ICL given K in 2 4 8 16 at
#    test time;
# every point on the class2class test tasks, 30 examples, seed 100 (compare rows here only), then the table and the
# plot of score against FLOPs per query. The same 4 meta-train tasks as in results/real are held out of training
# (20 examples each for the signal at the end). Every job runs on one thread, two at a time; a rerun skips finished jobs.
set -euo pipefail
D=../shared/data
R=results/sweep
BUDGETS="--k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
STAGE2="--stage finetune --partition class2class --val_tasks 4 --val_task_examples 20 --data $D --llm smollm2-135m
        --distiller layers:4 $BUDGETS --batch 1 --warmup 20 --schedule constant --log_interval 10 --val_items 8
        --threads 1 --lr 1e-4 --relabel 0.5 --max_steps 100 --eval_interval 100"
EVAL="--partition class2class --data $D --max_examples 30 --seeds 100 --threads 1"
l_point() {
  [ -f $R/l$1.pt ] || python train.py $STAGE2 --n_vectors $1 --out $R/l$1.pt > /dev/null
  [ -f $R/l$1.json ] || python eval.py $EVAL --methods mend --ckpt $R/l$1.pt --out $R/l$1.json > $R/l$1_eval.log 2>&1
}
k_point() {
  [ -f $R/k$1.json ] || python eval.py $EVAL --methods icl,mend --ckpt results/real/mend.pt --k $1 \
    --out $R/k$1.json > $R/k$1_eval.log 2>&1
}
(l_point 4; l_point 16; k_point 2; k_point 8) &
(l_point 32; l_point 64; k_point 4; k_point 16) &
wait
python analyze.py --sweep $(ls $R/l*.json $R/k*.json | sort -V | paste -sd,) --png $R/sweep.png | tee $R/sweep.log
