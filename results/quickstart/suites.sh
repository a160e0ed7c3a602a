#!/usr/bin/env bash
# Issue 41: the README's test command on this commit, then the suite before issue 41 (6e63ef2, whose tests are
# e2d6eee's), back to back, each with --durations=15 and its wall time. Run it on an otherwise idle machine:
#   git worktree add ../before 6e63ef2 && bash results/quickstart/suites.sh ../before | tee results/quickstart/pytest_durations.log
set -euo pipefail
BEFORE=$(cd "${1:?usage: results/quickstart/suites.sh WORKTREE_AT_6e63ef2}" && pwd)
stamp() { echo "$(date +%T), $(uptime)"; }
echo "== new suite ($(git rev-parse --short HEAD)): python -m pytest -q test_mend.py extensions, $(stamp)"
( time python -m pytest -q -p no:cacheprovider test_mend.py extensions --durations=15 ) 2>&1
echo "== old suite ($(git -C "$BEFORE" rev-parse --short HEAD)): python -m pytest -q test_mend.py, $(stamp)"
( cd "$BEFORE" && time python -m pytest -q -p no:cacheprovider test_mend.py --durations=15 ) 2>&1
echo "== end $(stamp)"
