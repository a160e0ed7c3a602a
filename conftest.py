"""
What the tests share (test_mend.py, the core's; extensions/test_extensions.py, our additions'): tiny random-init
GPT-2, Llama and T5 models with the byte tokenizer of data.byte_tokenizer, the plain HF forward they are compared
with, and small helpers. Offline: the hub is switched off before transformers is imported.
"""
import functools
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: a test that reaches the network fails
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config,  # noqa: E402
                          T5ForConditionalGeneration)

import data  # noqa: E402
from distill import answer_ce_per_example  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

ROOT = Path(__file__).parent
VOCAB = 300
DEVICE = os.environ.get("MEND_TEST_DEVICE", "cpu")  # cuda: the tests that compare numbers run on CUDA kernels


@pytest.fixture
def on_device():
    """Tensors and models of the test are made on MEND_TEST_DEVICE (results/gpu/run.sh sets cuda)."""
    torch.set_default_device(DEVICE)
    yield DEVICE
    torch.set_default_device("cpu")


def tiny_llm(family, seed=0):
    torch.manual_seed(seed)
    if family == "t5":  # T5 v1.1 / LM-adapt layout (gated-gelu); decoder start 0, </s> = the byte tokenizer's <eos>
        cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                       feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=256,
                       dropout_rate=0.0)  # no dropout, as the tiny Llama: the distiller copy is deterministic
        return model.freeze(T5ForConditionalGeneration(cfg))
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=512, bos_token_id=256,
                         eos_token_id=256)
        return model.freeze(GPT2LMHeadModel(cfg))
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=256,
                      eos_token_id=256, pad_token_id=256)
    return model.freeze(LlamaForCausalLM(cfg))


@pytest.fixture(scope="session")
def saved_llm(tmp_path_factory):
    """A tiny model + tokenizer saved as a local folder, usable as --llm by train.py and eval.py. Each family is built
    and saved once per session and shared by the tests, which only read it: the session fails if a file changed."""
    folder = tmp_path_factory.mktemp("llms")
    files = lambda: {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    written = {}

    @functools.cache
    def make(family):
        path = folder / family
        tiny_llm(family).save_pretrained(path)
        data.byte_tokenizer(folder).save_pretrained(path)
        written.update(files())
        return str(path)
    yield make
    assert files() == written, f"a test changed the shared tiny models under {folder}"


def ids(*rows):
    return torch.tensor(rows, dtype=torch.long)


def hf_logits(llm, prefix, query):
    """The plain HF forward of [prefix ; query], no cache, no padding: prefix ids (B, P) or embeddings (B, P, C), query
    (B, T) -> logits at the query rows (B, T, V), row t predicting token t+1. A T5 reads the prefix and </s> in its
    encoder and [start ; query] in its decoder (the start row is dropped)."""
    emb = llm.get_input_embeddings()
    prefix = emb(prefix) if prefix.dtype == torch.long else prefix                    # (B, P, C)
    if not llm.config.is_encoder_decoder:
        return llm(inputs_embeds=torch.cat([prefix, emb(query)], 1)).logits[:, -query.shape[1]:]
    eos = emb(torch.full((len(query), 1), llm.config.eos_token_id))                  # (B, 1, C)
    start = torch.full((len(query), 1), llm.config.decoder_start_token_id)
    return llm(inputs_embeds=torch.cat([prefix, eos], 1), decoder_input_ids=torch.cat([start, query], 1)).logits[:, 1:]


def naive_option_scores(llm, tok, ex, max_len, prefix=None):
    """The yardstick of cached scoring: one plain HF forward of [prefix ; input ; option] per option, no cache, no
    batching; prefix ids (1, P), vectors (1, P, C) or None -> -(mean NLL of each option's tokens) (n_options,)."""
    options = [data.encode(tok, o) for o in ex["options"]]
    x, _ = data.encode_example(tok, ex, max_len, answer_len=max(map(len, options)))  # cut as eval.py cuts
    emb = llm.get_input_embeddings().weight
    prefix = torch.zeros(1, 0, dtype=torch.long) if prefix is None else prefix
    prefix = (prefix if prefix.dtype == torch.long else prefix.to(emb.dtype)).to(emb.device)
    scores = []
    for o in options:
        q = torch.tensor([x + o], device=emb.device)                                    # (1, T)
        answer = torch.tensor([[0] * len(x) + [1] * len(o)], device=emb.device)         # (1, T)
        scores.append(-answer_ce_per_example(hf_logits(llm, prefix, q), q, answer))
    return torch.cat(scores)


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(l + "\n" for l in lines))
    return path


def train_args(llm, out, *extra):
    return train.get_args(["--llm", llm, "--distiller", "layers:1", "--n_vectors", "3", "--c4_max_tokens", "48",
                           "--max_len_per_example", "32", "--teacher_demo_tokens", "96", "--distiller_demo_tokens", "96",
                           "--val_items", "2", "--out", str(out), *extra])
