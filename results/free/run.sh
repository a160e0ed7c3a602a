#!/usr/bin/env bash
# Issue 21: the free prefixes at MEND's length (truncated, labels, anchors) beside zero-shot and ICL, from the
# repository root. Protocol: class2class, 100 examples, seed 100 (the baselines are deterministic); then nonpara2para
# and qa2qa at 50 examples. Two chains side by side, one thread each; each command's wall time goes to $R/times.txt.
# An evaluation whose JSON exists is skipped. Issue 44 added the labels prefix at l=64 (labels64[_random]).
set -euo pipefail
D=../shared/data
R=results/free
BUDGETS="--k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
EVAL="--data $D --max_examples 100 --seeds 100 --threads 1 $BUDGETS"
mkdir -p $R
timed() { local t=$(date +%s); "$@"; echo "$(( $(date +%s) - t )) s: $*" >> $R/times.txt; }
ev() { local out=$1; shift; [ -f $R/$out.json ] || timed python eval.py $EVAL "$@" --out $R/$out.json 2>&1 | grep -v "Loading weights" > $R/$out.log; }

# 1. class2class: every method under one protocol, gold and random labels
(ev baselines --partition class2class --methods zeroshot,icl,truncated --n_vectors 32
 ev icl_random --partition class2class --methods icl --perturb random_labels
 ev truncated_random --partition class2class --methods truncated --n_vectors 32 --perturb random_labels
 ev anchors64_random --partition class2class --methods anchors --n_vectors 64 --perturb random_labels
 ev labels64 --partition class2class --methods labels --n_vectors 64) &
(ev free32 --partition class2class --methods labels,anchors --n_vectors 32
 ev free32_random --partition class2class --methods labels,anchors --n_vectors 32 --perturb random_labels
 ev anchors64 --partition class2class --methods anchors --n_vectors 64
 ev labels64_random --partition class2class --methods labels --n_vectors 64 --perturb random_labels) &
wait

# 2. two more partitions, 50 examples
(ev para --partition nonpara2para --methods zeroshot,icl,labels,anchors --n_vectors 32 --max_examples 50) &
(ev qa --partition qa2qa --methods zeroshot,icl,labels,anchors --n_vectors 32 --max_examples 50) &
wait

# 3. paired bootstraps: the free prefixes against zero-shot, truncated and ICL; gold against random labels
B=$R/baselines.json
{ for m in labels anchors; do
    for b in zeroshot truncated icl; do python analyze.py --compare $R/free32.json:$m,$B:$b; done
    python analyze.py --compare $R/free32.json:$m,$R/free32_random.json:$m
  done
  python analyze.py --compare $R/anchors64.json:anchors,$B:icl
  python analyze.py --compare $R/anchors64.json:anchors,$R/free32.json:anchors
  python analyze.py --compare $R/anchors64.json:anchors,$R/anchors64_random.json:anchors
  python analyze.py --compare $R/labels64.json:labels,$R/labels64_random.json:labels
  python analyze.py --compare $R/labels64.json:labels,$B:icl
  python analyze.py --compare $B:icl,$R/icl_random.json:icl
  python analyze.py --compare $B:truncated,$R/truncated_random.json:truncated
  for p in para qa; do
    for m in labels anchors; do python analyze.py --compare $R/$p.json:$m,$R/$p.json:zeroshot; done
    python analyze.py --compare $R/$p.json:anchors,$R/$p.json:icl
  done; } | tee $R/compare.log
