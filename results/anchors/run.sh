#!/usr/bin/env bash
# Issue 34: MEND on top of the anchors (train.py --base anchors, results/anchors/README.md), from the repository root.
# For l = 32 and l = 64 (the anchors' count = MEND's vectors), training seeds 100 101 102 of
#   mend_anchors{l}        issue 22's stage-2 recipe (results/seeds/run.sh) with --base anchors, from a stage-1
#                          checkpoint at that l: runs/seeds_stage1.pt (results/seeds/run.sh's stage 1) at l=32, the same
#                          command at --n_vectors 64 (runs/seeds_stage1_l64.pt) at l=64;
#   anchors_reweighted{l}  the same recipe with --distiller none: no vectors, a learned bias per layer and head on the
#                          anchor logits (the baseline: what training alone buys the anchors);
# each evaluated on class2class (100 examples, seed 100) with gold and random labels, agreement with ICL against
# results/free/baselines.json. One thread per job; each command's wall time goes to $R/times.txt. Resumable: a stage 1,
# a finished training (its log copied to $R) or an evaluation (its JSON in $R) that exists is skipped, and an
# interrupted training continues from its checkpoint in runs/ (--resume). Then the summaries (results/seeds/summary.py)
# and the paired bootstraps against the anchors at l=64 (results/free/anchors64.json).
set -euo pipefail
D=../shared/data
R=results/anchors
BUDGETS="--k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
COMMON="--data $D --llm smollm2-135m $BUDGETS --batch 1 --warmup 20 --schedule constant --log_interval 10 --val_items 8 --threads 1"
STAGE1="--stage pretrain $COMMON --distiller layers:4 --c4_max_tokens 320 --lr 2e-4 --max_steps 200 --eval_interval 100"
STAGE2="--stage finetune $COMMON --relabel 0.5 --queries_per_demo 4 --lr 1e-4 --max_steps 150 --eval_interval 50 --partition class2class --base anchors"
EVAL="--data $D --max_examples 100 --seeds 100 --threads 1 --partition class2class --methods mend --reference results/free/baselines.json"
mkdir -p runs $R
timed() { local t=$(date +%s); "$@"; echo "$(( $(date +%s) - t )) s: $*" >> $R/times.txt; }
ev() { local out=$1; shift; [ -f $R/$out.json ] || timed python eval.py $EVAL "$@" --out $R/$out.json 2>&1 | grep -v "Loading weights" > $R/$out.log; }
job() {  # NAME SEED FLAGS...: train (or finish) one seed, then evaluate it with gold and random labels
  local name=$1 s=$2 ckpt=runs/anchors_$1_$2.pt; shift 2
  [ -f $R/train_${name}_$s.log ] || { timed python train.py $STAGE2 "$@" --seed $s --resume --out $ckpt > /dev/null
                                      cp ${ckpt%.pt}.log $R/train_${name}_$s.log; }
  ev ${name}_$s --ckpt $ckpt
  ev ${name}_${s}_random --ckpt $ckpt --perturb random_labels
}
seeds() { local name=$1; shift; for s in 100 101 102; do job $name $s "$@" & done; wait; }

s1() { echo runs/seeds_stage1$([ $1 = 32 ] || echo _l$1).pt; }  # L -> the stage-1 checkpoint at l = L
stage1() {  # L: results/seeds/run.sh's stage 1 at --n_vectors L (its checkpoint is reused where it exists;
  local ckpt=$(s1 $1)  # nothing runs once every MEND-on-anchors training at L has its log in $R)
  ls $R/train_mend_anchors$1_{100,101,102}.log > /dev/null 2>&1 && return
  [ -f $ckpt ] || timed python train.py $STAGE1 --n_vectors $1 --out $ckpt > /dev/null
  cp ${ckpt%.pt}.log $R/train_stage1_l$1.log
}
for l in ${LS:-32 64}; do  # LS=32 runs l=32 only
  stage1 $l &  # the re-weighted anchors need no stage 1: they train beside it
  seeds anchors_reweighted$l --distiller none --n_vectors $l
  seeds mend_anchors$l --distiller layers:4 --n_vectors $l --init $(s1 $l)
done

for name in $(for l in ${LS:-32 64}; do echo mend_anchors$l anchors_reweighted$l; done); do
  python results/seeds/summary.py $R/$name | tee $R/summary_$name.log
done
{ for s in 100 101 102; do
    for l in ${LS:-32 64}; do python analyze.py --compare $R/mend_anchors${l}_$s.json:mend,$R/anchors_reweighted${l}_$s.json:mend; done
    for name in $([[ "${LS:-32 64}" != *64* ]] || echo mend_anchors64 anchors_reweighted64); do
      python analyze.py --compare $R/${name}_$s.json:mend,results/free/anchors64.json:anchors
    done
  done; } | tee $R/compare.log
