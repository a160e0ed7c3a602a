"""
Tests of our additions (extensions/): the free prefixes and the gated start, the anchors and MEND on them, the option
objective and fitted vectors, the selection signal. Offline, on CPU, with conftest.py's tiny models. Run with the
core's: `python -m pytest -q test_mend.py extensions`.
"""
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import data
import distill
import eval as evaluate
import extensions
import model
import train
from conftest import ROOT, hf_logits, ids, naive_option_scores, tiny_llm, train_args, write_lines
from extensions import signal
from extensions.anchors import Anchors, anchor_positions, anchors_of, anchors_step_flops, answer_rows
from extensions.options import Options, fit_vectors, option_batch, refine
from extensions.prefixes import Gated, GatedDistiller, free_prefix


def reader_of(spec, llm, n_vectors, freeze_embeddings=False):
    """--base anchors' trained part: an AnchorReader around a distiller of the spec, or a bias alone (spec 'none')."""
    return Anchors({}).build(llm, spec, n_vectors, freeze_embeddings)


OPTION_ITEM = dict(teacher_demo=[5, 6, 7, 8, 9], distiller_demo=[5, 6, 7, 8, 9], inputs=[[10, 11, 12, 13, 14], [15, 16]],
                   options=[[[20, 21, 22], [23]], [[24, 25], [26, 27, 28], [29]]], gold=[0, 1])


def brute_force_option_terms(llm, vectors, item):
    """The option objective by hand: one full forward of [demos ; input ; option] (teacher) and of [vectors ; input ;
    option] (student) per (input, option), no cache; KL on the input's last 4 rows and the option rows predicting
    option tokens 2.., CE on the gold option's tokens. -> (mean KL, mean CE) over the inputs."""
    kls, ces = [], []
    for x, opts, gold in zip(item["inputs"], item["options"], item["gold"]):
        rows, ce = [], None
        for j, o in enumerate(opts):
            seq = torch.tensor([x + o])
            t = hf_logits(llm, torch.tensor([item["teacher_demo"]]), seq)[0]                 # (T, V)
            s = hf_logits(llm, vectors, seq)[0]                                              # (T, V)
            picked = list(range(max(0, len(x) - 4), len(x))) * (j == 0) + list(range(len(x), len(x) + len(o) - 1))
            rows += [distill.row_kl(t[r], s[r]) for r in picked]
            if j == gold:
                ce = F.cross_entropy(s[len(x) - 1:len(x) + len(o) - 1], torch.tensor(o))
        kls.append(torch.stack(rows).mean())
        ces.append(ce)
    return torch.stack(kls).mean(), torch.stack(ces).mean()


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_option_objective_equals_a_brute_force_loop_over_options(family):
    """--kl_rows options shares each input's keys/values among its options (teacher and student); its KL, CE and the
    distiller's gradients equal one full forward per (input, option). T5: left-padded decoder inputs."""
    llm = tiny_llm(family)
    distiller = model.build_distiller("layers:1", llm, n_vectors=3)
    loss, kl, ce = distill.mend_loss(llm, distiller, option_batch([OPTION_ITEM], "cpu"), lam=0.5, steps=Options({}))
    loss.backward()
    fast = [p.grad.clone() for p in distiller.parameters() if p.grad is not None]
    distiller.zero_grad()
    vectors = distiller(ids(OPTION_ITEM["distiller_demo"]), torch.ones(1, 5, dtype=torch.long))
    bkl, bce = brute_force_option_terms(llm, vectors, OPTION_ITEM)
    torch.testing.assert_close((kl, ce), (bkl.detach(), bce.detach()), rtol=1e-4, atol=1e-6)
    (bce + 0.5 * bkl).backward()
    slow = [p.grad for p in distiller.parameters() if p.grad is not None]
    assert len(fast) == len(slow) > 0 and kl > 0
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fitted_vectors_lower_the_kl_deterministically_and_zero_steps_change_nothing():
    """fit_vectors: its first KL is the option objective's on the same inputs (the teacher's targets, computed once,
    are right); the fit KL falls; the same seed gives the same vectors; steps=0 returns the input vectors."""
    llm = tiny_llm("llama")
    item = {**OPTION_ITEM, "gold": [-1, -1]}
    start = torch.randn(1, 3, 32) * 0.02
    same, history = fit_vectors(llm, start, item, steps=0)
    assert same is start and history == []
    a, history = fit_vectors(llm, start, item, steps=25, lr=0.5, seed=3)
    b, _ = fit_vectors(llm, start, item, steps=25, lr=0.5, seed=3)
    assert torch.equal(a, b) and a.shape == start.shape and history[-1] < 0.5 * history[0]
    free = model.PromptTuning(llm, 3)
    free.placeholder.data = start[0].clone()  # the first step's KL (both inputs) is the option objective's, unlabeled
    assert history[0] == pytest.approx(distill.mend_loss(llm, free, option_batch([item], "cpu"), steps=Options({}))[0].item(), rel=1e-5)


def test_selection_rule_keeps_only_tasks_where_icl_reads_labels():
    """A candidate is kept when ICL with the gold labels clears the one-class floor by FLOOR_MARGIN and beats ICL with
    random labels by LABEL_MARGIN; the random-label pass runs only after the floor test passes, and its labels are
    really random (the demonstrations it sees differ from the gold ones)."""
    golds = [0, 1] * 10
    demos = [{"input": f"x{i}", "output": "yes" if i % 2 else "no", "options": ["no", "yes"]} for i in range(16)]
    def predictor(icl, icl_random):
        calls = []
        def predict(method, task, examples):
            calls.append(method if method == "zeroshot" or examples[0] == demos else "icl_random")
            right = {"zeroshot": 0, "icl": icl, "icl_random": icl_random}[calls[-1]]
            return golds[:right] + [1 - g for g in golds[right:]], golds  # the first `right` predictions are correct
        return predict, calls
    predict, calls = predictor(icl=20, icl_random=10)   # macro-F1 100 vs 50 (floor 33.3)
    assert signal.label_sensitive("t", (demos, golds), predict, 100, print) and calls == ["zeroshot", "icl", "icl_random"]
    predict, calls = predictor(icl=20, icl_random=20)
    assert not signal.label_sensitive("t", (demos, golds), predict, 100, print)
    predict, calls = predictor(icl=0, icl_random=20)    # ICL below the floor: no random-label pass
    assert not signal.label_sensitive("t", (demos, golds), predict, 100, print) and calls == ["zeroshot", "icl"]


def test_selection_signal_holds_out_tasks_and_scores_like_eval(saved_llm, tmp_path, monkeypatch):
    """--val_tasks: a task where ICL sits at the one-class floor is refused (the random tiny model collapses on all
    three); with the margin lifted, the held-out task never enters training, the checkpoint leaves out the frozen
    embeddings, the logged MEND signal is what eval.py's scorer gives for that task's examples with the saved
    distiller, and the judge logs ICL and MEND with random labels too."""
    llm, ckpt = saved_llm("llama"), tmp_path / "m.pt"
    argv = ["--stage", "finetune", "--partition", "class2class", "--data", str(ROOT / "sample_data"), "--k", "4",
            "--max_steps", "2", "--eval_interval", "2", "--val_tasks", "1", "--val_task_examples", "8"]
    with pytest.raises(SystemExit, match="only 0 of 3 meta-train tasks qualify"):
        train.run(train_args(llm, ckpt, *argv))
    monkeypatch.setattr(signal, "FLOOR_MARGIN", -100.0)
    monkeypatch.setattr(signal, "LABEL_MARGIN", -100.0)
    train.run(train_args(llm, ckpt, *argv))
    state = model.load_checkpoint(ckpt)
    assert state["config"]["val_tasks_held_out"] == ["sample-topic"] and "sample-topic" not in state["config"]["train_tasks"]
    assert not any("embed" in k for k in state["model"]) and any("placeholder" in k for k in state["model"])
    log = ckpt.with_suffix(".log").read_text()
    logged = [float(l.split("signal mend ")[1].split()[0]) for l in log.splitlines() if "signal mend" in l]
    args = evaluate.get_args(["--data", str(ROOT / "sample_data"), "--ckpt", str(ckpt), "--partition", "class2class"])
    lm, toks, distiller, meta, _ = evaluate.load_models(args, ["mend"], "cpu")
    pool = data.read_metaicl(data.task_file(ROOT / "sample_data", "sample-topic", 16, 100, "test"))
    preds = evaluate.evaluate_seed("mend", lm, toks, distiller, pool[:4], pool[4:12], args, {**meta, "task": "t", "seed": 1})
    f1 = data.macro_f1(preds, [ex["options"].index(ex["output"]) for ex in pool[4:12]])
    assert "signal reference | held-out tasks macro-F1: zeroshot" in log and logged[-1] == pytest.approx(f1, abs=0.006)
    assert "| icl_random " in log and "| mend_random " in log
    import analyze
    report = analyze.main(analyze.get_args(["--held_out", "--ckpt", str(ckpt), "--data", str(ROOT / "sample_data")]))
    assert data.macro_f1(*report["mend"]["sample-topic"]) == pytest.approx(f1)


def test_truncated_reads_the_last_l_demonstration_tokens(saved_llm):
    """--methods truncated: ICL on the last l tokens of the demonstration prefix; its scores equal a plain forward of
    those tokens + input + option, and with l at least the prefix length it is ICL."""
    args = evaluate.get_args(["--llm", saved_llm("llama"), "--n_vectors", "5", "--max_len_per_example", "32",
                              "--teacher_demo_tokens", "96", "--distiller_demo_tokens", "96"])
    llm, toks, _, _, _ = evaluate.load_models(args, ["truncated"], "cpu")
    pool = data.read_metaicl(data.task_file(ROOT / "sample_data", "sample-sentiment", 16, 100, "train"))
    demos, ex = pool[:4], pool[5]
    teacher_ids, _ = data.demo_item(toks, demos, (96, 96), 32)
    fast = model.option_scores(llm, toks[0], ex, 32, *evaluate.make_prefix("truncated", llm, toks, None, demos, args, {}))
    slow = naive_option_scores(llm, toks[0], ex, 32, torch.tensor([teacher_ids[-5:]]))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    args.n_vectors = len(teacher_ids)
    icl = model.option_scores(llm, toks[0], ex, 32, *evaluate.make_prefix("icl", llm, toks, None, demos, args, {}))
    truncated = model.option_scores(llm, toks[0], ex, 32, *evaluate.make_prefix("truncated", llm, toks, None, demos, args, {}))
    assert torch.equal(icl, truncated) and not torch.allclose(fast, icl)


def test_answer_rows_and_anchor_positions(tmp_path):
    """answer_rows finds each demonstration's label rows (last input token, output, DEMO_SEP) in the joined
    prefix; anchor_positions keeps the sink and whole demonstrations' rows, latest first, or everything when it fits."""
    tok = data.byte_tokenizer(tmp_path)
    demos = [{"input": "ab", "output": "yes"}, {"input": "cde", "output": "no"}, {"input": "f", "output": "maybe"}]
    teacher_ids, _ = data.demo_item((tok, tok), demos, (20, 20), 32)              # the third demo does not fit
    rows = answer_rows(tok, demos, len(teacher_ids), 32)
    assert [tok.decode([teacher_ids[p] for p in r]) for r in rows] == ["\nyes\n\n", "\nno\n\n"]
    assert rows == [[2, 3, 4, 5, 6, 7], [11, 12, 13, 14, 15]]
    assert anchor_positions(rows, 16, 9) == [0, 1, 2, 3, 11, 12, 13, 14, 15]
    assert anchor_positions(rows, 16, 15) == [0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 14, 15]  # sink overlaps
    assert anchor_positions(rows, 16, 8) == [0, 1, 2, 3]                 # no whole demonstration fits
    assert anchor_positions(rows, 16, 16) == list(range(16))
    with pytest.raises(ValueError, match="not a prefix of whole demonstrations"):
        answer_rows(tok, demos, 10, 32)


def anchors_example(llm_path):
    """The anchors' test case: a tiny LLM at l=20, 4 sentiment demonstrations and one test input with 3 options ->
    (eval args, LLM, tokenizers, demos, example, the demonstrations' LLM tokens, the anchors' kept positions)."""
    args = evaluate.get_args(["--llm", llm_path, "--n_vectors", "20", "--max_len_per_example", "32",
                              "--teacher_demo_tokens", "96", "--distiller_demo_tokens", "96"])
    llm, toks, _, _, _ = evaluate.load_models(args, ["anchors"], "cpu")
    pool = data.read_metaicl(data.task_file(ROOT / "sample_data", "sample-sentiment", 16, 100, "train"))
    demos, ex = pool[:4], {"input": pool[5]["input"], "options": ["good", "terrible!", "ok"], "output": "ok"}
    teacher_ids = data.demo_item(toks, demos, (96, 96), 32)[0]
    D = len(teacher_ids)
    return args, llm, toks, demos, ex, teacher_ids, anchor_positions(answer_rows(toks[0], demos, D, 32), D, 20)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_anchors_keep_the_full_prefix_keys_values_at_label_rows(saved_llm, family):
    """--methods anchors: each option's score equals a plain HF forward of input+option after the full prefix's keys
    and values at the kept positions only, with the positions the query has in full ICL; with l at least the prefix
    length it is ICL exactly; at the wrong positions (right after the kept entries) the scores change."""
    args, llm, toks, demos, ex, teacher_ids, keep = anchors_example(saved_llm(family))
    D = len(teacher_ids)
    assert D > 20 and 4 < len(keep) <= 20 and keep[:4] == [0, 1, 2, 3]
    kv, start = evaluate.make_prefix("anchors", llm, toks, None, demos, args, {})
    scores = model.option_scores(llm, toks[0], ex, 32, kv, start)
    full = llm(input_ids=torch.tensor([teacher_ids]), use_cache=True).cache       # a plain HF forward of the prefix
    x = data.encode_example(toks[0], ex, 32, answer_len=9)[0]
    for score, option in zip(scores, ex["options"]):
        o = data.encode(toks[0], option)
        cache = model.DynamicCache([(layer.keys[:, :, keep], layer.values[:, :, keep]) for layer in full.layers])
        logits = llm(input_ids=torch.tensor([x + o]), position_ids=torch.arange(D, D + len(x) + len(o))[None],
                     cache=cache).logits[0]
        nll = F.cross_entropy(logits[len(x) - 1:-1], torch.tensor(o))
        assert abs(score.item() + nll.item()) < 1e-5
    assert not torch.allclose(scores, model.option_scores(llm, toks[0], ex, 32, kv))
    args.n_vectors = D
    icl = model.option_scores(llm, toks[0], ex, 32, *evaluate.make_prefix("icl", llm, toks, None, demos, args, {}))
    assert torch.equal(icl, model.option_scores(llm, toks[0], ex, 32, *evaluate.make_prefix("anchors", llm, toks, None, demos, args, {})))


def test_labels_read_the_last_l_tokens_of_the_demonstrations_without_inputs(saved_llm, tmp_path):
    """--methods labels: truncated over the no_inputs demonstrations, under its own key; --perturb composes."""
    args = evaluate.get_args(["--llm", saved_llm("llama"), "--n_vectors", "30", "--max_len_per_example", "32",
                              "--teacher_demo_tokens", "96", "--distiller_demo_tokens", "96"])
    llm, toks, _, _, _ = evaluate.load_models(args, ["labels"], "cpu")
    pool = data.read_metaicl(data.task_file(ROOT / "sample_data", "sample-sentiment", 16, 100, "train"))
    demos, ex = pool[:8], pool[9]
    no_inputs, _ = data.demo_item(toks, data.perturb_demos(demos, "no_inputs", 0), (96, 96), 32)
    text = toks[0].decode(no_inputs[-30:])
    assert text.endswith("".join(f"\n{d['output']}\n\n" for d in demos[-2:])) and demos[-1]["input"] not in text
    fast = model.option_scores(llm, toks[0], ex, 32, *evaluate.make_prefix("labels", llm, toks, None, demos, args, {}))
    slow = naive_option_scores(llm, toks[0], ex, 32, torch.tensor([no_inputs[-30:]]))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    out = tmp_path / "r.json"
    report = evaluate.main(evaluate.get_args(["--llm", saved_llm("llama"), "--partition", "class2class", "--methods",
                                              "labels", "--n_vectors", "30", "--seeds", "100", "--max_examples", "3",
                                              "--perturb", "random_labels", "--out", str(out)]))
    assert set(report["methods"]) == {"labels"} and report["perturb"] == "random_labels" and report["train_config"] is None


@pytest.mark.parametrize("base,l", [("labels", 3), ("labels", 60), ("truncated", 3)])
def test_mend_from_a_base_at_gate_zero_scores_exactly_as_its_base(saved_llm, tmp_path, base, l):
    """train.py --base: at gate 0 (lr 0 keeps it there) MEND's vectors are the base's token embeddings, so eval.py
    (as the plain forward of every option), the API and the vector files score exactly as the free prefix itself, with gold and with random labels. At l=60 the
    labels of 4 demonstrations are shorter than l: the vectors are as many as the base's tokens."""
    llm, ckpt = saved_llm("llama"), tmp_path / "mend.pt"
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0", "--lr", "0",
                         "--base", base, "--n_vectors", str(l)))
    state = model.load_checkpoint(ckpt)
    assert state["config"]["base"] == base and torch.equal(state["model"]["gate"], torch.zeros(32))
    common = ["--data", str(ROOT / "sample_data"), "--ckpt", str(ckpt), "--partition", "class2class", "--seeds", "100",
              "--max_examples", "4", "--methods", f"mend,{base}", "--vectors_dir", str(tmp_path / "vec")]
    for perturb in ("gold", "random_labels"):
        report = evaluate.main(evaluate.get_args([*common, "--perturb", perturb, "--out", str(tmp_path / f"{perturb}.json")]))
        for task, got in report["methods"]["mend"]["tasks"].items():
            assert got["predictions"] == report["methods"][base]["tasks"][task]["predictions"], (perturb, task)
    args = evaluate.get_args(common)
    llm_, toks, distiller, meta, _ = evaluate.load_models(args, ["mend", base], "cpu")
    pool = data.read_metaicl(data.task_file(ROOT / "sample_data", "sample-sentiment", 16, 100, "train"))
    demos, ex = pool[:4], pool[5]
    tokens = free_prefix(toks, demos, base, l, (96, 96), 32)
    assert (len(tokens) < l) == (l == 60)
    meta = {**meta, "task": "t", "seed": 1}
    free = model.option_scores(llm_, toks[0], ex, 32, *evaluate.make_prefix(base, llm_, toks, None, demos, args, {}))
    mend = model.option_scores(llm_, toks[0], ex, 32, *evaluate.make_prefix("mend", llm_, toks, distiller, demos, args, meta))
    assert torch.equal(mend, free)
    api = extensions.load(str(ckpt), device="cpu")
    pairs = [(d["input"], d["output"]) for d in demos]
    assert torch.equal(api.distill(pairs), llm_.get_input_embeddings()(torch.tensor([tokens])))
    assert api.vector_meta(pairs)["base_hash"] == distill.demos_hash(tokens)
    assert all("base_hash" in safe_open(str(f), "pt").metadata() for f in (tmp_path / "vec").glob("*.safetensors"))
    naive = naive_option_scores(llm_, toks[0], ex, 32, api.distill(pairs))  # the plain forward, same vectors
    torch.testing.assert_close(mend, naive, rtol=0, atol=1e-4)
    if base == "labels":
        with pytest.raises(ValueError, match="give \\(input, output\\) pairs"):
            api.distill("good film\nyes\n\n")


def test_stage1_from_the_truncated_base_at_gate_zero_has_the_truncated_reference_kl(saved_llm, tmp_path):
    """train.py --stage pretrain --base truncated: at gate 0 (lr 0 keeps it there) the student reads the last l tokens
    of each document's demonstration part, so its validation KL equals the reference line's truncated KL exactly, and
    both are below the no-prefix KL. Its checkpoint records the base; stage 2 starts from it with any --base."""
    llm, ckpt = saved_llm("llama"), tmp_path / "s1.pt"
    train.run(train_args(llm, ckpt, "--stage", "pretrain", "--max_steps", "1", "--lr", "0", "--base", "truncated",
                         "--val_items", "3"))
    lines = ckpt.with_suffix(".log").read_text().splitlines()
    ref = next(x for x in lines if x.startswith("val reference"))
    alone, truncated = float(ref.split("kl ")[1].split()[0]), float(ref.split("kl ")[-1])
    val = float(next(x for x in lines if "val kl" in x).split("val kl ")[1].split()[0])
    assert val == pytest.approx(truncated, rel=1e-5, abs=1e-7) and truncated < alone
    assert model.load_checkpoint(ckpt)["config"]["base"] == "truncated"
    for base in ("none", "labels"):
        train.run(train_args(llm, tmp_path / f"s2_{base}.pt", "--stage", "finetune", "--max_steps", "1",
                             "--init", str(ckpt), "--base", base))
    with pytest.raises(SystemExit):
        train.get_args(["--stage", "pretrain", "--base", "labels"])


def test_a_short_base_is_read_as_itself_and_only_the_gate_learns_at_zero():
    """A batch of two items whose bases have 2 and 4 of l=4 tokens: at gate 0 the student's KL equals, item by item,
    that of the LLM reading only its base tokens before the query (the missing slots are masked); the backward pass
    reaches the gate, and nothing else while the gate is 0."""
    llm = tiny_llm("llama")
    distiller = model.build_distiller("layers:1", llm, n_vectors=4, cls=GatedDistiller)
    items = [dict(teacher_demo=[5, 6, 7, 8, 9, 10], distiller_demo=[5, 6, 7, 8, 9, 10], queries=[[11, 12, 13]],
                  answer_masks=[[0, 0, 0]], base=[0, 0, 9, 10], base_mask=[0, 0, 1, 1]),
             dict(teacher_demo=[20, 21, 22], distiller_demo=[20, 21, 22], queries=[[23, 24]], answer_masks=[[0, 0]],
                  base=[20, 21, 22, 23], base_mask=[1, 1, 1, 1])]
    loss, kl, _ = distill.mend_loss(llm, distiller, Gated({}).collate(items, "cpu"), steps=Gated({}))
    expect = 0.0
    for it, n in zip(items, (2, 4)):
        q, qm = ids(it["queries"][0]), torch.ones(1, len(it["queries"][0]), dtype=torch.long)
        teacher = model.teacher_logits(llm, ids(it["teacher_demo"]), torch.ones(1, len(it["teacher_demo"]), dtype=torch.long), q, qm)
        alone = model.llm_logits(llm, q, qm, prefix_embeds=llm.get_input_embeddings()(ids(it["base"][-n:])),
                                 prefix_mask=torch.ones(1, n, dtype=torch.long))
        expect += distill.kl_per_example(teacher, alone, qm).item() / 2
    assert kl.item() == pytest.approx(expect, rel=1e-4) and kl.item() > 0  # all slots read: 0.0006 vs 0.00045
    loss.backward()
    assert distiller.gate.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for n, p in distiller.named_parameters() if n != "gate")


def anchors_case(tmp_path, family):
    """A tiny LLM, the byte tokenizer, 4 demonstrations with an example, and their anchors at l=20 (eval.py's)."""
    llm, tok = tiny_llm(family), data.byte_tokenizer(tmp_path)
    pool = data.read_metaicl(data.task_file(ROOT / "sample_data", "sample-sentiment", 16, 100, "train"))
    demos, ex = pool[:4], {"input": pool[5]["input"], "options": ["good", "terrible!", "ok"], "output": "ok"}
    return llm, (tok, tok), demos, ex, anchors_of(llm, (tok, tok), demos, (96, 96), 32, 20)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("perturb", ["gold", "random_labels"])
def test_anchor_reader_at_zero_scores_exactly_as_the_anchors(tmp_path, family, perturb):
    """At gate 0 (bias 0) the query reading the anchors and the vectors' keys/values gives eval.py's anchors scores
    bit for bit; a nonzero gate changes them; a bias of ln 2 on the anchor logits equals the anchors with every anchor
    key/value given twice (a plain forward: twice the weight in every softmax), and differs from the anchors."""
    llm, toks, demos, ex, _ = anchors_case(tmp_path, family)
    demos = data.perturb_demos(demos, perturb, 100)
    kv, start = anchors_of(llm, toks, demos, (96, 96), 32, 20)              # per layer (1, H, l, h)
    anchors = model.option_scores(llm, toks[0], ex, 32, kv, start)
    reader = reader_of("layers:1", llm, n_vectors=4)
    assert reader.gate.shape == (2, llm.config.num_attention_heads) and not reader.gate.any()
    d = torch.tensor([data.demo_item(toks, demos, (96, 96), 32)[1]])
    vector_kv = model.prefix_cache(llm, prefix_embeds=reader(d, torch.ones_like(d)).detach())  # (1, H_kv, 4, h)
    with reader.reading(llm, kv[0][0].shape[2], vector_kv):
        at_zero = model.option_scores(llm, toks[0], ex, 32, kv, start)
    assert torch.equal(at_zero, anchors)
    with torch.no_grad():
        reader.gate[1, 0] = 0.5
    with reader.reading(llm, kv[0][0].shape[2], vector_kv):
        assert (model.option_scores(llm, toks[0], ex, 32, kv, start) - anchors).abs().max() > 1e-4
    assert llm.config._attn_implementation == "sdpa"                                 # restored after the block
    bias = reader_of("none", llm, n_vectors=4)
    assert bias.distiller is None and model.count_params(bias, True) == 2 * llm.config.num_attention_heads
    with bias.reading(llm, kv[0][0].shape[2]):
        assert torch.equal(model.option_scores(llm, toks[0], ex, 32, kv, start), anchors)
    with torch.no_grad():
        bias.bias.fill_(math.log(2))
    with bias.reading(llm, kv[0][0].shape[2]):
        doubled = model.option_scores(llm, toks[0], ex, 32, kv, start)
    twice = [(torch.cat([k, k], 2), torch.cat([v, v], 2)) for k, v in kv]           # per layer (1, H, 2l, h)
    torch.testing.assert_close(doubled, model.option_scores(llm, toks[0], ex, 32, twice, start), rtol=1e-5, atol=1e-5)
    assert (doubled - anchors).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_anchors_loss_reads_each_padded_row_as_its_anchors_and_trains_only_gate_distiller_or_bias(tmp_path, family,
                                                                                                    monkeypatch):
    """mend_loss on a batch of two items with demonstrations and anchors of different lengths (left-padded) and 2 + 1
    queries: at gate 0 the student's logits equal, row by row, eval.py's anchors path (the LLM reading that item's
    demonstrations alone, keeping its anchors, the query at the positions it has after them). The backward pass
    reaches the gate alone at gate 0, the distiller too once the gate is open, the bias alone without a distiller;
    the LLM never has a gradient."""
    llm, toks, _, _, _ = anchors_case(tmp_path, family)
    pool = data.read_metaicl(data.task_file(ROOT / "sample_data", "sample-sentiment", 16, 100, "train"))
    rng = __import__("numpy").random.default_rng(0)
    steps = Anchors({"n_vectors": 30, "max_len_per_example": 32})
    fields = lambda item, demos, targets: steps.fields(toks, item, demos, targets)
    items = [data.meta_item(toks, pool[j:j + q], pool[10:], rng, k, (96, 96), 32, fields=fields)
             for j, q, k in ((0, 2, 4), (5, 1, 1))]
    batch = steps.collate(items, "cpu")
    lengths = [len(it["anchors"]) for it in items]
    assert batch["anchor_positions"].shape == (2, max(lengths)) and lengths[0] != lengths[1] and max(lengths) <= 30
    assert len(items[0]["teacher_demo"]) != len(items[1]["teacher_demo"])  # both padded: demonstrations and anchors
    expect = []
    for it in items:
        t = ids(it["teacher_demo"])
        kv = model.family(llm).take(model.prefix_cache(llm, prefix_ids=t), positions=torch.tensor(it["anchors"]))
        for query in it["queries"]:                                               # the query starts at D
            expect.append(model.llm_logits(llm, ids(query), torch.ones(1, len(query), dtype=torch.long),
                                           prefix_kv=kv, shift=t.shape[1] - len(it["anchors"]))[0])  # (T, V)
    students, terms = [], distill.query_terms
    monkeypatch.setattr(distill, "query_terms", lambda t, s, *a: students.append(s.detach()) or terms(t, s, *a))
    for spec in ("layers:1", "none"):
        reader = reader_of(spec, llm, n_vectors=3)
        loss, kl, _ = distill.mend_loss(llm, reader, batch, steps=steps)
        for row, want in enumerate(expect):
            torch.testing.assert_close(students[-1][row, :len(want)], want, rtol=1e-4, atol=1e-5)
        assert kl.item() > 0
        loss.backward()
        own = "gate" if spec != "none" else "bias"
        assert getattr(reader, own).grad.abs().sum() > 0
        assert all(p.grad is None or not p.grad.any() for n, p in reader.named_parameters() if n != own)
        assert all(p.grad is None for p in llm.parameters())
    with torch.no_grad():
        reader = reader_of("layers:1", llm, n_vectors=3)
        reader.gate.fill_(0.1)
    distill.mend_loss(llm, reader, batch, steps=steps)[0].backward()
    assert reader.distiller.placeholder.grad.abs().sum() > 0 and all(p.grad is None for p in llm.parameters())
    assert (students[-1][0, :len(expect[0])] - expect[0]).abs().max() > 1e-4    # an open gate reads the vectors


@pytest.mark.parametrize("spec", ["layers:1", "none"])
def test_train_then_eval_on_the_anchors_end_to_end(saved_llm, tmp_path, spec):
    """train.py --base anchors (with a distiller, from a plain stage-1 checkpoint, or without: --distiller none) then
    eval.py --methods mend: the checkpoint records the base and the distiller; at lr 0 (gate or bias at 0) MEND's
    predictions are the anchors' with gold and random labels; trained, the gate or bias moves; the vector API refuses
    the checkpoint in one line; an encoder-decoder LLM, --distiller none without --base anchors and stage 1 are refused."""
    llm, ckpt = saved_llm("llama"), tmp_path / "mend.pt"
    init = []
    if spec != "none":
        train.run(train_args(llm, tmp_path / "s1.pt", "--stage", "pretrain", "--max_steps", "1", "--val_items", "0",
                             "--n_vectors", "20"))
        init = ["--init", str(tmp_path / "s1.pt")]
    common = ["--stage", "finetune", "--distiller", spec, "--base", "anchors", "--n_vectors", "20", "--val_items", "1"]
    train.run(train_args(llm, ckpt, *common, *init, "--max_steps", "1", "--lr", "0"))
    state = model.load_checkpoint(ckpt)
    own = "gate" if spec != "none" else "bias"
    assert (state["config"]["base"], state["config"]["distiller"]) == ("anchors", spec)
    assert torch.equal(state["model"][own], torch.zeros(2, 4))
    if spec != "none":  # the stage-1 distiller's weights were loaded under the reader
        s1 = model.load_checkpoint(tmp_path / "s1.pt")["model"]
        assert torch.equal(state["model"]["distiller.placeholder"], s1["placeholder"])
    else:
        assert set(state["model"]) == {"bias"}
    flags = ["--data", str(ROOT / "sample_data"), "--ckpt", str(ckpt), "--partition", "class2class", "--seeds", "100",
             "--max_examples", "4", "--methods", "mend,anchors"]
    for perturb in ("gold", "random_labels"):
        report = evaluate.main(evaluate.get_args([*flags, "--perturb", perturb, "--out", str(tmp_path / f"{perturb}.json")]))
        assert report["train_config"]["base"] == "anchors"
        for task, got in report["methods"]["mend"]["tasks"].items():
            assert got["predictions"] == report["methods"]["anchors"]["tasks"][task]["predictions"], (perturb, task)
    trained = tmp_path / "trained.pt"
    train.run(train_args(llm, trained, *common, "--max_steps", "2", "--lr", "1e-2", "--val_items", "0"))
    assert model.load_checkpoint(trained)["model"][own].abs().sum() > 0
    report = evaluate.main(evaluate.get_args([*flags, "--ckpt", str(trained), "--methods", "mend", "--max_examples", "2",
                                              "--out", str(tmp_path / "t.json")]))
    assert report["train_config"]["init"] == "" and "mend" in report["methods"]
    with pytest.raises(model.CheckpointError, match="trained with --base anchors.*eval.py --methods mend"):
        extensions.load(str(ckpt), device="cpu")
    with pytest.raises(model.CheckpointError, match=r"one of our additions.*extensions\.load\("):
        distill.MEND.load(str(ckpt), device="cpu")  # the core knows only the paper's recipe
    with pytest.raises(SystemExit, match="--base anchors needs a decoder-only LLM"):
        train.get_args(["--stage", "finetune", "--llm", saved_llm("t5"), "--base", "anchors"])
    with pytest.raises(SystemExit, match="--distiller none applies to --base anchors only"):
        train.get_args(["--stage", "finetune", "--distiller", "none"])
    with pytest.raises(SystemExit, match="--base anchors applies to --stage finetune"):
        train.get_args(["--stage", "pretrain", "--base", "anchors"])


@pytest.mark.parametrize("spec", ["layers:1", "none"])
def test_anchors_step_flops_match_the_flop_counter(spec, monkeypatch):
    """train.py's MFU numerator for --base anchors: flops.anchors_step_flops of an item (teacher, anchors, the vectors'
    keys/values as a second set, the backward to the gate or bias) equals what FlopCounterMode counts in mend_loss's
    forward and backward (eager attention, one item, 2 unpadded queries) exactly; and method_flops' inference rows."""
    from torch.utils.flop_counter import FlopCounterMode
    import flops
    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, attn_implementation="eager")
    torch.manual_seed(0)
    llm = model.freeze(LlamaForCausalLM(cfg))
    reader = reader_of(spec, llm, n_vectors=5, freeze_embeddings=True)
    queries, anchors = [list(range(10, 30)), list(range(40, 60))], [0, 1, 2, 3, 20, 21, 22, 30, 31]
    item = dict(teacher_demo=list(range(60, 100)), distiller_demo=list(range(60, 100)), queries=queries,
                answer_masks=[[0] * 10 + [1] * 10, [0] * 14 + [1] * 6], anchors=anchors)
    with torch.no_grad():
        getattr(reader, "gate" if spec != "none" else "bias").fill_(0.1)  # nonzero: every gradient is computed
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = distill.mend_loss(llm, reader, Anchors({}).collate([item], "cpu"), steps=Anchors({}))
        loss.backward()
    dis_cfg, L = (reader.distiller.backbone.config, 5) if spec != "none" else (None, 0)
    want = anchors_step_flops(cfg, dis_cfg, L, len(anchors), 40, 40, [20, 20])
    assert counter.get_total_flops() == want
    monkeypatch.setitem(flops.CONFIGS, "tiny", cfg)
    f = extensions.method_flops("tiny", 40, 8, 5, 4, distiller="layers:1")
    assert f["anchors_reweighted"] == f["anchors"] < f["mend_anchors"] and f["mend_anchors_reuse"] < f["mend_anchors"]
    assert f["mend_anchors"] - f["anchors"] - f["mend"] + flops.total_flops(cfg, 5 + 8, 5 + 8, 8) == \
        flops.total_flops(cfg, 5, 5, 0) + 4 * 3 * 8 * 5 * 64


def test_ceiling_fits_vectors_per_task_from_unlabeled_inputs_of_other_seeds(saved_llm, tmp_path):
    """analyze.py --ceiling: per test task, fit inputs are the other seeds' inputs minus the test examples and the
    demonstrations, without labels; the JSON has every method in eval.py's layout (so --compare reads it), and MEND
    refined starts from MEND's vectors."""
    import analyze
    llm, ckpt = saved_llm("llama"), tmp_path / "mend.pt"
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--partition", "nonnli2nli", "--data",
                         str(ROOT / "sample_data"), "--max_steps", "1", "--val_items", "0"))
    out = tmp_path / "ceiling.json"
    report = analyze.main(analyze.get_args(["--ceiling", "--data", str(ROOT / "sample_data"), "--ckpt", str(ckpt),
                                            "--fit_steps", "2", "--partition", "nonnli2nli", "--max_examples", "6",
                                            "--k", "4", "--out", str(out)]))
    assert json.loads(out.read_text())["methods"].keys() == {"zeroshot", "icl", "truncated", "fitted", "mend", "mend_refined"}
    fits = report["fits"]["sample-same_words"]
    assert fits["fitted"]["kl_first"] > 0 and fits["mend_refined"]["kl_first"] > 0
    ev = evaluate.get_args(["--data", str(ROOT / "sample_data"), "--max_examples", "6", "--k", "4"])
    ev.seeds, ev.seeds_all = [100], [100, 13, 21, 42, 87]
    demos, tests = evaluate.task_files(ev, "sample-same_words")[100]
    inputs = analyze.fit_inputs(ev, "sample-same_words", 100, demos, tests)
    taken = {ex["input"] for ex in demos + tests}
    assert fits["inputs"] == len(inputs) > 0 and not taken & {x["input"] for x in inputs}
    assert all(set(x) == {"input", "options"} for x in inputs)
    assert report["methods"]["fitted"]["tasks"]["sample-same_words"]["n_examples"] == 6


def test_signal_curves_follow_a_resumed_run(tmp_path):
    """--curves: a resumed run's clock continues where the run before stopped; logs with and without the judge's
    random-label column both parse."""
    import analyze
    log = write_lines(tmp_path / "r.log", ["signal reference | held-out tasks macro-F1: zeroshot 7.59 | icl 15.64 | "
                                            "icl_random 11.00", "step 60 | signal mend 9.32 | mend_random 8.10 | 244s",
                                            "resumed from r.pt at step 60", "step 120 | signal mend 12.41 | 202s"])
    table = analyze.main(analyze.get_args(["--curves", str(log), "--png", str(tmp_path / "c.png")]))
    assert table[str(log)] == [(60, 244.0, 9.32, 8.10), (120, 446.0, 12.41, None)]
    assert (tmp_path / "c.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    judgeless = write_lines(tmp_path / "n.log", ["step 50 | val loss 8.6 | val kl 1.4 | val ce 7.2"])
    with pytest.raises(SystemExit, match="n.log holds no selection signal"):
        analyze.main(analyze.get_args(["--curves", str(judgeless)]))


def test_t5_anchors_keep_encoder_rows(saved_llm):
    """Anchors: each option's score equals HF with encoder_outputs restricted to the kept rows (and </s>); with l at
    least the prefix length it is ICL."""
    args, llm, toks, demos, ex, teacher_ids, keep = anchors_example(saved_llm("t5"))
    D, keep = len(teacher_ids), keep + [len(teacher_ids)]  # and </s>
    scores = model.option_scores(llm, toks[0], ex, 32, *evaluate.make_prefix("anchors", llm, toks, None, demos, args, {}))
    states = llm.encoder(input_ids=torch.tensor([teacher_ids + [256]])).last_hidden_state[:, keep]  # (1, l+1, C)
    x = data.encode_example(toks[0], ex, 32, answer_len=9)[0]
    for score, option in zip(scores, ex["options"]):
        o = data.encode(toks[0], option)
        logits = llm(encoder_outputs=(states,), decoder_input_ids=torch.tensor([[0] + x + o])).logits[0, 1:]
        assert abs(score.item() + F.cross_entropy(logits[len(x) - 1:-1], torch.tensor(o)).item()) < 1e-5
    args.n_vectors = D
    icl = model.option_scores(llm, toks[0], ex, 32, *evaluate.make_prefix("icl", llm, toks, None, demos, args, {}))
    anchors = model.option_scores(llm, toks[0], ex, 32, *evaluate.make_prefix("anchors", llm, toks, None, demos, args, {}))
    torch.testing.assert_close(icl, anchors, rtol=0, atol=1e-6)


def test_t5_gated_base_at_zero_reads_its_short_base_as_itself():
    """A gated distiller at gate 0 on a T5: two items whose bases fill 2 and 4 of l=4 slots (left-padded); the student
    equals, item by item, the plain HF forward with only the base's tokens before </s> in the encoder."""
    llm = tiny_llm("t5")
    distiller = model.build_distiller("layers:1", llm, n_vectors=4, cls=GatedDistiller)
    items = [dict(teacher_demo=[5, 6, 7], distiller_demo=[5, 6, 7], queries=[[11, 12, 13]], answer_masks=[[0, 0, 1]],
                  base=[0, 0, 9, 10], base_mask=[0, 0, 1, 1]),
             dict(teacher_demo=[20, 21], distiller_demo=[20, 21], queries=[[23, 24]], answer_masks=[[0, 1]],
                  base=[20, 21, 22, 23], base_mask=[1, 1, 1, 1])]
    b = Gated({}).collate(items, "cpu")
    vectors = distiller(b["distiller_demo_ids"], b["distiller_demo_mask"], llm.get_input_embeddings()(b["base_ids"]))
    student = model.llm_logits(llm, b["query_ids"], b["query_mask"], prefix_embeds=vectors, prefix_mask=b["base_mask"])
    for row, (it, n) in enumerate(zip(items, (2, 4))):
        q = ids(it["queries"][0])
        torch.testing.assert_close(student[row:row + 1, :q.shape[1]], hf_logits(llm, ids(it["base"][-n:]), q),
                                   rtol=0, atol=1e-5)


def test_refine_is_deterministic_and_zero_steps_change_nothing(saved_llm, tmp_path):
    """refine (a trained MEND's vectors fitted further): steps=0 returns the vectors unchanged, refining is
    deterministic and changes them."""
    llm, ckpt = saved_llm("llama"), tmp_path / "mend.pt"
    train.run(train_args(llm, ckpt, "--stage", "finetune", "--max_steps", "1", "--val_items", "0"))
    mend = extensions.load(str(ckpt), device="cpu")
    demos = [("good film", "yes"), ("bad film", "no")]
    vectors = mend.distill(demos)
    inputs, options = ["nice film", "awful", "so-so"], ["yes", "no"]
    assert refine(mend, vectors, demos, inputs, options, steps=0) is vectors
    a = refine(mend, vectors, demos, inputs, options, steps=3, lr=0.5, seed=1)
    assert torch.equal(a, refine(mend, vectors, demos, inputs, options, steps=3, lr=0.5, seed=1))
    assert a.shape == vectors.shape and not torch.allclose(a, vectors)


def test_answer_rows_with_separators_that_survive_a_tokenizer_without_newlines(tmp_path):
    """The anchors find the label rows with PLAIN_SEPS too (T5's SentencePiece turns "\\n" into a space)."""
    data.byte_tokenizer(tmp_path)                                             # writes tmp_path / tokenizer.json
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": "\n"}, "content": " "}
    (tmp_path / "sp.json").write_text(json.dumps(spec))
    flat = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "sp.json"), eos_token="<eos>", pad_token="<eos>")
    demos = [{"input": "ab", "output": "yes"}, {"input": "cd", "output": "no"}]
    teacher, _ = data.demo_item((flat, flat), demos, (100, 100), 32)
    assert answer_rows(flat, demos, len(teacher), 32)[1][0] == len("ab Answer: yes ; cd Answer: ") - 1  # predicts "no"


def test_anchors_reference_line_reports_the_anchors_own_kl(saved_llm, tmp_path):
    """train.py --base anchors: the reference line gives the KL of the anchors themselves, the student's start at
    gate 0, so at lr 0 the validation KL equals it (not the truncated prefix's)."""
    out = tmp_path / "a.pt"
    train.run(train_args(saved_llm("llama"), out, "--stage", "finetune", "--base", "anchors", "--max_steps", "1",
                         "--lr", "0", "--val_items", "3"))
    lines = out.with_suffix(".log").read_text().splitlines()
    ref = next(l for l in lines if l.startswith("val reference"))
    assert "the anchors at 3 positions: kl " in ref
    val = float(next(l for l in lines if "val kl" in l).split("val kl ")[1].split()[0])
    assert val == pytest.approx(float(ref.split("kl ")[-1]), rel=1e-4, abs=1e-6)


def test_relabelled_items_carry_the_remapped_options_of_the_option_objective(tmp_path):
    """--relabel 1 with --kl_rows options: each query's options (Options.fields) use the item's new label words, and
    its gold option is the query's remapped answer."""
    tok = data.byte_tokenizer(tmp_path)
    mk = lambda t, labels: [{"task": t, "input": f"{t}{i}", "output": labels[i % 2], "options": labels} for i in range(8)]
    pools = {"a": mk("a", ["yes", "no"]), "b": mk("b", ["red", "blue", "green"]), "c": mk("c", ["up", "down", "left"])}
    steps = Options({"max_len_per_example": 32})
    fields = lambda item, demos, targets: steps.fields((tok, tok), item, demos, targets)
    for index in range(9):
        it = data.meta_train_item(pools, (tok, tok), index, seed=0, k=4, budgets=(500, 500), max_len=32, queries=2,
                                  relabel=1.0, fields=fields)
        own = {ex["output"] for ex in pools[tok.decode(it["queries"][0])[0]]}
        for opts, gold, q in zip(it["options"], it["gold"], it["queries"]):
            words = [tok.decode(o) for o in opts]
            assert not set(words) & own and words[gold] == tok.decode(q).split("\n")[1]
