"""
Issue 30: stage 1's validation KL against steps, for the plain distiller and the one started from the truncated
prefix (--base truncated), between the two references of the same 48 held-out C4 documents: the LLM reading the
query with no prefix, and the LLM reading the last l demonstration-part tokens (truncated). Each curve gets a fitted
trend, KL = a + b * log2(steps) (b: the change per doubling of steps), and for the plain one the step count at which
that trend would meet truncated. Reads the train.py logs that results/stage1/run.sh copies here.

    python results/stage1/curves.py | tee results/stage1/curves.log   # + results/stage1/curves.png with matplotlib
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from analyze import pyplot, save_figure  # noqa: E402

R = Path("results/stage1")


def read_log(path):
    """-> (no-prefix KL, truncated KL, [(step, val KL)]) from a train.py stage-1 log (its segments appended)."""
    lines = Path(path).read_text().splitlines()
    ref = next(x for x in lines if x.startswith("val reference"))
    alone, truncated = float(ref.split("kl ")[1].split()[0]), float(ref.split("kl ")[-1])
    points = {int(x.split()[1]): float(x.split("val kl ")[1].split()[0]) for x in lines if "| val kl " in x}
    return alone, truncated, sorted(points.items())


def trend(points):
    """Least-squares KL = a + b * log2(step) -> (a, b)."""
    steps, kl = np.array(points, dtype=float).T
    b, a = np.polyfit(np.log2(steps), kl, 1)
    return a, b


def main():
    curves = {name: read_log(R / f"train_stage1_{name}.log") for name in ("plain", "truncated")
              if (R / f"train_stage1_{name}.log").exists()}
    alone, truncated = next(iter(curves.values()))[:2]
    print(f"references on the 48 held-out documents: no prefix {alone:.4f}, truncated (last 32 tokens) {truncated:.4f}")
    fits = {}
    for name, (_, _, points) in curves.items():
        fits[name] = a, b = trend(points)
        print(f"{name:9s} " + "  ".join(f"{s}: {kl:.4f}" for s, kl in points))
        line = f"{name:9s} trend: KL = {a:.4f} {b:+.4f} * log2(steps) ({b:+.4f} per doubling)"
        if name == "plain":
            line += (f"; meets truncated at about {2 ** ((truncated - a) / b):,.0f} steps" if b < 0
                     else "; not falling: never meets truncated")
        print(line)
    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, (_, _, points) in curves.items():
            steps = np.array([s for s, _ in points])
            dots, = ax.plot(steps, [kl for _, kl in points], marker="o", label=name)
            grid = np.geomspace(steps.min(), steps.max() * (64 if name == "plain" else 1))
            a, b = fits[name]
            ax.plot(grid, a + b * np.log2(grid), linestyle=":", color=dots.get_color(), label=f"{name}, trend")
        for label, value in (("no prefix", alone), ("truncated", truncated)):
            ax.axhline(value, linestyle="--", color="gray")
            ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize=8)
        ax.set_xscale("log")
        ax.set(xlabel="stage-1 steps", ylabel="validation KL (48 C4 documents)", title="stage 1 against its free prefix")
        ax.legend(fontsize=7)
        save_figure(fig, R / "curves.png")


if __name__ == "__main__":
    main()
