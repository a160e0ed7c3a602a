"""
The project's functions a newcomer crosses from `python train.py --stage pretrain` (default flags) to the first
loss: every function of the project's files entered, in order, until `mend_loss` first returns (class bodies,
lambdas and comprehensions are not counted).

    python results/structure/reading_path.py     # the functions in order, then the count per file
"""
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the default --data is the project's sample_data/
NEWLOCALS = 0x2  # inspect.CO_NEWLOCALS: set for functions, not for class bodies
SKIP = ("<module>", "<lambda>", "<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")


def trace(argv):
    """Run train.py's __main__ block with argv under a profiler -> [(file, function)] until the first loss."""
    project = {str(p) for p in ROOT.glob("*.py")} | {str(p) for p in ROOT.glob("extensions/*.py")}
    calls, done = [], []

    def profiler(frame, event, arg):
        code = frame.f_code
        if done or code.co_filename not in project or code.co_name in SKIP or not code.co_flags & NEWLOCALS:
            return  # a class body runs without new locals
        if event == "call":
            calls.append((Path(code.co_filename).relative_to(ROOT).as_posix(), code.co_name))
        elif event == "return" and code.co_name == "mend_loss":
            done.append(True)

    sys.argv = ["train.py", *argv]
    sys.setprofile(profiler)
    try:
        import runpy
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit:
        pass
    finally:
        sys.setprofile(None)
    return calls


def main():
    out = Path(tempfile.mkdtemp()) / "ckpt.pt"
    calls = trace(["--stage", "pretrain", "--max_steps", "1", "--out", str(out)])
    seen = list(dict.fromkeys(calls))
    for f, name in seen:
        print(f"{f}:{name}")
    files = Counter(f for f, _ in seen)
    print(f"{len(seen)} functions in {len(files)} files: "
          + ", ".join(f"{f} {n}" for f, n in files.most_common()))


if __name__ == "__main__":
    main()
