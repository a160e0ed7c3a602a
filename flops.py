"""
FLOPs and latency per test query of zero-shot, vanilla ICL, MEND and the free prefixes (the paper's
Figure 3 and its headline "up to 75% fewer FLOPs, 33% faster", section 4).

    python flops.py --out results | tee results/flops.log  # the committed tables: the paper's pairs + timings here
    python flops.py --data ../shared/data                  # also the demo lengths of the real MetaICL files
    python flops.py --bench_pair gpt2-large --batches 1,16 --lengths class2class,nonnli2nli   # on a GPU

FLOPs of one decoder forward (a multiply-add is 2 FLOPs; Kaplan et al. 2020 section 2.1, PaLM
appendix B, nanoGPT's estimate_mfu). The forward feeds n new tokens that attend to m keys (m = n, or
n plus a cached prefix) and computes logits at k of them:

    F(n, m, k) = 2 * n * n_layer * W  +  2 * k * C * V  +  4 * n_layer * n * m * A
                 \\ matmuls in blocks /   \\ LM head /     \\ attention: Q K^T and A V /

W is the number of weights a block multiplies each token by: GPT-2 12 C^2 (q, k, v, out 4 C^2; MLP 8
C^2), Llama C (H + 2 H_kv) h + H h C + 3 C F (grouped keys/values, gated MLP of width F). The LM
head (C x V, tied or not) runs only where logits are used: the query+option tokens, never a prefix.
Q K^T and A V each cost 2 n m A per layer with A = H h the attention width; grouped-query attention
shares keys, not query heads, so it saves no FLOPs here. No causal halving: we count the full n x m
rectangle that eager and SDPA kernels compute under a mask (and that torch.utils.flop_counter
counts); a causal-aware flash kernel does about half of the square part. Embedding lookups are free;
norms, softmax, activations, biases and residuals are O(n C) or O(n m H) and left out (< 1% here).

Per test query, with D demonstration tokens, T query+option tokens, L distillation vectors (the
paper's l = 100) and a distiller of width c whose forward F_d has no LM head (its projection c -> C
costs 2 L c C when c != C):

    zero-shot     F(T, T, T)
    vanilla ICL   F(D+T, D+T, T)                                  the LLM reads [demos ; query ; option]
    MEND          F_d(D+L, D+L, 0) + 2 L c C + F(L+T, L+T, T)      the distiller reads [demos ; L placeholders]

The free prefixes of length L (eval.py; `labels` costs what `truncated` costs):

    truncated     F(L+T, L+T, T)                                  the last L demonstration tokens
    anchors       F(D, D, 0) + F(T, L+T, T)                       read all D once, keep L keys/values

train.py --base anchors, with L anchors and L vectors (the query attends to both sets; N layers, A
attention width):

    anchors re-weighted   the anchors' cost                       a bias per layer and head on the anchor logits
    MEND on the anchors   F(D, D, 0) + F_d(D+L, D+L, 0) + 2 L c C + F(L, L, 0) + F(T, L+T, T) + 4 N T L A
                          the prefix, the distiller, the vectors' keys/values, the query over both sets

Amortised over Q queries that share their demonstrations (eval.py's KV reuse and distill-once), the
prefix is paid once:

    ICL       F(D, D, 0) / Q + F(T, D+T, T)
    MEND      [F_d(D+L, D+L, 0) + 2 L c C + F(L, L, 0)] / Q + F(T, L+T, T)
    truncated F(L, L, 0) / Q + F(T, L+T, T)
    anchors   F(D, D, 0) / Q + F(T, L+T, T)
    MEND on the anchors  [F(D, D, 0) + F_d(D+L, D+L, 0) + 2 L c C + F(L, L, 0)] / Q + F(T, L+T, T) + 4 N T L A

An encoder-decoder LLM (T5) is counted in three parts (A = H d_kv, F = 3 C d_ff gated or 2 C d_ff,
W_e = 4 C A + F, W_d = 6 C A + F: self-attention q, k, v, o and cross-attention q, o), the encoder
reading s = P+1 rows [prefix ; </s>]:

    Enc(s)            = 2 s N_e W_e + 4 N_e s^2 A                  the encoder (zero-shot: s = 1, [</s>] alone)
    Cross(s)          = 4 s N_d C A                                every decoder layer's cross keys/values, once
    Dec(n, m, s, k)   = 2 n N_d W_d + 4 N_d n m A + 4 N_d n s A + 2 k C V    the decoder: n tokens, m self keys
    per query         = Enc(s) + Cross(s) + Dec(T+1, T+1, s, T)    the decoder reads [start ; query]; reuse divides
                                                                   Enc + Cross by Q (the query never enters the encoder)

D: Figure 3's caption gives vanilla ICL a partition-dependent context (Class->Class 469 ...
non-NLI->NLI 848 tokens) against MEND's context of 100 vectors, so those lengths are D and both
methods add the same T. All three pairs share one tokenizer between LLM and distiller, so the
distiller reads the same D tokens. With --data, D is measured instead: data.demo_item on the k
seed-100 train demonstrations of each available test task, averaged over the tasks.

Latency is measured on random-init models of the real shapes (speed does not depend on the weights),
the LM head in float32 as in eval.py: --warmup untimed forwards, then the median of --runs forwards
under torch.no_grad, synchronized on CUDA. A batch holds B query rows (query+option each). "no
reuse" = every row carries its whole input; "reuse" = the demos' (ICL) or the vectors' (MEND)
keys/values are computed once beforehand (model.prefix_cache) and only the query rows are timed.
Per-query = batch time / B. Each cell is timed twice on CUDA: eager (one launch per op) and graphed
(model.Graphed, as MEND.score runs: the inputs copied into a captured CUDA graph, one replay); on a
CPU only eager.
"""
import copy
import functools
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GPT2Config, LlamaConfig, T5Config,
                          T5EncoderModel)

import data
from model import Distiller, Graphed, count_params, fp32_head, freeze, llm_logits, load_tokenizer, prefix_cache

# -----------------------------------------------------------------------------
# configs: published hyperparameters, built here so nothing is downloaded


def gpt2_config(n_layer, n_embd, n_head):
    return GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=50257, n_positions=1024)


CONFIGS = {
    "gpt2": gpt2_config(12, 768, 12),            # 124M
    "gpt2-large": gpt2_config(36, 1280, 20),     # 774M
    "gpt2-xl": gpt2_config(48, 1600, 25),        # 1.5B
    "t5-large-lm-adapt": T5Config(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16, vocab_size=32128,
                                  # google/t5-large-lm-adapt
                                  feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-small-lm-adapt": T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, vocab_size=32128,
                                  # google/t5-small-lm-adapt
                                  feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "smollm2-135m": LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                                max_position_embeddings=8192),  # = the embedded default's config.json
}
PAIRS = {  # LLM name -> distiller: another config (the paper's GPT-2 pairs) or 'layers:N' of the LLM (our default)
    "gpt2-large": "gpt2",
    "gpt2-xl": "gpt2",
    "smollm2-135m": "layers:4",
    "t5-large-lm-adapt": "layers:4",  # its first 4 encoder blocks (our T5 default; see README)
}
PAPER_LENGTHS = {"class2class": 469, "hr2lr": 652, "qa2qa": 639, "nonnli2nli": 848, "nonpara2para": 818}  # Figure 3
PAPER_CLAIMS = dict(flops_saved=0.75, faster=0.33)  # "up to 75% FLOPs reduction and 33% inference acceleration"
GOALS = dict(mend_vs_icl=0.5, reuse_vs_zeroshot=1.3)  # this project's latency goals (gpt2-large shapes)


def get_args(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=",".join(PAIRS), help="Comma-separated LLMs of the FLOPs table, each with its "
                   "distiller, among " + ", ".join(f"{llm} (distiller {d})" for llm, d in PAIRS.items())
                   + ". Default: all of them.")
    p.add_argument("--query_tokens", type=data.positive_int, default=64,
                   help="T, the tokens of one query row (input and option). Default: %(default)s.")
    p.add_argument("--n_vectors", type=data.positive_int, default=100,
                   help="L, the number of distillation vectors (the paper's l). Default: %(default)s.")
    p.add_argument("--queries", type=data.positive_int, default=100, help="Q, the test queries that "
                   "share one demonstration set (the amortised columns). Default: %(default)s.")
    p.add_argument("--data", default="", help="Data folder holding metaicl/, where each partition's "
                   "demonstration length D is also measured (e.g. ../shared/data). Without it, only "
                   "the paper's D.")
    p.add_argument("--tokenizer", type=data.model_name, default="smollm2-135m", help="Tokenizer "
                   "that measures D in --data (gpt2 works when it is in the local Hugging Face "
                   "cache). Default: %(default)s.")
    p.add_argument("--k", type=data.positive_int, default=16,
                   help="With --data: demonstrations per task, as eval.py reads them. Default: %(default)s.")
    p.add_argument("--max_len_per_example", type=data.positive_int, default=256,
                   help="With --data: most tokens of one demonstration, as in eval.py. Default: %(default)s.")
    p.add_argument("--demo_tokens", type=data.positive_ints, default="767,643", help="With --data: "
                   "the demonstration budgets of ICL and of the distiller, as in eval.py. Default: "
                   "%(default)s.")
    p.add_argument("--bench_pair", default="auto", choices=["auto", "none", *PAIRS], help="LLM "
                   "whose latency is timed, with its distiller (random weights): auto is gpt2-large "
                   "on a GPU and smollm2-135m on a CPU; none times nothing. Default: %(default)s.")
    p.add_argument("--lengths", default="class2class", help="Comma-separated partitions timed, each "
                   "at the demonstration length D the paper gives for it (tokens, its Figure 3): "
                   + ", ".join(f"{part} {D}" for part, D in PAPER_LENGTHS.items()) + ". Default: %(default)s.")
    p.add_argument("--batches", type=lambda s: s if s == "auto" else data.positive_ints(s), default="auto",
                   help="Comma-separated query rows per timed batch: auto is 1,16 on a GPU and 1 on "
                   "a CPU. Default: %(default)s.")
    p.add_argument("--runs", type=data.checked(int, lambda v: v >= 50, "an integer >= 50"), default=50,
                   help="Timed forwards per cell; the median is reported. Default: %(default)s.")
    p.add_argument("--warmup", type=data.checked(int, lambda v: v >= 10, "an integer >= 10"), default=10,
                   help="Untimed forwards before each cell. Default: %(default)s.")
    p.add_argument("--device", default="auto", help="Device to time on, e.g. cuda:1; auto is cuda "
                   "when available, else cpu. Default: %(default)s.")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="Data "
                   "type of the timed models: auto is bfloat16 on a GPU that supports it, else "
                   "float32. Default: %(default)s.")
    p.add_argument("--threads", type=data.count, default=0,
                   help="CPU threads for torch; 0 lets torch use every core. Default: %(default)s.")
    p.add_argument("--seed", type=data.count, default=0,
                   help="Seed of the random weights and token ids that are timed. Default: %(default)s.")
    p.add_argument("--out", default=".", help="Folder for flops.md and flops.json, made if missing "
                   "(the committed tables: --out results); an existing flops.md or flops.json is "
                   "replaced only if flops.py wrote it. Default: the current folder.")
    p.add_argument("--plot", default="", help="Also draw the FLOPs per query to this PNG file "
                   "(needs matplotlib); an existing file is replaced only if it is a PNG image.")
    args = p.parse_args(argv)
    if len(args.demo_tokens) != 2 or min(args.demo_tokens) < args.max_len_per_example:
        p.error(f"--demo_tokens {','.join(map(str, args.demo_tokens))}: two budgets "
                f"(ICL,distiller), each at least --max_len_per_example "
                f"({args.max_len_per_example}), so that one demonstration fits")
    for name in args.pairs.split(","):
        if name not in PAIRS:
            p.error(f"--pairs: unknown LLM {name!r}; choose from {', '.join(PAIRS)}")
    for name in args.lengths.split(","):
        if name not in PAPER_LENGTHS:
            p.error(f"--lengths: unknown partition {name!r}; choose from {', '.join(PAPER_LENGTHS)}")
    return args


def distiller_config(llm_name, spec=None):
    """The distiller's config (spec defaults to the LLM's pair): a named config, or a copy of the
    LLM's cut to its first N layers."""
    spec = spec or PAIRS[llm_name]
    if not spec.startswith("layers:"):
        return CONFIGS[known(spec)]
    cfg = copy.deepcopy(CONFIGS[llm_name])
    cfg.num_hidden_layers = int(spec.split(":", 1)[1])
    return cfg


# -----------------------------------------------------------------------------
# analytic FLOPs


def block_weights(cfg):
    """(n_layer, W weights each token meets in one block, A attention width) of a GPT-2- or
    Llama-style config, or of a T5's encoder blocks (a T5 distiller is its encoder: its forward is
    F(n, n, 0) with these)."""
    if cfg.model_type == "t5":
        A = cfg.num_heads * cfg.d_kv
        return cfg.num_layers, 4 * cfg.d_model * A + t5_mlp(cfg), A
    C, H = cfg.hidden_size, cfg.num_attention_heads
    h = getattr(cfg, "head_dim", None) or C // H
    H_kv = getattr(cfg, "num_key_value_heads", None) or H
    if hasattr(cfg, "intermediate_size"):  # Llama family: gated MLP (gate, up, down)
        mlp = 3 * C * cfg.intermediate_size
    else:                                  # GPT-2: MLP of width n_inner (default 4C)
        mlp = 2 * C * (cfg.n_inner or 4 * C)
    attn = C * (H + 2 * H_kv) * h + H * h * C
    return cfg.num_hidden_layers, attn + mlp, H * h


def forward_flops(cfg, new, context, logits):
    """F(n, m, k) of the docstring, split into {'matmul': blocks + LM head, 'attention': Q K^T + A
    V}."""
    n_layer, W, A = block_weights(cfg)
    return {"matmul": 2 * new * n_layer * W + 2 * logits * cfg.hidden_size * cfg.vocab_size,
            "attention": 4 * n_layer * new * context * A}


def total_flops(cfg, new, context, logits):
    """F(n, m, k) of the docstring as one number."""
    return sum(forward_flops(cfg, new, context, logits).values())


def t5_mlp(cfg):
    """Weights of a T5 feed-forward block: gated (v1.1, LM-adapt: wi_0, wi_1, wo) or not (v1.0: wi,
    wo)."""
    return (3 if cfg.is_gated_act else 2) * cfg.d_model * cfg.d_ff


def encoder_flops(cfg, s):
    """An encoder-decoder LLM reading s encoder rows ([prefix ; </s>]): its encoder, Enc(s) = 2 s
    N_e W_e + 4 N_e s^2 A, and the cross-attention keys/values of every decoder layer, Cross(s) = 4
    s N_d C A (computed once per prefix)."""
    n_enc, W_e, A = block_weights(cfg)
    return {"matmul": 2 * s * n_enc * W_e + 4 * s * cfg.num_decoder_layers * cfg.d_model * A,
            "attention": 4 * n_enc * s * s * A}


def decoder_flops(cfg, new, context, s, logits):
    """Dec(n, m, s, k): n decoder tokens attending m decoder keys and s encoder rows, logits at k of
    them. A decoder block multiplies by W_d = 6 C A + F: self-attention q, k, v, o and
    cross-attention q, o (its k, v: encoder_flops)."""
    A, C, N = cfg.num_heads * cfg.d_kv, cfg.d_model, cfg.num_decoder_layers
    return {"matmul": 2 * new * N * (6 * C * A + t5_mlp(cfg)) + 2 * logits * C * cfg.vocab_size,
            "attention": 4 * N * new * (context + s) * A}


def seq2seq_flops(cfg, s, T, Q=1):
    """Per query of T tokens after a prefix of s encoder rows shared by Q queries: (Enc(s) +
    Cross(s)) / Q + Dec(T+1, T+1, s, T), the decoder reading [start ; query]."""
    return sum(encoder_flops(cfg, s).values()) / Q + sum(decoder_flops(cfg, T + 1, T + 1, s, T).values())


def known(name):
    """name itself, when CONFIGS has its config."""
    if name not in CONFIGS:
        raise SystemExit(f"flops.py has no config for {name!r}; add it to flops.CONFIGS (known: {', '.join(CONFIGS)})")
    return name


def distill_flops(llm_name, D, L, distiller=None):
    """FLOPs of distilling D demonstration tokens into L vectors (the distiller and its
    projection)."""
    llm, dis = CONFIGS[known(llm_name)], distiller_config(llm_name, distiller)
    c, C = dis.hidden_size, llm.hidden_size
    return total_flops(dis, D + L, D + L, 0) + (2 * L * c * C if c != C else 0)


def method_flops(llm_name, D, T, L, Q, distiller=None):
    """FLOPs per test query of each method, with no reuse and amortised over Q queries sharing the
    demos (the anchors' rows: extensions.method_flops)."""
    llm, distill = CONFIGS[known(llm_name)], distill_flops(llm_name, D, L, distiller)
    if llm.is_encoder_decoder:
        return seq2seq_method_flops(llm, D, T, L, Q, distill)
    return {
        "zeroshot": total_flops(llm, T, T, T),
        "icl": total_flops(llm, D + T, D + T, T),
        "mend": distill + total_flops(llm, L + T, L + T, T),
        "mend_llm_only": total_flops(llm, L + T, L + T, T),  # Reviewer 3's question: without the cost of making S_D
        "icl_reuse": total_flops(llm, D, D, 0) / Q + total_flops(llm, T, D + T, T),
        "mend_reuse": (distill + total_flops(llm, L, L, 0)) / Q + total_flops(llm, T, L + T, T),
        # the free prefixes at MEND's length (eval.py): truncated and labels read l tokens, anchors all D, then keep l
        "truncated": total_flops(llm, L + T, L + T, T),
        "truncated_reuse": total_flops(llm, L, L, 0) / Q + total_flops(llm, T, L + T, T),
    }


def seq2seq_method_flops(llm, D, T, L, Q, distill):
    """method_flops for an encoder-decoder LLM: the encoder reads [prefix ; </s>] (zero-shot:
    [</s>]), the decoder [start ; query]; the query never enters the encoder, so reuse only shares
    the encoder and cross keys/values."""
    return {
        "zeroshot": seq2seq_flops(llm, 1, T),
        "icl": seq2seq_flops(llm, D + 1, T),
        "mend": distill + seq2seq_flops(llm, L + 1, T),
        "mend_llm_only": seq2seq_flops(llm, L + 1, T),
        "icl_reuse": seq2seq_flops(llm, D + 1, T, Q),
        "mend_reuse": distill / Q + seq2seq_flops(llm, L + 1, T, Q),
        "truncated": seq2seq_flops(llm, L + 1, T),
        "truncated_reuse": seq2seq_flops(llm, L + 1, T, Q),
    }


def step_flops(llm_cfg, dis_cfg, L, teacher_len, distiller_len, query_lens, teacher=True):
    """Analytic FLOPs of one training item (train.py's step; MFU = these / step time / peak). The
    teacher reads the demonstrations once (one logit row) and each query after them; the distiller's
    forward over [demos ; L placeholders] and its backward (weight and input gradients: 2x its
    forward); the student's forward over [L vectors ; query] and its backward down to the vectors:
    the frozen LLM's weight gradients are not computed, so the blocks and LM head cost 1x their
    forward again, the attention 2x (dQ, dK, dP, dV)."""
    total = 0  # dis_cfg None: PromptTuning, whose vectors cost nothing to make
    if dis_cfg is not None:
        c, C, n = dis_cfg.hidden_size, llm_cfg.hidden_size, distiller_len + L
        total += 3 * (total_flops(dis_cfg, n, n, 0) + (2 * L * c * C if c != C else 0))
    if llm_cfg.is_encoder_decoder:
        return total + seq2seq_step_flops(llm_cfg, L, teacher_len, query_lens, teacher)
    if teacher:
        total += total_flops(llm_cfg, teacher_len, teacher_len, 1)
    for T in query_lens:
        total += teacher * total_flops(llm_cfg, T, teacher_len + T, T)
        f = forward_flops(llm_cfg, L + T, L + T, T)
        total += 2 * f["matmul"] + 3 * f["attention"]
    return total


def seq2seq_step_flops(cfg, L, teacher_len, query_lens, teacher):
    """step_flops' LLM part for an encoder-decoder: the teacher's encoder reads [demos ; </s>] once,
    its decoder each [start ; query]; the student's encoder reads [vectors ; </s>] once per query
    row (each row carries its vectors), then its decoder; the student's backward reaches the vectors
    through all of it (matmuls 1x, attention 2x more) except the decoder's first self-attention and
    first cross-attention query, which never see the vectors: their backward (10 n C A in
    projections, 8 n^2 A in attention, 2 n s A for dQ) is not computed."""
    A, C, s = cfg.num_heads * cfg.d_kv, cfg.d_model, L + 1
    total = teacher * sum(encoder_flops(cfg, teacher_len + 1).values())
    for T in query_lens:
        n = T + 1                                                               # [start ; query]
        total += teacher * sum(decoder_flops(cfg, n, n, teacher_len + 1, T).values())
        for f in (encoder_flops(cfg, s), decoder_flops(cfg, n, n, s, T)):
            total += 2 * f["matmul"] + 3 * f["attention"]
        total -= 10 * n * C * A + 8 * n * n * A + 2 * n * s * A
    return total


# nominal dense tensor-core peaks (TFLOP/s: bf16 (fp16 on V100/T4), fp32) from the vendors' datasheets, by the exact
# torch.cuda.get_device_name(): a word of it would give an L40 the L4's peak and an H100 PCIe the SXM's
GPU_PEAK_TFLOPS = {"NVIDIA H200": (989, 67), "NVIDIA H100 80GB HBM3": (989, 67), "NVIDIA H100 PCIe": (756, 51),
                   "NVIDIA H100 NVL": (835, 60), "NVIDIA A100-SXM4-80GB": (312, 19.5),
                   "NVIDIA A100-SXM4-40GB": (312, 19.5), "NVIDIA A100-PCIE-40GB": (312, 19.5),
                   "NVIDIA A100 80GB PCIe": (312, 19.5), "NVIDIA L40S": (362, 91.6), "NVIDIA L40": (181, 90.5),
                   "NVIDIA L4": (121, 30.3), "NVIDIA A10": (125, 31.2), "Tesla V100-SXM2-16GB": (125, 15.7),
                   "Tesla V100-SXM2-32GB": (125, 15.7), "Tesla T4": (65, 8.1)}


def peak_flops(device, dtype):
    """The peak a step's FLOP/s is measured against: on CUDA the table above (None for an unlisted GPU: pass
    --peak_tflops); on CPU this machine's float32 matmul rate."""
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        peaks = GPU_PEAK_TFLOPS.get(name)
        return None if peaks is None else 1e12 * peaks[dtype == torch.float32]
    return cpu_matmul_rate()


@functools.cache
def cpu_matmul_rate():
    """FLOP/s of a 2048^3 float32 matmul on CPU, best of 5, measured once per process (about 0.1
    TFLOP of work)."""
    g = torch.Generator().manual_seed(0)  # not the global generator: a run's seeds stay its own
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best


# -----------------------------------------------------------------------------
# demonstration lengths: the paper's, or measured on MetaICL files


def demo_files(args):
    """{partition: the seed-100 train files of its test tasks} under --data, for the paper's
    partitions that have any; none at all is an error (nothing to measure)."""
    found = {name: [path for task in data.partition(args.data, name)["test"]
                    if (path := data.task_file(args.data, task, 16, 100, "train")).exists()] for name in PAPER_LENGTHS}
    if not any(found.values()):
        raise SystemExit(f"--data {args.data}: no test task of {', '.join(PAPER_LENGTHS)} has a "
                         f"seed-100 train file under {Path(args.data) / 'metaicl'}")
    return {name: paths for name, paths in found.items() if paths}


def measured_lengths(args, files):
    """{partition: mean D} over demo_files' files of each partition."""
    tok = load_tokenizer(args.tokenizer)
    out = {}
    for name, paths in files.items():
        lengths = [len(data.demo_item((tok, tok), data.read_metaicl(path)[:args.k], tuple(args.demo_tokens),
                                      args.max_len_per_example)[0]) for path in paths]
        out[name] = round(statistics.mean(lengths))
        print(f"{name}: D = {out[name]} {args.tokenizer} tokens (mean of {len(lengths)} tasks)")
    return out


def flops_rows(args, lengths):
    """One row per (pair, length source, partition): D, T, L, Q and the FLOPs of each method."""
    rows = []
    for llm_name in args.pairs.split(","):
        for source, table in lengths.items():
            for part, D in table.items():
                f = method_flops(llm_name, D, args.query_tokens, args.n_vectors, args.queries)
                rows.append(dict(llm=llm_name, distiller=PAIRS[llm_name], source=source, partition=part, D=D,
                                 T=args.query_tokens, L=args.n_vectors, Q=args.queries, flops=f))
    return rows


def flops_table(rows):
    """Markdown lines: GFLOPs per query and the MEND/ICL ratios, without and with reuse."""
    lines = ["| LLM + distiller | D from | partition | D | zero-shot | ICL | MEND | MEND/ICL | MEND "
             "LLM-only/ICL | ICL reuse | MEND reuse | MEND/ICL reuse |", "|" + "---|" * 12]
    for r in rows:
        f, g = r["flops"], {k: v / 1e9 for k, v in r["flops"].items()}
        lines.append(f"| {r['llm']} + {r['distiller']} | {r['source']} | {r['partition']} | "
                     f"{r['D']} | {g['zeroshot']:.1f} | {g['icl']:.1f} | {g['mend']:.1f} | "
                     f"{f['mend'] / f['icl']:.2f} | {f['mend_llm_only'] / f['icl']:.2f} | "
                     f"{g['icl_reuse']:.1f} | {g['mend_reuse']:.1f} | "
                     f"{f['mend_reuse'] / f['icl_reuse']:.2f} |")
    return lines


# -----------------------------------------------------------------------------
# latency


def build_models(llm_name, L, device, dtype):
    """Random-init LLM and distiller (model.Distiller on a bare backbone) of the pair's real shapes,
    frozen; the LM head in float32, as eval.py's (model.fp32_head)."""
    cfg, dis = CONFIGS[llm_name], distiller_config(llm_name)
    with torch.device(device):
        llm = (AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM).from_config(cfg).to(dtype)
        # T5: the encoder
        backbone = T5EncoderModel(dis) if dis.model_type == "t5" else AutoModel.from_config(dis)
        distiller = Distiller(backbone, L, llm.config.hidden_size).to(dtype)
    return freeze(fp32_head(llm)), freeze(distiller)


def median_ms(fn, runs, warmup, device):
    """Median wall-clock milliseconds of fn() over `runs` calls after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def latency_cells(llm, distiller, D, T, L, B):
    """{method: (fn, inputs)}: fn(*inputs) scores B query rows of T tokens after D demo tokens;
    prefixes for 'reuse' are made here, once."""
    device, V = llm.device, llm.config.vocab_size
    demos = torch.randint(V, (1, D), device=device)  # (1, D) one shared demo set
    q = torch.randint(V, (B, T), device=device)                                 # (B, T)
    qm = torch.ones_like(q)                                                     # (B, T)
    # (B, D, C) the demos in every row
    demo_embeds = llm.get_input_embeddings()(demos).expand(B, -1, -1)
    demos_b = demos.expand(B, -1)                                               # (B, D)
    icl_kv = prefix_cache(llm, prefix_ids=demos)  # per layer (1, H, D, h)
    # per layer (1, H, L, h)
    mend_kv = prefix_cache(llm, prefix_embeds=distiller(demos, torch.ones_like(demos)))

    def mend(demos, q, qm):
        vectors = distiller(demos, torch.ones_like(demos))                      # (B, L, C)
        return llm_logits(llm, q, qm, prefix_embeds=vectors, prefix_mask=qm.new_ones(B, L))

    return {
        "zero-shot": (lambda q, qm: llm_logits(llm, q, qm), (q, qm)),
        "ICL": (lambda x, q, qm: llm_logits(llm, q, qm, prefix_embeds=x, prefix_mask=qm.new_ones(B, D)),
                (demo_embeds, q, qm)),
        "ICL + demo KV reuse": (lambda q, qm: llm_logits(llm, q, qm, prefix_kv=icl_kv), (q, qm)),
        "MEND": (mend, (demos_b, q, qm)),
        "MEND + distill once": (lambda q, qm: llm_logits(llm, q, qm, prefix_kv=mend_kv), (q, qm)),
    }


@torch.no_grad()
def bench(args, llm_name, device, dtype):
    """Latency rows: every method at every (timed partition, batch size)."""
    llm, distiller = build_models(llm_name, args.n_vectors, device, dtype)
    print(f"timing {llm_name} ({count_params(llm) / 1e6:.0f}M) + distiller {PAIRS[llm_name]} "
          f"({count_params(distiller) / 1e6:.0f}M), random init, device={device} "
          f"dtype={str(dtype).split('.')[1]}")
    rows = []
    for part in args.lengths.split(","):
        for B in args.batches:
            D, T, L = PAPER_LENGTHS[part], args.query_tokens, args.n_vectors
            for method, (fn, inputs) in latency_cells(llm, distiller, D, T, L, B).items():
                ms = median_ms(lambda: fn(*inputs), args.runs, args.warmup, device)
                row = dict(llm=llm_name, distiller=PAIRS[llm_name], partition=part, D=D, T=T, L=L, B=B,
                           method=method, ms_batch=ms, ms_query=ms / B, graphed_ms_query=None, graphed_agree=None)
                if str(device).startswith("cuda"):
                    graphed = Graphed(fn)
                    row["graphed_ms_query"] = median_ms(lambda: graphed(*inputs), args.runs, args.warmup, device) / B
                    # the share of next-token argmaxes the replay and the eager forward agree on
                    row["graphed_agree"] = (graphed(*inputs).argmax(-1) == fn(*inputs).argmax(-1)).float().mean().item()
                rows.append(row)
                graph = "" if row["graphed_ms_query"] is None else f" {row['graphed_ms_query']:9.2f} graphed"
                print(f"{method:20s} {part} D={D} T={T} L={L} B={B}: {ms:9.1f} ms/batch {ms / B:9.2f} ms/query"
                      + graph, flush=True)
    return rows


def ratio(rows, part, B, num, den, column="ms_query"):
    """Per-query latency of method `num` over method `den` at one (partition, batch), eager or
    (column="graphed_ms_query") graphed."""
    ms = {r["method"]: r[column] for r in rows if r["partition"] == part and r["B"] == B}
    return ms[num] / ms[den]


def latency_table(rows, device, dtype):
    """Markdown lines: one row per timed cell, eager and graphed (CUDA only), with its ratios to ICL
    and zero-shot at the same length and batch."""
    lines = [f"device={device} dtype={dtype}, random-init weights, median of the timed runs; graphed: "
             "one CUDA graph replay per call (CUDA only, - elsewhere)", "",
             "| LLM + distiller | partition | D | T | L | B | method | ms/batch | ms/query | x ICL | x zero-shot | "
             "graphed ms/query | graphed x ICL |", "|" + "---|" * 13]
    for r in rows:
        x_icl, x_zs = (ratio(rows, r["partition"], r["B"], r["method"], m) for m in ("ICL", "zero-shot"))
        graphed = "- | -" if r["graphed_ms_query"] is None else (
            f"{r['graphed_ms_query']:.2f} | "
            f"{ratio(rows, r['partition'], r['B'], r['method'], 'ICL', 'graphed_ms_query'):.2f}")
        lines.append(f"| {r['llm']} + {r['distiller']} | {r['partition']} | {r['D']} | {r['T']} | "
                     f"{r['L']} | {r['B']} | {r['method']} | {r['ms_batch']:.1f} | "
                     f"{r['ms_query']:.2f} | {x_icl:.2f} | {x_zs:.2f} | {graphed} |")
    return lines


# -----------------------------------------------------------------------------
# goals and claims, side by side


def flops_goal_lines(rows):
    """The paper's FLOPs claim against our analytic ratios at the paper's lengths, per pair."""
    lines = []
    for llm_name in dict.fromkeys(r["llm"] for r in rows if r["source"] == "paper"):
        mine = [r["flops"] for r in rows if r["llm"] == llm_name and r["source"] == "paper"]
        ratios, llm_only = [f["mend"] / f["icl"] for f in mine], [f["mend_llm_only"] / f["icl"] for f in mine]
        reached = "REACHED" if 1 - min(ratios) >= PAPER_CLAIMS["flops_saved"] else "NOT REACHED"
        lines.append(f"FLOPs  paper: up to {PAPER_CLAIMS['flops_saved']:.0%} fewer | ours "
                     f"({llm_name} + {PAIRS[llm_name]}, paper D, T={rows[0]['T']}, no reuse): "
                     f"{1 - max(ratios):.0%} to {1 - min(ratios):.0%} fewer incl. the distiller, "
                     f"{1 - max(llm_only):.0%} to {1 - min(llm_only):.0%} LLM only -> the paper's "
                     f"{PAPER_CLAIMS['flops_saved']:.0%} {reached} with the distiller")
    return lines


def latency_goal_lines(rows, device, dtype):
    """The paper's speed claim and our two latency goals, each said met or not, per timed
    (partition, batch) and column (eager; graphed where timed)."""
    lines = []
    for part, B in dict.fromkeys((r["partition"], r["B"]) for r in rows):
        r = next(x for x in rows if x["partition"] == part and x["B"] == B)
        shapes = "" if r["llm"] == "gpt2-large" else " [not gpt2-large shapes: indicative only]"
        for column, mode in (("ms_query", "eager"), ("graphed_ms_query", "graphed")):
            if r[column] is None:
                continue
            where = f"{r['llm']} + {r['distiller']}, {part} D={r['D']} T={r['T']} B={B}, {device} {dtype}, {mode}"
            mend_icl = ratio(rows, part, B, "MEND", "ICL", column)
            reuse_zs = ratio(rows, part, B, "MEND + distill once", "zero-shot", column)
            lines += [
                f"speed  paper: {PAPER_CLAIMS['faster']:.0%} faster | ours ({where}): MEND is "
                f"{abs(1 - mend_icl):.0%} {'faster' if mend_icl <= 1 else 'slower'} than ICL per query, "
                f"no reuse",
                f"goal   MEND <= {GOALS['mend_vs_icl']}x ICL latency (no reuse): {mend_icl:.2f}x -> "
                f"{'MET' if mend_icl <= GOALS['mend_vs_icl'] else 'NOT MET'} ({where}){shapes}",
                f"goal   MEND + distill once <= {GOALS['reuse_vs_zeroshot']}x zero-shot latency: "
                f"{reuse_zs:.2f}x -> {'MET' if reuse_zs <= GOALS['reuse_vs_zeroshot'] else 'NOT MET'} "
                f"({where}){shapes}"]
    return lines


def plot(path, rows):
    """GFLOPs per query of each method at each (pair, partition), as grouped bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot drawn")
        return
    methods = ["zeroshot", "icl", "mend", "icl_reuse", "mend_reuse"]
    width = 1 / (len(methods) + 1)
    fig, ax = plt.subplots(figsize=(max(6, len(rows)), 4))
    for j, m in enumerate(methods):
        offset = (j - (len(methods) - 1) / 2) * width  # bars centred on the row's tick
        ax.bar([i + offset for i in range(len(rows))], [r["flops"][m] / 1e9 for r in rows], width=width, label=m)
    ax.set_xticks(range(len(rows)), [f"{r['llm']}\n{r['partition']} D={r['D']}" for r in rows], fontsize=7)
    ax.set_ylabel(f"GFLOPs per query (T={rows[0]['T']}, L={rows[0]['L']}, Q={rows[0]['Q']})")
    ax.legend()
    fig.tight_layout()
    data.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# the recipe: config -> device/dtype -> lengths -> analytic FLOPs -> timings -> goals -> report

def main(args):
    """The recipe: device/dtype -> lengths -> analytic FLOPs -> timings -> goals -> report."""
    # every path written is checked before any work
    data.check_output(args.out, "--out", folder=True)
    for name, kind in (("flops.md", "flops_md"), ("flops.json", "flops_json")):
        if Path(args.out, name).exists():  # replaced only when flops.py wrote it
            data.check_output(Path(args.out, name), "--out", kind=kind)
    if args.plot:
        data.check_output(args.plot, "--plot", kind="png")
    # a --data with nothing to measure fails before any output
    files = demo_files(args) if args.data else {}
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = device.startswith("cuda")  # cuda, cuda:0, ...
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    dtype = getattr(torch, "bfloat16" if bf16 else "float32") if args.dtype == "auto" else getattr(torch, args.dtype)
    dtype_name = str(dtype).split(".")[1]
    bench_pair = args.bench_pair if args.bench_pair != "auto" else "gpt2-large" if cuda else "smollm2-135m"
    args.batches = ([1, 16] if cuda else [1]) if args.batches == "auto" else args.batches
    hardware = torch.cuda.get_device_name(device) if cuda else f"threads={torch.get_num_threads()}"
    where = f"{device} {hardware}"  # printed with every number
    print(f"device={where} dtype={dtype_name} T={args.query_tokens} L={args.n_vectors} Q={args.queries}")

    lengths = {"paper": PAPER_LENGTHS}
    if args.data:
        lengths[f"{args.data} ({args.tokenizer})"] = measured_lengths(args, files)
    rows = flops_rows(args, lengths)
    report = ["## Analytic FLOPs per test query (GFLOPs; reuse = amortised over Q queries)", "",
              f"T={args.query_tokens} query+option tokens, L={args.n_vectors} vectors, Q={args.queries}, "
              "attention over the full rectangle (no causal halving)", "", *flops_table(rows), ""]
    goals = flops_goal_lines(rows)

    timings = []
    if bench_pair != "none":
        timings = bench(args, bench_pair, device, dtype)
        report += ["## Measured latency", "", *latency_table(timings, where, dtype_name), ""]
        goals += latency_goal_lines(timings, where, dtype_name)
    report += ["## Paper claims and goals", "", *[f"- {g}" for g in goals]]
    print("\n".join(report))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = "\n".join(report) + "\n"
    summary = json.dumps(dict(config=vars(args), device=where, dtype=dtype_name, flops=rows, latency=timings,
                              goals=goals), indent=1)
    data.write_atomically(out / "flops.md", lambda tmp: Path(tmp).write_text(table))
    data.write_atomically(out / "flops.json", lambda tmp: Path(tmp).write_text(summary))
    print(f"wrote {out / 'flops.md'} and {out / 'flops.json'}")
    if args.plot:
        plot(args.plot, rows)


if __name__ == "__main__":
    data.run_cli(lambda: main(get_args()))
