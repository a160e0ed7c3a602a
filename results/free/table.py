"""
The README's table at MEND's length (l=32): each method's class2class score (100 examples, seed 100) with gold and
with random labels and its agreement with ICL (the share of examples where it picks ICL's option, gold labels), from
the committed JSON files, and its FLOPs per query from extensions.method_flops with the
demonstration tokens eval.py measured (T = 64 query+option tokens, flops.py's default); then zero-shot, ICL and the
free prefixes on nonpara2para and qa2qa. A trained MEND is the mean
and range (min-max) over its training seeds (results/seeds); issue 16's single run is the seed-100 part of
results/real/final/mend.json and mend_random.json (that checkpoint was not kept); MEND on the anchors and the
re-weighted anchors are results/anchors (issue 34).

    python results/free/table.py | tee results/free/table.log
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import eval as evaluate  # noqa: E402
import extensions  # noqa: E402

F, S, A = Path("results/free"), Path("results/seeds"), Path("results/anchors")
ICL = json.loads((F / "baselines.json").read_text())["methods"]["icl"]["tasks"]


def seed_average(path, method, seed="100"):
    """A method's score on MetaICL seed 100, or None when the file was not made."""
    if not Path(path).exists():
        return None
    tasks = json.loads(Path(path).read_text())["methods"][method]["tasks"]
    return sum(t["per_seed"][seed] for t in tasks.values()) / len(tasks)


def agreement(path, method, seed="100"):
    """A method's agreement with ICL (results/free/baselines.json, the same examples) on MetaICL seed 100, or None."""
    if not Path(path).exists():
        return None
    tasks = json.loads(Path(path).read_text())["methods"][method]["tasks"]
    return sum(evaluate.agreement(t["predictions"][seed], ICL[task]["predictions"][seed])
               for task, t in tasks.items()) / len(tasks)


def over_seeds(name, suffix="", measure=seed_average, folder=S):
    """'mean [min, max] (n seeds)' of a trained setting over its training seeds, or None."""
    files = sorted(p for p in folder.glob(f"{name}_*{suffix}.json") if re.fullmatch(rf"{name}_\d+{suffix}", p.stem))
    scores = [measure(p, "mend") for p in files]
    if not scores:
        return None
    return f"{sum(scores) / len(scores):.1f} [{min(scores):.1f}, {max(scores):.1f}] ({len(scores)} seeds)"


def trained(label, name, folder=S):
    """A trained setting's row: gold, random labels and agreement over its training seeds."""
    return (label, over_seeds(name, folder=folder), over_seeds(name, "_random", folder=folder),
            over_seeds(name, measure=agreement, folder=folder))


def cell(score):
    return "not run" if score is None else score if isinstance(score, str) else f"{score:.1f}"


def main():
    base = json.loads((F / "baselines.json").read_text())
    D, Dm, T, L = base["demo_tokens"]["icl"], base["demo_tokens"]["mend"], 64, 32
    f1, f100 = (extensions.method_flops("smollm2-135m", D, T, L, q, "layers:4") for q in (1, 100))
    g = lambda key, reuse: f"{f1[key] / 1e9:.1f} / {f100[reuse] / 1e9:.1f}"
    h1, h100 = (extensions.method_flops("smollm2-135m", D, T, 64, q, "layers:4") for q in (1, 100))
    g64 = lambda key, reuse: f"{h1[key] / 1e9:.1f} / {h100[reuse] / 1e9:.1f}"
    free = lambda label, file, rand, m: (label, seed_average(F / file, m), seed_average(F / rand, m), agreement(F / file, m))
    rows = [(*free("zero-shot", "baselines.json", "baselines.json", "zeroshot"), g("zeroshot", "zeroshot")),
            (*free("truncated l=32", "baselines.json", "truncated_random.json", "truncated"), g("truncated", "truncated_reuse")),
            (*free("labels l=32", "free32.json", "free32_random.json", "labels"), g("truncated", "truncated_reuse")),
            (*free("anchors l=32", "free32.json", "free32_random.json", "anchors"), g("anchors", "anchors_reuse")),
            (*free("anchors l=64", "anchors64.json", "anchors64_random.json", "anchors"), g64("anchors", "anchors_reuse")),
            (*free("labels l=64", "labels64.json", "labels64_random.json", "labels"), g64("truncated", "truncated_reuse")),
            ("MEND, issue 16 (one run)", seed_average("results/real/final/mend.json", "mend"),
             seed_average("results/real/final/mend_random.json", "mend"), agreement("results/real/final/mend.json", "mend"),
             g("mend", "mend_reuse")),
            (*trained("MEND, paper (150 steps)", "mend"), g("mend", "mend_reuse")),
            (*trained("MEND, --base labels", "mend_labels"), g("mend", "mend_reuse")),
            (*trained("MEND, paper, l=64", "mend_l64"), g64("mend", "mend_reuse")),
            (*trained("MEND, --base labels, l=64", "mend_labels_l64"), g64("mend", "mend_reuse")),
            (*trained("MEND, --base truncated", "mend_truncated"), g("mend", "mend_reuse")),
            (*trained("MEND labels, stage 1 trunc.", "mend_labels_s1truncated"), g("mend", "mend_reuse")),
            (*trained("MEND labels, stage 1 1,600", "mend_plain", Path("results/stage1")), g("mend", "mend_reuse")),
            (*trained("MEND labels, s1 trunc. 3,200", "mend_truncated", Path("results/stage1")), g("mend", "mend_reuse")),
            (*trained("anchors re-weighted l=32", "anchors_reweighted32", A), g("anchors_reweighted", "anchors_reweighted_reuse")),
            (*trained("MEND on anchors l=32", "mend_anchors32", A), g("mend_anchors", "mend_anchors_reuse")),
            (*trained("anchors re-weighted l=64", "anchors_reweighted64", A), g64("anchors_reweighted", "anchors_reweighted_reuse")),
            (*trained("MEND on anchors l=64", "mend_anchors64", A), g64("mend_anchors", "mend_anchors_reuse")),
            (*free("ICL", "baselines.json", "icl_random.json", "icl"), g("icl", "icl_reuse"))]
    print(f"D = {D:.0f} demonstration tokens (ICL), {Dm:.0f} (distiller); T = {T}; l = {L}; smollm2-135m + layers:4")
    print(f"{'method':28s} | {'gold':28s} | {'random labels':28s} | {'agreement with ICL':28s} | GFLOPs per query "
          f"(1 / amortised over 100)")
    for name, gold, rand, agree, fl in rows:
        print(f"{name:28s} | {cell(gold):28s} | {cell(rand):28s} | {cell(agree):28s} | {fl}")
    other_partitions()


def other_partitions():
    """Step 2: zero-shot, ICL and the free prefixes at l=32 on two more partitions (50 examples, seed 100)."""
    methods = ("zeroshot", "icl", "labels", "anchors")
    print(f"\n{'partition (50 examples)':26s} | " + " | ".join(f"{m:>8s}" for m in methods))
    for name, file in (("nonpara2para", "para.json"), ("qa2qa", "qa.json")):
        print(f"{name:26s} | " + " | ".join(f"{cell(seed_average(F / file, m)):>8s}" for m in methods))


if __name__ == "__main__":
    main()
