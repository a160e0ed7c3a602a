"""
The MEND objectives (paper section 3.2, knowledge distillation with the frozen LLM as its own teacher).

    teacher  = LLM(demonstrations ; query)           run without gradients
    student  = LLM(S_D ; query),  S_D = distiller(demonstrations)
    KL       = forward KL(teacher || student) at temperature tau, summed over the vocabulary, on every query position
    stage 1  = KL                       (pretraining on C4: query = the last 20% of a document)
    stage 2  = CE(answer tokens) + lambda * KL   (finetuning on MetaICL meta-train tasks: query = input ; output)

The option objective (train.py --kl_rows options, our addition) takes both terms on the rows the option scorer reads
instead: each input is teacher-forced with every option, sharing the input's keys/values among its options; the KL is
on the input's last rows and every option-token row, the CE on the gold option. fit_vectors is the same distillation
without a distiller: free vectors for one demonstration set, the ceiling of what l vectors can carry.
AnchorReader (train.py --base anchors) is MEND on top of eval.py's anchors: the query reads the LLM's own keys/values
of the demonstrations at l label positions and, through a gate per layer and head that starts at 0, the keys/values of
the distilled vectors (or, without a distiller, a bias on the anchor logits); the objective is the same.

Above the objectives sits what uses a trained distiller: the distill-once vector files (safetensors with the LLM,
distiller, checkpoint and demonstrations that made them) and the MEND API (distill your demonstrations once, then
score, classify, refine or generate). Imports run one way: data <- model <- distill <- eval <- train.

Both terms are averaged per example first (over its query or answer tokens), then over the batch. With batch 1 per
GPU under DDP, which is what the official runs use, that is exactly their objective; it also makes a 2-process run,
gradient accumulation and a single large batch give identical gradients.
"""
import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import data
from model import (NO_DISTILLER, CausalLM, CheckpointError, autocast, build_distiller, demo_cache, extend_prefix,
                   family, file_hash, freeze, llm_logits, load_checkpoint, load_distiller_state, load_llm,
                   option_scores, prefix_cache, resolve_device, teacher_logits, tokenizers, umask_mode)

INPUT_ROWS = 4   # the option objective's KL rows of an input: its last 4 (the last one predicts each option's first token)
FIT_BATCH = 8    # fit_vectors: inputs per step


def kl_per_example(teacher, student, mask, temperature=1.0):
    """KL(p_teacher || p_student) per example: logits (B, T, V), mask (B, T) -> (B,), the mean over masked rows."""
    return masked_mean(row_kl(teacher, student, temperature), mask)


def row_kl(teacher, student, temperature=1.0):
    """KL(p_teacher || p_student) of every row, summed over the vocabulary: logits (..., V) -> (...)."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)               # (..., V)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)               # (..., V)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def option_ce(logits, option_ids, option_mask):
    """Mean NLL of each option's tokens: logits (M, To, V) whose row t predicts option token t -> (M,)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), option_ids, reduction="none")   # (M, To)
    return masked_mean(nll, option_mask)


def answer_ce_per_example(student, query_ids, answer_mask):
    """Next-token CE on the answer tokens: row t predicts token t+1. logits (B, T, V) -> (B,)."""
    logits, targets = student[:, :-1].float(), query_ids[:, 1:]               # (B, T-1, V), (B, T-1)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")    # (B, T-1)
    return masked_mean(ce, answer_mask[:, 1:])


def masked_mean(values, mask):
    """(B, T) values, (B, T) 0/1 mask -> (B,) mean over the masked entries (0 for an example with none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@contextmanager
def phase(timings, name):
    """Add the wall time of a block to timings[name] (no-op when timings is None); synchronizes CUDA first."""
    if timings is None:
        yield
        return
    sync()
    t = time.perf_counter()
    yield
    sync()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_item_mean(values, query_item, n_items):
    """(B*Q,) per-query values -> their mean per item, then over the B items: each item weighs the same whatever its Q."""
    counts = torch.bincount(query_item, minlength=n_items).to(values.dtype)          # (B,)
    return (values / counts[query_item]).sum() / n_items


# -----------------------------------------------------------------------------
# the rows the option scorer reads (train.py --kl_rows options; fitting vectors)


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


def query_terms(teacher, student, batch, temperature):
    """The paper's rows: KL on every query row, CE on the answer tokens -> (N,), (N,)."""
    q, qm = batch["query_ids"], batch["query_mask"]
    kl = kl_per_example(teacher, student, qm, temperature) if teacher is not None else None
    return kl, answer_ce_per_example(student, q, batch["answer_mask"])


# -----------------------------------------------------------------------------
# the loss of one step


def mend_loss(llm, distiller, batch, lam=1.0, temperature=1.0, timings=None):
    """One MEND step's loss on a collated batch (see data.collate). Returns (loss, kl, ce) as 0-d tensors.

    A batch of queries (the paper's objective) takes the KL on every query row and the CE on the answer tokens; a
    batch of inputs with options (collate(..., options=True): the option objective) takes them on the rows the option
    scorer reads (option_terms). Without answers (stage 1, unlabeled inputs) the loss is the KL alone; stage 2 adds
    the answer CE: CE + lam * KL (with lam = 0 the teacher is not run and the logged KL is 0).
    An item with Q queries is read once by the teacher (keys/values of its demonstrations) and once by the distiller;
    its vectors then precede each of its Q queries. With a timings dict, the forward phases are timed, and
    timings["grad_at_vectors"] records when the backward pass reaches the distilled vectors.
    """
    if "anchor_positions" in batch:
        return anchors_loss(llm, distiller, batch, lam, temperature, timings)
    options, owner = "option_ids" in batch, batch["query_item"]
    batch = at_least_input_rows(batch) if options else batch
    B = batch["distiller_demo_ids"].shape[0]
    has_answer = bool((batch["gold_option"] >= 0).any() if options else batch["answer_mask"].any())
    teacher = None  # lam = 0 in stage 2 (CE only: MEND without distillation, PromptTuning) needs no teacher
    with phase(timings, "teacher_forward"):
        if lam or not has_answer:
            teacher = teacher_options(llm, batch) if options else teacher_logits(
                llm, batch["teacher_demo_ids"], batch["teacher_demo_mask"], batch["query_ids"], batch["query_mask"], owner)
    with phase(timings, "distiller_forward"):
        base = llm.get_input_embeddings()(batch["base_ids"]) if "base_ids" in batch else None  # (B, L, C) (--base)
        vectors = distiller(batch["distiller_demo_ids"], batch["distiller_demo_mask"], base)   # (B, L, C)
    if timings is not None and vectors.requires_grad:
        vectors.register_hook(lambda g: timings.__setitem__("grad_at_vectors", (sync(), time.perf_counter())[1]))
    with phase(timings, "student_forward"):
        prefix = vectors[owner]                                                                  # (N, L, C)
        vmask = batch["base_mask"][owner] if base is not None else owner.new_ones(prefix.shape[:2])  # (N, L)
        student = read_options(llm, batch, dict(embeds=prefix, mask=vmask)) if options else llm_logits(
            llm, batch["query_ids"], batch["query_mask"], prefix_embeds=prefix, prefix_mask=vmask)
        kl, ce = (option_terms if options else query_terms)(teacher, student, batch, temperature)
        kl = per_item_mean(kl, owner, B) if kl is not None else vectors.new_zeros((), dtype=torch.float32)
        ce = per_item_mean(ce, owner, B) if has_answer else kl.new_zeros(())
    loss = ce + lam * kl if has_answer else kl
    return loss, kl.detach(), ce.detach()


def demo_vectors(llm, distiller, distiller_ids, base_ids=None):
    """The vectors of one demonstration set: (1, L, C), or for a distiller trained with --base the base's embeddings
    + gate * its output, one vector per base token: (1, len(base_ids), C), so a short base is read as itself."""
    ids = torch.tensor([distiller_ids], device=llm.device)                              # (1, D)
    base = None if base_ids is None else llm.get_input_embeddings()(torch.tensor([base_ids], device=llm.device))
    return distiller(ids, torch.ones_like(ids), base)                                   # (1, L or L_b, C)


# -----------------------------------------------------------------------------
# MEND on the anchors (train.py --base anchors): distilled keys/values beside the LLM's own label keys/values


class AnchorReader(nn.Module):
    """The query reads the anchors (eval.py --methods anchors: the keys/values of the LLM's reading of the whole
    demonstration prefix at l label positions) and, at every layer, a second key/value set: those the frozen LLM
    computes from the distiller's L vectors read as a prefix. Per layer and head, the output is A + gate * B, with
    A = softmax over [anchors ; query] (exactly the anchors), B = softmax over the L vector keys alone, and the gate
    (n_layers, H) at 0 to start. Without a distiller (--distiller none, the re-weighted anchors) there is no B: a
    bias (n_layers, H), also at 0 to start, is added to the attention logits of the anchor keys. Decoder-only LLMs."""

    def __init__(self, llm, distiller=None):
        super().__init__()
        shape = (llm.config.num_hidden_layers, llm.config.num_attention_heads)
        self.distiller = distiller
        self.gate = nn.Parameter(torch.zeros(shape)) if distiller is not None else None   # (n_layers, H)
        self.bias = nn.Parameter(torch.zeros(shape)) if distiller is None else None       # (n_layers, H)

    def forward(self, demo_ids, demo_mask):
        """The distiller's vectors (B, L, C); None without a distiller."""
        return None if self.distiller is None else self.distiller(demo_ids, demo_mask)

    @contextmanager
    def reading(self, llm, n_anchors, vector_kv=None):
        """Within the block, every attention layer of the LLM reads as described above: its keys' first n_anchors are
        the anchors; vector_kv is the vectors' state (per layer (1 or B, H_kv, L, h) twice; None without a
        distiller). The LLM's own attention function computes A (and B), so at gate 0 (bias 0) nothing changes."""
        base = llm.config._attn_implementation
        name = f"mend_anchors_{base}"
        AttentionInterface.register(name, partial(anchor_attention, base=base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])  # the base's masks, unchanged
        READING.append((self, n_anchors, vector_kv))
        llm.set_attn_implementation(name)
        try:
            yield
        finally:
            llm.set_attn_implementation(base)
            READING.pop()


READING = []  # (reader, n_anchors, vector_kv) while AnchorReader.reading is active


def anchor_attention(module, query, key, value, attention_mask, base, **kwargs):
    """The attention function of AnchorReader.reading (transformers' attention interface): query (B, H, T, h), keys
    and values (B, H_kv, S, h) of [anchors ; query so far] -> (B, T, H, h), as the LLM's own function `base` returns."""
    reader, n_anchors, vector_kv = READING[-1]
    attend = ALL_ATTENTION_FUNCTIONS[base] if base in ALL_ATTENTION_FUNCTIONS else \
        sys.modules[type(module).__module__].eager_attention_forward  # eager: the modeling file's own function
    layer = module.layer_idx
    if reader.bias is not None:
        attention_mask = anchor_bias(attention_mask, reader.bias[layer], n_anchors, query, key)   # (B, H, T, S)
    out, weights = attend(module, query, key, value, attention_mask, **kwargs)                    # (B, T, H, h): A
    if reader.gate is None:
        return out, weights
    k, v = (t.expand(query.shape[0], -1, -1, -1).to(query.dtype) for t in vector_kv[layer])       # (B, H_kv, L, h)
    extra, _ = attend(module, query, k, v, None, **{**kwargs, "is_causal": False})                # (B, T, H, h): B
    return out + reader.gate[layer].view(1, 1, -1, 1).to(out.dtype) * extra, weights


def anchor_bias(mask, bias, n_anchors, query, key):
    """An additive mask (B, H, T, S): the LLM's mask (boolean, additive or None: causal) with bias (H,) added to the
    logits of the first n_anchors keys."""
    T, S = query.shape[2], key.shape[2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)[None, None]  # (1, 1, T, S)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    anchors = (torch.arange(S, device=query.device) < n_anchors).to(query.dtype)               # (S,)
    return mask + bias.to(query.dtype).view(1, -1, 1, 1) * anchors                              # (B, H, T, S)


def build_reader(spec, llm, n_vectors, freeze_embeddings=False):
    """--base anchors: an AnchorReader around a distiller (build_distiller's spec), or none (spec 'none')."""
    if family(llm) is not CausalLM:
        raise data.DataError("--base anchors reads the keys/values of a decoder-only LLM; not an encoder-decoder (T5)")
    distiller = None if spec == NO_DISTILLER else build_distiller(spec, llm, n_vectors, freeze_embeddings=freeze_embeddings)
    return AnchorReader(llm, distiller).to(llm.device)


def load_weights(module, state, path):
    """A checkpoint's weights into a distiller (load_distiller_state) or an AnchorReader. An AnchorReader takes a
    checkpoint trained with --base anchors (its gate or bias, and its distiller's weights under 'distiller.'), or,
    with a distiller, a plain MEND checkpoint (stage 1: the distiller's weights alone; the gate stays at 0)."""
    if not isinstance(module, AnchorReader):
        return load_distiller_state(module, state, path)
    trained = "bias" in state or any(k.startswith("distiller.") for k in state)
    if module.distiller is not None:
        inner = {k.removeprefix("distiller."): v for k, v in state.items() if k.startswith("distiller.")}
        load_distiller_state(module.distiller, inner if trained else state, path)
    name = "gate" if module.distiller is not None else "bias"
    if trained:
        if name not in state or state[name].shape != getattr(module, name).shape:
            raise CheckpointError(f"{path}: no {name} of shape {tuple(getattr(module, name).shape)} for this LLM and "
                                  f"--base anchors {'with' if module.distiller is not None else 'without'} a distiller")
        with torch.no_grad():
            getattr(module, name).copy_(state[name])


def anchor_rows(state, positions):
    """Each row's anchors: a left-padded demonstration state (per layer (N, H, D, h)) at its own positions (N, l) ->
    per layer (N, H, l, h). (The adapter's take keeps one set of positions for every row: one demonstration set.)"""
    idx = positions[:, None, :, None]                                           # (N, 1, l, 1)
    pick = lambda t: t.gather(2, idx.expand(-1, t.shape[1], -1, t.shape[3]))   # (N, H, l, h)
    return [(pick(k), pick(v)) for k, v in state]


def anchors_loss(llm, reader, batch, lam=1.0, temperature=1.0, timings=None):
    """mend_loss for --base anchors (query rows only). The teacher's keys/values of the demonstrations, computed once,
    also give each row's anchors; the student reads the query after the anchors, at the positions it has after the
    whole demonstrations, with the keys/values of the distilled vectors (read once per item) as the second set."""
    owner, q, qm, tm = batch["query_item"], batch["query_ids"], batch["query_mask"], batch["teacher_demo_mask"]
    B = batch["distiller_demo_ids"].shape[0]
    has_answer = bool(batch["answer_mask"].any())
    with phase(timings, "teacher_forward"), torch.no_grad():
        kv = demo_cache(llm, batch["teacher_demo_ids"], tm, owner)                      # per layer (N, H, D, h)
        teacher = llm_logits(llm, q, qm, prefix_kv=kv, prefix_mask=tm[owner]) if lam or not has_answer else None
    with phase(timings, "distiller_forward"):
        vectors = reader(batch["distiller_demo_ids"], batch["distiller_demo_mask"])     # (B, L, C) or None
    with phase(timings, "student_forward"):
        fam, reader = family(llm), getattr(reader, "module", reader)  # DDP wraps the reader
        vector_kv = None if vectors is None else fam.take(fam.context(llm, embeds=vectors), rows=owner)  # (N, H, L, h)
        amask = batch["anchor_mask"][owner]                                             # (N, l)
        shift = tm[owner].sum(-1, keepdim=True) - amask.sum(-1, keepdim=True)           # (N, 1): D - l per row
        with reader.reading(llm, amask.shape[1], vector_kv):
            student = llm_logits(llm, q, qm, prefix_kv=anchor_rows(kv, batch["anchor_positions"][owner]),
                                 prefix_mask=amask, shift=shift)                        # (N, T, V)
        kl, ce = query_terms(teacher, student, batch, temperature)
        kl = per_item_mean(kl, owner, B) if kl is not None else student.new_zeros((), dtype=torch.float32)
        ce = per_item_mean(ce, owner, B) if has_answer else kl.new_zeros(())
    loss = ce + lam * kl if has_answer else kl
    return loss, kl.detach(), ce.detach()


def anchors_of(llm, toks, demos, budgets, max_len, l):
    """eval.py's anchors of one demonstration set: the LLM reads the whole prefix once -> (the keys/values of its l
    anchor positions, per layer (1, H, l, h); the query's first position, D)."""
    teacher_ids = data.demo_item(toks, demos, budgets, max_len)[0]
    kv = prefix_cache(llm, prefix_ids=torch.tensor([teacher_ids], device=llm.device))     # per layer (1, H, D, h)
    rows = data.answer_rows(toks[0], demos, len(teacher_ids), max_len)
    keep = torch.tensor(data.anchor_positions(rows, len(teacher_ids), l), device=llm.device)
    return family(llm).take(kv, positions=keep), len(teacher_ids)


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
        batch = at_least_input_rows(data.collate([subset(item, pick)], llm.device, options=True))
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
        batch = at_least_input_rows(data.collate([subset(item, range(i, min(i + FIT_BATCH, len(item["inputs"]))))],
                                                 llm.device, options=True))
        n = len(batch["input_ids"])
        prefix = dict(kv=family(llm).take(kv, rows=torch.zeros(n, dtype=torch.long, device=llm.device)),  # n rows
                      mask=demo.new_ones(n, demo.shape[1]))
        tail, rows = read_options(llm, batch, prefix)                               # (N, R, V), (M, To, V)
        lengths, owner = batch["option_mask"].sum(-1).tolist(), batch["option_query"].tolist()
        tails += list(tail)
        options += [[rows[m, :lengths[m]] for m in range(len(rows)) if owner[m] == n] for n in range(len(tail))]
    return tails, options


# -----------------------------------------------------------------------------
# distill once, reuse many: distilled vectors saved with what made them


def demos_hash(demo_ids):
    return hashlib.sha256(json.dumps(list(map(int, demo_ids))).encode()).hexdigest()[:16]


def save_vectors(path, vectors, meta):
    """vectors (1, L, C) + metadata {llm, distiller, ckpt_hash, demos_hash} -> safetensors, atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"vectors": vectors.detach().float().cpu().contiguous()}, tmp, metadata={k: str(v) for k, v in meta.items()})
    umask_mode(tmp)
    os.replace(tmp, path)


def load_vectors(path, expect):
    """Load vectors back, refusing any made by another LLM, distiller, checkpoint or set of demonstrations."""
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
    """One option list for every input, or one per input -> one list per input; empty options: ValueError."""
    per_input = [list(o) for o in options] if options and isinstance(options[0], (list, tuple)) else [list(options)] * len(inputs)
    if len(per_input) != len(inputs) or not all(per_input):
        raise ValueError(f"options must be one non-empty list for every input or one non-empty list per input "
                         f"({len(inputs)} inputs), got {options!r}")
    return per_input


class MEND:
    """A trained MEND from one checkpoint: the frozen LLM, the distiller and both tokenizers.

        mend = MEND.load("mend.pt")
        vectors = mend.distill([("great movie", "positive"), ("dull plot", "negative")])   # (1, L, C), once
        mend.classify(vectors, ["what a film", "I fell asleep"], ["positive", "negative"])  # -> ['positive', ...]
    """

    def __init__(self, llm, distiller, toks, config, ckpt_hash, ctx=None):
        self.llm, self.distiller, self.toks, self.config, self.ckpt_hash = llm, distiller, toks, config, ckpt_hash
        self.ctx = ctx or nullcontext()  # autocast when the LLM is held in bf16/fp16
        self.max_len = config["max_len_per_example"]
        self.budgets = (config["teacher_demo_tokens"], config["distiller_demo_tokens"])

    @classmethod
    def load(cls, ckpt, llm=None, device="auto", dtype="auto"):
        """Refuses an `llm` other than the one the checkpoint was trained for, naming both. device auto = cuda when
        available; dtype auto = bf16 there where supported (see autocast), fp32 on CPU."""
        state = load_checkpoint(ckpt)
        cfg = state["config"]
        if llm and llm != cfg["llm"]:
            raise CheckpointError(f"{ckpt} was trained for llm={cfg['llm']}, not llm={llm}")
        if cfg.get("base") == "anchors":
            raise CheckpointError(f"{ckpt} was trained with --base anchors: its queries read the LLM's own keys/values of "
                                  f"the demonstrations beside the vectors, which this vector API does not carry; "
                                  f"evaluate it with eval.py --methods mend --ckpt {ckpt}")
        device = resolve_device(device)
        dtype, ctx = autocast(device, dtype)
        lm = load_llm(cfg["llm"], device, dtype)
        distiller = build_distiller(cfg["distiller"], lm, cfg["n_vectors"], gated=cfg.get("base", "none") != "none")
        load_distiller_state(distiller, state["model"], ckpt)
        return cls(lm, freeze(distiller), tokenizers(cfg["distiller"], cfg["llm"]), cfg, file_hash(ckpt), ctx)

    def demo_ids(self, demos, reader=1):
        """Token ids of (input, output) pairs (formatted and budgeted as in training) or of one formatted string, as
        the distiller (reader=1) or the LLM (reader=0, the teacher) reads them. Bad demonstrations: ValueError."""
        if isinstance(demos, str):
            if not demos.strip():
                raise ValueError("the demonstration text is empty")
            return data.encode(self.toks[reader], demos)[-self.budgets[reader]:]  # keep the end, nearest the query
        demos = list(demos)
        if not demos:
            raise ValueError("no demonstrations: give a non-empty list of (input, output) pairs or a formatted string")
        for i, d in enumerate(demos):
            if not (isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(t, str) for t in d)):
                raise ValueError(f"demonstration {i} is {d!r}, not an (input, output) pair of strings")
        pairs = [{"input": x, "output": y} for x, y in demos]
        return data.demo_item(self.toks, pairs, self.budgets, self.max_len)[reader]

    def base_ids(self, demos):
        """The tokens a MEND trained with --base starts from (data.free_prefix), built from the demonstrations as in
        training and eval.py; None without a base. A labels base needs (input, output) pairs, not formatted text."""
        base, l = self.config.get("base", "none"), self.config["n_vectors"]
        if base == "none":
            return None
        if isinstance(demos, str):
            if base == "labels":
                raise ValueError("this MEND starts from the demonstrations' labels (--base labels): give (input, "
                                 "output) pairs, not formatted text")
            return self.demo_ids(demos, reader=0)[-l:]  # truncated: the end of the text
        self.demo_ids(demos)  # the checks of the pairs
        return data.free_prefix(self.toks, [{"input": x, "output": y} for x, y in demos], base, l, self.budgets,
                                self.max_len)

    @torch.no_grad()
    def distill(self, demos):
        """Demonstrations -> distillation vectors (1, L, C): list of (input, output) pairs, or formatted text."""
        with self.ctx:
            return demo_vectors(self.llm, self.distiller, self.demo_ids(demos), self.base_ids(demos))

    def vector_meta(self, demos):
        """What save_vectors records, and load_vectors checks, for vectors distilled from `demos`."""
        base = self.base_ids(demos)
        return {"llm": self.config["llm"], "distiller": self.config["distiller"], "ckpt_hash": self.ckpt_hash,
                "base": self.config.get("base", "none"), "demos_hash": demos_hash(self.demo_ids(demos)),
                **({"base_hash": demos_hash(base)} if base else {})}

    @torch.no_grad()
    def score(self, vectors, inputs, options):
        """Per input, one score per option: -(mean NLL of the option's tokens) after [vectors ; input]. options is
        one list for every input, or one list per input. The vectors' keys/values are computed once."""
        with self.ctx:
            kv = prefix_cache(self.llm, prefix_embeds=vectors.to(self.llm.device))
            return [option_scores(self.llm, self.toks[0], {"input": x, "options": o}, self.max_len, kv)
                    for x, o in zip(inputs, options_per_input(inputs, options))]

    def classify(self, vectors, inputs, options):
        """The best option per input."""
        per_input = options_per_input(inputs, options)
        return [o[int(s.argmax())] for s, o in zip(self.score(vectors, inputs, options), per_input)]

    def refine(self, vectors, demos, inputs, options, steps=60, lr=0.1, seed=0):
        """Fit the vectors further (distill.fit_vectors) so that the LLM reading them matches the LLM reading `demos`
        on these unlabeled inputs and their options (no label is read): -> refined vectors (1, L, C). lr is relative to
        the RMS of the LLM's token embeddings; steps=0 returns the vectors unchanged; the same seed, the same result."""
        teacher = self.demo_ids(demos, reader=0)
        examples = [{"input": x, "options": o} for x, o in zip(inputs, options_per_input(inputs, options))]
        item = dict(teacher_demo=teacher, distiller_demo=teacher, **data.option_fields(self.toks[0], examples, self.max_len))
        with torch.enable_grad(), self.ctx:
            return fit_vectors(self.llm, vectors, item, steps, lr, seed)[0]

    @torch.no_grad()
    def generate(self, vectors, input, max_new_tokens=32):
        """Greedy continuation of `input` (formatted as a query) after the vectors, whose keys/values are computed
        once; each new token extends the cache. Stops at the tokenizer's end-of-sequence token."""
        x, _ = data.encode_example(self.toks[0], {"input": input}, self.max_len, answer_len=max_new_tokens)
        out = []
        with self.ctx:
            kv = prefix_cache(self.llm, prefix_embeds=vectors.to(self.llm.device))
            logits, kv = extend_prefix(self.llm, torch.tensor([x], device=self.llm.device), kv)  # (1, V)
            while len(out) < max_new_tokens:
                out.append(int(logits.argmax(-1)))
                if out[-1] == self.toks[0].eos_token_id:
                    break
                logits, kv = extend_prefix(self.llm, torch.tensor([out[-1:]], device=self.llm.device), kv)
        return self.toks[0].decode(out, skip_special_tokens=True)
