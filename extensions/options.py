"""
The option objective and fitted vectors (ours, not the paper's).

train.py --kl_rows options takes the paper's two terms on the rows the option scorer reads instead of the query rows:
each input is teacher-forced with every option, sharing the input's keys/values among its options; the KL is on the
input's last INPUT_ROWS rows and every option-token row, the CE on the gold option.

fit_vectors is the same distillation without a distiller: free vectors for one demonstration set, optimised on the
option rows of unlabeled inputs (analyze.py --ceiling: the ceiling of what l vectors can carry); refine fits a trained
MEND's vectors further the same way.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

import data
from distill import Paper, masked_mean, options_per_input, row_kl
from extensions.prefixes import Gated
from model import demo_cache, family, llm_logits

INPUT_ROWS = 4   # the KL rows of an input: its last 4 (the last one predicts each option's first token)
FIT_BATCH = 8    # fit_vectors: inputs per step


# -----------------------------------------------------------------------------
# the rows the option scorer reads


def option_fields(tok, examples, max_len):
    """The queries as the option scorer reads them: the input ids, cut for the longest option as at test time; each
    option's ids (a generation example's only option is its output); and the index of the gold option (-1 for an
    unlabeled example, as in fitting vectors)."""
    out = dict(inputs=[], options=[], gold=[])
    for ex in examples:
        texts = ex.get("options") or [ex["output"]]
        options = [data.encode(tok, o) for o in texts]
        out["inputs"].append(data.encode_example(tok, ex, max_len, answer_len=max(map(len, options)))[0])
        out["options"].append(options)
        out["gold"].append(texts.index(ex["output"]) if "output" in ex else -1)
    return out


def collate_options(items):
    """Inputs (N, T) left-padded, so their last rows line up; all their options (M, To) right-padded, option_query[m]
    = the input of option m; gold_option[n] = the row of input n's gold option (-1: unlabeled)."""
    x, xm = data.pad([x for it in items for x in it["inputs"]], 0, left=True)       # (N, T)
    per_input = [opts for it in items for opts in it["options"]]
    o, om = data.pad([o for opts in per_input for o in opts], 0, left=False)         # (M, To)
    first = np.cumsum([0] + [len(opts) for opts in per_input])[:-1]
    gold = [int(f) + g if g >= 0 else -1 for f, g in zip(first, (g for it in items for g in it["gold"]))]
    return dict(input_ids=x, input_mask=xm, option_ids=o, option_mask=om, gold_option=torch.tensor(gold),
                option_query=torch.tensor([n for n, opts in enumerate(per_input) for _ in opts]))


def option_batch(items, device):
    """The demonstration fields of data.collate (no queries) and the options of collate_options, as a batch."""
    t, tm = data.pad([it["teacher_demo"] for it in items], 0, left=True)           # (B, D)
    d, dm = data.pad([it["distiller_demo"] for it in items], 0, left=True)         # (B, D')
    owner = torch.tensor([b for b, it in enumerate(items) for _ in it["gold"]])      # (N,)
    batch = dict(teacher_demo_ids=t, teacher_demo_mask=tm, distiller_demo_ids=d, distiller_demo_mask=dm,
                 query_item=owner, **collate_options(items))
    return at_least_input_rows({k: v.to(device) for k, v in batch.items()})


def option_ce(logits, option_ids, option_mask):
    """Mean NLL of each option's tokens: logits (M, To, V) whose row t predicts option token t -> (M,)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), option_ids, reduction="none")   # (M, To)
    return masked_mean(nll, option_mask)


def read_options(llm, batch, prefix):
    """The LLM reads [prefix ; input] once per input, then every option of the input after that state, as the
    option scorer reads them. prefix: dict(embeds=(N, P, C)) or dict(kv=a state of N rows), and mask=(N, P).
    -> (logits of the inputs' last INPUT_ROWS rows (N, R, V), option logits (M, To, V): row t predicts token t).
    Inputs are left-padded, so their last rows share positions and only those rows go through the LM head."""
    x, xm, owner = batch["input_ids"], batch["input_mask"], batch["option_query"]
    fam = family(llm)
    tail, state = fam.read(llm, prefix, x, xm, keep=INPUT_ROWS, cache=True)         # (N, R, V)
    mask = torch.cat([prefix["mask"], xm], dim=1)            # (N, P+T): the keys a decoder-only state holds
    options = llm_logits(llm, batch["option_ids"], batch["option_mask"], prefix_kv=fam.take(state, rows=owner),
                         prefix_mask=mask[owner])                                   # (M, To, V)
    return tail, torch.cat([tail[owner, -1:], options[:, :-1]], dim=1)              # (M, To, V)


def at_least_input_rows(batch):
    """Left-pad inputs shorter than INPUT_ROWS tokens (the padding is masked), so the objective's rows exist."""
    short = INPUT_ROWS - batch["input_ids"].shape[1]
    if short <= 0:
        return batch
    return {**batch, "input_ids": F.pad(batch["input_ids"], (short, 0)), "input_mask": F.pad(batch["input_mask"], (short, 0))}


@torch.no_grad()
def teacher_options(llm, batch):
    """The teacher on the option rows: the LLM reading the real demonstrations (keys/values computed once per item)."""
    owner = batch["query_item"]
    kv = demo_cache(llm, batch["teacher_demo_ids"], batch["teacher_demo_mask"], owner)     # per layer (N, H, D, h)
    return read_options(llm, batch, dict(kv=kv, mask=batch["teacher_demo_mask"][owner]))


def option_terms(teacher, student, batch, temperature):
    """Per input: KL on its last INPUT_ROWS rows and on its options' rows that predict option tokens 2.. (the first is
    predicted by the last input row, counted once), and the NLL of its gold option (0 when unlabeled) -> (N,), (N,)."""
    owner, om, gold = batch["option_query"], batch["option_mask"], batch["gold_option"]
    valid = batch["input_mask"][:, -INPUT_ROWS:]                                      # (N, R), inputs left-padded
    later = om.clone()
    later[:, 0] = 0                                                                   # (M, To)
    kl = None
    if teacher is not None:
        total = (row_kl(teacher[0], student[0], temperature) * valid).sum(-1)       # (N,)
        total = total.index_add(0, owner, (row_kl(teacher[1], student[1], temperature) * later).sum(-1))
        n_rows = valid.sum(-1).to(total.dtype).index_add(0, owner, later.sum(-1).to(total.dtype))  # (N,)
        kl = total / n_rows
    rows = gold.clamp(min=0)
    ce = option_ce(student[1][rows], batch["option_ids"][rows], om[rows]) * (gold >= 0)  # (N,)
    return kl, ce


class Options(Paper):
    """train.py --kl_rows options: the paper's loss on the option scorer's rows (teacher, student and terms above)."""

    def fields(self, toks, item, demos, targets):
        return {**super().fields(toks, item, demos, targets),
                **option_fields(toks[0], targets, self.config["max_len_per_example"])}

    def collate(self, items, device):
        batch = super().collate(items, device)  # the queries' fields stay unread; the options are read instead
        return at_least_input_rows({**batch, **{k: v.to(device) for k, v in collate_options(items).items()}})

    def has_answer(self, batch):
        return bool((batch["gold_option"] >= 0).any())

    def teacher(self, llm, batch, logits=True):
        return teacher_options(llm, batch) if logits else None

    def student(self, llm, distiller, batch, vectors, mask, teacher):
        owner = batch["query_item"]
        return read_options(llm, batch, dict(embeds=vectors[owner], mask=mask[owner]))  # (N, L, C) prefix

    def terms(self, teacher, student, batch, temperature):
        return option_terms(teacher, student, batch, temperature)


class GatedOptions(Options, Gated):
    """--kl_rows options with --base labels|truncated."""


# -----------------------------------------------------------------------------
# distillation without a distiller: the best l vectors for one demonstration set (the ceiling of the channel)


def fit_vectors(llm, vectors, item, steps=60, lr=0.1, seed=0):
    """Free vectors (1, L, C), optimised by Adam so that the LLM reading them matches the LLM reading the item's
    demonstrations (teacher_demo) on the option rows of the item's unlabeled inputs (data.option_fields; KL only, no
    label is read). lr is relative to the RMS of the LLM's token embeddings; cosine decay to 0; FIT_BATCH inputs per
    step, drawn by the seed. steps=0 returns the vectors unchanged. -> (vectors (1, L, C), fit KL per step)."""
    if steps == 0:
        return vectors, []
    free = torch.nn.Parameter(vectors.detach().float().clone())                     # (1, L, C)
    rms = float(llm.get_input_embeddings().weight.float().pow(2).mean().sqrt())
    optimizer = torch.optim.Adam([free], lr=lr * rms)
    tails, options = teacher_targets(llm, item)
    rng, n, history = np.random.default_rng(seed), len(item["inputs"]), []
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = lr * rms * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = [int(j) for j in rng.choice(n, size=min(FIT_BATCH, n), replace=False)]
        batch = option_batch([subset(item, pick)], llm.device)
        teacher = (torch.stack([tails[j] for j in pick]),                            # (N, R, V)
                   torch.nn.utils.rnn.pad_sequence([o for j in pick for o in options[j]], batch_first=True))  # (M, To, V)
        prefix = free.expand(len(pick), -1, -1)                                      # (N, L, C)
        student = read_options(llm, batch, dict(embeds=prefix, mask=batch["input_mask"].new_ones(prefix.shape[:2])))
        kl = option_terms(teacher, student, batch, 1.0)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        kl.backward()
        optimizer.step()
        history.append(kl.item())
    return free.detach().to(vectors.dtype), history


def subset(item, picked):
    """The item with only the picked inputs (and their options and gold indices), in the picked order."""
    return {**item, **{k: [item[k][j] for j in picked] for k in ("inputs", "options", "gold")}}


@torch.no_grad()
def teacher_targets(llm, item):
    """The teacher's logits on the option rows of every input of an item, computed once (the LLM is frozen and the
    demonstrations fixed): per input its last rows (R, V), and per input a list of its options' rows (len_o, V)."""
    demo = torch.tensor([item["teacher_demo"]], device=llm.device)                   # (1, D)
    kv = demo_cache(llm, demo, torch.ones_like(demo), torch.zeros(1, dtype=torch.long, device=llm.device))  # read once
    tails, options = [], []
    for i in range(0, len(item["inputs"]), FIT_BATCH):
        batch = option_batch([subset(item, range(i, min(i + FIT_BATCH, len(item["inputs"]))))], llm.device)
        n = len(batch["input_ids"])
        prefix = dict(kv=family(llm).take(kv, rows=torch.zeros(n, dtype=torch.long, device=llm.device)),  # n rows
                      mask=demo.new_ones(n, demo.shape[1]))
        tail, rows = read_options(llm, batch, prefix)                               # (N, R, V), (M, To, V)
        lengths, owner = batch["option_mask"].sum(-1).tolist(), batch["option_query"].tolist()
        tails += list(tail)
        options += [[rows[m, :lengths[m]] for m in range(len(rows)) if owner[m] == n] for n in range(len(tail))]
    return tails, options


def refine(mend, vectors, demos, inputs, options, steps=60, lr=0.1, seed=0):
    """Fit a trained MEND's (distill.MEND) vectors further (fit_vectors) so that the LLM reading them matches the LLM
    reading `demos` on these unlabeled inputs and their options (no label is read): -> refined vectors (1, L, C). lr is
    relative to the RMS of the LLM's token embeddings; steps=0 returns the vectors unchanged; the same seed, the same
    result."""
    teacher = mend.demo_ids(demos, reader=0)
    examples = [{"input": x, "options": o} for x, o in zip(inputs, options_per_input(inputs, options))]
    item = dict(teacher_demo=teacher, distiller_demo=teacher, **option_fields(mend.toks[0], examples, mend.max_len))
    with torch.enable_grad(), mend.ctx:
        return fit_vectors(mend.llm, vectors, item, steps, lr, seed)[0]
