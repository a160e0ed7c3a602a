"""
Issue 49: what TF32 costs in model.fp32_head's matmul (on CUDA its inputs are rounded to TF32's 10-bit mantissa and
summed in float32), against the exact float32 head and against bf16 logits (what the head would give without
fp32_head). TF32 is emulated on the CPU by rounding both inputs to 10 mantissa bits (to nearest even); the matmul is
then float32.

    python results/precision/tf32_head.py | tee results/precision/tf32_head.log    # about a minute on 2 cores

The embedded SmolLM2-135M-Instruct (real weights) reads the first 256 tokens of 8 real C4 documents; per document and
in all: the largest logit difference, the KL(exact || other) per position (the stage-1 loss is this KL) and the
difference of log p(next token) (what an option's score averages).
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import data  # noqa: E402
import model  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--c4", default=str(ROOT.parent / "shared" / "data" / "c4"), help="folder of real C4 .jsonl files")
args = p.parse_args()


def tf32(x):
    """float32 -> float32 rounded to TF32's 10-bit mantissa (to nearest, ties to even)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)


torch.set_num_threads(2)
llm, tok = model.load_llm(model.EMBEDDED), model.load_tokenizer(model.EMBEDDED)
W = llm.get_output_embeddings().weight.float()                                      # (V, C)
texts = [json.loads(line)["text"] for line in open(sorted(Path(args.c4).glob("*.jsonl"))[0])][:8]
print(f"{model.EMBEDDED}, float32 weights; 8 C4 documents, first 256 tokens each")
total = {"tf32 head": [], "bf16 logits": []}
with torch.no_grad():
    for i, text in enumerate(texts):
        ids = torch.tensor([data.encode(tok, text)[:256]])                          # (1, T)
        h = llm.model(input_ids=ids).last_hidden_state[0]                            # (T, C)
        exact = h @ W.T                                                              # (T, V)
        for name, other in (("tf32 head", tf32(h) @ tf32(W).T), ("bf16 logits", exact.bfloat16().float())):
            lp, lq = exact.log_softmax(-1), other.log_softmax(-1)
            kl = (lp.exp() * (lp - lq)).sum(-1)                                      # (T,)
            nxt = ids[0, 1:, None]                                                   # (T-1, 1)
            dlogp = (lp[:-1].gather(1, nxt) - lq[:-1].gather(1, nxt)).abs()
            total[name].append((kl.mean().item(), dlogp.mean().item(), dlogp.max().item()))
            print(f"doc {i} {name:11s}: max |logit diff| {(other - exact).abs().max():.4f}, KL {kl.mean():.2e}, "
                  f"|d log p(next)| mean {dlogp.mean():.2e} max {dlogp.max():.2e}")
for name, rows in total.items():
    kl, mean = (sum(r[j] for r in rows) / len(rows) for j in (0, 1))
    print(f"all {name:11s}: KL {kl:.2e} per position, |d log p(next)| mean {mean:.2e}, "
          f"max {max(r[2] for r in rows):.2e}")
