"""
The README's table at MEND's length (l=32): each method's class2class score (100 examples, seed 100) from the
committed JSON files, and its FLOPs per query from flops.method_flops with the demonstration tokens eval.py measured
(T = 64 query+option tokens, flops.py's default). MEND's seed-100 scores come from issue 16's final run
(results/real/final/mend.json and mend_random.json, per-seed entries; that checkpoint was not kept).

    python results/free/table.py | tee results/free/table.log
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import flops  # noqa: E402


def seed_average(path, method, seed="100"):
    tasks = json.loads(Path(path).read_text())["methods"][method]["tasks"]
    return sum(t["per_seed"][seed] for t in tasks.values()) / len(tasks)


def main():
    base = json.loads(Path("results/free/baselines.json").read_text())
    D, Dm, T, L = base["demo_tokens"]["icl"], base["demo_tokens"]["mend"], 64, 32
    f1, f100 = (flops.method_flops("smollm2-135m", D, T, L, q, "layers:4") for q in (1, 100))
    g = lambda key, reuse: f"{f1[key] / 1e9:.2f} / {f100[reuse] / 1e9:.2f}"
    rows = [("zero-shot", "results/free/baselines.json", "zeroshot", g("zeroshot", "zeroshot")),
            ("truncated l=32", "results/free/baselines.json", "truncated", g("truncated", "truncated_reuse")),
            ("labels l=32", "results/free/free32.json", "labels", g("truncated", "truncated_reuse")),
            ("anchors l=32", "results/free/free32.json", "anchors", g("anchors", "anchors_reuse")),
            ("MEND l=32 (issue 16, one training run)", "results/real/final/mend.json", "mend", g("mend", "mend_reuse")),
            ("ICL", "results/free/baselines.json", "icl", g("icl", "icl_reuse"))]
    print(f"D = {D:.0f} demonstration tokens (ICL), {Dm:.0f} (distiller); T = {T}; l = {L}; smollm2-135m + layers:4")
    for name, path, method, fl in rows:
        print(f"{name:40s} {seed_average(path, method):5.1f}   GFLOPs per query (1 / amortised over 100): {fl}")
    print(f"{'MEND random labels (issue 16)':40s} {seed_average('results/real/final/mend_random.json', 'mend'):5.1f}")


if __name__ == "__main__":
    main()
