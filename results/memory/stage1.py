"""
Issue 49: the memory one stage-1 step takes at the paper's shapes (gpt2-large LLM held in bf16, gpt2 distiller trained
in float32 under bf16 autocast, l=100, 1024-token C4 documents: 819 demonstration and 205 query tokens), per item and
fixed, to say which batch one GPU holds.

    python results/memory/stage1.py | tee results/memory/stage1.log    # about 6 minutes on 2 CPU cores

Counted on the CPU (random weights; memory does not depend on them): the activations autograd saves for the backward
in mend_loss's forward (torch.autograd.graph.saved_tensors_hooks, each storage once, the weights left out), at batch 1
and 2, with the LLM's and the distiller's dropout on (train.py --preset paper), then without the dropout on
attention probabilities (see below); the fixed part from the parameter
counts (LLM weights in bf16; distiller weights, gradients and AdamW's two moments in float32). A GPU's peak adds the
allocator's slack and the temporaries of one layer at a time; results/gpu/check.py's mfu_by_batch measures it.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

import data  # noqa: E402
import distill  # noqa: E402
import flops  # noqa: E402
from model import count_params  # noqa: E402

GiB = 2 ** 30
torch.manual_seed(0)
llm, distiller = flops.build_models("gpt2-large", 100, "cpu", torch.float32)
llm.to(torch.bfloat16).train()                     # frozen, dropout on (--preset paper)
distiller.requires_grad_(True).train()
weights = {p.untyped_storage().data_ptr() for p in [*llm.parameters(), *distiller.parameters()]}
fixed = count_params(llm) * 2 + count_params(distiller) * 4 * 4    # bf16 LLM; distiller weights, grads, 2 moments
print(f"gpt2-large ({count_params(llm) / 1e6:.0f}M, bf16) + gpt2 distiller ({count_params(distiller) / 1e6:.0f}M, "
      f"float32), l=100, bf16 autocast, threads={torch.get_num_threads()}")
print(f"fixed: LLM weights + distiller weights, gradients, AdamW moments = {fixed / GiB:.2f} GiB")


def saved_per_batch(B):
    """The bytes of the activations mend_loss's forward saves for the backward at batch B."""
    batch = data.collate([data.c4_item(torch.randint(50257, (1024,)).int().numpy(), (None, None), 1024)
                          for _ in range(B)])
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        distill.mend_loss(llm, distiller, batch)
    print(f"  batch {B}: {batch['teacher_demo_ids'].shape[1]} demonstration and {batch['query_ids'].shape[1]} query "
          f"tokens an item; saved activations {sum(seen.values()) / GiB:.2f} GiB ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    return sum(seen.values())


# CPU SDPA with dropout on the attention probabilities falls back to the math kernel, which saves the (H, T, S)
# matrices; a GPU's fused kernels (flash, memory-efficient: with a mask) save none, so the second count turns that
# one dropout off: it is what a GPU saves
for name in ("CPU kernels, every dropout on", "attention-probability dropout off (a GPU's fused attention)"):
    print(name)
    one = saved_per_batch(1)
    item = saved_per_batch(2) - one  # the rest of batch 1 is per call (the head's float32 copy of its weights)
    print(f"  per item: {item / GiB:.2f} GiB of saved activations, per call {(one - item) / GiB:.2f} GiB; fixed + "
          "per call + batch x per item: " + ", ".join(f"batch {B} {(fixed + one + (B - 1) * item) / GiB:.1f} GiB"
                                                    for B in (1, 8, 16, 32)), flush=True)
    for module in [*llm.modules(), *distiller.modules()]:
        if hasattr(module, "attn_dropout"):
            module.attn_dropout.p = 0.0
