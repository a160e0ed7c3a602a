"""
The MEND objective (paper section 3.2, knowledge distillation with the frozen LLM as its own
teacher).

    teacher  = LLM(demonstrations ; query)           run without gradients
    student  = LLM(S_D ; query),  S_D = distiller(demonstrations)
    KL       = forward KL(teacher || student) at temperature tau, summed over the vocabulary, on every query position
    stage 1  = KL                       (pretraining on C4: query = the last 20% of a document)
    stage 2  = CE(answer tokens) + lambda * KL   (finetuning on MetaICL meta-train tasks: query = input ; output)

Both terms are averaged per example first (over its query or answer tokens), then over the batch.
With batch 1 per GPU under DDP, which is what the official runs use, that is exactly their
objective; it also makes a 2-process run, gradient accumulation and a single large batch give
identical gradients.

`Paper` names the steps of that path once (build the distiller, load its weights, the fields of an
item, collate, the teacher, the vectors, the student, the loss terms, a step's FLOPs, the
optimizer's groups, the vectors and prefix evaluation reads), each with the paper's version. It is
the one plug point of our additions (extensions/): each of them subclasses it where it differs, and
`extensions.steps_for(config)` picks the one a run's flags or a checkpoint's config name.

Above the objective sits what uses a trained distiller: the distill-once vector files (safetensors
with the LLM, distiller, checkpoint and demonstrations that made them) and the MEND API (distill
your demonstrations once, then score, classify or generate). Imports run one way: data <- model <-
flops <- distill <- extensions/ <- the entry scripts (train.py, eval.py, analyze.py), which choose
the steps of a run or a checkpoint.
"""
import hashlib
import json
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.profiler import record_function

import data
import flops
from model import (CausalLM, CheckpointError, Graphed, autocast, build_distiller, extend_prefix, family, file_hash,
                   freeze, llm_logits, load_checkpoint, load_distiller_state, load_llm, mean_log_probs, prefix_cache,
                   resolve_device, teacher_logits, tokenizers, umask_mode)


def kl_per_example(teacher, student, mask, temperature=1.0):
    """KL(p_teacher || p_student) per example: logits (B, T, V), mask (B, T) -> (B,), the mean over
    masked rows."""
    return masked_mean(row_kl(teacher, student, temperature), mask)


def row_kl(teacher, student, temperature=1.0):
    """KL(p_teacher || p_student) of every row, summed over the vocabulary: logits (..., V) ->
    (...)."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)               # (..., V)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)               # (..., V)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def answer_ce_per_example(student, query_ids, answer_mask):
    """Next-token CE on the answer tokens: row t predicts token t+1. logits (B, T, V) -> (B,)."""
    logits, targets = student[:, :-1].float(), query_ids[:, 1:]  # (B, T-1, V), (B, T-1)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")    # (B, T-1)
    return masked_mean(ce, answer_mask[:, 1:])


def masked_mean(values, mask):
    """(B, T) values, (B, T) 0/1 mask -> (B,) mean over the masked entries (0 for an example with
    none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def per_item_mean(values, query_item, n_items):
    """(B*Q,) per-query values -> their mean per item, then over the B items: each item weighs the
    same whatever its Q."""
    counts = torch.bincount(query_item, minlength=n_items).to(values.dtype)          # (B,)
    return (values / counts[query_item]).sum() / n_items


def query_terms(teacher, student, batch, temperature):
    """The paper's rows: KL on every query row, CE on the answer tokens -> (N,), (N,) (KL None
    without a teacher)."""
    q, qm = batch["query_ids"], batch["query_mask"]
    kl = kl_per_example(teacher, student, qm, temperature) if teacher is not None else None
    return kl, answer_ce_per_example(student, q, batch["answer_mask"])


# -----------------------------------------------------------------------------
# the loss of one step


def mend_loss(llm, distiller, batch, lam=1.0, temperature=1.0, steps=None):
    """One MEND step's loss on a collated batch (see data.collate). Returns (loss, kl, ce) as 0-d
    tensors.

    The teacher reads the demonstrations, the distiller makes the vectors, the student reads
    [vectors ; query]; the KL is taken on every query row and the CE on the answer tokens. Without
    answers (stage 1) the loss is the KL alone; stage 2 adds the answer CE: CE + lam * KL (with lam
    = 0 the teacher is not run and the logged KL is 0). An item with Q queries is read once by the
    teacher (keys/values of its demonstrations) and once by the distiller; its vectors then precede
    each of its Q queries. `steps` (default: the paper's) supplies each step; the phases are named
    for torch.profiler (train.py --bench).
    """
    steps = steps or Paper({})
    owner, B = batch["query_item"], batch["distiller_demo_ids"].shape[0]
    has_answer = steps.has_answer(batch)
    # lam = 0 in stage 2 (no distillation, PromptTuning): no logits
    with record_function("teacher_forward"):
        teacher = steps.teacher(llm, batch, logits=bool(lam or not has_answer))
    with record_function("distiller_forward"):
        vectors, mask = steps.vectors(llm, distiller, batch)                   # (B, L, C), (B, L)
    with record_function("student_forward"):
        student = steps.student(llm, distiller, batch, vectors, mask, teacher)
        kl, ce = steps.terms(teacher, student, batch, temperature)
        kl = per_item_mean(kl, owner, B) if kl is not None else student.new_zeros((), dtype=torch.float32)
        ce = per_item_mean(ce, owner, B) if has_answer else kl.new_zeros(())
    loss = ce + lam * kl if has_answer else kl
    return loss, kl.detach(), ce.detach()


class Paper:
    """The paper's MEND, step by step. An addition of ours (extensions/) subclasses it and replaces
    the steps where it differs; `config` is a run's flags (train.py) or a checkpoint's training
    config, as a dict."""

    api_refusal = None  # why the vector API (MEND) cannot use such a checkpoint, if it cannot
    own = ()            # names of the parameters these steps add to the paper's distiller

    def __init__(self, config):
        self.config = config

    def tokenizers(self, llm_name):
        return tokenizers(self.config["distiller"], llm_name)

    def build(self, llm, spec, n_vectors, freeze_embeddings=False):
        return build_distiller(spec, llm, n_vectors, freeze_embeddings=freeze_embeddings)

    def load(self, distiller, state, path):
        load_distiller_state(distiller, state, path)

    def fields(self, toks, item, demos, targets):
        """What an item carries beyond the paper's fields (demos, targets: None for a C4
        document)."""
        return {}

    def collate(self, items, device):
        return data.collate(items, device)

    def has_answer(self, batch):
        return bool(batch["answer_mask"].any())

    def teacher(self, llm, batch, logits=True):
        """The LLM reading the real demonstrations, then each query: (N, T, V) logits (None when not
        needed)."""
        if not logits:
            return None
        return teacher_logits(llm, batch["teacher_demo_ids"], batch["teacher_demo_mask"], batch["query_ids"],
                              batch["query_mask"], batch["query_item"])

    def vectors(self, llm, distiller, batch):
        """-> the distilled vectors (B, L, C) and their mask (B, L)."""
        vectors = distiller(batch["distiller_demo_ids"], batch["distiller_demo_mask"])   # (B, L, C)
        return vectors, batch["distiller_demo_mask"].new_ones(vectors.shape[:2])

    def student(self, llm, distiller, batch, vectors, mask, teacher):
        """The LLM reading [vectors ; query], each query after its own item's vectors: (N, T, V)."""
        owner = batch["query_item"]
        return llm_logits(llm, batch["query_ids"], batch["query_mask"], prefix_embeds=vectors[owner],
                          prefix_mask=mask[owner])  # (N, L, C) prefix -> (N, T, V)

    def terms(self, teacher, student, batch, temperature):
        return query_terms(teacher, student, batch, temperature)

    def start_logits(self, llm, batch):
        """What the student reads at the start, read by the LLM as it is (train.py's reference
        line): for the paper's MEND the last l demonstration tokens (the truncated prefix) -> (N, T,
        V)."""
        owner, l = batch["query_item"], self.config["n_vectors"]
        # (N, l)
        t, tm = batch["teacher_demo_ids"][owner, -l:], batch["teacher_demo_mask"][owner, -l:]
        return llm_logits(llm, batch["query_ids"], batch["query_mask"], prefix_embeds=llm.get_input_embeddings()(t),
                          prefix_mask=tm)  # (N, l, C) prefix -> (N, T, V)

    def start_name(self):
        return f"the last {self.config['n_vectors']} demonstration tokens (truncated)"

    def item_flops(self, cfgs, item):
        """flops.step_flops of one item; cfgs = (LLM config, distiller config or None for
        PromptTuning)."""
        lens = (len(item["teacher_demo"]), len(item["distiller_demo"]), list(map(len, item["queries"])))
        teacher = bool(self.config["lam"]) or self.config["stage"] == "pretrain"
        return flops.step_flops(*cfgs, self.config["n_vectors"], *lens, teacher=teacher)

    def param_groups(self, distiller, lr, lr_vectors):
        """AdamW groups: the placeholders and projection at lr_vectors (when set), the rest at
        lr."""
        named = [(n, p) for n, p in distiller.named_parameters() if p.requires_grad]
        own = lambda n: n.startswith(("placeholder", "proj"))
        return [{"params": [p for n, p in named if not own(n)], "peak_lr": lr},
                {"params": [p for n, p in named if own(n)], "peak_lr": lr_vectors or lr}]

    def inputs(self, toks, demos, budgets, max_len):
        """What the distiller reads of a demonstration set ((input, output) dicts or formatted
        text), by name: the vector files record a hash of each ({name}_hash)."""
        return {"demos": data.demo_ids(toks, demos, budgets, max_len)[1]}

    def demo_vectors(self, llm, distiller, inputs):
        """The vectors of one demonstration set: (1, L, C)."""
        ids = torch.tensor([inputs["demos"]], device=llm.device)                # (1, D)
        return distiller(ids, torch.ones_like(ids))

    def prefix(self, llm, toks, distiller, demos, args, vectors_of):
        """eval.py's cached prefix of MEND: the keys/values of the distilled vectors,
        vectors_of(distiller)."""
        return prefix_cache(llm, prefix_embeds=vectors_of(distiller)), None


# -----------------------------------------------------------------------------
# distill once, reuse many: distilled vectors saved with what made them


def demos_hash(demo_ids):
    return hashlib.sha256(json.dumps(list(map(int, demo_ids))).encode()).hexdigest()[:16]


def save_vectors(path, vectors, meta):
    """vectors (1, L, C) + metadata {llm, distiller, ckpt_hash, demos_hash} -> safetensors,
    atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"vectors": vectors.detach().float().cpu().contiguous()}, tmp,
              metadata={k: str(v) for k, v in meta.items()})
    umask_mode(tmp)
    os.replace(tmp, path)


def load_vectors(path, expect):
    """Load vectors back, refusing any made by another LLM, distiller, checkpoint or set of
    demonstrations."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    for key, want in expect.items():
        if meta.get(key) != str(want):
            raise data.DataError(f"{path}: vectors were made with {key}={meta.get(key)}, not {key}={want}")
    return load_file(path)["vectors"]



# -----------------------------------------------------------------------------
# using a trained MEND: distill your demonstrations once, then score, classify or generate at zero-shot cost


def options_per_input(inputs, options):
    """One option list for every input, or one per input -> one list per input; empty options:
    ValueError."""
    nested = options and isinstance(options[0], (list, tuple))  # one option list per input
    per_input = [list(o) for o in options] if nested else [list(options)] * len(inputs)
    if len(per_input) != len(inputs) or not all(per_input):
        raise ValueError(f"options must be one non-empty list for every input or one non-empty list "
                         f"per input ({len(inputs)} inputs), got {options!r}")
    return per_input


def bucket(n):
    """The padded length of n tokens in the API's queries: the next power of two up to 16, then the
    next multiple of 16 (few shapes, one CUDA graph each, little padding)."""
    return 1 << (n - 1).bit_length() if n <= 16 else -(-n // 16) * 16


def query_tensors(tok, input, options, max_len):
    """The input (cut as eval.py cuts it) left-padded, the options right-padded, each to its bucket
    -> x, x_mask (1, Tx) and options, options_mask (n_options, To)."""
    opts = [data.encode(tok, o) for o in options]
    x, _ = data.encode_example(tok, {"input": input}, max_len, answer_len=max(map(len, opts)))
    return (*data.pad([x], 0, left=True, length=bucket(len(x))),
            *data.pad(opts, 0, left=False, length=bucket(max(map(len, opts)))))


def query_scores(llm, vectors, x, x_mask, options, options_mask):
    """The API's query, as eval.py's model.option_scores but from fixed-shape tensors and reading
    nothing on the host (one CUDA graph per shape): vectors (1, L, C), query_tensors' four -> (n,).
    [vectors ; input] is read once, with a cache; the options then read its keys/values in one
    batch."""
    n, L = options.shape[0], vectors.shape[1]
    mask = torch.cat([x_mask.new_ones(1, L), x_mask], dim=1)                    # (1, L+Tx)
    last, state = family(llm).read(llm, dict(embeds=vectors, mask=mask[:, :L]), x, x_mask, keep=1, cache=True)
    logits = llm_logits(llm, options, options_mask, prefix_kv=state, prefix_mask=mask.expand(n, -1))
    return mean_log_probs(last[:, -1], logits, options, options_mask)         # logits (n, To, V)


class MEND:
    """A trained MEND from one checkpoint: the frozen LLM, the distiller and both tokenizers.

        mend = MEND.load("mend.pt")
        vectors = mend.distill([("great movie", "positive"), ("dull plot", "negative")])   # (1, L, C), once
        mend.classify(vectors, ["what a film", "I fell asleep"], ["positive", "negative"])  # -> ['positive', ...]
    """

    def __init__(self, llm, distiller, toks, config, ckpt_hash, steps, ctx=None):
        self.llm, self.distiller, self.toks, self.config, self.ckpt_hash = llm, distiller, toks, config, ckpt_hash
        self.ctx = ctx or nullcontext()  # autocast when the LLM is held in bf16/fp16
        self.max_len = config["max_len_per_example"]
        self.budgets = (config["teacher_demo_tokens"], config["distiller_demo_tokens"])
        self.steps = steps
        # a CUDA graph per query shape on CUDA (a decoder-only LLM: a T5's masks are read on the host)
        self.query = Graphed(lambda *args: query_scores(llm, *args), on=family(llm) is CausalLM)

    @classmethod
    def load(cls, ckpt, llm=None, device="auto", dtype="auto", recipe=None):
        """Refuses an `llm` other than the one the checkpoint was trained for, naming both. device
        auto = cuda when available; dtype auto = bf16 there where supported (see autocast), fp32 on
        CPU. recipe: config -> the steps (default: the paper's; extensions.load passes the one that
        also knows our additions)."""
        state = load_checkpoint(ckpt)
        cfg = state["config"]
        if llm and llm != cfg["llm"]:
            raise CheckpointError(f"{ckpt} was trained for llm={cfg['llm']}, not llm={llm}")
        ours = cfg.get("base", "none") != "none" or (cfg.get("kl_rows"), cfg["stage"]) == ("options", "finetune")
        if ours and recipe is None:
            raise CheckpointError(f"{ckpt} was trained with one of our additions (--base "
                                  f"{cfg.get('base')}, --kl_rows {cfg.get('kl_rows')}); load it "
                                  f"with extensions.load({ckpt!r})")
        steps = (recipe or Paper)(cfg)
        if steps.api_refusal:
            raise CheckpointError(f"{ckpt} {steps.api_refusal}; evaluate it with eval.py --methods mend --ckpt {ckpt}")
        device = resolve_device(device)
        dtype, ctx = autocast(device, dtype)
        lm = load_llm(cfg["llm"], device, dtype)
        distiller = steps.build(lm, cfg["distiller"], cfg["n_vectors"])
        steps.load(distiller, state["model"], ckpt)
        return cls(lm, freeze(distiller), steps.tokenizers(cfg["llm"]), cfg, file_hash(ckpt), steps, ctx)

    def demos(self, demos):
        """(input, output) pairs as the data's dicts, or one formatted string as it is. Bad
        demonstrations: ValueError."""
        if isinstance(demos, str):
            return demos
        demos = list(demos)
        if not demos:
            raise ValueError("no demonstrations: give a non-empty list of (input, output) pairs or a formatted string")
        for i, d in enumerate(demos):
            if not (isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(t, str) for t in d)):
                raise ValueError(f"demonstration {i} is {d!r}, not an (input, output) pair of strings")
        return [{"input": x, "output": y} for x, y in demos]

    def demo_ids(self, demos, reader=1):
        """Token ids of (input, output) pairs (formatted and budgeted as in training) or of one
        formatted string, as the distiller (reader=1) or the LLM (reader=0, the teacher) reads
        them."""
        return data.demo_ids(self.toks, self.demos(demos), self.budgets, self.max_len)[reader]

    def inputs(self, demos):
        return self.steps.inputs(self.toks, self.demos(demos), self.budgets, self.max_len)

    @torch.no_grad()
    def distill(self, demos):
        """Demonstrations -> distillation vectors (1, L, C): list of (input, output) pairs, or
        formatted text."""
        with self.ctx:
            return self.steps.demo_vectors(self.llm, self.distiller, self.inputs(demos))

    def vector_meta(self, demos):
        """What save_vectors records, and load_vectors checks, for vectors distilled from
        `demos`."""
        return {"llm": self.config["llm"], "distiller": self.config["distiller"], "ckpt_hash": self.ckpt_hash,
                "base": self.config.get("base", "none"),
                **{f"{name}_hash": demos_hash(ids) for name, ids in self.inputs(demos).items()}}

    @torch.no_grad()
    def score(self, vectors, inputs, options):
        """Per input, one float per option: -(mean NLL of the option's tokens) after [vectors ;
        input]. inputs is a list of strings (-> a list of score lists) or one string (-> its score
        list); options is one list for every input, or one list per input. Each input is read once
        after the vectors, its options in one batch (query_scores)."""
        if isinstance(inputs, str):
            return self.score(vectors, [inputs], options)[0]
        per_input = options_per_input(inputs, options)
        rows = [query_tensors(self.toks[0], x, o, self.max_len) for x, o in zip(inputs, per_input)]
        with self.ctx:
            return [self.query(vectors.to(self.llm.device), *(t.to(self.llm.device) for t in r)).tolist() for r in rows]

    def classify(self, vectors, inputs, options):
        """The best option per input of a list, or of one string (-> one option)."""
        if isinstance(inputs, str):
            return self.classify(vectors, [inputs], options)[0]
        per_input = options_per_input(inputs, options)
        return [o[s.index(max(s))] for s, o in zip(self.score(vectors, inputs, options), per_input)]

    @torch.no_grad()
    def generate(self, vectors, input, max_new_tokens=32):
        """Greedy continuation of `input` (formatted as a query) after the vectors, whose
        keys/values are computed once; each new token extends the cache. Stops at the tokenizer's
        end-of-sequence token. The text is returned without the whitespace it starts with (the line
        break after the query, in the format of the demonstrations)."""
        if not isinstance(input, str):
            raise ValueError(f"input must be one string, got {type(input).__name__}: generate one input at a time")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        x, _ = data.encode_example(self.toks[0], {"input": input}, self.max_len, answer_len=max_new_tokens)
        out = []
        with self.ctx:
            kv = prefix_cache(self.llm, prefix_embeds=vectors.to(self.llm.device))
            # (1, V)
            logits, kv = extend_prefix(self.llm, torch.tensor([x], device=self.llm.device), kv)
            while True:
                out.append(int(logits.argmax(-1)))
                if out[-1] == self.toks[0].eos_token_id or len(out) == max_new_tokens:
                    break  # no forward after the last token
                logits, kv = extend_prefix(self.llm, torch.tensor([out[-1:]], device=self.llm.device), kv)
        return self.toks[0].decode(out, skip_special_tokens=True).lstrip()
