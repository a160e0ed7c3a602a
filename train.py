"""
Train the MEND distiller, both stages of the paper in one loop (paper section 3.2; the official
recipe's values: results/official_code.md).

    python train.py --stage pretrain                          # stage 1: KL only, on C4-style text  -> ckpt.pt
    python train.py --stage finetune --init ckpt.pt           # stage 2: CE + lambda*KL on meta-train tasks -> mend.pt
    torchrun --nproc_per_node=8 train.py --stage pretrain --preset paper   # the paper's recipe on 8 GPUs

With no other flags both commands train the embedded default (SmolLM2-135M, distiller = its first 2
layers) on the project's sample data in a few minutes on a laptop CPU. `--preset paper` gives the
paper's recipe (gpt2-large LLM, gpt2 distiller, l=100, 16 demos, lr 5e-5 / 1e-5, 30k steps, global
batch 8, budgets 767/643 tokens).

Order of one step: lr from the schedule -> micro-batches (teacher forward without grad, distiller
forward, student forward, loss / grad_accum, backward) -> unscale, clip, step, zero_grad -> log.
Every eval_interval steps and at the last step: validation loss and an atomic checkpoint. Ctrl-C
saves and exits; a NaN/inf loss stops the run and keeps the last good checkpoint; --resume continues
exactly on CPU (same data, RNG and optimizer state, step for step; on CUDA to the rounding of its
atomic-add kernels, see README: What is exact on a GPU).
"""
import argparse
import functools
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function

import data
import extensions
import flops
from distill import answer_ce_per_example, kl_per_example, mend_loss
from model import (EMBEDDED, PROMPT, autocast, check_compatible, count_params, distiller_state, llm_logits,
                   load_checkpoint, load_llm, now, resolve_device, save_checkpoint, teacher_logits)

# the official pretrain.sh / finetune.sh (results/official_code.md); batch is per GPU: 8 GPUs give the global 8
PAPER = {
    "common": dict(llm="gpt2-large", distiller="gpt2", n_vectors=100, k=16, batch=1, grad_accum=1, max_steps=30000,
                   warmup=0, schedule="linear", lam=1.0, temperature=1.0, max_len_per_example=256,
                   teacher_demo_tokens=767, distiller_demo_tokens=643, c4_max_tokens=1024, eval_interval=2000,
                   queries_per_demo=1, relabel=0.0, freeze_embeddings=False, kl_rows="query", llm_dropout=True),
    "pretrain": dict(lr=5e-5),
    "finetune": dict(lr=1e-5),
}
OUT = {"pretrain": "ckpt.pt", "finetune": "mend.pt"}
SHARE_GPU = "MEND_SHARE_GPU"  # =1: all torchrun ranks share cuda:0 (results/gpu/check.py's DDP test on one GPU)


def get_args(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0])
    paper = p.add_argument_group("the paper's recipe (--preset paper sets the paper's values)")
    paper.add_argument("--stage", required=True, choices=["pretrain", "finetune"],
                       help="The stage to train: pretrain (stage 1: C4 text, KL loss only) or "
                       "finetune (stage 2: MetaICL tasks, answer CE + lambda x KL).")
    paper.add_argument("--preset", default="cpu", choices=["cpu", "paper"],
                       help="The values of the flags in this group: cpu (a short run on a CPU) or "
                       "paper (the paper's recipe, for GPUs). Default: %(default)s.")
    paper.add_argument("--init", default="", help="Start the distiller from this checkpoint, e.g. "
                       "stage 2 from stage 1's ckpt.pt. Without it, the distiller starts from its "
                       "pretrained or copied weights.")
    paper.add_argument("--data", default="sample_data", help="Data folder holding c4/ and metaicl/ "
                       "(README: Real data). Default: %(default)s.")
    paper.add_argument("--partition", default="qa2qa", help="MetaICL partition whose meta-train "
                       "tasks stage 2 trains on: hr2lr, class2class, nonclass2class, qa2qa, "
                       "nonqa2qa, nonnli2nli or nonpara2para. Default: %(default)s.")
    paper.add_argument("--llm", type=data.model_name, default=EMBEDDED,
                       help="The frozen LLM, decoder-only or T5: a hub name, a local folder, or "
                       "smollm2-135m (embedded, works offline). Default: %(default)s.")
    paper.add_argument("--distiller", type=data.model_name, default="layers:2",
                       help="The distiller: a hub name or local folder (paper: gpt2), or layers:N, "
                       "a copy of the LLM's first N layers (of a T5: of its encoder). Default: "
                       "%(default)s.")
    paper.add_argument("--n_vectors", type=data.positive_int, default=16,
                       help="Number l of distillation vectors (paper: 100). Default: %(default)s.")
    paper.add_argument("--k", type=data.positive_int, default=4,
                       help="Demonstrations per stage-2 example (paper: 16). Default: %(default)s.")
    paper.add_argument("--max_len_per_example", type=data.positive_int, default=64,
                       help="Most tokens of one example, input and output together; a longer input "
                       "is cut (MetaICL: 256). Default: %(default)s.")
    paper.add_argument("--teacher_demo_tokens", type=data.positive_int, default=256,
                       help="Most demonstration tokens the teacher reads, whole demonstrations only "
                       "(paper: 767). Default: %(default)s.")
    paper.add_argument("--distiller_demo_tokens", type=data.positive_int, default=256,
                       help="Most demonstration tokens the distiller reads (paper: 643). Default: %(default)s.")
    paper.add_argument("--c4_max_tokens", type=data.checked(int, lambda v: v >= 2, "an integer >= 2 (demonstrations "
                       "and a query)"), default=128, help="Tokens kept of each C4 document in stage "
                       "1: the first 80%% are the demonstrations, the rest the query (paper: 1024). "
                       "Default: %(default)s.")
    paper.add_argument("--lr", type=data.non_negative, default=1e-4,
                       help="Peak AdamW learning rate (paper: 5e-5 in stage 1, 1e-5 in stage 2); 0 "
                       "keeps the weights as initialised. Default: %(default)s.")
    paper.add_argument("--weight_decay", type=data.non_negative, default=0.0,
                       help="AdamW weight decay (paper: 0). Default: %(default)s.")
    paper.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                       help="Learning-rate schedule after the warmup: linear or cosine decay, or "
                       "constant. Default: %(default)s.")
    paper.add_argument("--warmup", type=data.count, default=0,
                       help="Steps of linear learning-rate warmup (paper: 0). Default: %(default)s.")
    paper.add_argument("--max_steps", type=data.positive_int, default=30,
                       help="Optimizer steps (paper: 30000). Default: %(default)s.")
    paper.add_argument("--batch", type=data.positive_int, default=2,
                       help="Examples per micro-batch in each process (paper: 1 on each of 8 GPUs). "
                       "Default: %(default)s.")
    paper.add_argument("--grad_accum", type=data.positive_int, default=1,
                       help="Micro-batches accumulated into one optimizer step. Default: %(default)s.")
    paper.add_argument("--clip", type=data.positive, default=1.0, help="Gradient-norm clipping "
                       "threshold (the Hugging Face Trainer's, which the paper's code uses). "
                       "Default: %(default)s.")
    paper.add_argument("--lam", type=data.non_negative, default=1.0, help="Weight lambda of the KL "
                       "term in stage 2's loss, CE + lambda x KL; 0 trains on the answer CE alone. "
                       "Default: %(default)s.")
    paper.add_argument("--temperature", type=data.positive, default=1.0,
                       help="Temperature tau of the KL (paper: 1). Default: %(default)s.")
    paper.add_argument("--llm_dropout", action=argparse.BooleanOptionalAction, default=False,
                       help="Keep the frozen LLM's dropout on in training passes, as the official "
                       "code does (results/official_code.md). Default: off.")
    paper.add_argument("--seed", type=data.count, default=100,
                       help="Seed of the data order and of torch's random numbers. Default: %(default)s.")
    ours = p.add_argument_group("our additions to the paper's step (README: What we added to the paper's method)")
    ours.add_argument("--queries_per_demo", type=data.positive_int, default=1,
                      help="Stage 2: queries of a task that read one demonstration set (one teacher "
                      "and one distiller pass serve them all). Default: %(default)s.")
    ours.add_argument("--relabel", type=data.fraction, default=0.0,
                      help="Stage 2: probability that an example's label words are swapped for "
                      "other tasks' labels (symbol tuning). Default: %(default)s.")
    ours.add_argument("--freeze_embeddings", action=argparse.BooleanOptionalAction, default=True,
                      help="Keep the distiller's token embeddings as loaded (the paper trains them). Default: on.")
    ours.add_argument("--lr_vectors", type=data.non_negative, default=0.0,
                      help="Peak learning rate of the placeholders and the projection; 0 uses --lr. "
                      "Default: %(default)s.")
    ours.add_argument("--val_items", type=data.count, default=8, help="Held-out validation "
                      "examples, scored at every checkpoint; 0 for none. Default: %(default)s.")
    extensions.add_arguments(p)
    system = p.add_argument_group("system")
    system.add_argument("--out", default="", help="Checkpoint file to write, its log (.log) beside "
                        "it; its folder must exist, and an existing file is replaced only if it is "
                        "a checkpoint. Default: ckpt.pt for --stage pretrain, mend.pt for finetune.")
    system.add_argument("--resume", action="store_true",
                        help="Continue the run saved at --out: weights, optimizer, random states and step.")
    system.add_argument("--eval_interval", type=data.positive_int, default=10,
                        help="Steps between validations and checkpoint saves. Default: %(default)s.")
    system.add_argument("--log_interval", type=data.positive_int, default=1,
                        help="Steps between log lines. Default: %(default)s.")
    system.add_argument("--device", default="auto", help="Device to train on, e.g. cuda:1; auto is "
                        "cuda when available, else cpu. Default: %(default)s.")
    system.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Autocast dtype, also the frozen LLM's: auto is bfloat16 on a GPU that "
                        "supports it, else float16, and float32 on a CPU. Default: %(default)s.")
    system.add_argument("--threads", type=data.count, default=0,
                        help="CPU threads for torch; 0 lets torch use every core. Default: %(default)s.")
    system.add_argument("--compile", action="store_true", help="Compile the distiller with torch.compile.")
    system.add_argument("--bench", action="store_true", help="Time every phase of every step and "
                        "write the breakdown to a JSON file beside --out (.bench.json).")
    system.add_argument("--peak_tflops", type=data.non_negative, default=0.0,
                        help="Peak TFLOP/s that MFU is given against; 0 uses the GPU's nominal "
                        "peak, or on a CPU its measured float32 matmul rate. Default: %(default)s.")
    known, _ = p.parse_known_args(argv)
    if known.preset == "paper":
        p.set_defaults(**PAPER["common"], **PAPER[known.stage])
    args = p.parse_args(argv)
    args.out = args.out or OUT[args.stage]
    layers = args.distiller.removeprefix("layers:")  # flags each in range that cannot work together
    if layers != args.distiller and not (layers.isdigit() and int(layers) >= 1):
        p.error(f"--distiller {args.distiller}: layers:N takes an integer N >= 1")
    why = extensions.combination_error(args, PROMPT) or (data.budget_error(args) if args.stage == "finetune" else None)
    if why:
        p.error(why)
    return args


# -----------------------------------------------------------------------------
# device, dtype, DDP


def setup_device(args):
    """-> (device, autocast context, autocast dtype, rank, world size); joins the torchrun process group if any.
    The autocast dtype (model.autocast) applies on CPU too: --dtype bfloat16 there runs the GPU's code
    path."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = resolve_device(args.device).startswith("cuda")
    # test-only: every rank on cuda:0 over gloo (NCCL refuses a shared GPU)
    shared = os.environ.get(SHARE_GPU) == "1"
    device = f"cuda:{0 if shared else int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    dtype, ctx = autocast(device, args.dtype)
    if world > 1:
        dist.init_process_group("nccl" if cuda and not shared else "gloo")
    if cuda:
        torch.cuda.set_device(device)
    return device, ctx, dtype, rank, world


def get_lr(args, step):
    """The schedule as a factor of the peak lr: linear warmup, then linear decay to 0 (the paper's
    HF Trainer default), cosine, or constant."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    return {"linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac)), "constant": 1.0}[args.schedule]




# -----------------------------------------------------------------------------
# data: item number i of the run, the same whatever the number of processes


def read_data(args, toks, steps):
    """The run's C4 items (stage 1) or meta-train pools (stage 2), read before the LLM loads and the
    log is written, so that a run that would read nothing is refused first -> (items or pools, lines
    for the log)."""
    notes = []
    if args.stage == "finetune":
        part = data.partition(args.data, args.partition)
        return data.meta_train_pools(args.data, part["train"], notes.append), notes
    # every rank holds all of C4, tokenized once (data.c4_ids: 4 KiB a 1024-token document)
    docs = [data.c4_ids(toks[0], t, args.c4_max_tokens) for t in data.read_c4(Path(args.data) / "c4")]
    docs = [ids for ids in docs if c4_doc(args, toks, steps, ids)]
    if len(docs) <= args.val_items:
        raise SystemExit(f"{args.data}/c4 has {len(docs)} usable documents; need more than "
                         f"--val_items={args.val_items}")
    return docs, notes


def c4_doc(args, toks, steps, ids):
    """The stage-1 item of one C4 document's token ids, with the fields of the run's steps (None if
    too short to split)."""
    item = data.c4_item(ids, toks, args.c4_max_tokens)
    return item and {**item, **steps.fields(toks, item, None, None)}


def make_items(args, read, toks, log, signal, steps):
    """read_data's (items or pools, lines for the log) -> (item(i) for training item number i, fixed
    validation items, trained-on tasks, tasks held out for the selection signal). Each item carries
    the fields of the run's steps."""
    budgets, (source, notes) = (args.teacher_demo_tokens, args.distiller_demo_tokens), read
    for note in notes:
        log(note)
    if args.stage == "pretrain":
        train, val = source[:-args.val_items] if args.val_items else source, source[len(source) - args.val_items:]
        log(f"c4: {len(train):,} training documents, {len(val)} held out")

        @functools.lru_cache(maxsize=1)
        def order(epoch):  # one permutation per pass over the corpus, made once, not once per item
            return torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + epoch))
        item = lambda i: c4_doc(args, toks, steps, train[order(i // len(train))[i % len(train)]])
        return item, [c4_doc(args, toks, steps, t) for t in val], [], set()
    held_out = signal.choose(source, log) if signal else set()
    pools = {t: p for t, p in source.items() if t not in held_out}
    n_held = 2 if args.val_items else 0
    train_pools, held = data.split_pools(pools, n_held) if n_held else (pools, {})
    fields = lambda item, demos, targets: steps.fields(toks, item, demos, targets)
    val = data.meta_val_items(train_pools, held, toks, args.seed, args.val_items, args.k, budgets,
                              args.max_len_per_example, fields) if n_held else []
    return (lambda i: data.meta_train_item(train_pools, toks, i, args.seed, args.k, budgets, args.max_len_per_example,
                                           args.queries_per_demo, args.relabel, fields)), val, sorted(pools), held_out


# -----------------------------------------------------------------------------
# checkpoints


def checkpoint_state(distiller, optimizer, scaler, step, config, world=1):
    """What a checkpoint holds; called on every rank (it gathers each rank's RNG states: their
    dropout masks differ)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, rng)
        rng = {**rng, "ranks": ranks}
    return {"model": distiller_state(distiller), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "config": config, "rng": rng}


def starting_state(args):
    """The checkpoint a run starts from (--resume: its own --out, when it exists; else --init), read
    and checked before the LLM is loaded, so a wrong path or a foreign checkpoint costs a second,
    not a model load."""
    resume = args.resume and os.path.exists(args.out)
    if not resume and not args.init:
        return None
    path = args.out if resume else args.init
    if not resume and not os.path.isfile(path):
        raise SystemExit(f"--init {path}: no such checkpoint "
                         f"(make it with: python train.py --stage pretrain --out {path})")
    state = load_checkpoint(path)
    check_compatible(state["config"], args.llm, args.distiller, path)
    if resume and "optimizer" not in state:
        raise SystemExit(f"{path} holds no optimizer state to resume from")
    return {**state, "path": path, "resume": resume}


def restore(state, optimizer, scaler, rank):
    """--resume: optimizer, scaler and this rank's RNG; returns the step to continue from. A scaler state saved by a
    bf16 or fp32 run is empty (its scaler was disabled): an fp16 run then starts a fresh scale. A rank the saved run
    did not have keeps its own seed."""
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    ranks = state["rng"].get("ranks", [state["rng"]])
    if rank < len(ranks):
        torch.set_rng_state(ranks[rank]["torch"])
        if "cuda" in ranks[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ranks[rank]["cuda"])
    return state["step"]


# -----------------------------------------------------------------------------
# what the loop calls besides the step: validation, the reference line, the log


@torch.no_grad()
def validate(llm, distiller, val_items, steps, args, device):
    """Mean loss, KL and CE on the held-out items (distiller in eval mode, no gradients)."""
    distiller.eval()
    totals = torch.zeros(3)
    for i in range(0, len(val_items), args.batch):
        chunk = val_items[i:i + args.batch]
        out = mend_loss(llm, distiller, steps.collate(chunk, device), args.lam, args.temperature, steps)
        totals += torch.stack([o.float().cpu() for o in out]) * len(chunk)
    distiller.train()
    return (totals / max(1, len(val_items))).tolist()


@torch.no_grad()
def reference_line(llm, val_items, steps, args, device):
    """What the vectors must beat, on the validation items (the LLM is frozen, so it is computed
    once): KL and CE of the LLM reading the query alone, the teacher's own CE, and the KL of the LLM
    reading what the student reads at the start (the steps' start_logits: for the paper's, the last
    l demonstration tokens as ordinary tokens)."""
    kl, ce, teacher_ce, start_kl, n = 0.0, 0.0, 0.0, 0.0, len(val_items)
    for it in val_items:
        b = steps.collate([it], device)
        q, qm, t, tm = b["query_ids"], b["query_mask"], b["teacher_demo_ids"], b["teacher_demo_mask"]
        teacher = teacher_logits(llm, t, tm, q, qm)
        alone = llm_logits(llm, q, qm)                                          # (1, T, V)
        start = steps.start_logits(llm, b)                                      # (1, T, V)
        kl += kl_per_example(teacher, alone, qm, args.temperature).item() / n
        ce += answer_ce_per_example(alone, q, b["answer_mask"]).item() / n
        teacher_ce += answer_ce_per_example(teacher, q, b["answer_mask"]).item() / n
        start_kl += kl_per_example(teacher, start, qm, args.temperature).item() / n
    return (f"val reference | the LLM reading the query alone: kl {kl:.5g} | ce {ce:.5g} | the "
            f"teacher: ce {teacher_ce:.5g} | {steps.start_name()}: kl {start_kl:.5g}")


def make_optimizer(distiller, args, steps):
    """Fused AdamW (10x faster on CPU too) over the parameter groups of the run's steps, each with
    its peak lr."""
    groups = steps.param_groups(distiller, args.lr, args.lr_vectors)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, weight_decay=args.weight_decay, fused=True)


def log_setup(log, config, llm, distiller, device, dtype):
    """The log's lines after the config: device, precision and sizes, then the peak MFU is taken
    against -> that peak (None for a GPU of unknown peak)."""
    log(f"device={device} dtype={str(dtype).removeprefix('torch.')} world={config['world_size']} "
        f"threads={torch.get_num_threads()} | llm {config['llm']}: {count_params(llm):,} params, "
        f"frozen | distiller {config['distiller']}: {count_params(distiller, True):,} trainable "
        f"params (backbone + {config['n_vectors']} placeholders + projection)")
    peak = config["peak_tflops"] * 1e12 or flops.peak_flops(device, dtype)
    source = ("--peak_tflops" if config["peak_tflops"] else "measured float32 matmul rate" if device == "cpu"
              else "nominal, flops.GPU_PEAK_TFLOPS")
    log(f"peak for MFU: {peak / 1e12:.3g} TFLOP/s ({source})" if peak
        else "peak for MFU: unknown GPU, pass --peak_tflops (MFU not logged)")
    return peak


def logger(path, rank):
    """log(msg): rank 0 prints msg and appends it to the log file at path."""
    def log(msg):
        if rank == 0:
            print(msg, flush=True)
            with open(path, "a") as f:
                f.write(msg + "\n")
    return log


# -----------------------------------------------------------------------------
# the run


def run(args):
    """The recipe: device -> data -> models -> config -> items -> optimizer -> the loop. Every bad
    input is refused before the first line of the log is written. Returns this run's [(step,
    loss)]."""
    device, ctx, dtype, rank, world = setup_device(args)
    log = logger(Path(args.out).with_suffix(".log"), rank)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = extensions.steps_for(vars(args))  # the paper's steps, or those of an addition (--base, --kl_rows)
    # every file the run writes sits beside --out
    data.check_output(args.out, "--out", kind="checkpoint")
    start = starting_state(args)  # a bad --init/--resume fails here, before the LLM is touched
    toks = steps.tokenizers(args.llm)  # so does a model that cannot be loaded
    read = read_data(args, toks, steps)  # and a run that would read nothing
    # the frozen LLM is held in the autocast dtype; the distiller stays fp32
    llm = load_llm(args.llm, device, dtype)
    distiller = steps.build(llm, args.distiller, args.n_vectors, args.freeze_embeddings)
    config = {**vars(args), "world_size": world}
    if start and start["resume"]:  # marks where the resumed run's lines begin: later steps above were not saved
        log(f"resumed from {args.out} at step {start['step']}")
    # the first write: a run refused before this leaves every file as it was
    log(f"config: {json.dumps(config)}")
    peak = log_setup(log, config, llm, distiller, device, dtype)
    # held-out tasks
    signal = args.val_tasks and extensions.Signal(llm, distiller, toks, args, ctx, steps)
    item, val_items, tasks, held_out = make_items(args, read, toks, log, signal, steps)
    config["train_tasks"], config["val_tasks_held_out"] = tasks, sorted(held_out)
    optimizer = make_optimizer(distiller, args, steps)
    # a no-op unless fp16
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    # None: PromptTuning
    backbone = getattr(getattr(distiller, "distiller", distiller), "backbone", None)
    flops_cfg = (llm.config, backbone and backbone.config)
    if val_items:
        with ctx:
            log(reference_line(llm, val_items, steps, args, device))
    if signal:  # on every rank (only rank 0 logs), so that no rank waits in a collective meanwhile
        signal.log_reference(log)
    # the weights above are alike on every rank; dropout masks must differ
    torch.manual_seed(args.seed + rank)
    step = 0
    if start:  # --resume restores everything; --init loads the distiller's weights only (stage 2 from stage 1)
        # what its steps added
        left = set(extensions.steps_for(start["config"]).own) - set(distiller.state_dict())
        steps.load(distiller, {k: v for k, v in start["model"].items() if k not in left}, start["path"])
        step = restore(start, optimizer, scaler, rank) if start["resume"] else 0
    if args.resume and not (start and start["resume"]):
        log(f"--resume: no checkpoint found at {args.out}; training starts from step 0")
    if start and not start["resume"]:
        log(f"initialized the distiller from {args.init}")
    # what the forward pass calls; distiller is what is saved
    model = DDP(distiller) if world > 1 else distiller
    model = torch.compile(model) if args.compile else model

    def save(s):  # every rank gathers its RNG state into the checkpoint; rank 0 writes it
        state = checkpoint_state(distiller, optimizer, scaler, s, config, world)
        if rank == 0:
            save_checkpoint(args.out, state)

    # the training loop: lr -> micro-batches (loss, backward) -> clip, step -> log -> validation and checkpoint
    per_step = args.batch * args.grad_accum * world  # items per optimizer step, over all processes
    losses, window, t_start = [], [], time.time()  # window: per step since the last log line
    profiler = bench_profiler(args) if args.bench else nullcontext()
    model.train()
    try:
        with profiler:
            while step < args.max_steps:
                factor = get_lr(args, step)
                for group in optimizer.param_groups:
                    group["lr"] = group["peak_lr"] * factor
                t0, stats, tokens, queries, work = now(), torch.zeros(3, device=device), 0, 0, 0
                llm.train(args.llm_dropout)  # dropout only; the LLM's weights stay frozen (no gradients)
                for micro in range(args.grad_accum):
                    first = step * per_step + (micro * world + rank) * args.batch
                    items = [item(i) for i in range(first, first + args.batch)]
                    tokens += sum(len(it["teacher_demo"]) + sum(map(len, it["queries"])) for it in items)
                    queries += sum(len(it["queries"]) for it in items)
                    work += sum(steps.item_flops(flops_cfg, it) for it in items)
                    with ctx:
                        batch = steps.collate(items, device)
                        loss, kl, ce = mend_loss(llm, model, batch, args.lam, args.temperature, steps)
                    if not torch.isfinite(loss):
                        log(f"step {step + 1}: loss is {loss.item()}; stopping. The last good "
                            f"checkpoint {args.out} is kept.")
                        raise SystemExit(1)
                    with record_function("backward"):
                        scaler.scale(loss / args.grad_accum).backward()
                    stats += torch.stack([loss.detach(), kl, ce]) / args.grad_accum
                llm.eval()
                # fp16: the scaler skips a step whose gradients hold inf/NaN
                with record_function("optimizer"):
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(distiller.parameters(), args.clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                if world > 1:
                    dist.all_reduce(stats)
                    stats /= world
                step, dt = step + 1, now() - t0  # now() waits for the GPU: the step's kernels are inside dt
                losses.append((step, stats[0].item()))
                window.append(stats.tolist() + [dt, tokens * world, queries * world, work * world])
                if args.bench:
                    profiler.step()
                # the means over the window
                if step % args.log_interval == 0 or step == args.max_steps:
                    loss, kl, ce, dt, tok, qs, fl = (sum(col) / len(window) for col in zip(*window))
                    # peak is per device
                    mfu = f" ({fl / dt / world / peak:.1%} of peak)" if peak else ""
                    log(f"step {step} | loss {loss:.5g} | kl {kl:.5g} | ce {ce:.5g} | lr "
                        f"{args.lr * factor:.2e} | {dt * 1000:.0f}ms | {tok / dt:.0f} tok/s | "
                        f"{qs / dt:.2f} queries/s | {fl / dt / 1e12:.3g} TFLOP/s{mfu}")
                    window = []
                if step % args.eval_interval == 0 or step == args.max_steps:
                    if val_items:
                        with ctx:
                            v = validate(llm, distiller, val_items, steps, args, device)
                        log(f"step {step} | val loss {v[0]:.5g} | val kl {v[1]:.5g} | val ce {v[2]:.5g}")
                    if signal:  # every rank judges, as above
                        signal.log_step(step, time.time() - t_start, log)
                    save(step)
    except KeyboardInterrupt:
        save(step)
        log(f"interrupted: saved step {step} to {args.out}; continue with --resume")
        raise SystemExit(130)
    final = f"{losses[-1][1]:.4f} -> {args.out}" if losses else "nan (no step taken, nothing saved)"
    log(f"done: {step} steps in {time.time() - t_start:.0f}s, final loss {final}")
    if args.bench and rank == 0:
        write_bench(profiler, losses, args, log)
    if world > 1:  # gloo's threads abort the process at exit (SIGABRT) if the group is left open
        dist.barrier()
        dist.destroy_process_group()
    return losses


# -----------------------------------------------------------------------------
# --bench: where a step's time goes


PHASES = ["teacher_forward", "distiller_forward", "student_forward", "backward", "optimizer"]


def bench_profiler(args):
    """torch.profiler over the steps after 2 warm-up steps; mend_loss and the loop mark the
    PHASES."""
    skip = min(2, args.max_steps - 1)
    gpu = [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, *gpu],
                                  schedule=torch.profiler.schedule(skip_first=skip, wait=0, warmup=0,
                                                                   active=args.max_steps))


def write_bench(profiler, losses, args, log):
    """--bench: mean time per step of each phase (its GPU time on CUDA, else its wall time) and the loop's overhead
    over them, logged and written beside the checkpoint (--out with the suffix .bench.json)."""
    events = {e.key: e for e in profiler.key_averages()}
    n = args.max_steps - min(2, args.max_steps - 1) if losses else 1
    gpu = torch.cuda.is_available()
    ms = {k: (events[k].device_time_total if gpu else events[k].cpu_time_total) / 1000 / n if k in events else 0.0
          for k in PHASES}
    total = events["ProfilerStep*"].cpu_time_total / 1000 / n if "ProfilerStep*" in events else sum(ms.values())
    overhead = total / max(sum(ms.values()), 1e-9) - 1
    for k in PHASES:
        log(f"bench | {k:18s} {ms[k]:8.1f} ms/step")
    log(f"bench | {'total':18s} {total:8.1f} ms/step; the loop's overhead over the phases: "
        f"{overhead * 100:.1f}% ({n} steps)")
    Path(args.out).with_suffix(".bench.json").write_text(json.dumps(
        {"config": vars(args), "ms_per_step": {**ms, "total": total}, "overhead": overhead}, indent=1))


if __name__ == "__main__":
    data.run_cli(lambda: run(get_args()))
