"""
MEND over training seeds against the free prefixes at its length (issue 22): each seed's class2class score with gold
and random labels, the mean and spread (min-max) over seeds, and per seed the paired bootstrap against zero-shot, ICL,
truncated, labels and anchors (results/free, the same examples: class2class, 100 examples, seed 100). The anchors and
the labels prefix are those at the run's own length (its JSON's n_vectors: 32 or 64); truncated is at l=32.

    python results/seeds/summary.py [NAME [SEED ...]]   # NAME: mend (the paper's, default), mend_labels, mend_labels_lam4, ...
    python results/seeds/summary.py results/stage1/mend_plain   # a NAME with a folder reads that folder

Each seed's agreement with ICL (the share of examples where MEND picks ICL's option, gold labels) is printed beside
its score, with the paired bootstrap of the agreement against anchors.
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import analyze  # noqa: E402
import eval as evaluate  # noqa: E402

R, F = Path("results/seeds"), Path("results/free")
ANCHORS = {32: F / "free32.json", 64: F / "anchors64.json"}  # l -> the results/free file with the anchors at l
LABELS = {32: F / "free32.json", 64: F / "labels64.json"}  # l -> the results/free file with the labels prefix at l


def tasks(path, method):
    return json.loads(Path(path).read_text())["methods"][method]["tasks"]


def average(t):
    return sum(r["score"] for r in t.values()) / len(t)


def agreement(t, icl):
    """Agreement with ICL (%), per task then averaged, on MetaICL seed 100."""
    return sum(evaluate.agreement(r["predictions"]["100"], icl[task]["predictions"]["100"]) for task, r in t.items()) / len(t)


def with_reference(t, icl):
    """Tasks with ICL's predictions as their agreement reference (what eval.py --reference stores)."""
    return {task: {**r, "reference": icl[task]["predictions"], "agreement": evaluate.agreement(
        r["predictions"]["100"], icl[task]["predictions"]["100"])} for task, r in t.items()}


def main(name="mend", seeds=()):
    global R
    R, name = (Path(name).parent, Path(name).name) if "/" in name else (R, name)
    seeds = seeds or sorted(m[1] for p in R.glob("*.json") if (m := re.fullmatch(rf"{name}_(\d+)", p.stem)))
    l = json.loads((R / f"{name}_{seeds[0]}.json").read_text())["n_vectors"]
    if l not in ANCHORS:
        raise SystemExit(f"error: {R / name}_{seeds[0]}.json: l={l}, but results/free has the anchors at l={sorted(ANCHORS)} only")
    free = {"zeroshot": tasks(F / "baselines.json", "zeroshot"), "icl": tasks(F / "baselines.json", "icl"),
            "truncated": tasks(F / "baselines.json", "truncated"), "labels": tasks(LABELS[l], "labels"),
            "anchors": tasks(ANCHORS[l], "anchors")}
    lengths = "l=32" if l == 32 else f"l=32; anchors and labels l={l}"
    print(f"free prefixes ({lengths}) and baselines: " + ", ".join(f"{m} {average(t):.1f}" for m, t in free.items()))
    gold, rand = {}, {}
    for s in seeds:
        gold[s] = tasks(R / f"{name}_{s}.json", "mend")
        random_file = R / f"{name}_{s}_random.json"
        rand[s] = tasks(random_file, "mend") if random_file.exists() else None
        line = f"seed {s}: gold {average(gold[s]):.1f}, agreement with ICL {agreement(gold[s], free['icl']):.1f}"
        if rand[s]:
            diff, lo, hi, _ = analyze.paired_bootstrap(gold[s], rand[s])
            line += f", random labels {average(rand[s]):.1f} (gold - random {diff:+.2f} [{lo:+.2f}, {hi:+.2f}])"
        print(line)
        for m, t in free.items():
            diff, lo, hi, _ = analyze.paired_bootstrap(gold[s], t)
            print(f"    MEND - {m:9s} {diff:+6.2f} [{lo:+.2f}, {hi:+.2f}]")
        a, b = with_reference(gold[s], free["icl"]), with_reference(free["anchors"], free["icl"])
        diff, lo, hi, _ = analyze.paired_bootstrap(a, b, key="agreement")
        print(f"    agreement with ICL, MEND - anchors {diff:+6.2f} [{lo:+.2f}, {hi:+.2f}]")
    agreements = [agreement(t, free["icl"]) for t in gold.values()]
    print(f"{name} agreement with ICL over {len(agreements)} seeds: mean {sum(agreements) / len(agreements):.1f}, "
          f"min {min(agreements):.1f}, max {max(agreements):.1f} (anchors {agreement(free['anchors'], free['icl']):.1f})")
    scores = [average(t) for t in gold.values()]
    print(f"{name} over {len(scores)} seeds: mean {sum(scores) / len(scores):.1f}, min {min(scores):.1f}, "
          f"max {max(scores):.1f} (spread {max(scores) - min(scores):.1f})")
    randoms = [average(t) for t in rand.values() if t]
    if randoms:
        print(f"{name} random labels over {len(randoms)} seeds: mean {sum(randoms) / len(randoms):.1f}, "
              f"min {min(randoms):.1f}, max {max(randoms):.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:2], seeds=sys.argv[2:])
