"""
Rescore a stored eval.py JSON with today's metric rule (data.is_classification: MetaICL's task type first) from its
stored predictions: no model is run, only the metric of a task whose type changed is recomputed (issue 23: wiqa is
multi-choice in MetaICL's configs, so accuracy, not macro-F1).

    python results/partitions/rescore.py results/partitions/eval_qa2qa.json results/partitions/eval_qa2qa_rescored.json
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402


def rescore(report):
    typed = data.METAICL_TYPES["multi-choice"] | data.METAICL_TYPES["classification"]
    for name, method in report["methods"].items():
        for task, r in method["tasks"].items():
            if task not in typed:
                continue
            metric = "macro_f1" if task in data.METAICL_TYPES["classification"] else "accuracy"
            if metric != r["metric"]:
                fn = data.macro_f1 if metric == "macro_f1" else data.accuracy
                r["per_seed"] = {s: fn(r["predictions"][s], r["golds"][s]) for s in r["golds"]}
                old, r["score"], r["metric"] = r["score"], float(np.mean(list(r["per_seed"].values()))), metric
                print(f"{name} {task}: {r['metric']} {r['score']:.2f} (was {old:.2f} by the option-set rule)")
        before = method["average"]
        method["average"] = float(np.mean([r["score"] for r in method["tasks"].values()]))
        print(f"{name} average: {method['average']:.2f} (was {before:.2f})")
    return report


if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    Path(dst).write_text(json.dumps(rescore(json.loads(Path(src).read_text())), indent=1))
