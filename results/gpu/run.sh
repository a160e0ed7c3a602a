#!/usr/bin/env bash
# Issue 24: the GPU path at the paper's shapes in one command (see results/gpu/check.py for the steps);
# issue 31 added random-init T5-large with its distiller (first 4 encoder blocks) in bf16.
#   bash results/gpu/run.sh OUT            on a CUDA machine, under 8 minutes
#   bash results/gpu/run.sh OUT --smoke    the same on CPU, tiny shapes, under 2 minutes
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: results/gpu/run.sh OUT [--smoke]}; shift
PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 results/gpu/check.py "$OUT" "$@" 2>&1 | grep -v "Loading weights\|Writing model shards"
