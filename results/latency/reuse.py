"""
The cached-prefix cells of flops.py's latency table (issue 49): for each, the ops dispatched per call and
the median time, on random-init models of a pair's real shapes, at one of the paper's lengths D, batch 1.
A prefix's keys/values used to be copied into a new transformers cache on every call (model.held_cache now
hands them over as they are).

    python results/latency/reuse.py                       # this checkout: smollm2-135m, D=469, CPU
    python results/latency/reuse.py --root OTHER          # another checkout (e.g. before the change)
"""
import argparse
import sys
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--root", default=str(Path(__file__).resolve().parents[2]),
               help="the checkout whose model.py and flops.py are timed")
p.add_argument("--pair", default="smollm2-135m", help="flops.py's LLM name (its distiller comes with it)")
p.add_argument("--D", type=int, default=469, help="demonstration tokens (the paper's class2class length)")
args = p.parse_args()
sys.path.insert(0, args.root)

import torch  # noqa: E402

import flops  # noqa: E402
from dispatch import Ops  # noqa: E402  (this folder's op counter)

torch.manual_seed(0)
torch.set_num_threads(1)
T, L = 64, 100
llm, distiller = flops.build_models(args.pair, L, "cpu", torch.float32)
print(f"checkout {args.root}; {args.pair} + {flops.PAIRS[args.pair]}, D={args.D} T={T} L={L} B=1, float32, "
      "one thread")
with torch.no_grad():
    cells = flops.latency_cells(llm, distiller, args.D, T, L, 1)
    for method in ("zero-shot", "ICL + demo KV reuse", "MEND + distill once"):
        cell = cells[method]  # fn, or (fn, inputs) after issue 49's graphed column
        call = cell if callable(cell) else lambda: cell[0](*cell[1])
        with Ops() as ops:
            call()
        ms = flops.median_ms(call, 50, 10, "cpu")
        copies = ops.count["cat"] + ops.count["copy_"]
        print(f"{method:20s} {sum(ops.count.values()):5d} ops per call ({copies} cat/copy_), "
              f"median {ms:7.2f} ms")
