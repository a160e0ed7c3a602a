"""
The README's table at MEND's length (l=32): each method's class2class score (100 examples, seed 100) with gold and
with random labels, from the committed JSON files, and its FLOPs per query from flops.method_flops with the
demonstration tokens eval.py measured (T = 64 query+option tokens, flops.py's default); then zero-shot, ICL and the
free prefixes on nonpara2para and qa2qa. A trained MEND is the mean
and range (min-max) over its training seeds (results/seeds); issue 16's single run is the seed-100 part of
results/real/final/mend.json and mend_random.json (that checkpoint was not kept).

    python results/free/table.py | tee results/free/table.log
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import flops  # noqa: E402

F, S = Path("results/free"), Path("results/seeds")


def seed_average(path, method, seed="100"):
    """A method's score on MetaICL seed 100, or None when the file was not made."""
    if not Path(path).exists():
        return None
    tasks = json.loads(Path(path).read_text())["methods"][method]["tasks"]
    return sum(t["per_seed"][seed] for t in tasks.values()) / len(tasks)


def over_seeds(name, suffix=""):
    """'mean [min, max] (n seeds)' of a trained setting over its training seeds, or None."""
    files = sorted(p for p in S.glob(f"{name}_*{suffix}.json") if re.fullmatch(rf"{name}_\d+{suffix}", p.stem))
    scores = [seed_average(p, "mend") for p in files]
    if not scores:
        return None
    return f"{sum(scores) / len(scores):.1f} [{min(scores):.1f}, {max(scores):.1f}] ({len(scores)} seeds)"


def cell(score):
    return "not run" if score is None else score if isinstance(score, str) else f"{score:.1f}"


def main():
    base = json.loads((F / "baselines.json").read_text())
    D, Dm, T, L = base["demo_tokens"]["icl"], base["demo_tokens"]["mend"], 64, 32
    f1, f100 = (flops.method_flops("smollm2-135m", D, T, L, q, "layers:4") for q in (1, 100))
    g = lambda key, reuse: f"{f1[key] / 1e9:.1f} / {f100[reuse] / 1e9:.1f}"
    h1, h100 = (flops.method_flops("smollm2-135m", D, T, 64, q, "layers:4") for q in (1, 100))
    g64 = lambda key, reuse: f"{h1[key] / 1e9:.1f} / {h100[reuse] / 1e9:.1f}"
    zs = seed_average(F / "baselines.json", "zeroshot")
    rows = [("zero-shot", zs, zs, g("zeroshot", "zeroshot")),
            ("truncated l=32", seed_average(F / "baselines.json", "truncated"),
             seed_average(F / "truncated_random.json", "truncated"), g("truncated", "truncated_reuse")),
            ("labels l=32", seed_average(F / "free32.json", "labels"), seed_average(F / "free32_random.json", "labels"),
             g("truncated", "truncated_reuse")),
            ("anchors l=32", seed_average(F / "free32.json", "anchors"), seed_average(F / "free32_random.json", "anchors"),
             g("anchors", "anchors_reuse")),
            ("anchors l=64", seed_average(F / "anchors64.json", "anchors"), seed_average(F / "anchors64_random.json", "anchors"),
             g64("anchors", "anchors_reuse")),
            ("MEND, issue 16 (one run)", seed_average("results/real/final/mend.json", "mend"),
             seed_average("results/real/final/mend_random.json", "mend"), g("mend", "mend_reuse")),
            ("MEND, paper (150 steps)", over_seeds("mend"), over_seeds("mend", "_random"), g("mend", "mend_reuse")),
            ("MEND, --base labels", over_seeds("mend_labels"), over_seeds("mend_labels", "_random"), g("mend", "mend_reuse")),
            ("MEND, --base truncated", over_seeds("mend_truncated"), over_seeds("mend_truncated", "_random"),
             g("mend", "mend_reuse")),
            ("ICL", seed_average(F / "baselines.json", "icl"), seed_average(F / "icl_random.json", "icl"),
             g("icl", "icl_reuse"))]
    print(f"D = {D:.0f} demonstration tokens (ICL), {Dm:.0f} (distiller); T = {T}; l = {L}; smollm2-135m + layers:4")
    print(f"{'method':26s} | {'gold':28s} | {'random labels':28s} | GFLOPs per query (1 / amortised over 100)")
    for name, gold, rand, fl in rows:
        print(f"{name:26s} | {cell(gold):28s} | {cell(rand):28s} | {fl}")
    other_partitions()


def other_partitions():
    """Step 2: zero-shot, ICL and the free prefixes at l=32 on two more partitions (50 examples, seed 100)."""
    methods = ("zeroshot", "icl", "labels", "anchors")
    print(f"\n{'partition (50 examples)':26s} | " + " | ".join(f"{m:>8s}" for m in methods))
    for name, file in (("nonpara2para", "para.json"), ("qa2qa", "qa.json")):
        print(f"{name:26s} | " + " | ".join(f"{cell(seed_average(F / file, m)):>8s}" for m in methods))


if __name__ == "__main__":
    main()
