"""
Free prefixes and the gated start (ours, not the paper's): l prefix slots that cost no training, and a MEND that
starts from one of them (train.py --base labels|truncated).

  truncated  the last l LLM tokens of the demonstration prefix (vanilla ICL reading only its end);
  labels     the same over the demonstrations with their inputs removed (mostly their labels).

eval.py scores both as methods of their own. With --base, the vectors are the LLM's embeddings of such a prefix plus
gate * the distiller's output, the gate (C,) at 0, so training starts at the free prefix's scores (a zero-initialised
branch, as adapters start). Stage 1 takes --base truncated (C4 text has no labels).
"""
import torch
import torch.nn as nn

import data
from distill import Paper
from model import Distiller, build_distiller, llm_logits, load_distiller_state, prefix_cache

FREE_PREFIXES = ("truncated", "labels")  # eval.py methods, and what train.py --base can start MEND from
GATE_LR = 100.0  # the gate's learning rate, in units of --lr (Adam moves a parameter by about lr per step: at 1e-4 a
                 # gate starting at 0 would reach at most 0.015 in 150 steps)


def free_prefix(toks, demos, name, l, budgets, max_len):
    """The last l LLM tokens of the demonstrations (truncated) or of the demonstrations with their inputs removed
    (labels); demos may also be formatted text (truncated only: the end of the text)."""
    if isinstance(demos, str):
        if name == "labels":
            raise ValueError("this MEND starts from the demonstrations' labels (--base labels): give (input, output) "
                             "pairs, not formatted text")
        return data.demo_ids(toks, demos, budgets, max_len)[0][-l:]
    if name == "labels":
        demos = data.perturb_demos(demos, "no_inputs", seed=0)  # no randomness in removing inputs
    return data.demo_item(toks, demos, budgets, max_len)[0][-l:]


def base_slots(ids, l):
    """A base's ids left-padded to l slots, the padding slots masked, so that a shorter prefix is read as itself, at
    the positions it has alone."""
    pad = l - len(ids)
    return dict(base=[0] * pad + ids, base_mask=[0] * pad + [1] * len(ids))


def prefix(name, llm, toks, demos, args):
    """eval.py's method `name`: the cached prefix of a demonstration set's free prefix at l = args.n_vectors."""
    keep = free_prefix(toks, demos, name, args.n_vectors, (args.teacher_demo_tokens, args.distiller_demo_tokens),
                       args.max_len_per_example)
    return prefix_cache(llm, prefix_ids=torch.tensor([keep], device=llm.device)), None


class GatedDistiller(Distiller):
    """A distiller whose vectors are base + gate * its output: base the LLM's embeddings (B, L_b, C) of a free
    prefix's tokens, filling the last L_b <= L slots; the gate (C,) starts at 0."""

    def __init__(self, backbone, n_vectors, llm_width):
        super().__init__(backbone, n_vectors, llm_width)
        self.gate = nn.Parameter(torch.zeros(llm_width))                      # (C,)

    def forward(self, demo_ids, demo_mask, base_embeds):
        out = super().forward(demo_ids, demo_mask)                             # (B, L, C)
        return base_embeds + self.gate * out[:, out.shape[1] - base_embeds.shape[1]:]  # (B, L_b, C)


class Gated(Paper):
    """train.py --base labels|truncated: the paper's steps, with the base's tokens in every item and batch, the gate
    in the distiller (at 0 when --init's checkpoint has none) and its own learning rate."""

    own = ("gate",)

    def build(self, llm, spec, n_vectors, freeze_embeddings=False):
        return build_distiller(spec, llm, n_vectors, freeze_embeddings=freeze_embeddings, cls=GatedDistiller)

    def load(self, distiller, state, path):
        load_distiller_state(distiller, state, path, optional=("gate",))

    def fields(self, toks, item, demos, targets):
        l, fmt = self.config["n_vectors"], (self.config["teacher_demo_tokens"], self.config["distiller_demo_tokens"])
        if demos is None:  # a C4 document (stage 1, truncated): the last l tokens of its demonstration part
            return base_slots(item["teacher_demo"][-l:], l)
        return base_slots(free_prefix(toks, demos, self.config["base"], l, fmt, self.config["max_len_per_example"]), l)

    def collate(self, items, device):
        extra = dict(base_ids=torch.tensor([it["base"] for it in items]),
                     base_mask=torch.tensor([it["base_mask"] for it in items]))  # (B, L) each
        return {**super().collate(items, device), **{k: v.to(device) for k, v in extra.items()}}

    def vectors(self, llm, distiller, batch):
        base = llm.get_input_embeddings()(batch["base_ids"])                     # (B, L, C)
        return distiller(batch["distiller_demo_ids"], batch["distiller_demo_mask"], base), batch["base_mask"]

    def start_logits(self, llm, batch):
        """The LLM reading the query after the base's tokens as they are (the start at gate 0) -> (N, T, V)."""
        owner = batch["query_item"]
        base = llm.get_input_embeddings()(batch["base_ids"][owner])              # (N, L, C)
        return llm_logits(llm, batch["query_ids"], batch["query_mask"], prefix_embeds=base,
                          prefix_mask=batch["base_mask"][owner])

    def start_name(self):
        l = self.config["n_vectors"]
        return f"the labels prefix at l={l}" if self.config["base"] == "labels" else super().start_name()

    def param_groups(self, distiller, lr, lr_vectors):
        groups = super().param_groups(distiller, lr, lr_vectors)
        gate = [p for n, p in distiller.named_parameters() if n == "gate"]
        groups[0]["params"] = [p for p in groups[0]["params"] if all(p is not g for g in gate)]
        return groups + [{"params": gate, "peak_lr": GATE_LR * lr}]

    def inputs(self, toks, demos, budgets, max_len):
        base = free_prefix(toks, demos, self.config["base"], self.config["n_vectors"], budgets, max_len)
        return {**super().inputs(toks, demos, budgets, max_len), "base": base}

    def demo_vectors(self, llm, distiller, inputs):
        """One vector per base token: (1, len(base), C), so a short base is read as itself."""
        ids = torch.tensor([inputs["demos"]], device=llm.device)                # (1, D)
        base = llm.get_input_embeddings()(torch.tensor([inputs["base"]], device=llm.device))  # (1, L_b, C)
        return distiller(ids, torch.ones_like(ids), base)
