#!/usr/bin/env bash
# Issue 10, section 1 at CPU scale: the paper's baselines trained with the recipe and budget of results/real/issue9.sh
# (same meta-train tasks, items, steps, budgets), from the repository root after results/real/issue9.sh (it needs
# results/real/stage1.pt). Every job runs on one thread, two at a time, as the logs were made.
#  - PromptTuning: 32 shared vectors, answer CE only; lr 1e-3 (soft prompts are usually trained with a larger rate than
#    a network; one untuned point) and no label remapping (vectors that never read the demonstrations cannot follow a
#    remapping); 700 steps like MEND's stage 2.
#  - MEND without distillation (lambda 0, CE only): the MEND recipe otherwise, with stage 1 (700 steps) and without
#    (900 steps), like the two MEND rows.
set -euo pipefail
D=../shared/data
R=results/baselines
BUDGETS="--k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
COMMON="--data $D --llm smollm2-135m --n_vectors 32 $BUDGETS --batch 1 --warmup 20 --schedule constant --log_interval 10 --val_items 8 --threads 1"
STAGE2="--stage finetune --partition class2class --val_tasks 4 --val_task_examples 40 $COMMON --lam 0"
EVAL="--partition class2class --data $D --max_examples 100 --seeds 100,13 --threads 1"
timed() { local t=$(date +%s); "$@"; echo "$(( $(date +%s) - t )) s: $*" >> $R/times.txt; }
train_eval() {  # name, then train.py arguments
  timed python train.py $STAGE2 "${@:2}" --out $R/$1.pt > /dev/null
  timed python eval.py $EVAL --methods mend --ckpt $R/$1.pt --out $R/eval_$1.json > $R/eval_$1.log 2>&1
}
(train_eval prompt_tuning --distiller prompt --lr 1e-3 --max_steps 700 --eval_interval 150
 train_eval mend_no_kd --distiller layers:4 --init results/real/stage1.pt --lr 1e-4 --relabel 0.5 --max_steps 700 --eval_interval 150) &
(train_eval mend_no_kd_no_stage1 --distiller layers:4 --lr 1e-4 --relabel 0.5 --max_steps 900 --eval_interval 150) &
wait
for m in prompt_tuning mend_no_kd mend_no_kd_no_stage1; do
  python analyze.py --compare $R/eval_$m.json:$(python -c "import json;print(*json.load(open('$R/eval_$m.json'))['methods'])"),results/real/eval_zeroshot.json:zeroshot
done | tee $R/compare.log
# with against without distillation (the MEND rows of results/real)
python analyze.py --compare results/real/eval_mend.json:mend,$R/eval_mend_no_kd.json:mend_no_kd | tee -a $R/compare.log
python analyze.py --compare results/real/eval_mend_no_stage1.json:mend,$R/eval_mend_no_kd_no_stage1.json:mend_no_kd | tee -a $R/compare.log
python analyze.py --curves results/real/mend.log,$R/mend_no_kd.log,$R/prompt_tuning.log,results/real/mend_no_stage1.log,$R/mend_no_kd_no_stage1.log --png $R/curves.png | tee $R/curves.log
