"""
Our additions to the paper's MEND, one file per concept; the paper's method is the six files above this folder.

    prefixes.py  the free prefixes truncated and labels (eval.py methods) and the gated start (train.py --base)
    anchors.py   the anchors (eval.py --methods anchors), MEND on them (--base anchors) and the re-weighted anchors
                 (--base anchors --distiller none)
    options.py   the option objective (train.py --kl_rows options), fitted vectors and refine
    signal.py    the selection signal on held-out meta-train tasks (train.py --val_tasks)

The folder imports the core and the core never imports it: the entry scripts (train.py, eval.py, analyze.py) do.
What they ask of it is below: the steps a run or checkpoint takes (each addition subclasses distill.Paper, the
paper's steps) and the API's loader, the flags and the checks of their combinations, eval.py's free prefixes, and
the FLOPs rows of the anchors.
"""
from functools import partial

import data
import flops
from distill import MEND, Paper
from extensions import anchors, options, prefixes
from extensions.signal import Signal

__all__ = ["PREFIXES", "Signal", "add_arguments", "combination_error", "load", "method_flops", "options", "steps_for"]

PREFIXES = {"truncated": partial(prefixes.prefix, "truncated"), "labels": partial(prefixes.prefix, "labels"),
            "anchors": anchors.prefix}


def load(ckpt, **kwargs):
    """distill.MEND.load of a checkpoint trained with the paper's recipe or with one of our additions."""
    return MEND.load(ckpt, recipe=steps_for, **kwargs)


def steps_for(config):
    """The steps a run (train.py's flags as a dict) or a checkpoint (its config) takes: the paper's (distill.Paper)
    unless --base or --kl_rows options (stage 2) name an addition."""
    base = config.get("base", "none")
    if base == "anchors":
        return anchors.Anchors(config)
    rows = config.get("kl_rows", "query") == "options" and config.get("stage") == "finetune"
    gated = base in prefixes.FREE_PREFIXES
    cls = {(False, False): Paper, (True, False): prefixes.Gated, (False, True): options.Options,
           (True, True): options.GatedOptions}[(gated, rows)]
    return cls(config)


def add_arguments(parser):
    """train.py's flags of our additions."""
    ours = parser.add_argument_group("our additions (extensions/, README: What we added to the paper's method)")
    ours.add_argument("--base", default="none", choices=["none", *prefixes.FREE_PREFIXES, "anchors"],
                      help="Start from a free prefix: the vectors are its l tokens' embeddings + gate x the "
                      "distiller's output, the gate at 0 (stage 1: truncated only). anchors: the query reads eval.py's "
                      "anchors + gate x the vectors' keys/values (extensions/anchors.py; with --distiller none, a bias "
                      "on the anchor logits). Default: %(default)s.")
    ours.add_argument("--kl_rows", default="query", choices=["query", "options"],
                      help="Stage 2: the rows the KL is taken on, the paper's query rows or the rows the option "
                      "scorer reads. Default: %(default)s.")
    ours.add_argument("--val_tasks", type=data.count, default=0,
                      help="Stage 2: meta-train tasks held out of training for the selection signal; 0 for none. "
                      "Default: %(default)s.")
    ours.add_argument("--val_task_examples", type=data.positive_int, default=40,
                      help="Test examples scored per task held out by --val_tasks. Default: %(default)s.")
    return ours


def combination_error(args, prompt):
    """Why our additions' flags cannot work with the others, or None (prompt: the PromptTuning distiller's name)."""
    if args.base == "labels" and args.stage == "pretrain":
        return "--base labels applies to --stage finetune (C4 text has no labels; stage 1 takes --base truncated)"
    if args.base != "none" and args.distiller == prompt:
        return f"--base {args.base} needs a distiller; PromptTuning (--distiller prompt) never reads the demonstrations"
    if args.distiller == anchors.NO_DISTILLER and args.base != "anchors":
        return "--distiller none applies to --base anchors only (the anchors re-weighted, no vectors)"
    return anchors.anchors_error(args) if args.base == "anchors" else None


def method_flops(llm_name, D, T, L, Q, distiller=None):
    """flops.method_flops with the rows of the anchors, MEND on them and the re-weighted anchors."""
    llm, distill = flops.CONFIGS[flops.known(llm_name)], flops.distill_flops(llm_name, D, L, distiller)
    return {**flops.method_flops(llm_name, D, T, L, Q, distiller), **anchors.method_flops(llm, D, T, L, Q, distill)}

