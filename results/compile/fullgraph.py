"""
Issue 49: the static MEND query (distiller + LLM, model.causal_mask's 4-D masks, fixed shapes) compiles as one graph
with torch.compile(fullgraph=True), and its compiled logits against eager's.

    python results/compile/fullgraph.py | tee results/compile/fullgraph.log    # under a minute on 2 CPU cores

For a tiny GPT-2 and a tiny Llama (random init, float32, 2 layers, a 1-layer distiller copy, L=4) and padded inputs
(left-padded demonstrations, right-padded queries): torch._dynamo.explain's graph and break counts, then the compiled
query (inductor) against the eager one. It prints, per family, one line with the counts, the break reasons (none
expected) and max |compiled - eager|.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import model  # noqa: E402

CONFIGS = {"gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300,
                                                                  bos_token_id=256, eos_token_id=256)),
           "llama": lambda: LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                                        bos_token_id=256, eos_token_id=256, pad_token_id=256))}


def main():
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, float32", flush=True)
    for family, build in CONFIGS.items():
        torch.manual_seed(0)
        llm = model.freeze(build())
        distiller = model.freeze(model.build_distiller("layers:1", llm, n_vectors=4))
        d, q = torch.randint(0, 256, (3, 24)), torch.randint(0, 256, (3, 8))          # demos (B, D), queries (B, T)
        dm, qm = torch.ones_like(d), torch.ones_like(q)
        dm[0, :6], qm[1, 5:] = 0, 0                                                   # left / right padding

        def query(d, dm, q, qm):
            vectors = distiller(d, dm)                                                # (B, L, C)
            return model.llm_logits(llm, q, qm, prefix_embeds=vectors, prefix_mask=qm.new_ones(len(q), 4))
        with torch.no_grad():
            eager = query(d, dm, q, qm)                                               # (B, T, V)
            explained = torch._dynamo.explain(query)(d, dm, q, qm)
            t0 = time.perf_counter()
            compiled = torch.compile(query, fullgraph=True)(d, dm, q, qm)
            seconds = time.perf_counter() - t0
        reasons = sorted({str(b.reason).splitlines()[0] for b in explained.break_reasons}) or ["none"]
        print(f"{family}: {explained.graph_count} graph(s), {explained.graph_break_count} graph break(s) "
              f"(reasons: {'; '.join(reasons)}); fullgraph compile {seconds:.0f} s; max |compiled - eager| "
              f"{(compiled - eager).abs().max().item():.2e}", flush=True)


if __name__ == "__main__":
    main()
