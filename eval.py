"""
Evaluate zero-shot, vanilla ICL and MEND on the unseen test tasks of a MetaICL partition (paper
section 4).

    python eval.py --partition qa2qa  # sample data, after the two train.py commands
    python eval.py --partition class2class --data ../shared/data --methods zeroshot,icl --max_examples 100

What it prints: one line per (task, method) with its score per seed and the time taken, then a table
of every method's score per task and on average, and, when ICL runs in the same command or
--reference names an ICL result, a second table of each method's agreement with ICL (the share of
examples on which it picks ICL's option). The JSON file (--out) holds the predictions, golds and
configuration; measured numbers live in the README and results/.

Free prefixes at MEND's length l (the checkpoint's n_vectors, else --n_vectors), no training:
  truncated  vanilla ICL reading only the last l tokens of the demonstration prefix;
  labels     the same over the demonstrations with their inputs removed (mostly their labels);
  anchors    the LLM reads the whole prefix once, then the query attends only to the keys/values of l positions: the
             first 4 (the attention sink) and the label rows of the latest demonstrations (Wang et al. 2023), at the
             positions the query has in full ICL. With l at least the prefix length, it is ICL.
A MEND trained with --base anchors (train.py) is scored on top of the anchors: the query reads them and, through a
gate per layer and head, the keys/values of its distilled vectors (extensions/anchors.py; no vectors, a bias on the
anchor logits, for --distiller none). Its results are named mend.

Protocol (MetaICL's): for each seed in 100,13,21,42,87 the demonstrations are
{task}_16_{seed}_train.jsonl, in file order, and the test examples {task}_16_{seed}_test.jsonl (or
the seed-100 file, which MetaICL makes identical across seeds). Each option is scored by the mean
per-token NLL of its tokens; the lowest wins. A task is classification when every test example
offers the same option set (then macro-F1 over the gold classes, MetaICL's definition), otherwise
multiple choice (accuracy). Scores are averaged over seeds per task, then over tasks, each task
counted once. `--protocol random` is the official MEND code's protocol instead: the demonstrations
are re-drawn, in random order, out of the seed's train file for every test example.

Speed without changing a score: one (task, seed) shares its demonstrations, so their keys/values
(ICL) or their distilled vectors and the vectors' keys/values (MEND) are computed once and reused
for every example, and all options of an example are scored in one batch (results/scoring/bench.py
times it against the plain forward of every option).
"""
import json
import time
from pathlib import Path

import numpy as np
import torch

import data
import extensions
from distill import demos_hash, load_vectors, save_vectors
from model import (EMBEDDED, PROMPT, autocast, file_hash, load_checkpoint, load_llm, predict, prefix_cache,
                   resolve_device, tokenizers)

PAPER_DEFAULTS = dict(k=16, max_len_per_example=256, teacher_demo_tokens=767, distiller_demo_tokens=643, n_vectors=100)


METHODS = ("zeroshot", "icl", *extensions.PREFIXES, "mend")  # the paper's, and between them our free prefixes
METHOD_LIST = data.checked(lambda s: [m for m in s.split(",") if m], lambda v: set(v) <= set(METHODS),
                           "a comma-separated subset of zeroshot,icl,truncated,labels,anchors,mend")


def get_args(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--partition", default="qa2qa", help="MetaICL partition whose test tasks are "
                   "evaluated: hr2lr, class2class, nonclass2class, qa2qa, nonqa2qa, nonnli2nli or "
                   "nonpara2para. Default: %(default)s.")
    p.add_argument("--data", default="sample_data", help="Data folder holding metaicl/ (README: "
                   "Real data). Default: %(default)s.")
    p.add_argument("--methods", type=METHOD_LIST, default="",
                   help="Comma-separated methods among zeroshot, icl, truncated, labels, anchors "
                   "and mend (truncated, labels and anchors: the free prefixes of length l, no "
                   "training). Default: zeroshot,icl, and mend when --ckpt exists.")
    p.add_argument("--n_vectors", type=data.positive_int, default=None, help="Length l of the free "
                   "prefixes. Default: --ckpt's number of vectors when that file exists, else 100.")
    p.add_argument("--ckpt", default="mend.pt", help="MEND checkpoint made by train.py (a stage-1 "
                   "checkpoint is reported as 'mend (stage 1 only)'). Default: %(default)s.")
    p.add_argument("--llm", type=data.model_name, default="",
                   help="The frozen LLM. Default: the one --ckpt was trained for, else smollm2-135m.")
    p.add_argument("--seeds", type=data.seed_list, default="100,13,21,42,87", help="Comma-separated "
                   "MetaICL seeds, each with its own demonstrations. Default: %(default)s.")
    p.add_argument("--max_examples", type=data.count, default=0, help="Test examples evaluated per "
                   "task, the first ones; 0 evaluates all. Default: %(default)s.")
    p.add_argument("--protocol", default="fixed", choices=["fixed", "random"], help="How "
                   "demonstrations are drawn: fixed (MetaICL's: the seed's file, in order) or "
                   "random (the official MEND code's: a new random draw for every test example). "
                   "Default: %(default)s.")
    p.add_argument("--k", type=data.positive_int, default=None, help="Number of demonstrations. "
                   "Default: --ckpt's when that file exists (whatever the methods), else 16.")
    p.add_argument("--max_len_per_example", type=data.positive_int, default=None, help="Most tokens "
                   "of one input and option together; a longer input is cut. Default: --ckpt's when "
                   "that file exists, else 256.")
    p.add_argument("--teacher_demo_tokens", type=data.positive_int, default=None, help="Most "
                   "demonstration tokens ICL reads. Default: --ckpt's when that file exists, else "
                   "767.")
    p.add_argument("--distiller_demo_tokens", type=data.positive_int, default=None, help="Most "
                   "demonstration tokens MEND's distiller reads. Default: --ckpt's when that file "
                   "exists, else 643.")
    p.add_argument("--perturb", default="gold", choices=list(data.PERTURBATIONS), help="The "
                   "demonstrations ICL and MEND read: gold, random_labels (each label a random "
                   "option), no_labels (inputs only) or no_inputs (labels only). Default: "
                   "%(default)s.")
    p.add_argument("--vectors_dir", default="", help="Folder that keeps distilled vectors "
                   "(safetensors files): each demonstration set is distilled once, later runs load "
                   "its vectors. Without it, none are kept.")
    p.add_argument("--out", default="", help="JSON file for the results; its folder must exist, and "
                   "an existing file is replaced only if it is an eval.py result. Default: "
                   "eval_PARTITION.json.")
    p.add_argument("--device", default="auto", help="Device to run on, e.g. cuda:1; auto is cuda "
                   "when available, else cpu. Default: %(default)s.")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="Autocast dtype, also the LLM's: auto is bfloat16 on a GPU that supports "
                   "it, else float16, and float32 on a CPU. Default: %(default)s.")
    p.add_argument("--threads", type=data.count, default=0,
                   help="CPU threads for torch; 0 lets torch use every core. Default: %(default)s.")
    p.add_argument("--reference", default="", help="An eval.py JSON file holding ICL's predictions "
                   "on the same examples, which every method's agreement is measured against. "
                   "Without it, this run's icl, when it runs.")
    args = p.parse_args(argv)
    args.out = args.out or f"eval_{args.partition}.json"
    return args


# -----------------------------------------------------------------------------
# metrics


def agreement(predictions, reference):
    """Agreement with ICL: the share (%) of examples on which a method picks the option ICL picks.
    It measures what MEND is trained for (behave as the LLM reading the demonstrations), whatever
    the gold answer."""
    return data.accuracy(predictions, reference)


def add_agreement(results, reference):
    """Each method's agreement with reference = {task: {seed: ICL's predictions}}: per task (mean
    over seeds, stored with the reference predictions, for analyze.py --compare) and on average over tasks."""
    for r in results.values():
        for task, t in r["tasks"].items():
            t["reference"] = ref = {s: reference[task][s] for s in t["predictions"]}
            t["agreement"] = float(np.mean([agreement(p, ref[s]) for s, p in t["predictions"].items()]))
        r["agreement"] = float(np.mean([t["agreement"] for t in r["tasks"].values()]))


def load_reference(path, args, files):
    """--reference: {task: {seed: ICL's predictions}} from an eval JSON of the same partition, seeds, examples and
    golds (and, under the same --perturb, the same demonstrations); any mismatch is refused in one
    line."""
    if not Path(path).is_file():
        raise SystemExit(f"--reference {path}: no such file")
    ref = json.loads(Path(path).read_text())
    icl = ref.get("methods", {}).get("icl")
    if icl is None:
        raise SystemExit(f"--reference {path}: holds no icl predictions")
    for key in ("partition", "seeds", "max_examples", "k"):
        if ref.get(key) != getattr(args, key):
            raise SystemExit(f"--reference {path}: {key} {ref.get(key)}, but this run's is {getattr(args, key)}")
    out = {}
    for task, seeds in files.items():
        if task not in icl["tasks"]:
            raise SystemExit(f"--reference {path}: no ICL predictions for {task}")
        for seed, (_, tests) in seeds.items():
            if icl["tasks"][task]["golds"].get(str(seed)) != [ex["options"].index(ex["output"]) for ex in tests]:
                raise SystemExit(f"--reference {path}: other test examples or golds for {task} seed {seed}")
        out[task] = {int(s): p for s, p in icl["tasks"][task]["predictions"].items()}
    return out


# -----------------------------------------------------------------------------
# one (task, seed): the demonstrations become a prefix once, then every test example is scored against it


def make_prefix(method, llm, toks, distiller, demos, args, vector_meta):
    """The cached prefix of a demonstration set as (keys/values per layer, the query's first
    position or None when it follows the prefix): nothing (zero-shot), the demos' keys/values (ICL),
    the keys/values of the distilled vectors (MEND, loaded from --vectors_dir when they were
    distilled before), or one of our free prefixes (extensions/). The steps of a MEND trained with
    one of our additions may give a triple: the pair and a context to read it in."""
    if method == "zeroshot":
        return None, None
    if method in extensions.PREFIXES:
        return extensions.PREFIXES[method](llm, toks, demos, args)
    if method == "icl":
        teacher_ids = data.demo_item(toks, demos, (args.teacher_demo_tokens, args.distiller_demo_tokens),
                                     args.max_len_per_example)[0]
        return prefix_cache(llm, prefix_ids=torch.tensor([teacher_ids], device=llm.device)), None
    vectors_of = lambda d: distill(llm, toks, d, demos, args, vector_meta)
    return vector_meta["steps"].prefix(llm, toks, distiller, demos, args, vectors_of)


def distill(llm, toks, distiller, demos, args, vector_meta):
    """Distilled vectors (1, L, C) of one demonstration set (the steps' demo_vectors, which for a MEND trained with
    --base also read the base's tokens), through the distill-once cache when there is one."""
    steps, budgets = vector_meta["steps"], (args.teacher_demo_tokens, args.distiller_demo_tokens)
    inputs = steps.inputs(toks, demos, budgets, args.max_len_per_example)
    meta = {**{k: v for k, v in vector_meta.items() if k != "steps"},
            **{f"{name}_hash": demos_hash(ids) for name, ids in inputs.items()}}
    path = Path(args.vectors_dir) / f"{meta['task']}_{meta['seed']}_{meta['demos_hash']}.safetensors" \
        if args.vectors_dir and args.protocol == "fixed" else None
    if path is not None and path.exists():
        return load_vectors(path, meta).to(llm.device)
    vectors = steps.demo_vectors(llm, distiller, inputs)                              # (1, L, C)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_vectors(path, vectors, meta)
    return vectors


def evaluate_seed(method, llm, toks, distiller, demos, tests, args, vector_meta):
    """Predicted option index for each test example of one (task, seed)."""
    if args.protocol == "fixed":
        return predict(llm, toks[0], tests, args.max_len_per_example,
                       make_prefix(method, llm, toks, distiller, demos, args, vector_meta))
    predictions = []
    # the official code: a fresh random draw and order of demos per test example
    for i, ex in enumerate(tests):
        order = np.random.default_rng([vector_meta["seed"], i]).permutation(len(demos))[:args.k]
        prefix = make_prefix(method, llm, toks, distiller, [demos[j] for j in order], args, vector_meta)
        predictions += predict(llm, toks[0], [ex], args.max_len_per_example, prefix)
    return predictions


def evaluate_task(method, llm, toks, distiller, seeds, args, meta, task):
    """One method on one task over all seeds -> {metric, score (mean over seeds), per_seed,
    n_examples}."""
    first_tests = seeds[args.seeds[0]][1]
    classification = data.is_classification(first_tests, task)
    metric = data.macro_f1 if classification else data.accuracy
    per_seed, predictions, golds, seen = {}, {}, {}, {}
    for seed, (demos, tests) in seeds.items():
        golds[seed] = [ex["options"].index(ex["output"]) for ex in tests]
        same = next((s for s, t in seen.items() if t == tests), None) if method == "zeroshot" else None
        # zero-shot reads no demos
        predictions[seed] = predictions[same] if same is not None else evaluate_seed(
            method, llm, toks, distiller, demos, tests, args, {**meta, "task": task, "seed": seed})
        per_seed[seed], seen[seed] = metric(predictions[seed], golds[seed]), tests
    return {"metric": "macro_f1" if classification else "accuracy", "score": float(np.mean(list(per_seed.values()))),
            "per_seed": per_seed, "n_examples": len(first_tests), "predictions": predictions, "golds": golds}


def demo_lengths(files, toks, args):
    """Mean demonstration tokens that ICL and the distiller read over the evaluated (task, seed)
    sets: flops.py's D."""
    budgets = (args.teacher_demo_tokens, args.distiller_demo_tokens)
    sizes = [[len(ids) for ids in data.demo_item(toks, demos, budgets, args.max_len_per_example)]
             for seeds in files.values() for demos, _ in seeds.values()]                # (sets, 2)
    return dict(zip(("icl", "mend"), np.mean(sizes, axis=0).tolist()))


def find_tasks(args, tasks):
    """-> ({task: {seed: (demos, tests)}}, {skipped task: reason}); each skip is reported in one line. Finding no task
    is an error: a run that would evaluate nothing."""
    found = {task: task_files(args, task) for task in tasks}
    files = {t: f for t, f in found.items() if not isinstance(f, str)}
    skipped = {t: f for t, f in found.items() if isinstance(f, str)}
    if not files:
        task, reason = next(iter(skipped.items()))
        raise SystemExit(f"--partition {args.partition} --seeds {','.join(map(str, args.seeds))}: "
                         f"none of its {len(tasks)} test tasks has its files under "
                         f"{Path(args.data) / 'metaicl'} ({task}: {reason})")
    for task, reason in skipped.items():
        print(f"warning: skipping {task}: {reason}")
    return files, skipped


def task_files(args, task):
    """{seed: (demos, tests)} for one task, or a reason string why it is skipped."""
    if not (Path(args.data) / "metaicl" / task).is_dir():
        return "not in the data folder"
    out = {}
    for seed in args.seeds:
        train = data.task_file(args.data, task, 16, seed, "train")
        test = data.task_file(args.data, task, 16, seed, "test")
        test = test if test.exists() else data.task_file(args.data, task, 16, 100, "test")
        if not train.exists() or not test.exists():
            return f"missing {(train if not train.exists() else test).name}"
        tests = data.read_metaicl(test)[:args.max_examples or None]
        if any(not ex["options"] for ex in tests):
            return "a test example has no options (a generation task)"
        out[seed] = (data.perturb_demos(data.read_metaicl(train)[:args.k], args.perturb, seed), tests)
    return out


# -----------------------------------------------------------------------------
# models


def read_checkpoint(args, methods, device):
    """The MEND checkpoint's state and training config (both empty without mend). One rule, whatever
    the methods: k, l, the budgets and the LLM come from their flags, else from --ckpt's config when
    that file exists, else from the paper's values (settings); they are checked. A bad checkpoint or
    budget fails here, before any model loads."""
    if "mend" in methods and not Path(args.ckpt).exists():
        raise SystemExit(f"{args.ckpt} not found; make it with: python train.py --stage pretrain && "
                         f"python train.py --stage finetune --init ckpt.pt  (or pass --methods "
                         f"zeroshot,icl)")
    state = load_checkpoint(args.ckpt) if Path(args.ckpt).exists() else {"config": {}}  # on the CPU
    cfg = state["config"]
    if "mend" in methods and args.llm and args.llm != cfg["llm"]:
        raise SystemExit(f"{args.ckpt} was trained for llm={cfg['llm']}, not --llm {args.llm}")
    settings(args, cfg)
    if data.budget_error(args):
        raise SystemExit(data.budget_error(args))
    return (state, cfg) if "mend" in methods else ({}, {})


def settings(args, cfg):
    """Fill k, l, the budgets and the LLM left unset by their flags from a checkpoint's config
    (cfg), else from the paper's values; args.settings says which came from where, for the header
    line."""
    given = [f"--{key}" for key in PAPER_DEFAULTS if getattr(args, key) is not None]
    for key, paper_value in PAPER_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, cfg.get(key, paper_value))
    args.llm = args.llm or cfg.get("llm", EMBEDDED)
    source = f"the config of {args.ckpt}" if cfg else f"the paper's values ({args.ckpt} not found)"
    args.settings = (f"k {args.k}, l {args.n_vectors}, budgets "
                     f"{args.teacher_demo_tokens}/{args.distiller_demo_tokens} tokens "
                     f"(teacher/distiller), {args.max_len_per_example} per example: from {source}"
                     + (f" except {', '.join(given)} (flags)" if given else ""))


def load_models(args, methods, device, dtype=torch.float32, checkpoint=None):
    """LLM, (LLM tokenizer, distiller tokenizer), distiller (None without mend), the vector metadata
    and the training config, from read_checkpoint's (state, config) (read here when not given)."""
    state, cfg = checkpoint or read_checkpoint(args, methods, device)
    steps = extensions.steps_for(cfg) if cfg else None  # the paper's steps, or an addition's (extensions/)
    toks, distiller, meta = steps.tokenizers(args.llm) if cfg else tokenizers("layers:1", args.llm), None, {}
    llm = load_llm(args.llm, device, dtype)
    if cfg:
        distiller = steps.build(llm, cfg["distiller"], cfg["n_vectors"])
        steps.load(distiller, state["model"], args.ckpt)
        distiller.eval().requires_grad_(False)
        meta = {"llm": cfg["llm"], "distiller": cfg["distiller"], "ckpt_hash": file_hash(args.ckpt),
                "base": cfg.get("base", "none"), "steps": steps}
    return llm, toks, distiller, meta, cfg


STAGE1 = " (stage 1 only)"  # the name's suffix for a checkpoint of train.py --stage pretrain, never finetuned


def trained_method(cfg):
    """The method a checkpoint implements, from its training config (not its file name): mend,
    mend_no_kd (lam 0) or prompt_tuning, followed by STAGE1 when the checkpoint is stage 1's (KL
    only, where lam plays no part)."""
    stage1 = cfg.get("stage") == "pretrain"
    no_kd = cfg.get("lam", 1.0) == 0 and not stage1
    name = "prompt_tuning" if cfg["distiller"] == PROMPT else "mend_no_kd" if no_kd else "mend"
    return name + STAGE1 * stage1


def refuse_seen_tasks(cfg, tests, args):
    """A MEND checkpoint is never evaluated on test tasks it was trained on."""
    seen = sorted(set(cfg.get("train_tasks", [])) & set(tests))
    if seen:
        raise SystemExit(f"{args.ckpt} was finetuned on {', '.join(seen)}, which are test tasks of "
                         f"{args.partition}; finetune with --partition {args.partition} or evaluate "
                         f"another partition")


# -----------------------------------------------------------------------------
# reports


def print_table(results, methods, key="score"):
    """One row per task and the average: each method's score, or (key="agreement") its agreement
    with ICL."""
    tasks = list(results[methods[0]]["tasks"])
    width, cols = max([len(t) for t in tasks] + [7]), [max(9, len(m)) for m in methods]
    print(f"{'task':{width}s} {'metric' if key == 'score' else 'agreement':9s} "
          + " ".join(f"{m:>{c}s}" for m, c in zip(methods, cols)))
    for t in tasks:
        metric = results[methods[0]]["tasks"][t]["metric"] if key == "score" else "with ICL"
        print(f"{t:{width}s} {metric:9s} "
              + " ".join(f"{results[m]['tasks'][t][key]:{c}.1f}" for m, c in zip(methods, cols)))
    print(f"{'average':{width}s} {'':9s} " + " ".join(f"{results[m]['average' if key == 'score' else key]:{c}.1f}"
                                                     for m, c in zip(methods, cols)))


def write_json(path, report):
    """The result file, written to a temp file and renamed, as checkpoints are: a crash mid-write
    leaves the old file."""
    data.write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))


def evaluate_all(args, models, files, names, ctx):
    """Every method on every task, one line each; names = {method: the name it is reported under} ->
    {name: {"tasks": {task: evaluate_task's result}, "average"}}."""
    llm, toks, distiller, meta = models
    results = {name: {"tasks": {}} for name in names.values()}
    for n, (task, seeds) in enumerate(files.items(), 1):
        for method, name in names.items():
            t0 = time.time()
            with ctx:
                score = evaluate_task(method, llm, toks, distiller, seeds, args, meta, task)
                results[name]["tasks"][task] = score
            print(f"[{n}/{len(files)}] {task} {name}: {score['score']:.1f} "
                  f"({' '.join(f'{v:.1f}' for v in score['per_seed'].values())}) "
                  f"{time.time() - t0:.0f}s", flush=True)
    for r in results.values():
        r["average"] = float(np.mean([t["score"] for t in r["tasks"].values()]))
    return results


@torch.no_grad()
def main(args):
    t_start = time.time()
    # every path written is checked before any work
    data.check_output(args.out, "--out", kind="eval")
    if args.vectors_dir:
        data.check_output(args.vectors_dir, "--vectors_dir", folder=True)
    methods = args.methods or ["zeroshot", "icl"] + ["mend"] * Path(args.ckpt).exists()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype, ctx = autocast(device, args.dtype)
    part = data.partition(args.data, args.partition)
    checkpoint = read_checkpoint(args, methods, device)
    refuse_seen_tasks(checkpoint[1], part["test"], args)
    # a bad input fails by here, before a model loads
    files, skipped = find_tasks(args, part["test"])
    reference = load_reference(args.reference, args, files) if args.reference else None
    if not args.methods and "mend" not in methods:
        print(f"note: {args.ckpt} not found, so no mend (make it with: python train.py --stage "
              f"pretrain && python train.py --stage finetune --init ckpt.pt)")
    llm, toks, distiller, meta, cfg = load_models(args, methods, device, dtype, checkpoint)
    # what a checkpoint was trained as
    names = {m: trained_method(cfg) if m == "mend" and cfg else m for m in methods}
    print(f"{args.partition}: evaluating {len(files)} of {len(part['test'])} test tasks "
          f"({len(skipped)} skipped), seeds {args.seeds}, methods {list(names.values())}, llm "
          f"{args.llm}, device {device}, dtype {str(dtype)[6:]}; {args.settings}")
    results = evaluate_all(args, (llm, toks, distiller, meta), files, names, ctx)
    print_table(results, list(results))
    if reference or "icl" in methods:
        add_agreement(results, reference or {t: r["predictions"] for t, r in results["icl"]["tasks"].items()})
        print_table(results, list(results), key="agreement")
    report = {"partition": args.partition, "perturb": args.perturb, "llm": args.llm, "dtype": str(dtype)[6:],
              "distiller": cfg.get("distiller"), "ckpt": args.ckpt if distiller is not None else None,
              "seeds": args.seeds, "max_examples": args.max_examples, "k": args.k, "n_vectors": args.n_vectors,
              "demo_tokens": demo_lengths(files, toks, args), "train_config": cfg or None,
              "reference": args.reference or ("icl" if "icl" in methods else None),
              "seconds": time.time() - t_start, "methods": results, "skipped_tasks": skipped}
    write_json(args.out, report)
    print(f"wrote {args.out} ({report['seconds']:.0f}s)")
    return report


if __name__ == "__main__":
    data.run_cli(lambda: main(get_args()))
