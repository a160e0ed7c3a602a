#!/usr/bin/env bash
# The first real-data run (issue 6; results/README.md). Today's default freezes the distiller's embeddings, so it passes --no-freeze_embeddings.
# The real-data run of the README (issue 6), from the repository root. It was run as two parallel chains on one
# thread each: (stage 1 -> stage 2 -> MEND eval -> nonpara2para baselines) and (baselines eval; MEND without stage 1
# -> its eval). Sequentially it takes about 3 hours on this 2-core CPU.
set -euo pipefail
export OMP_NUM_THREADS=1
D=../shared/data
BUDGETS="--k 16 --max_len_per_example 96 --teacher_demo_tokens 384 --distiller_demo_tokens 384"
COMMON="--data $D --llm smollm2-135m --distiller layers:4 --n_vectors 32 $BUDGETS --batch 1 --warmup 20 --log_interval 10 --val_items 8 --no-freeze_embeddings"
python train.py --stage pretrain $COMMON --c4_max_tokens 320 --lr 2e-4 --max_steps 300 --eval_interval 100 --out results/first_run/stage1.pt
python train.py --stage finetune $COMMON --partition class2class --init results/first_run/stage1.pt --lr 1e-4 --max_steps 400 --eval_interval 100 --out results/first_run/mend.pt
python train.py --stage finetune $COMMON --partition class2class --lr 1e-4 --max_steps 400 --eval_interval 100 --out results/first_run/mend_no_stage1.pt
python eval.py --partition class2class --data $D --methods zeroshot,icl --max_examples 100 --seeds 100,13 $BUDGETS --out results/eval_class2class_baselines.json > results/eval_class2class_baselines.log 2>&1
python eval.py --partition class2class --data $D --methods mend --ckpt results/first_run/mend.pt --max_examples 100 --seeds 100,13 --out results/first_run/eval_class2class_mend.json > results/first_run/eval_class2class_mend.log 2>&1
python eval.py --partition class2class --data $D --methods mend --ckpt results/first_run/mend_no_stage1.pt --max_examples 100 --seeds 100,13 --out results/first_run/eval_class2class_mend_no_stage1.json > results/first_run/eval_class2class_mend_no_stage1.log 2>&1
python eval.py --partition nonpara2para --data $D --methods zeroshot,icl --max_examples 100 --seeds 100,13 $BUDGETS --out results/eval_nonpara2para_baselines.json > results/eval_nonpara2para_baselines.log 2>&1
# the reference lines quoted in the README (what the vectors must beat): --max_steps 0 only computes them
python train.py --stage pretrain $COMMON --c4_max_tokens 320 --max_steps 0 --out runs/ref1.pt | grep "val reference" > results/first_run/val_reference_c4.log
python train.py --stage finetune $COMMON --partition class2class --max_steps 0 --out runs/ref.pt | grep "val reference" > results/first_run/val_reference_class2class.log
