"""
eval.py's cached, batched option scoring against the plain forward of every option
(conftest.naive_option_scores, the tests' yardstick): time and largest score difference of each
method on the first N test examples of the first task's first seed. Methods whose prefix skips
positions (the anchors, a MEND trained with --base anchors) have no plain forward and are skipped.

    python results/scoring/bench.py --n 5 --partition class2class --data ../shared/data \
        --methods zeroshot,icl --seeds 100 --out results/eval_bench.json

Every other flag is eval.py's. Prints a line per method; writes the JSON to --out.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402
import eval as evaluate  # noqa: E402
from conftest import naive_option_scores  # noqa: E402
from extensions.prefixes import free_prefix  # noqa: E402
from model import autocast, now, option_scores, resolve_device  # noqa: E402


def plain_prefix(method, llm, toks, distiller, demos, args, meta):
    """What the plain forward reads before the input: ids (1, P), vectors (1, L, C) or None."""
    budgets = (args.teacher_demo_tokens, args.distiller_demo_tokens)
    if method == "zeroshot":
        return None
    if method == "icl":
        ids = data.demo_item(toks, demos, budgets, args.max_len_per_example)[0]
    elif method == "mend":
        return evaluate.distill(llm, toks, distiller, demos, args, meta)
    else:
        ids = free_prefix(toks, demos, method, args.n_vectors, budgets, args.max_len_per_example)
    return torch.tensor([ids], device=llm.device)


@torch.no_grad()
def bench(n, args, llm, toks, distiller, files, methods, meta):
    """{method: seconds cached and naive, speed-up, largest |score difference|} on n examples."""
    task, (seed, (demos, tests)) = next((t, next(iter(f.items()))) for t, f in files.items())
    tests, report = tests[:n], {"task": task, "seed": seed, "n_examples": min(n, len(tests))}
    for method in methods:
        meta_ts = {**meta, "task": task, "seed": seed}
        for sample in (tests[:1], tests):  # the first pass, on one example, is a warm-up
            t0 = now()  # now() waits for the GPU's queued work
            prefix = evaluate.make_prefix(method, llm, toks, distiller, demos, args, meta_ts)
            if len(prefix) != 2 or prefix[1] is not None:
                break  # its keys/values skip positions: no plain forward
            fast = [option_scores(llm, toks[0], ex, args.max_len_per_example, *prefix) for ex in sample]
            t1 = now()
            plain = plain_prefix(method, llm, toks, distiller, demos, args, meta_ts)
            slow = [naive_option_scores(llm, toks[0], ex, args.max_len_per_example, plain)
                    for ex in sample]
            t2 = now()
        else:
            diff = max(float((a - b).abs().max()) for a, b in zip(fast, slow))
            tokens = plain.shape[1] if method == "icl" else None
            report[method] = {"cached_s": t1 - t0, "naive_s": t2 - t1, "speedup": (t2 - t1) / (t1 - t0),
                              "max_abs_diff": diff, "demo_tokens": tokens}
            print(f"bench {method:8s} {task} seed {seed}: cached {t1 - t0:.2f}s, naive {t2 - t1:.2f}s, "
                  f"speed-up {(t2 - t1) / (t1 - t0):.1f}x, max |score diff| {diff:.2e}")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--n", type=data.positive_int, default=5, help="Test examples timed. Default: 5.")
    known, rest = p.parse_known_args(argv)
    args = evaluate.get_args(rest)
    data.check_output(args.out, "--out", kind="eval")
    methods = args.methods or ["zeroshot", "icl"] + ["mend"] * Path(args.ckpt).exists()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype, ctx = autocast(device, args.dtype)
    checkpoint = evaluate.read_checkpoint(args, methods, device)
    files, _ = evaluate.find_tasks(args, data.partition(args.data, args.partition)["test"])
    llm, toks, distiller, meta, _ = evaluate.load_models(args, methods, device, dtype, checkpoint)
    with ctx:
        report = {"partition": args.partition, "device": device, "llm": args.llm,
                  **bench(known.n, args, llm, toks, distiller, files, methods, meta)}
    evaluate.write_json(args.out, report)
    return report


if __name__ == "__main__":
    data.run_cli(main)
