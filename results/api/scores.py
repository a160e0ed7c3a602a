"""
Issue 49: MEND.score, now a fixed-shape query (distill.query_scores: the input left-padded and the options
right-padded to their buckets, [vectors ; input] read once with a cache, the options in one batch; one CUDA graph per
shape on CUDA), against the cached scorer it replaced (the vectors' keys/values once per call, then the input, then
the options: model.option_scores, which eval.py keeps), on real MetaICL test examples, float32 on the CPU.

    python train.py --stage finetune --max_steps 1 --out /tmp/api.pt     # any checkpoint of the embedded model
    python results/api/scores.py --ckpt /tmp/api.pt | tee results/api/scores.log

It prints, per task, the largest |new - old| over every option of its first --n test examples, whether every argmax
agrees, and the mean time per input of each path (one thread).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import data  # noqa: E402
import distill  # noqa: E402
import model  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--ckpt", required=True, help="a checkpoint of the paper's MEND (train.py)")
p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder holding metaicl/")
p.add_argument("--tasks", default="glue-sst2,superglue-cb,ai2_arc,commonsense_qa", help="comma-separated test tasks")
p.add_argument("--n", type=int, default=50, help="test examples per task")
args = p.parse_args()

torch.set_num_threads(1)
mend = distill.MEND.load(args.ckpt, device="cpu", dtype="float32")
print(f"{args.ckpt}: llm {mend.config['llm']}, distiller {mend.config['distiller']}, l={mend.config['n_vectors']}; "
      f"float32, one thread; the first {args.n} test examples of each task, 16 demonstrations (seed 100)")
for task in args.tasks.split(","):
    demos = data.read_metaicl(data.task_file(args.data, task, 16, 100, "train"))
    tests = data.read_metaicl(data.task_file(args.data, task, 16, 100, "test"))[:args.n]
    vectors = mend.distill([(d["input"], d["output"]) for d in demos])
    kv = model.prefix_cache(mend.llm, prefix_embeds=vectors)
    worst, agree, t_new, t_old = 0.0, 0, [], []
    with torch.no_grad():
        for ex in tests:
            t0 = time.perf_counter()
            new = torch.tensor(mend.score(vectors, ex["input"], ex["options"]))
            t1 = time.perf_counter()
            old = model.option_scores(mend.llm, mend.toks[0], ex, mend.max_len, kv)
            t_new.append(t1 - t0)
            t_old.append(time.perf_counter() - t1)
            worst = max(worst, (new - old).abs().max().item())
            agree += int(new.argmax() == old.argmax())
    options = statistics.mean(len(ex["options"]) for ex in tests)
    print(f"{task}: {len(tests)} inputs, {options:.1f} options each; max |new - old| {worst:.2e}; argmax equal in "
          f"{agree}/{len(tests)}; per input new {statistics.mean(t_new) * 1000:.0f} ms, old "
          f"{statistics.mean(t_old) * 1000:.0f} ms", flush=True)
