"""How much of the fitted vectors' gain over zero-shot MEND closes, per task, on the ceiling's examples.

    python results/options/gap.py results/ceiling/class2class.json results/options/eval_mend.json:mend

The ceiling (analyze.py --ceiling) scores seed 100's demonstrations on the first N test examples; an eval.py JSON of
the same partition holds per-example predictions for seed 100 on at least those examples, so MEND is rescored on
exactly the ceiling's examples (same demonstrations, same scorer, same metric).
"""
import json
import sys

sys.path.insert(0, ".")
from data import accuracy, macro_f1  # noqa: E402

ceiling = json.load(open(sys.argv[1]))
path, method = sys.argv[2].rsplit(":", 1)
mend = json.load(open(path))["methods"][method]["tasks"]
rows = []
for task, zs in ceiling["methods"]["zeroshot"]["tasks"].items():
    n, metric = zs["n_examples"], macro_f1 if zs["metric"] == "macro_f1" else accuracy
    golds = zs["golds"]["100"]
    assert mend[task]["golds"]["100"][:n] == golds, task
    m = metric(mend[task]["predictions"]["100"][:n], golds)
    z, f = zs["score"], ceiling["methods"]["fitted"]["tasks"][task]["score"]
    rows.append((task, z, f, m))
    print(f"{task:28s} zero-shot {z:5.1f} | fitted {f:5.1f} | {method} {m:5.1f}")
z, f, m = (sum(r[i] for r in rows) / len(rows) for i in (1, 2, 3))
print(f"{'average':28s} zero-shot {z:5.1f} | fitted {f:5.1f} | {method} {m:5.1f} | "
      f"{method} closes {(m - z) / (f - z):+.0%} of the fitted vectors' gain over zero-shot ({f - z:+.1f} points)")
