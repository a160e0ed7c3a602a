"""
Issue 40: do two runs of results/structure/identity.sh give the same scores and losses? Compares every eval JSON's
scores and predictions and every training log's step, validation and reference lines (timings stripped).

    python results/structure/identity.py BEFORE AFTER     # prints one line per file and exits 1 on any difference
"""
import json
import re
import sys
from pathlib import Path

TIMING = re.compile(r" \| \d+ms \|.*$|, \d+s,.*$| in \d+s| -> .*$")  # timings and the output path


def log_lines(path):
    """The deterministic lines of a training log: loss, validation and reference lines without their timings."""
    keep = [line for line in path.read_text().splitlines() if line.startswith(("step ", "val reference", "done:"))]
    return [TIMING.sub("", line) for line in keep]


def scores(path):
    """method -> task -> (score, predictions per seed) of an eval JSON."""
    report = json.loads(path.read_text())
    return {m: {t: (r["score"], r["predictions"]) for t, r in v["tasks"].items()} for m, v in report["methods"].items()}


def main(before, after):
    same = True
    for b in sorted(before.glob("*.log")) + sorted(before.glob("*.json")):
        a = after / b.name
        equal = a.exists() and (log_lines(a) == log_lines(b) if b.suffix == ".log" else scores(a) == scores(b))
        same &= equal
        print(f"{b.name}: {'identical' if equal else 'DIFFERENT' if a.exists() else 'MISSING after'}")
    return same


if __name__ == "__main__":
    sys.exit(0 if main(Path(sys.argv[1]), Path(sys.argv[2])) else 1)
