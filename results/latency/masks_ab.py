"""
Issue 49: does building the 4-D attention masks ourselves (model.causal_mask) cost CPU time against transformers'
own 2-D path? flops.py's five latency cells (smollm2-135m + layers:4, D=469, T=64, L=100, batch 1, float32, one
thread) in one process, the two mask paths alternating: 4 rounds of 5 timed calls each (after one untimed), medians.
The 2-D path is model.causal_mask replaced by one that returns the 2-D mask, so transformers builds its own.

    python results/latency/masks_ab.py | tee results/latency/masks_ab.log    # about 2 minutes on an idle CPU
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

import flops  # noqa: E402
import model  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
llm, distiller = flops.build_models("smollm2-135m", 100, "cpu", torch.float32)
cells = flops.latency_cells(llm, distiller, 469, 64, 100, 1)
paths = {"4-D (ours)": model.causal_mask, "2-D (transformers')": lambda config, mask, T, dtype: mask}
times = {}
with torch.no_grad():
    for _ in range(4):
        for path, build in paths.items():
            model.causal_mask = build
            for method, (fn, inputs) in cells.items():
                fn(*inputs)
                for _ in range(5):
                    t0 = time.perf_counter()
                    fn(*inputs)
                    times.setdefault((method, path), []).append(time.perf_counter() - t0)
print("smollm2-135m + layers:4, D=469 T=64 L=100 B=1, float32, one thread; median of 20 calls per cell and path")
for method in cells:
    ours, theirs = (statistics.median(times[(method, path)]) * 1000 for path in paths)
    print(f"{method:20s} 4-D {ours:7.1f} ms | 2-D {theirs:7.1f} ms | 4-D / 2-D {ours / theirs:.3f}")
