"""
The selection signal (ours, not the paper's; train.py --val_tasks N): meta-train tasks held out of training entirely
and judged as eval.py judges the test tasks, so that a run can be selected without touching a test task. A task is
held out where the teacher reads the labels: ICL beats the best one-class prediction by FLOOR_MARGIN points of
macro-F1 and ICL with random labels by LABEL_MARGIN. train.py logs zero-shot, ICL and ICL with random labels on them
once, then MEND and MEND with random labels at every validation.
"""
import numpy as np
import torch

import data
from model import predict as predict_options, prefix_cache

FLOOR_MARGIN = 5.0  # a task is kept where ICL beats the best one-class prediction by this much macro-F1
LABEL_MARGIN = 5.0  # ... and ICL with random labels by this much


def selection_tasks(pools, args, log, predict):
    """--val_tasks: meta-train tasks held out of training entirely, as {task: (k demos, test examples)}: classification
    tasks with 2 to 8 labels and enough examples, in the seed's order, kept where the teacher reads the labels (see
    label_sensitive). predict(method, task, (demos, tests)) -> (predictions, golds)."""
    if not args.val_tasks:
        return {}
    n = args.k + args.val_task_examples
    fit = sorted(t for t, p in pools.items() if len(p) >= n and data.is_classification(p) and 2 <= len(p[0]["options"]) <= 8)
    chosen = []
    for j in np.random.default_rng(args.seed).permutation(len(fit)):
        if len(chosen) < args.val_tasks and len(pools) - len(chosen) > 1:
            chosen += [fit[j]] * label_sensitive(fit[j], signal_examples(pools[fit[j]], args), predict, args.seed, log)
    if len(chosen) < args.val_tasks:
        raise SystemExit(f"--val_tasks {args.val_tasks}: only {len(chosen)} of {len(pools)} meta-train tasks qualify "
                         f"(classification, 2-8 labels, at least {n} examples, ICL {FLOOR_MARGIN} points above the "
                         f"one-class floor and {LABEL_MARGIN} points above ICL with random labels)")
    chosen.sort()
    log(f"selection signal: held out of training: {', '.join(chosen)} ({args.val_task_examples} examples each)")
    return {t: signal_examples(pools[t], args) for t in chosen}


def label_sensitive(task, examples, predict, seed, log):
    """The rule of selection_tasks for one candidate: ICL with the gold labels scores FLOOR_MARGIN points of macro-F1
    above the best one-class prediction (the teacher does better than collapsing onto one class) and LABEL_MARGIN
    points above ICL with random labels (the teacher reads the labels, so a student can be shown to). Zero-shot is
    logged beside them; the random-label pass runs only when the first test passes."""
    preds, golds = predict("zeroshot", task, examples)
    floor = max(data.macro_f1([c] * len(golds), golds) for c in set(golds))
    zero_shot, icl = data.macro_f1(preds, golds), data.macro_f1(*predict("icl", task, examples))
    line = f"selection signal candidate {task}: one-class floor {floor:.1f}, zero-shot {zero_shot:.1f}, icl {icl:.1f}"
    ok = icl >= floor + FLOOR_MARGIN
    if ok:
        icl_random = data.macro_f1(*predict("icl", task, random_labels({task: examples}, seed)[task]))
        line += f", icl random labels {icl_random:.1f}"
        ok = icl >= icl_random + LABEL_MARGIN
    log(line + (" -> kept" if ok else ""))
    return ok


def signal_examples(pool, args):
    """A held-out task's (k demonstrations, test examples): the first k of its pool, then the next val_task_examples."""
    return pool[:args.k], pool[args.k:args.k + args.val_task_examples]


def random_labels(signal, seed):
    """The held-out tasks with their demonstrations' labels replaced at random: a method that reads the labels scores
    lower on them than with the gold labels, as ICL does."""
    return {t: (data.perturb_demos(demos, "random_labels", seed), tests) for t, (demos, tests) in signal.items()}


class Signal:
    """The held-out tasks of a run and the models that are judged on them (the distiller, read as the run reads it:
    steps, distill.Paper)."""

    def __init__(self, llm, distiller, toks, args, ctx, steps):
        self.llm, self.distiller, self.toks, self.args, self.ctx, self.steps = llm, distiller, toks, args, ctx, steps
        self.tasks, self.random = {}, {}

    def choose(self, pools, log):
        """Hold out args.val_tasks of the meta-train pools (selection_tasks) -> their names."""
        self.tasks = selection_tasks(pools, self.args, log, lambda m, task, ex: self.predictions(m, {task: ex})[task])
        self.random = random_labels(self.tasks, self.args.seed)
        return set(self.tasks)

    @torch.no_grad()
    def predictions(self, method, tasks):
        """{held-out task: (predicted option indices, gold indices)} of one method, scored exactly as eval.py scores:
        the demonstrations (icl) or their distilled vectors (mend) become a cached prefix, zero-shot has none."""
        args, toks, llm, out = self.args, self.toks, self.llm, {}
        budgets = (args.teacher_demo_tokens, args.distiller_demo_tokens)
        self.distiller.eval()
        with self.ctx:
            for task, (demos, tests) in tasks.items():
                prefix = None  # zero-shot
                if method == "icl":
                    teacher_ids = data.demo_item(toks, demos, budgets, args.max_len_per_example)[0]
                    prefix = prefix_cache(llm, prefix_ids=torch.tensor([teacher_ids], device=llm.device))
                if method == "mend":
                    inputs = self.steps.inputs(toks, demos, budgets, args.max_len_per_example)
                    prefix = prefix_cache(llm, prefix_embeds=self.steps.demo_vectors(llm, self.distiller, inputs))
                preds = predict_options(llm, toks[0], tests, args.max_len_per_example, (prefix, None))
                out[task] = (preds, [ex["options"].index(ex["output"]) for ex in tests])
        self.distiller.train()
        return out

    def score(self, method, tasks):
        """A method's macro-F1 averaged over the held-out tasks."""
        return float(np.mean([data.macro_f1(p, g) for p, g in self.predictions(method, tasks).values()]))

    def judge(self, methods):
        """' | '-joined macro-F1 of each (label, method, tasks)."""
        return " | ".join(f"{label} {self.score(m, tasks):.2f}" for label, m, tasks in methods)

    def log_reference(self, log):
        """Zero-shot, ICL and ICL with random labels on the held-out tasks, once (the LLM is frozen)."""
        if self.tasks:
            log("signal reference | held-out tasks macro-F1: " + self.judge(
                [("zeroshot", "zeroshot", self.tasks), ("icl", "icl", self.tasks), ("icl_random", "icl", self.random)]))

    def log_step(self, step, seconds, log):
        """MEND and MEND with random labels on the held-out tasks, at a validation step."""
        if self.tasks:
            f1 = self.judge([("mend", "mend", self.tasks), ("mend_random", "mend", self.random)])
            log(f"step {step} | signal {f1} | {seconds:.0f}s")
