#!/usr/bin/env bash
# Issue 22: MEND over three training seeds, from the repository root. BASE=none (default) is the paper's MEND;
# BASE=labels or BASE=truncated starts it from that free prefix (train.py --base). Stage 1 as in results/real/run.sh
# (200 steps on C4; skipped when its checkpoint $S1.pt exists: never start this while stage 1 is still running), then
# issue 16's final stage-2 recipe at 150 steps (150 and 250 steps did not differ beyond noise) with --seed 100, 101,
# 102; each checkpoint evaluated on class2class (100 examples, seed 100) with gold and with random labels. One thread
# per job; each command's wall time goes to $R/times.txt. Resumable: a finished training (its log in $R) or evaluation
# (its JSON in $R) is skipped, and an interrupted training continues from its checkpoint in runs/ (--resume). Then: python results/seeds/summary.py $NAME
#     BASE=labels bash results/seeds/run.sh        # -> results/seeds/mend_labels_{seed}[_random].json
# EXTRA adds stage-2 flags to the recipe under the name suffix TAG (one change at a time):
#     BASE=labels EXTRA="--lam 4" TAG=lam4 bash results/seeds/run.sh   # -> results/seeds/mend_labels_lam4_{seed}...
# DISTILLER (default layers:4) sets the distiller of both stages; another one gets its own stage-1 checkpoint.
# L (default 32) sets the number of vectors of both stages (issue 44: L=64 is the paper's compression ratio); L=64
# names its runs *_l64 and reuses the stage-1 checkpoint at that l (runs/seeds_stage1_l64.pt, results/anchors/run.sh's):
#     L=64 bash results/seeds/run.sh                   # -> results/seeds/mend_l64_{seed}[_random].json
# S1BASE=truncated trains that stage 1 with --base truncated (issue 30: does a stage 1 that starts at the truncated
# prefix make a better stage 2?); it gets its own stage-1 checkpoint and the name suffix s1truncated:
#     S1BASE=truncated BASE=labels bash results/seeds/run.sh   # -> results/seeds/mend_labels_s1truncated_{seed}...
set -euo pipefail
D=../shared/data
R=results/seeds
BASE=${BASE:-none}
S1BASE=${S1BASE:-none}
L=${L:-32}
LTAG=$([ "$L" = 32 ] || echo _l$L)
NAME=$([ "$BASE" = none ] && echo mend || echo mend_$BASE)$([ "$S1BASE" = none ] || echo _s1$S1BASE)${TAG:+_$TAG}$LTAG
DISTILLER=${DISTILLER:-layers:4}
S1=runs/seeds_stage1$([ "$DISTILLER" = layers:4 ] || echo "_${DISTILLER/:/}")$([ "$S1BASE" = none ] || echo _$S1BASE)$LTAG
BUDGETS="--k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
COMMON="--data $D --llm smollm2-135m --distiller $DISTILLER --n_vectors $L $BUDGETS --batch 1 --warmup 20 --schedule constant --log_interval 10 --val_items 8 --threads 1"
STAGE2="--stage finetune $COMMON --relabel 0.5 --queries_per_demo 4 --lr 1e-4 --max_steps 150 --eval_interval 50 --partition class2class --init $S1.pt --base $BASE ${EXTRA:-}"
EVAL="--data $D --max_examples 100 --seeds 100 --threads 1 --partition class2class --methods mend"
mkdir -p runs $R
timed() { local t=$(date +%s); "$@"; echo "$(( $(date +%s) - t )) s: $*" >> $R/times.txt; }
ev() { local out=$1; shift; [ -f $R/$out.json ] || timed python eval.py $EVAL "$@" --out $R/$out.json 2>&1 | grep -v "Loading weights" > $R/$out.log; }

[ -f $S1.pt ] || timed python train.py --stage pretrain $COMMON --c4_max_tokens 320 --lr 2e-4 --max_steps 200 --eval_interval 100 --base $S1BASE --out $S1.pt > /dev/null
cp $S1.log $R/train_${S1#runs/seeds_}.log
for s in ${SEEDS:-100 101 102}; do
  ([ -f $R/train_${NAME}_$s.log ] || { timed python train.py $STAGE2 --seed $s --resume --out runs/seeds_${NAME}_$s.pt > /dev/null
                                      cp runs/seeds_${NAME}_$s.log $R/train_${NAME}_$s.log; }
   ev ${NAME}_$s --ckpt runs/seeds_${NAME}_$s.pt
   ev ${NAME}_${s}_random --ckpt runs/seeds_${NAME}_$s.pt --perturb random_labels) &
done
wait
python results/seeds/summary.py $NAME | tee $R/summary_$NAME.log
