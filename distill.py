"""
The MEND objectives (paper section 3.2, knowledge distillation with the frozen LLM as its own teacher).

    teacher  = LLM(demonstrations ; query)           run without gradients
    student  = LLM(S_D ; query),  S_D = distiller(demonstrations)
    KL       = forward KL(teacher || student) at temperature tau, summed over the vocabulary, on every query position
    stage 1  = KL                       (pretraining on C4: query = the last 20% of a document)
    stage 2  = CE(answer tokens) + lambda * KL   (finetuning on MetaICL meta-train tasks: query = input ; output)

Both terms are averaged per example first (over its query or answer tokens), then over the batch. With batch 1 per
GPU under DDP, which is what the official runs use, that is exactly their objective; it also makes a 2-process run,
gradient accumulation and a single large batch give identical gradients.
"""
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from model import llm_logits, teacher_logits


def kl_per_example(teacher, student, mask, temperature=1.0):
    """KL(p_teacher || p_student) per example: logits (B, T, V), mask (B, T) -> (B,), the mean over masked rows."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)               # (B, T, V)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)               # (B, T, V)
    kl_rows = (log_p.exp() * (log_p - log_q)).sum(-1)                          # (B, T)
    return masked_mean(kl_rows, mask)


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


def mend_loss(llm, distiller, batch, lam=1.0, temperature=1.0, timings=None):
    """One MEND step's loss on a collated batch (see data.collate). Returns (loss, kl, ce) as 0-d tensors.

    Stage-1 batches have no answer tokens, so their loss is the KL alone; stage 2 adds the answer CE: CE + lam * KL
    (with lam = 0 the teacher is not run and the logged KL is 0).
    An item with Q queries is read once by the teacher (keys/values of its demonstrations) and once by the distiller;
    its vectors then precede each of its Q queries. With a timings dict, the forward phases are timed, and
    timings["grad_at_vectors"] records when the backward pass reaches the distilled vectors.
    """
    q, qm, owner = batch["query_ids"], batch["query_mask"], batch["query_item"]
    B, has_answer = batch["distiller_demo_ids"].shape[0], bool(batch["answer_mask"].any())
    teacher = None  # lam = 0 in stage 2 (CE only: MEND without distillation, PromptTuning) needs no teacher
    with phase(timings, "teacher_forward"):
        if lam or not has_answer:
            teacher = teacher_logits(llm, batch["teacher_demo_ids"], batch["teacher_demo_mask"], q, qm, owner)  # (B*Q, T, V)
    with phase(timings, "distiller_forward"):
        vectors = distiller(batch["distiller_demo_ids"], batch["distiller_demo_mask"])         # (B, L, C)
    if timings is not None and vectors.requires_grad:
        vectors.register_hook(lambda g: timings.__setitem__("grad_at_vectors", (sync(), time.perf_counter())[1]))
    with phase(timings, "student_forward"):
        prefix = vectors[owner]                                                                  # (B*Q, L, C)
        vmask = qm.new_ones(prefix.shape[:2])                                                    # (B*Q, L)
        student = llm_logits(llm, q, qm, prefix_embeds=prefix, prefix_mask=vmask)              # (B*Q, T, V)
        kl = per_item_mean(kl_per_example(teacher, student, qm, temperature), owner, B) if teacher is not None \
            else student.new_zeros(())
        ce = per_item_mean(answer_ce_per_example(student, q, batch["answer_mask"]), owner, B) if has_answer \
            else kl.new_zeros(())
    loss = ce + lam * kl if has_answer else kl
    return loss, kl.detach(), ce.detach()
