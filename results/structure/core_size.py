"""
The core's size (every top-level .py but the tests, conftest.py and analyze.py) at a commit or in the
working tree: lines, characters, lines over 100 and over 120 characters, per file and in total.

    python results/structure/core_size.py [COMMIT]     # default: the working tree
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imports import source  # noqa: E402

CORE = ["model.py", "distill.py", "data.py", "train.py", "eval.py", "flops.py"]


def main(commit=None):
    rows = []
    for name in CORE:
        lines = source(name, commit).splitlines()
        rows.append((name, len(lines), sum(len(x) + 1 for x in lines), sum(len(x) > 100 for x in lines),
                     sum(len(x) > 120 for x in lines), max(map(len, lines))))
    total = [sum(r[i] for r in rows) for i in range(1, 5)] + [max(r[5] for r in rows)]
    for name, *r in rows + [("core", *total)]:
        print(f"{name:11s} {r[0]:5,} lines {r[1]:8,} characters  over 100: {r[2]:4} ({r[2] / r[0]:5.1%})"
              f"  over 120: {r[3]:3}  widest {r[4]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
