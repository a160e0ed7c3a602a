#!/usr/bin/env bash
# Issue 9 ("MEND that learns"), from the repository root of a fresh clone: the recipe search, then the final run with
# the chosen setting and its evaluation. Every job runs on one thread; two jobs at a time share the 2-core CPU, as
# the logs were made. Each command's wall time is appended to results/real/times.txt.
set -euo pipefail
D=../shared/data
R=results/real
BUDGETS="--k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
COMMON="--data $D --llm smollm2-135m --distiller layers:4 --n_vectors 32 $BUDGETS --batch 1 --warmup 20 --schedule constant --log_interval 10 --val_items 8 --threads 1"
STAGE2="--stage finetune --partition class2class --val_tasks 4 --val_task_examples 40 $COMMON"
mkdir -p runs $R results/recipe
timed() { local t=$(date +%s); "$@"; echo "$(( $(date +%s) - t )) s: $*" >> $R/times.txt; }

# 1. recipe search, stage 2 only, about 16-25 minutes each, two at a time (logs: results/recipe/*.log)
timed python train.py $STAGE2 --lr 1e-4 --max_steps 240 --eval_interval 60 --out runs/A_base.pt > /dev/null &
timed python train.py $STAGE2 --lr 1e-4 --relabel 0.5 --max_steps 240 --eval_interval 60 --out runs/C_relabel.pt > /dev/null &
wait
timed python train.py $STAGE2 --queries_per_demo 4 --lr 3e-4 --max_steps 180 --eval_interval 45 --out runs/B_q4.pt > /dev/null &
timed python train.py $STAGE2 --queries_per_demo 4 --lr 3e-4 --relabel 0.5 --max_steps 180 --eval_interval 45 --out runs/D_q4_relabel.pt > /dev/null &
wait
cp runs/A_base.log runs/C_relabel.log runs/B_q4.log runs/D_q4_relabel.log results/recipe/

# 2. the final run with the chosen setting (label remapping 0.5, one query per demonstration set, lr 1e-4 constant),
#    two chains at a time, about 50 minutes of training each: (stage 1 -> stage 2) and (stage 2 alone = the ablation
#    without stage 1, which continues the recipe-search run C: --resume restores weights, optimizer, RNG and data
#    position, so it equals one run of 900 steps)
(timed python train.py --stage pretrain $COMMON --c4_max_tokens 320 --lr 2e-4 --max_steps 200 --eval_interval 100 --out $R/stage1.pt > /dev/null
 timed python train.py $STAGE2 --init $R/stage1.pt --lr 1e-4 --relabel 0.5 --max_steps 700 --eval_interval 150 --out $R/mend.pt > /dev/null) &
(cp runs/C_relabel.pt $R/mend_no_stage1.pt && cp runs/C_relabel.log $R/mend_no_stage1.log
 timed python train.py $STAGE2 --lr 1e-4 --relabel 0.5 --max_steps 900 --eval_interval 150 --resume --out $R/mend_no_stage1.pt > /dev/null) &
wait

# 3. evaluation on the class2class test tasks with the protocol of the committed baselines (100 examples, seeds 100
#    and 13); the budgets come from the checkpoints
EVAL="--partition class2class --data $D --max_examples 100 --seeds 100,13 --threads 1"
timed python eval.py $EVAL --methods mend --ckpt $R/mend.pt --out $R/eval_mend.json > $R/eval_mend.log 2>&1 &
timed python eval.py $EVAL --methods mend --ckpt $R/mend_no_stage1.pt --out $R/eval_mend_no_stage1.json > $R/eval_mend_no_stage1.log 2>&1 &
wait
# 4. zero-shot again, now with per-example predictions (same scores as the committed baselines), for the paired
#    bootstrap; then the comparisons, the curves and the per-class diagnosis of the recipe search
timed python eval.py $EVAL --methods zeroshot $BUDGETS --out $R/eval_zeroshot.json > $R/eval_zeroshot.log 2>&1
for m in mend mend_no_stage1; do python analyze.py --compare $R/eval_$m.json:mend,$R/eval_zeroshot.json:zeroshot; done | tee $R/compare.log
python analyze.py --curves $R/mend.log,$R/mend_no_stage1.log | tee $R/curves.log
for r in A_base C_relabel; do OMP_NUM_THREADS=1 python analyze.py --held_out --ckpt runs/$r.pt --data $D | grep -v "Loading weights" > results/recipe/held_out_$r.log; done
