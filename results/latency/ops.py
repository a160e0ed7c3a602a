"""
Issue 49: the aten ops every latency cell of flops.py dispatches per call, and how many of them read a tensor on the
host (aten::_local_scalar_dense: a GPU sync, an error inside a CUDA graph). At batch 1 on a GPU an eager cell is
bound by these launches (on the lent H200 about 18 us an op), so the count predicts its eager time; a CUDA graph
replays them as one launch. The count does not depend on the widths, so the models have the paper's pair's depths
(gpt2-large's 36 blocks, gpt2's 12) and tiny widths; D=469 demonstration tokens, T=64, L=100, float32, CPU.

    python results/latency/ops.py                  # this checkout
    python results/latency/ops.py --root OTHER     # another checkout (e.g. before the 4-D masks)
"""
import argparse
import sys
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--root", default=str(Path(__file__).resolve().parents[2]),
               help="the checkout whose model.py and flops.py are counted")
args = p.parse_args()
sys.path.insert(0, args.root)

import torch  # noqa: E402
from transformers import GPT2Config  # noqa: E402

import flops  # noqa: E402
from dispatch import Ops  # noqa: E402  (this folder's op counter)

flops.CONFIGS["deep-tiny"] = GPT2Config(n_layer=36, n_embd=64, n_head=4, vocab_size=512, n_positions=1024,
                                            bos_token_id=0, eos_token_id=0)
flops.CONFIGS["deep-tiny-distiller"] = GPT2Config(n_layer=12, n_embd=32, n_head=2, vocab_size=512,
                                                      n_positions=1024, bos_token_id=0, eos_token_id=0)
flops.PAIRS["deep-tiny"] = "deep-tiny-distiller"
torch.manual_seed(0)
llm, distiller = flops.build_models("deep-tiny", 100, "cpu", torch.float32)
print(f"checkout {args.root}; GPT-2 depths 36 (LLM) + 12 (distiller), tiny widths; D=469 T=64 L=100 B=1")
with torch.no_grad():
    for method, cell in flops.latency_cells(llm, distiller, 469, 64, 100, 1).items():
        call = cell if callable(cell) else lambda: cell[0](*cell[1])  # fn, or (fn, inputs) after issue 49
        call()
        with Ops() as ops:
            call()
        print(f"{method:20s} {sum(ops.count.values()):5d} ops per call, {ops.count['_local_scalar_dense']} host reads")
