"""
Stage 1's per-item sampling time against the corpus size: train.make_items over the real C4
documents repeated to 1,000 and 1,000,000 documents (the list holds references, the documents are
not copied), the embedded model's tokenizer; a checkout that holds C4 as token ids gets them.
Each size: the first item (it draws the epoch's permutation), then the mean of the next items.

    python results/sampling/bench.py                    # this checkout
    python results/sampling/bench.py --root OTHER       # another checkout's train.py
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--root", default=str(Path(__file__).resolve().parents[2]),
               help="the checkout whose train.py is timed")
p.add_argument("--c4", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "c4"),
               help="folder of real C4 .jsonl files")
p.add_argument("--items", type=int, default=200, help="items timed after the first, per size")
args = p.parse_args()
sys.path.insert(0, args.root)

import torch  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402
from distill import Paper  # noqa: E402

torch.set_num_threads(1)
run = train.get_args(["--stage", "pretrain", "--val_items", "0"])
steps = Paper(vars(run))
toks = steps.tokenizers(run.llm)
files = sorted(Path(args.c4).glob("*.jsonl"))
texts = [json.loads(line)["text"] for f in files for line in open(f)]
# what train.read_data holds: token ids since issue 49 (data.c4_ids), texts before
docs = [data.c4_ids(toks[0], t, run.c4_max_tokens) for t in texts] if hasattr(data, "c4_ids") else texts
print(f"checkout {args.root}; {len(texts):,} real C4 documents; {args.items} items timed per size; "
      "one thread")
for n in (1_000, 1_000_000):
    source = [docs[i % len(docs)] for i in range(n)]
    item = train.make_items(run, (source, []), toks, lambda msg: None, None, steps)[0]
    t0 = time.perf_counter()
    item(0)
    first = time.perf_counter() - t0
    times = []
    for i in range(1, args.items + 1):
        t0 = time.perf_counter()
        item(i)
        times.append(time.perf_counter() - t0)
    mean, median = statistics.mean(times) * 1000, statistics.median(times) * 1000
    print(f"{n:>9,} documents | first item {first * 1000:7.2f} ms | next items: "
          f"mean {mean:6.2f} ms, median {median:6.2f} ms")
