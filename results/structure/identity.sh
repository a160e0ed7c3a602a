#!/usr/bin/env bash
# Issue 40: the fixed set of commands whose scores and losses must not change when the code is reorganised. Run it
# from a checkout before and after a move, then compare: python results/structure/identity.py BEFORE AFTER
#   bash results/structure/identity.sh OUT     # OUT: a folder for the logs and JSON (about 10 minutes on 2 cores)
# The quick start's three commands (stage 1, stage 2, eval qa2qa); zero-shot, ICL and the three free prefixes on 20
# examples; 5-step stage 2 runs with --base labels, --base anchors and --base anchors --distiller none, each evaluated.
# One thread everywhere (the same thread count before and after is what makes the sums identical; one, so that
# jobs beside it do not slow it down by oversubscribing the cores).
set -euo pipefail
OUT=$(realpath -m "${1:?usage: results/structure/identity.sh OUT}")
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
T="--threads 1"
ev() { local name=$1; shift; python eval.py $T "$@" --out "$OUT/$name.json" 2>&1 | grep -v "Loading weights" > "$OUT/$name.out"; }
tr() { python train.py $T "$@" 2>&1 | grep -v "Loading weights" > /dev/null; }

tr --stage pretrain --out "$OUT/ckpt.pt"
tr --stage finetune --init "$OUT/ckpt.pt" --out "$OUT/mend.pt"
ev eval_qa2qa --partition qa2qa --ckpt "$OUT/mend.pt"
ev free --partition qa2qa --methods zeroshot,icl,truncated,labels,anchors --max_examples 20
S2="--stage finetune --max_steps 5 --eval_interval 5"
tr $S2 --base labels --init "$OUT/ckpt.pt" --out "$OUT/labels.pt"
tr $S2 --base anchors --init "$OUT/ckpt.pt" --out "$OUT/anchors.pt"
tr $S2 --base anchors --distiller none --out "$OUT/reweighted.pt"
for name in labels anchors reweighted; do ev eval_$name --partition qa2qa --methods mend --ckpt "$OUT/$name.pt" --max_examples 20; done
rm -f "$OUT"/*.pt
