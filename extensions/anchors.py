"""
The anchors and MEND on top of them (ours, not the paper's).

eval.py --methods anchors, a free prefix: the LLM reads the whole demonstration prefix once, then the query attends
only to the keys/values of l positions: the first 4 (the attention sink) and the label rows of the latest
demonstrations (after Wang et al. 2023, label words as anchors), at the positions the query has in full ICL. With l
at least the prefix length, it is ICL.

train.py --base anchors: the query reads the anchors and, at every layer, a second key/value set: those the frozen LLM
computes from the distiller's L vectors read as a prefix. Per layer and head, the output is A + gate * B, with A =
softmax over [anchors ; query] (exactly the anchors), B = softmax over the L vector keys alone, and the gate
(n_layers, H) at 0 to start. With --distiller none (the re-weighted anchors) there is no B: a bias (n_layers, H), also
at 0 to start, is added to the attention logits of the anchor keys. Decoder-only LLMs. The objective is the paper's
(query rows): only the teacher's keys/values, which also give each row's anchors, and the student differ.
"""
import sys
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import data
import flops
from distill import Paper
from model import (EMBEDDED, CausalLM, CheckpointError, build_distiller, demo_cache, family, llm_logits, load_distiller_state,
                   lm_kind, load_tokenizer, prefix_cache)
from extensions.prefixes import GATE_LR

NO_DISTILLER = "none"  # --distiller none: no distiller, the anchors re-weighted
SINK = 4               # the first positions always kept (the attention sink)


# -----------------------------------------------------------------------------
# the anchors' positions and keys/values (eval.py --methods anchors)


def answer_rows(tok, demos, n_tokens, max_len):
    """Where the labels sit in a joined prefix of n_tokens LLM tokens (demo_item's teacher ids, which hold whole
    demonstrations in order): per demonstration, the positions of its last input token (the row that predicts the
    label), its output tokens and its DEMO_SEP."""
    rows, start = [], 0
    for x, y in (data.encode_example(tok, d, max_len) for d in demos):
        end = start + len(x) + len(y) + len(data.encode(tok, data.separators(tok)[1]))
        if end > n_tokens:
            break
        rows.append(list(range(start + len(x) - 1, end)))
        start = end
    if start != n_tokens:
        raise ValueError(f"answer_rows: {n_tokens} tokens are not a prefix of whole demonstrations")
    return rows


def anchor_positions(rows, n_tokens, l, sink=SINK):
    """The positions whose keys/values the anchors keep, at most l, in order: all n_tokens when they fit (then it is
    ICL), else the first `sink` positions and the answer rows of whole demonstrations, the latest first, while they fit."""
    if l >= n_tokens:
        return list(range(n_tokens))
    keep = list(range(min(sink, n_tokens, l)))
    for r in reversed(rows):
        fresh = [p for p in r if p not in keep]
        if len(keep) + len(fresh) > l:
            break
        keep += fresh
    return sorted(keep)


def anchors_of(llm, toks, demos, budgets, max_len, l):
    """The anchors of one demonstration set: the LLM reads the whole prefix once -> (the keys/values of its l anchor
    positions, per layer (1, H, l, h); the query's first position, D)."""
    teacher_ids = data.demo_item(toks, demos, budgets, max_len)[0]
    kv = prefix_cache(llm, prefix_ids=torch.tensor([teacher_ids], device=llm.device))     # per layer (1, H, D, h)
    rows = answer_rows(toks[0], demos, len(teacher_ids), max_len)
    keep = torch.tensor(anchor_positions(rows, len(teacher_ids), l), device=llm.device)
    return family(llm).take(kv, positions=keep), len(teacher_ids)


def prefix(llm, toks, demos, args):
    """eval.py's method anchors: make_prefix's pair, l = args.n_vectors."""
    return anchors_of(llm, toks, demos, (args.teacher_demo_tokens, args.distiller_demo_tokens),
                      args.max_len_per_example, args.n_vectors)


def anchor_rows(state, positions):
    """Each row's anchors: a left-padded demonstration state (per layer (N, H, D, h)) at its own positions (N, l) ->
    per layer (N, H, l, h). (The adapter's take keeps one set of positions for every row: one demonstration set.)"""
    idx = positions[:, None, :, None]                                           # (N, 1, l, 1)
    pick = lambda t: t.gather(2, idx.expand(-1, t.shape[1], -1, t.shape[3]))   # (N, H, l, h)
    return [(pick(k), pick(v)) for k, v in state]


# -----------------------------------------------------------------------------
# MEND on the anchors: distilled keys/values beside the LLM's own label keys/values


class AnchorReader(nn.Module):
    """The trained part of --base anchors: a distiller and a gate (n_layers, H), or without a distiller a bias
    (n_layers, H); both start at 0. `reading` makes the LLM's attention read as the module docstring says."""

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
        """Within the block, every attention layer of the LLM reads the anchors (its keys' first n_anchors) and, with
        a distiller, vector_kv (per layer (1 or B, H_kv, L, h) twice). The LLM's own attention function computes A
        (and B), so at gate 0 (bias 0) nothing changes. The reader's state is bound into the registered function."""
        base = llm.config._attn_implementation
        if base.startswith("mend_anchors"):
            raise RuntimeError("AnchorReader.reading: the LLM already reads anchors; readings do not nest")
        name = f"mend_anchors_{base}"
        AttentionInterface.register(name, partial(anchor_attention, base=base, reader=self, n_anchors=n_anchors,
                                                  vector_kv=vector_kv))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])  # the base's masks, unchanged
        llm.set_attn_implementation(name)
        try:
            yield
        finally:
            llm.set_attn_implementation(base)


def anchor_attention(module, query, key, value, attention_mask, base, reader, n_anchors, vector_kv, **kwargs):
    """The attention function of AnchorReader.reading (transformers' attention interface): query (B, H, T, h), keys
    and values (B, H_kv, S, h) of [anchors ; query so far] -> (B, T, H, h), as the LLM's own function `base` returns."""
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
    return out + reader.gate[layer].view(1, 1, -1, 1).to(out.dtype) * extra, weights             # gate (H,) -> (1, 1, H, 1)


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


class Anchors(Paper):
    """train.py --base anchors (and --distiller none): the paper's objective on query rows, with the steps below."""

    own = ("gate", "bias")
    api_refusal = ("was trained with --base anchors: its queries read the LLM's own keys/values of the demonstrations "
                   "beside the vectors, which this vector API does not carry")

    def tokenizers(self, llm_name):
        if self.config["distiller"] != NO_DISTILLER:
            return super().tokenizers(llm_name)
        tok = load_tokenizer(llm_name)
        return tok, tok  # no distiller: the LLM's tokenizer for both readers

    def build(self, llm, spec, n_vectors, freeze_embeddings=False):
        if family(llm) is not CausalLM:
            raise data.DataError("--base anchors reads the keys/values of a decoder-only LLM; not an encoder-decoder (T5)")
        distiller = None if spec == NO_DISTILLER else build_distiller(spec, llm, n_vectors,
                                                                      freeze_embeddings=freeze_embeddings)
        return AnchorReader(llm, distiller).to(llm.device)

    def load(self, reader, state, path):
        """A checkpoint trained with --base anchors (its gate or bias, its distiller's weights under 'distiller.'),
        or, with a distiller, a plain MEND checkpoint (stage 1: the distiller's weights alone; the gate stays at 0)."""
        trained = "bias" in state or any(k.startswith("distiller.") for k in state)
        if reader.distiller is not None:
            inner = {k.removeprefix("distiller."): v for k, v in state.items() if k.startswith("distiller.")}
            load_distiller_state(reader.distiller, inner if trained else state, path)
        name = "gate" if reader.distiller is not None else "bias"
        if trained:
            if name not in state or state[name].shape != getattr(reader, name).shape:
                raise CheckpointError(f"{path}: no {name} of shape {tuple(getattr(reader, name).shape)} for this LLM "
                                      f"and --base anchors {'with' if reader.distiller is not None else 'without'} a "
                                      f"distiller")
            with torch.no_grad():
                getattr(reader, name).copy_(state[name])

    def fields(self, toks, item, demos, targets):
        """The at most l positions of teacher_demo whose keys/values are kept."""
        n = len(item["teacher_demo"])
        rows = answer_rows(toks[0], demos, n, self.config["max_len_per_example"])
        return dict(anchors=anchor_positions(rows, n, self.config["n_vectors"]))

    def collate(self, items, device):
        """Adds the anchors' positions in the left-padded teacher demonstrations, anchor_positions (B, l), left-padded,
        and anchor_mask (B, l)."""
        batch = super().collate(items, device)
        D = batch["teacher_demo_ids"].shape[1]
        a, am = data.pad([[p + D - len(it["teacher_demo"]) for p in it["anchors"]] for it in items], 0, left=True)
        return {**batch, "anchor_positions": a.to(device), "anchor_mask": am.to(device)}  # (B, l): shifted by padding

    @torch.no_grad()
    def teacher(self, llm, batch, logits=True):
        """The demonstrations' keys/values, read once (they also give each row's anchors), and the teacher's logits."""
        kv = demo_cache(llm, batch["teacher_demo_ids"], batch["teacher_demo_mask"], batch["query_item"])  # (N, H, D, h)
        mask = batch["teacher_demo_mask"][batch["query_item"]]
        return kv, llm_logits(llm, batch["query_ids"], batch["query_mask"], prefix_kv=kv, prefix_mask=mask) if logits else None

    def vectors(self, llm, reader, batch):
        return reader(batch["distiller_demo_ids"], batch["distiller_demo_mask"]), None  # (B, L, C) or None

    def student(self, llm, reader, batch, vectors, mask, teacher):
        """The query after the anchors, at the positions it has after the whole demonstrations, with the keys/values
        of the distilled vectors (read once per item) as the second set."""
        owner, tm, fam = batch["query_item"], batch["teacher_demo_mask"], family(llm)
        reader = getattr(reader, "module", reader)  # DDP wraps the reader
        vector_kv = None if vectors is None else fam.take(fam.context(llm, embeds=vectors), rows=owner)  # (N, H, L, h)
        amask = batch["anchor_mask"][owner]                                             # (N, l)
        shift = tm[owner].sum(-1, keepdim=True) - amask.sum(-1, keepdim=True)           # (N, 1): D - l per row
        with reader.reading(llm, amask.shape[1], vector_kv):
            return llm_logits(llm, batch["query_ids"], batch["query_mask"], shift=shift, prefix_mask=amask,
                              prefix_kv=anchor_rows(teacher[0], batch["anchor_positions"][owner]))  # (N, T, V)

    def terms(self, teacher, student, batch, temperature):
        return super().terms(teacher[1], student, batch, temperature)

    def start_logits(self, llm, batch):
        """The LLM reading the query after the anchors alone (the start at gate 0 or bias 0) -> (N, T, V)."""
        owner, tm, am = batch["query_item"], batch["teacher_demo_mask"], batch["anchor_mask"]
        kv = anchor_rows(demo_cache(llm, batch["teacher_demo_ids"], tm, owner), batch["anchor_positions"][owner])
        shift = tm[owner].sum(-1, keepdim=True) - am[owner].sum(-1, keepdim=True)  # (N, 1): D - l per row
        return llm_logits(llm, batch["query_ids"], batch["query_mask"], prefix_kv=kv, prefix_mask=am[owner], shift=shift)

    def start_name(self):
        return f"the anchors at {self.config['n_vectors']} positions"

    def item_flops(self, cfgs, item):
        lens = (len(item["teacher_demo"]), len(item["distiller_demo"]), list(map(len, item["queries"])))
        L = self.config["n_vectors"] if cfgs[1] is not None else 0
        return anchors_step_flops(*cfgs, L, len(item["anchors"]), *lens, teacher=bool(self.config["lam"]))

    def param_groups(self, reader, lr, lr_vectors):
        named = [(n.removeprefix("distiller."), p) for n, p in reader.named_parameters() if p.requires_grad]
        own = lambda n: n.startswith(("placeholder", "proj"))
        gate = [p for n, p in named if n in ("gate", "bias")]
        return [{"params": [p for n, p in named if not own(n) and n not in ("gate", "bias")], "peak_lr": lr},
                {"params": [p for n, p in named if own(n)], "peak_lr": lr_vectors or lr},
                {"params": gate, "peak_lr": GATE_LR * lr}]

    def prefix(self, llm, toks, reader, demos, args, vectors_of):
        """make_prefix's triple: the anchors' pair and the context in which the query also reads its vectors'
        keys/values (AnchorReader.reading)."""
        kv, start = prefix(llm, toks, demos, args)
        inner = reader.distiller  # None: the re-weighted anchors
        vector_kv = inner and prefix_cache(llm, prefix_embeds=vectors_of(inner))
        return kv, start, reader.reading(llm, kv[0][0].shape[2], vector_kv)


def anchors_error(args):
    """Why --base anchors cannot run with these flags, or None."""
    if args.stage == "pretrain":
        return "--base anchors applies to --stage finetune (C4 text has no labels to anchor on)"
    if args.kl_rows == "options" or args.val_tasks:
        return "--base anchors reads query rows only: not with --kl_rows options or --val_tasks"
    if args.llm != EMBEDDED and lm_kind(args.llm):
        return f"--base anchors needs a decoder-only LLM; {args.llm} is an encoder-decoder (T5)"
    return None


# -----------------------------------------------------------------------------
# FLOPs (flops.py's formulas; see its docstring)


def anchors_query(cfg, T, n_anchors, L):
    """A query of T tokens after the anchors (n_anchors + T keys) that also reads L vector keys/values: F(T, a+T, T) +
    4 n_layer T L A, the second set's Q K^T and A V."""
    n_layer, _, A = flops.block_weights(cfg)
    return flops.total_flops(cfg, T, n_anchors + T, T) + 4 * n_layer * T * L * A


def anchors_step_flops(cfg, dis_cfg, L, n_anchors, teacher_len, distiller_len, query_lens, teacher=True):
    """step_flops for train.py --base anchors (decoder-only; L = 0 and dis_cfg None: --distiller none). The teacher
    reads the demonstrations once (their keys/values also give the a = n_anchors anchors) and, when its logits are
    used, each query after them. The distiller as in step_flops; the LLM reads its L vectors once (one logit row),
    backward down to the vectors through every layer's keys/values: all blocks but the last, and the last one's key
    and value projections. The student reads each query of T tokens after the anchors (a+T keys, plus the L vector
    keys); its backward reaches the gate (or the bias) of every layer: 1x the matmuls except the first layer's q, k, v
    projections (nothing before the first gate needs a gradient), 2x the attention of the later layers, and at the
    first layer only dP, dK, dV of the vector set (3 of its 4 matmuls' 2 T L A each) or dP of the anchors (the bias)."""
    n, W, A = flops.block_weights(cfg)
    C = cfg.hidden_size
    A_kv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * (A // cfg.num_attention_heads)
    qkv = C * (A + 2 * A_kv)                                                    # weights of the q, k, v projections
    total = flops.total_flops(cfg, teacher_len, teacher_len, 1)
    if dis_cfg is not None:
        c, n_d = dis_cfg.hidden_size, distiller_len + L
        total += 3 * (flops.total_flops(dis_cfg, n_d, n_d, 0) + (2 * L * c * C if c != C else 0))
        total += flops.total_flops(cfg, L, L, 1) + 2 * L * (n - 1) * W + 2 * L * C * 2 * A_kv + 8 * (n - 1) * L * L * A
    for T in query_lens:
        total += teacher * flops.total_flops(cfg, T, teacher_len + T, T)
        f = flops.forward_flops(cfg, T, n_anchors + T, T)
        total += 2 * f["matmul"] - 2 * T * qkv + 3 * f["attention"] * (n - 1) // n + 12 * (n - 1) * T * L * A
        total += 4 * T * L * A + (6 * T * L * A if L else 2 * T * (n_anchors + T) * A) + f["attention"] // n
    return total


def method_flops(llm, D, T, L, Q, distill):
    """flops.method_flops' rows of the anchors at L positions, MEND on them and the re-weighted anchors."""
    F = flops.total_flops
    if llm.is_encoder_decoder:  # read all D+1 encoder rows, keep L+1 of them for the decoder
        keep = sum(flops.decoder_flops(llm, T + 1, T + 1, L + 1, T).values())
        full = sum(flops.encoder_flops(llm, D + 1).values())
        return {"anchors": full + keep, "anchors_reuse": full / Q + keep}
    return {
        "anchors": F(llm, D, D, 0) + F(llm, T, L + T, T),
        "anchors_reuse": F(llm, D, D, 0) / Q + F(llm, T, L + T, T),
        "mend_anchors": F(llm, D, D, 0) + distill + F(llm, L, L, 0) + anchors_query(llm, T, L, L),
        "mend_anchors_reuse": (F(llm, D, D, 0) + distill + F(llm, L, L, 0)) / Q + anchors_query(llm, T, L, L),
        "anchors_reweighted": F(llm, D, D, 0) + F(llm, T, L + T, T),  # a bias per layer and head: the anchors' cost
        "anchors_reweighted_reuse": F(llm, D, D, 0) / Q + F(llm, T, L + T, T),
    }
