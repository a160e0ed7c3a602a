#!/usr/bin/env bash
# Issue 10, section 2 at CPU scale: ICL and MEND (results/real/mend.pt) on class2class with perturbed demonstrations,
# 30 test examples per task and seed 100 only (a smaller protocol than the main table, so compare rows here only).
# One job at a time on one thread, from the repository root after results/real/issue9.sh; a rerun skips finished jobs.
set -euo pipefail
D=../shared/data
R=results/perturb
P="--partition class2class --data $D --max_examples 30 --seeds 100 --threads 1 --ckpt results/real/mend.pt --k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
job() { [ -f $R/$1.json ] || python eval.py $P "${@:2}" --out $R/$1.json > $R/$1.log 2>&1; }
for perturb in gold random_labels no_labels no_inputs; do
  job icl_$perturb --methods icl --perturb $perturb
  job mend_$perturb --methods mend --perturb $perturb
done
job zeroshot --methods zeroshot
