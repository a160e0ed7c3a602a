"""
What the distilled vectors attend to (the paper's analysis of MEND's vectors); --curves, --held_out, --sweep,
--compare and --ceiling instead read training logs, held-out tasks, eval.py results and fitted vectors.

For one task and its demonstrations:

  1. the distiller's attention from each placeholder position over the demonstration tokens (last layer, mean over
     heads), printed as the top demonstration tokens per vector (and a PNG heatmap when matplotlib is installed);
  2. the LLM's attention from the answer position (the last input token, which predicts the answer) to its prefix:
     to the distilled vectors (MEND, the student) against to the real demonstrations (ICL, the teacher), per layer.

    python analyze.py --ckpt mend.pt --task sample-sentiment
    python analyze.py --ckpt results/real/mend.pt --data ../shared/data --task ag_news --png results/analysis/attention_ag_news.png
    python analyze.py --curves results/real/mend.log,results/real/mend_no_stage1.log --png results/real/curves.png
    python analyze.py --held_out --ckpt runs/A_base.pt --data ../shared/data
    python analyze.py --sweep results/sweep/l4.json,results/sweep/l32.json --png results/sweep/sweep.png
    python analyze.py --compare eval_a.json:mend,eval_b.json:zeroshot
    python analyze.py --ceiling --data ../shared/data --ckpt mend.pt --partition class2class --max_examples 100

--curves reads train.py logs instead: the selection signal (held-out tasks' macro-F1) against training wall time.
--held_out shows, per task held out by --val_tasks, how often zero-shot, ICL and MEND predict each class.
--ceiling fits l free vectors per test task (extensions/options.py fit_vectors: KL to the LLM reading the demonstrations, on the
option rows of the task's unlabeled inputs from its other seeds' training files) and scores them next to zero-shot,
ICL, truncated demonstrations and, with --ckpt, MEND and MEND refined (fitted starting from the distiller's output).
--compare: the paired bootstrap of one method of an eval.py result over another (score, and agreement with ICL when
both hold it): the difference, its 95% interval and the share of resamples above 0.
--sweep reads eval.py JSON files (the l and K sweep of results/sweep/run.sh): each method's score next to the FLOPs
per query of its configuration (extensions.method_flops with the demonstration tokens that eval.py measured).
"""
import importlib.util
import json
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import data
import eval as evaluate
import extensions
from extensions.options import fit_vectors, option_fields
from extensions.signal import Signal, signal_examples
from model import PROMPT, PromptTuning, predict, prefix_cache


def get_args(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="mend.pt", help="Checkpoint made by train.py. Default: %(default)s.")
    p.add_argument("--data", default="sample_data", help="Data folder holding metaicl/. Default: %(default)s.")
    p.add_argument("--task", default="sample-sentiment", help="Task whose demonstrations (its "
                   "TASK_16_SEED_train.jsonl) are analysed. Default: %(default)s.")
    p.add_argument("--seed", type=data.count, default=100,
                   help="MetaICL seed of the demonstrations. Default: %(default)s.")
    p.add_argument("--top", type=data.positive_int, default=5,
                   help="Demonstration tokens listed for each vector, the most attended first. Default: %(default)s.")
    p.add_argument("--png", default="", help="Also draw a plot to this PNG file (needs matplotlib): the attention "
                   "heatmap, or the plot of --curves or --sweep; an existing file is replaced only if it is a PNG.")
    p.add_argument("--curves", default="", help="Comma-separated train.py logs: print and plot their selection "
                   "signal (held-out macro-F1) against training time.")
    p.add_argument("--held_out", action="store_true", help="Count, for each task held out by train.py --val_tasks, "
                   "how often zero-shot, ICL and MEND predict each class.")
    p.add_argument("--sweep", default="", help="Comma-separated eval.py JSON files: print and plot each method's "
                   "score against its FLOPs per query.")
    p.add_argument("--query_tokens", type=data.positive_int, default=64,
                   help="With --sweep: T, the tokens of one query row, as in flops.py. Default: %(default)s.")
    p.add_argument("--compare", default="", help="Two eval.py result files as A.json:METHOD,B.json:METHOD: "
                   "print a paired bootstrap over their test examples of A's METHOD minus B's.")
    p.add_argument("--ceiling", action="store_true", help="Fit l free vectors per test task of a partition and score "
                   "them beside zero-shot, ICL, truncated demonstrations and, with --ckpt, MEND and MEND refined; "
                   "eval.py's flags after it set the protocol.")
    p.add_argument("--fit_steps", type=data.positive_int, default=60,
                   help="With --ceiling: Adam steps of each fit. Default: %(default)s.")
    p.add_argument("--fit_lr", type=data.positive, default=0.1, help="With --ceiling: the fit's learning rate, "
                   "relative to the RMS of the token embeddings. Default: %(default)s.")
    p.add_argument("--out", default="", help="JSON file to write, the attention maps or the --ceiling results; an "
                   "existing file is replaced only if it is of the same kind. Default: attention_TASK.json, or "
                   "ceiling_PARTITION.json with --ceiling.")
    args, rest = p.parse_known_args(argv)
    if rest and not args.ceiling:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    modes = [f"--{m}" for m in ("ceiling", "curves", "sweep", "held_out") if getattr(args, m)]
    if len(modes) > 1:
        p.error(f"{' and '.join(modes)}: choose one of these modes")
    for flag in ("curves", "sweep"):
        for path in filter(None, getattr(args, flag).split(",")):
            if not Path(path).is_file():
                p.error(f"--{flag}: {path}: no such file")
    args.protocol = rest
    return args


@torch.no_grad()
def distiller_attention(mend, ids):
    """(L, D): last-layer attention of each placeholder over the demonstration tokens, mean over heads."""
    ids = torch.tensor([ids], device=mend.llm.device)                               # (1, D)
    out = mend.distiller.backbone(**mend.distiller.backbone_inputs(ids, torch.ones_like(ids)), output_attentions=True)
    L = mend.distiller.placeholder.shape[0]
    return out.attentions[-1][0].mean(0)[-L:, :ids.shape[1]].float().cpu()        # (H, D+L, D+L) -> (L, D)


@torch.no_grad()
def prefix_share(mend, prefix_embeds, query_ids):
    """Per LLM layer, the attention mass (mean over heads) that the last query position puts on the prefix."""
    q = torch.tensor([query_ids], device=mend.llm.device)                             # (1, T)
    x = torch.cat([prefix_embeds, mend.llm.get_input_embeddings()(q)], dim=1)       # (1, P+T, C)
    att = mend.llm(inputs_embeds=x, output_attentions=True, logits_to_keep=1).attentions
    P = prefix_embeds.shape[1]
    return [float(a[0, :, -1, :P].sum(-1).mean()) for a in att]                    # per layer (H, S, S) -> share


def pyplot():
    """matplotlib.pyplot drawing to files only, or None when matplotlib is not installed (plots are optional)."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    fig.tight_layout()
    data.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    print(f"wrote {path}")


def heatmap(path, att, labels):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(min(24, 2 + len(labels) / 6), 2 + att.shape[0] / 4))
    ax.imshow(att.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
    ax.set(xlabel="demonstration token", ylabel="distillation vector", title="distiller attention (last layer)")
    save_figure(fig, path)


def signal_curve(log):
    """[(step, training seconds, MEND signal, MEND signal with random labels or None)] from a train.py log; a --resume
    continues the clock of the run before."""
    points, offset, last = [], 0.0, 0.0
    for line in Path(log).read_text().splitlines():
        if line.startswith("resumed from"):
            offset = last
        elif "| signal mend " in line:
            step, rest = line.removeprefix("step ").split(" | signal mend ")
            fields = rest.split(" | ")  # f1 [| mend_random f1] | seconds
            last = offset + float(fields[-1].removesuffix("s"))
            random = float(fields[1].split()[1]) if len(fields) == 3 else None
            points.append((int(step), last, float(fields[0]), random))
    return points


def curves(args):
    """Print every log's curve, with the zero-shot and ICL reference of the first log, and plot them if possible."""
    logs = args.curves.split(",")
    ref = next((l for l in Path(logs[0]).read_text().splitlines() if l.startswith("signal reference")), None)
    if ref is None:
        raise SystemExit(f"--curves: {logs[0]} holds no selection signal (the run had no --val_tasks)")
    print(ref)
    table = {log: signal_curve(log) for log in logs}
    for log, points in table.items():
        print(f"{log}: " + "  ".join(f"step {s} {t:.0f}s {f:.2f}" + (f" (random labels {x:.2f})" if x is not None else "")
                                      for s, t, f, x in points))
    plt = pyplot() if args.png else None
    if plt:
        fig, ax = plt.subplots(figsize=(7, 4))
        for log, points in table.items():
            line, = ax.plot([p[1] / 60 for p in points], [p[2] for p in points], marker="o", label=Path(log).stem)
            if points and points[0][3] is not None:
                ax.plot([p[1] / 60 for p in points], [p[3] for p in points], marker="x", linestyle=":",
                        color=line.get_color(), label=f"{Path(log).stem}, random labels")
        for name, value in zip(("zero-shot", "ICL"), (ref.split("zeroshot ")[1].split()[0], ref.split("icl ")[1].split()[0])):
            ax.axhline(float(value), linestyle="--", color="gray")
            ax.annotate(name, (0.01, float(value)), xycoords=("axes fraction", "data"), fontsize=8)
        ax.set(xlabel="training minutes", ylabel="held-out tasks macro-F1", title="selection signal")
        ax.legend(fontsize=7)
        save_figure(fig, args.png)
    return table


def held_out(args):
    """Per held-out task: gold class counts, then each method's macro-F1 and predicted class counts (does a method
    read the demonstrations, or predict one class whatever they say?)."""
    mend = extensions.load(args.ckpt, device="cpu")
    cfg = SimpleNamespace(**{**mend.config, "data": args.data})
    pools = data.meta_train_pools(args.data, cfg.val_tasks_held_out, log=lambda msg: None)
    signal = {t: signal_examples(pools[t], cfg) for t in cfg.val_tasks_held_out}
    judge = Signal(mend.llm, mend.distiller, mend.toks, cfg, nullcontext(), mend.steps)
    report = {m: judge.predictions(m, signal) for m in ("zeroshot", "icl", "mend")}
    for task in signal:
        counts = lambda xs: dict(sorted(Counter(xs).items()))
        line = "  ".join(f"{m} {data.macro_f1(*report[m][task]):.1f} {counts(report[m][task][0])}" for m in report)
        print(f"{task}: gold {counts(report['mend'][task][1])} | {line}")
    return report


FLOPS_KEY = {"zeroshot": "zeroshot", "icl": "icl", "mend": "mend", "mend_no_kd": "mend", "prompt_tuning": "mend_llm_only"}


def sweep_rows(args):
    """One row per (eval.py JSON, method): K, l, demonstration tokens D, average score and GFLOPs per query (no reuse)."""
    rows = []
    for path in args.sweep.split(","):
        report = json.loads(Path(path).read_text())
        if "demo_tokens" not in report:
            raise SystemExit(f"{path}: no demo_tokens; rerun eval.py (files written before the sweep lack them)")
        spec = report["distiller"] if report["distiller"] not in (None, PROMPT) else None
        for method, result in report["methods"].items():
            key, L = FLOPS_KEY[method.removesuffix(evaluate.STAGE1)], report["n_vectors"] or 0
            D = report["demo_tokens"]["icl" if method == "icl" else "mend"]
            f = extensions.method_flops(report["llm"], D, args.query_tokens, L, 1, spec)[key]
            series = f"{method} ({Path(report['ckpt']).stem})" if report["ckpt"] and method != "icl" else method
            rows.append(dict(file=path, method=method, series=series, k=report["k"], l=L if key.startswith("mend") else 0,
                             D=round(D), score=result["average"], gflops=f / 1e9))
    return rows


def sweep(args):
    """Print the sweep's table and plot score against GFLOPs per query (one marker per point, labelled l and K; one
    colour per method and checkpoint)."""
    rows = sweep_rows(args)
    print(f"{'file':40s} {'method':14s} {'K':>3s} {'l':>4s} {'D':>5s} {'score':>6s} {'GFLOPs':>7s}  (T={args.query_tokens})")
    for r in rows:
        print(f"{r['file']:40s} {r['method']:14s} {r['k']:3d} {r['l']:4d} {r['D']:5d} {r['score']:6.1f} {r['gflops']:7.2f}")
    plt = pyplot() if args.png else None
    if plt:
        fig, ax = plt.subplots(figsize=(7, 4))
        for series in dict.fromkeys(r["series"] for r in rows):  # one marker colour per method and checkpoint
            points = [r for r in rows if r["series"] == series]
            ax.plot([r["gflops"] for r in points], [r["score"] for r in points], "o", label=series)
            for r in points:
                ax.annotate(f"l={r['l']} K={r['k']}" if r["l"] else f"K={r['k']}", (r["gflops"], r["score"]), fontsize=7)
        ax.set(xlabel=f"GFLOPs per query (T={args.query_tokens}, no reuse)", ylabel="average score",
               title="score against cost")
        ax.legend(fontsize=7)
        save_figure(fig, args.png)
    return rows


# -----------------------------------------------------------------------------
# --ceiling: how far MEND is from the best l vectors


def fit_inputs(args, task, seed, demos, tests):
    """Unlabeled inputs (with their options) of a task for fitting: the other seeds' training files, each input once,
    none of them a test example or one of this seed's demonstrations. No label is kept."""
    taken = {ex["input"] for ex in demos + tests}
    found = {}
    for other in args.seeds_all:
        path = data.task_file(args.data, task, 16, other, "train")
        if other != seed and path.exists():
            found.update({ex["input"]: ex["options"] for ex in data.read_metaicl(path) if ex["input"] not in taken})
    return [{"input": x, "options": o} for x, o in found.items()]


def fitted(start, llm, teacher_ids, inputs, args, tok):
    """fit_vectors from `start` (1, L, C) on the inputs -> (vectors, fit record)."""
    item = dict(teacher_demo=teacher_ids, distiller_demo=teacher_ids,
                **option_fields(tok, inputs, args.max_len_per_example))
    t = time.time()
    with torch.enable_grad():
        vectors, history = fit_vectors(llm, start, item, args.fit_steps, args.fit_lr, seed=0)
    return vectors, {"kl_first": history[0], "kl_last": history[-1], "seconds": time.time() - t}


def ceiling_task(args, llm, toks, distiller, meta, task, seeds):
    """Every method on one task and seed -> ({method: predictions}, golds, fit records)."""
    seed, (demos, tests) = next(iter(seeds.items()))
    inputs = fit_inputs(args, task, seed, demos, tests)
    teacher_ids = data.demo_item(toks, demos, (args.teacher_demo_tokens, args.distiller_demo_tokens),
                                 args.max_len_per_example)[0]
    score = lambda prefix: predict(llm, toks[0], tests, args.max_len_per_example, prefix)
    preds = {m: score(evaluate.make_prefix(m, llm, toks, distiller, demos, args, meta)) for m in ("zeroshot", "icl", "truncated")}
    start = PromptTuning(llm, args.n_vectors).placeholder.detach()[None]                 # (1, L, C) random tokens
    fits = {"inputs": len(inputs)}
    vectors, fits["fitted"] = fitted(start, llm, teacher_ids, inputs, args, toks[0])
    preds["fitted"] = score((prefix_cache(llm, prefix_embeds=vectors), None))
    if distiller is not None:
        mend = evaluate.distill(llm, toks, distiller, demos, args, meta)                 # (1, L, C)
        preds["mend"] = score((prefix_cache(llm, prefix_embeds=mend), None))
        vectors, fits["mend_refined"] = fitted(mend, llm, teacher_ids, inputs, args, toks[0])
        preds["mend_refined"] = score((prefix_cache(llm, prefix_embeds=vectors), None))
    return preds, [ex["options"].index(ex["output"]) for ex in tests], fits


@torch.no_grad()
def ceiling(args):
    """Per test task (first --seeds seed): zero-shot, ICL, truncated, vectors fitted from random token embeddings and,
    with a checkpoint, MEND and MEND refined. The JSON (eval.py's layout, so --compare reads it) is rewritten
    after every task."""
    ev = evaluate.get_args(["--data", args.data, "--ckpt", args.ckpt, *args.protocol])
    ev.fit_steps, ev.fit_lr, ev.out = args.fit_steps, args.fit_lr, args.out or f"ceiling_{ev.partition}.json"
    data.check_output(ev.out, "--out", kind="eval")  # eval.py's layout
    ev.seeds_all = [100, 13, 21, 42, 87]
    ev.seeds = ev.seeds[:1]
    if ev.threads:
        torch.set_num_threads(ev.threads)
    with_mend, tests = Path(ev.ckpt).exists(), data.partition(ev.data, ev.partition)["test"]
    methods = ["mend"] if with_mend else []
    checkpoint = evaluate.read_checkpoint(ev, methods, "cpu")
    evaluate.refuse_seen_tasks(checkpoint[1], tests, ev)
    files, skipped = evaluate.find_tasks(ev, tests)  # a bad input fails by here, before a model loads
    llm, toks, distiller, meta, cfg = evaluate.load_models(ev, methods, "cpu", checkpoint=checkpoint)
    report = {"partition": ev.partition, "llm": ev.llm, "ckpt": ev.ckpt if with_mend else None, "seeds": ev.seeds,
              "max_examples": ev.max_examples, "k": ev.k, "n_vectors": ev.n_vectors, "fit_steps": ev.fit_steps,
              "fit_lr": ev.fit_lr, "methods": {}, "fits": {}, "skipped_tasks": skipped}
    for n, (task, seeds) in enumerate(files.items(), 1):
        t = time.time()
        preds, golds, report["fits"][task] = ceiling_task(ev, llm, toks, distiller, {**meta, "task": task, "seed": ev.seeds[0]}, task, seeds)
        metric = data.macro_f1 if data.is_classification(seeds[ev.seeds[0]][1], task) else data.accuracy
        for m, p in preds.items():
            score = metric(p, golds)
            report["methods"].setdefault(m, {"tasks": {}})["tasks"][task] = {
                "metric": metric.__name__, "score": score, "per_seed": {ev.seeds[0]: score}, "n_examples": len(golds),
                "predictions": {ev.seeds[0]: p}, "golds": {ev.seeds[0]: golds}}
            report["methods"][m]["average"] = float(np.mean([r["score"] for r in report["methods"][m]["tasks"].values()]))
        print(f"[{n}/{len(files)}] {task} ({report['fits'][task]['inputs']} fit inputs): " +
              " | ".join(f"{m} {report['methods'][m]['tasks'][task]['score']:.1f}" for m in preds) + f" | {time.time() - t:.0f}s",
              flush=True)
        evaluate.write_json(ev.out, report)
    print("average over " + f"{len(files)} tasks: " + " | ".join(f"{m} {r['average']:.1f}" for m, r in report["methods"].items()))
    print(f"wrote {ev.out}")
    return report


# -----------------------------------------------------------------------------
# --compare: two eval.py results, paired over their test examples


def paired_bootstrap(a, b, n=2000, seed=0, key="score"):
    """How far is the average of method a above method b from noise? Both are {task: evaluate_task
    result} on the same examples. Each resample redraws every (task, seed)'s test examples with
    replacement, the same draw for a and b, and recomputes the average. key="agreement" takes the
    agreement with ICL (both against a's reference) instead of the score. -> (observed difference,
    2.5% and 97.5% quantiles, share of resamples > 0)."""
    rng, diffs = np.random.default_rng(seed), []
    for _ in range(n):
        per_task = []
        for task, ra in a.items():
            rb, metric = b[task], data.macro_f1 if ra["metric"] == "macro_f1" and key == "score" else data.accuracy
            seeds = []
            for s, golds in ra["golds" if key == "score" else "reference"].items():
                i = rng.integers(len(golds), size=len(golds))
                g = [golds[j] for j in i]
                seeds.append(metric([ra["predictions"][s][j] for j in i], g)
                             - metric([rb["predictions"][s][j] for j in i], g))
            per_task.append(np.mean(seeds))
        diffs.append(np.mean(per_task))
    observed = np.mean([a[t][key] - b[t][key] for t in a])
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(observed), float(low), float(high), float(np.mean(np.array(diffs) > 0))


def compare(spec):
    """--compare A.json:METHOD,B.json:METHOD -> print the paired bootstrap of A's method over
    B's."""
    pairs = [s.rsplit(":", 1) for s in spec.split(",")]
    if len(pairs) != 2 or any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--compare {spec}: expected A.json:METHOD,B.json:METHOD")
    (fa, ma), (fb, mb) = pairs
    missing = [f for f in (fa, fb) if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"--compare: {missing[0]}: no such file")
    methods = [json.loads(Path(f).read_text()).get("methods", {}) for f in (fa, fb)]
    for (f, m), found in zip(pairs, methods):
        if m not in found:
            raise SystemExit(f"--compare: {f} holds no method {m!r} (it holds {', '.join(found) or 'none'})")
    a, b = methods[0][ma]["tasks"], methods[1][mb]["tasks"]
    if set(a) != set(b):
        raise SystemExit(f"--compare: the two files cover different tasks ({sorted(set(a) ^ set(b))})")
    keys = ["score"] + ["agreement"] * all("reference" in r for r in [*a.values(), *b.values()])
    if len(keys) == 2 and any(a[t]["reference"] != b[t]["reference"] for t in a):
        raise SystemExit("--compare: the two files' agreement is taken against different ICL predictions")
    for key in keys:
        wins = sum(a[t][key] > b[t][key] for t in a)
        diff, lo, hi, share = paired_bootstrap(a, b, key=key)
        print(f"{ma} ({fa}) - {mb} ({fb}): {diff:+.2f} points of {key}, 95% interval "
              f"[{lo:+.2f}, {hi:+.2f}] (paired bootstrap over test examples, 2000 resamples; {share:.1%} of them > 0); "
              f"{ma} wins {wins} of {len(a)} tasks")



def main(args):
    if args.png:  # what it writes is checked before any work
        data.check_output(args.png, "--png", kind="png")
    if args.compare:
        return compare(args.compare)
    if args.ceiling:
        return ceiling(args)
    if args.curves:
        return curves(args)
    if args.sweep:
        return sweep(args)
    if args.held_out:
        return held_out(args)
    out = args.out or f"attention_{args.task}.json"
    data.check_output(out, "--out", kind="attention")
    demos = data.read_metaicl(data.task_file(args.data, args.task, 16, args.seed, "train"))  # a missing task fails
    query = data.read_metaicl(data.task_file(args.data, args.task, 16, 100, "test"))[0]     # before the model loads
    mend = extensions.load(args.ckpt, device="cpu")
    if mend.llm.config.is_encoder_decoder:
        raise SystemExit(f"{args.ckpt}: the attention maps read a decoder-only LLM's attention from the answer position "
                         f"to its prefix; an encoder-decoder LLM reads it through cross-attention (not analysed here)")
    mend.llm.set_attn_implementation("eager")  # attention weights are only returned by the eager kernels
    if hasattr(mend.distiller, "backbone"):
        mend.distiller.backbone.set_attn_implementation("eager")
    demos = demos[:mend.config["k"]]
    pairs = [(d["input"], d["output"]) for d in demos]
    teacher_ids, _ = data.demo_item(mend.toks, demos, mend.budgets, mend.max_len)
    x, _ = data.encode_example(mend.toks[0], query, mend.max_len)
    report = {"task": args.task, "ckpt": args.ckpt, "query": query["input"]}
    if hasattr(mend.distiller, "backbone"):
        ids = mend.demo_ids(pairs)
        att = distiller_attention(mend, ids)
        words = [mend.toks[1].decode([t]) for t in ids]
        for v, row in enumerate(att):
            top = row.topk(min(args.top, len(ids)))
            print(f"vector {v:3d}: " + "  ".join(f"{words[j]!r} {w:.2f}" for w, j in zip(top.values, top.indices)))
        report["distiller_attention"] = att.tolist()
        if args.png:
            heatmap(args.png, att, words)
    demo_embeds = mend.llm.get_input_embeddings()(torch.tensor([teacher_ids]))      # (1, D, C)
    report["llm_share_on_vectors"] = prefix_share(mend, mend.distill(pairs), x)
    report["llm_share_on_demos"] = prefix_share(mend, demo_embeds, x)
    for layer, (s, t) in enumerate(zip(report["llm_share_on_vectors"], report["llm_share_on_demos"])):
        print(f"LLM layer {layer:2d}: answer position -> vectors {s:.3f} | -> real demonstrations {t:.3f}")
    evaluate.write_json(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    data.run_cli(lambda: main(get_args()))
