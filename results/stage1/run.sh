#!/usr/bin/env bash
# Issue 30: stage 1 placed against its free prefix, from the repository root. Two chains side by side, one thread each:
#   plain:     python train.py --stage pretrain (the distiller's vectors alone), to 1,600 steps
#   truncated: the same with --base truncated (the LLM's embeddings of the last l demonstration-part tokens + gate *
#              the distiller's output, the gate at 0), to 3,200 steps
# Validation on the 48 held-out C4 documents every 200 steps; the checkpoints at 200, 400, 800, 1,600 (and 3,200) are
# kept as runs/stage1_{chain}_{step}.pt. Each segment is `--resume --max_steps N` on runs/stage1_{chain}.pt: with a
# constant lr, a run resumed at a larger --max_steps is the same run step for step, so the script continues where
# its checkpoints are (a run may span sessions) and starts again when runs/ is gone.
# Then each chain's longest stage 1 starts stage 2 with the labels-base recipe of results/seeds/run.sh (150 steps),
# seeds 100, 101, 102, each evaluated on class2class (100 examples, seed 100) with gold and random labels, agreement
# with ICL taken against results/free/baselines.json. Each command's wall time goes to $R/times.txt.
# Then the plot and fitted trends (curves.py) and each stage 2's summary over seeds (results/seeds/summary.py).
set -euo pipefail
D=../shared/data
R=results/stage1
BUDGETS="--k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
COMMON="--data $D --llm smollm2-135m --distiller layers:4 --n_vectors 32 $BUDGETS --batch 1 --warmup 20 --schedule constant --log_interval 10 --threads 1"
STAGE1="--stage pretrain $COMMON --c4_max_tokens 320 --lr 2e-4 --val_items 48 --eval_interval 200"
STAGE2="--stage finetune $COMMON --val_items 8 --relabel 0.5 --queries_per_demo 4 --lr 1e-4 --max_steps 150 --eval_interval 50 --partition class2class --base labels"
EVAL="--data $D --max_examples 100 --seeds 100 --threads 1 --partition class2class --methods mend --reference results/free/baselines.json"
mkdir -p runs $R
timed() { local t=$(date +%s); "$@"; echo "$(( $(date +%s) - t )) s: $*" >> $R/times.txt; }
ev() { local out=$1; shift; timed python eval.py $EVAL "$@" --out $R/$out.json 2>&1 | grep -v "Loading weights" > $R/$out.log; }

chain() {  # chain NAME BASE STEPS...: stage 1 to each of STEPS, then stage 2 from the last
  local name=$1 base=$2; shift 2
  local last
  for n in "$@"; do
    last=runs/stage1_${name}_$n.pt
    if [ ! -f $last ]; then
      timed python train.py $STAGE1 --base $base --max_steps $n --resume --out runs/stage1_$name.pt > /dev/null
      cp runs/stage1_$name.pt $last
    fi
    cp runs/stage1_$name.log $R/train_stage1_$name.log
  done
  for s in ${SEEDS:-100 101 102}; do
    local out=runs/stage2_${name}_$s.pt
    [ -f $out ] || timed python train.py $STAGE2 --init $last --seed $s --out $out > /dev/null
    cp runs/stage2_${name}_$s.log $R/train_stage2_${name}_$s.log
    [ -f $R/mend_${name}_$s.json ] || ev mend_${name}_$s --ckpt $out
    [ -f $R/mend_${name}_${s}_random.json ] || ev mend_${name}_${s}_random --ckpt $out --perturb random_labels
  done
}

chain plain none 200 400 800 1600 &
chain truncated truncated 200 400 800 1600 3200 &
wait
python results/stage1/curves.py | tee $R/curves.log
for name in plain truncated; do python results/seeds/summary.py $R/mend_$name | tee $R/summary_$name.log; done
