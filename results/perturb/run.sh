#!/usr/bin/env bash
# Issue 10, section 2 at CPU scale: ICL and MEND (results/real/mend.pt) on class2class with perturbed demonstrations,
# 30 test examples per task and seed 100 only (a smaller protocol than the main table, so compare rows here only).
# One job at a time on one thread, from the repository root after results/real/run.sh.
set -euo pipefail
D=../shared/data
R=results/perturb
P="--partition class2class --data $D --max_examples 30 --seeds 100 --threads 1 --ckpt results/real/mend.pt --k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
for perturb in gold random_labels no_labels no_inputs; do
  python eval.py $P --methods icl --perturb $perturb --out $R/icl_$perturb.json > $R/icl_$perturb.log 2>&1
  python eval.py $P --methods mend --perturb $perturb --out $R/mend_$perturb.json > $R/mend_$perturb.log 2>&1
done
python eval.py $P --methods zeroshot --out $R/zeroshot.json > $R/zeroshot.log 2>&1
