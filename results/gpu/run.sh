#!/usr/bin/env bash
# Issues 24 and 43: the GPU path at the paper's shapes in one command (see results/gpu/check.py for the steps); it exits
# non-zero when any step fails. Where the machine's transformers is older than requirements.txt's floor and a .whl/
# folder of wheels is present (transformers and what it needs that the machine lacks), they are installed first into
# /tmp/site, so that the check runs on our transformers, not the machine's (check.py refuses an older one).
#   bash results/gpu/run.sh OUT            on a CUDA machine, about 8 minutes (issue 49's steps not yet timed on a GPU)
#   bash results/gpu/run.sh OUT --smoke    the same on CPU, tiny shapes, under 2 minutes
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: results/gpu/run.sh OUT [--smoke] [--fail STEP]}; shift
# the installed version from its metadata: importing transformers here would cost a few seconds per call
old=$(python3 -c "import importlib.metadata as m, re; n = lambda v: tuple(int(x) for x in re.findall(r'\d+', v)[:3])
print(int(n(m.version('transformers')) < n(next(l for l in open('requirements.txt') if l.startswith('transformers')).split('>=')[1])))")
if [ "$old" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# offline, so no hub kernels: transformers (5.25) would kernelize every model it loads and needs the `kernels` package
export USE_HUB_KERNELS=0
PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 results/gpu/check.py "$OUT" "$@" 2>&1 | grep -v "Loading weights\|Writing model shards"
