"""Does a checkpoint's MEND read the demonstrations' labels on tasks where the teacher does?

    python results/real/label_probe.py results/real/final/judge_scan.log runs/final_mend.pt runs/final_no_stage1.pt

The tasks are the ones the label-sensitive judge kept in its scan (the log's "held out of training" line; ICL drops by
5+ macro-F1 with random labels there). The final runs trained without the judge, so these tasks were among their
training tasks: this probes label reading on trained tasks, not on unseen ones. Each checkpoint's MEND is scored
with the judge's own code (extensions.signal.Signal.predictions: eval.py's scorer) with gold and with random labels.
"""
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, ".")
import data  # noqa: E402
import extensions  # noqa: E402
from data import macro_f1  # noqa: E402
from extensions.signal import Signal, random_labels, signal_examples  # noqa: E402

line = next(l for l in open(sys.argv[1]) if "held out of training:" in l)
tasks = line.split("held out of training: ")[1].split(" (")[0].split(", ")
for ckpt in sys.argv[2:]:
    mend = extensions.load(ckpt, device="cpu")
    cfg = SimpleNamespace(**{**mend.config, "val_task_examples": 40})
    pools = data.meta_train_pools(cfg.data, tasks, log=lambda msg: None)
    signal = {t: signal_examples(pools[t], cfg) for t in tasks}
    judge = Signal(mend.llm, mend.distiller, mend.toks, cfg, nullcontext(), mend.steps)
    for name, sig in (("gold", signal), ("random labels", random_labels(signal, cfg.seed))):
        preds = judge.predictions("mend", sig)
        scores = {t: macro_f1(*preds[t]) for t in tasks}
        print(f"{ckpt} | {name}: {np.mean(list(scores.values())):.2f} | " + " | ".join(f"{t} {s:.1f}" for t, s in scores.items()), flush=True)
