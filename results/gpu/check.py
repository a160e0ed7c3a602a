"""
Everything a GPU can show in one command (issue 24), at the paper's shapes with random-initialised models (speed and
memory do not depend on the weights, and no hub is needed):

    bash results/gpu/run.sh OUT            # on a CUDA machine, under 8 minutes; logs + summary.md under OUT
    bash results/gpu/run.sh OUT --smoke    # the same script on CPU with tiny shapes and 2 steps, under 2 minutes

Steps, each timed, logged to OUT/{tests,train,runs,eval,latency}.log (at most 8 files come back from the GPU
machine) and summarised in OUT/summary.md; checkpoints and models go to a temporary folder:
  tests      the test suite, the number-comparing tests on CUDA kernels (MEND_TEST_DEVICE=cuda)
  train      each stage at the paper's shapes (gpt2-large LLM + gpt2 distiller, l=100, budgets 767/643 tokens,
             1024-token C4 documents) in bf16 and in fp16 (GradScaler): step time, tokens/s, peak GPU memory
             (torch.cuda.max_memory_allocated) and MFU against the GPU's nominal bf16 peak (train.py's log line);
             then each stage with T5-large (t5-large-lm-adapt's shapes) and its first 4 encoder blocks as distiller,
             at the same lengths, in bf16 only (T5 overflows in fp16)
  resume     10 + 10 steps with --resume give the losses of 20 straight steps (smoke: 2 + 2)
  torchrun   torchrun --nproc_per_node=1 (nccl on CUDA) gives the losses of the plain run
  eval       eval.py at the paper's shapes on a few examples in bf16 and in float32: the same predictions
  latency    flops.py's latency of MEND and ICL at the paper's five context lengths, batch 1
The models are GPT2Configs and a T5Config saved with save_pretrained, with a byte-level tokenizer (one token per byte; the shapes,
not the tokenization, are what is measured); the data is sample_data/ (MetaICL and C4 layouts).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration  # noqa: E402

import data  # noqa: E402
import eval as evaluate  # noqa: E402
import flops  # noqa: E402
import train  # noqa: E402

SHAPES = {  # name -> (n_layer, n_embd, n_head)
    "paper": {"llm": (36, 1280, 20), "distiller": (12, 768, 12)},    # gpt2-large + gpt2
    "smoke": {"llm": (2, 64, 4), "distiller": (1, 32, 2)},
}
T5_SHAPES = {"paper": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),   # t5-large-lm-adapt
             "smoke": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)}
T5_DISTILLER = {"paper": "layers:4", "smoke": "layers:1"}  # the first encoder blocks of the T5 itself
BUDGETS = {"paper": ["--n_vectors", "100", "--k", "16", "--max_len_per_example", "256", "--teacher_demo_tokens", "767",
                     "--distiller_demo_tokens", "643", "--c4_max_tokens", "1024"],
           "smoke": ["--n_vectors", "4", "--k", "4", "--max_len_per_example", "32", "--teacher_demo_tokens", "96",
                     "--distiller_demo_tokens", "96", "--c4_max_tokens", "64"]}


def build(folder, shape):
    """Random-init GPT-2 LLM and distiller of the shape, saved as local model folders -> (llm path, distiller path)."""
    paths = []
    for name, (n_layer, n_embd, n_head) in SHAPES[shape].items():
        path = folder / name
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024)).save_pretrained(path)
        data.byte_tokenizer(folder).save_pretrained(path)
        paths.append(str(path))
    return paths


def build_t5(folder, shape):
    """Random-init T5 of the shape (v1.1 / LM-adapt layout: gated-gelu, untied head), saved as a local folder."""
    path = folder / "t5"
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=256,
                                        **T5_SHAPES[shape])).save_pretrained(path)
    data.byte_tokenizer(folder).save_pretrained(path)
    return str(path)


class Step:
    """Run one step of the check with its output in OUT/<name>.log; record its time and result for the summary."""

    def __init__(self, out):
        self.out, self.rows = out, []

    def __call__(self, name, fn, log):
        t = time.time()
        with open(self.out / f"{log}.log", "a") as f:
            f.write(f"==== {name}\n")
            try:
                result = fn(f)
            except Exception as e:  # one failed step is reported and the others still run
                result = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            f.write(f"\n{name}: {result} ({time.time() - t:.0f} s)\n")
        self.rows.append((name, f"{time.time() - t:.0f} s", result))
        print(f"{name}: {result} ({time.time() - t:.0f} s)", flush=True)


def shell(cmd, f, env=None):
    """Run a command with its output into the log; -> its exit status."""
    f.flush()
    return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode


def train_args(llm, distiller, shape, stage, out, steps, *extra):
    return train.get_args(["--stage", stage, "--llm", llm, "--distiller", distiller, *BUDGETS[shape], "--data",
                           str(ROOT / "sample_data"), "--max_steps", str(steps), "--eval_interval", str(steps),
                           "--val_items", "0", "--log_interval", "1", "--warmup", "0", "--out", str(out), *extra])


def one_training(llm, distiller, shape, stage, dtype, work, f):
    """steps of one stage in one dtype -> a summary cell: ms/step, tok/s and MFU of the last logged step, peak memory."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = 20 if shape == "paper" else 2
    out = work / f"{Path(llm).name}_{stage}_{dtype}.pt"
    train.run(train_args(llm, distiller, shape, stage, out, steps, "--dtype", dtype))
    lines = out.with_suffix(".log").read_text()
    f.write(lines)
    last = [line for line in lines.splitlines() if line.startswith(f"step {steps} |")][0]
    ms, tok = re.search(r"(\d+)ms \| (\d+) tok/s", last).groups()
    mfu = re.search(r"TFLOP/s(?: \((.*) of peak\))?", last).group(1) or "n/a"
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "n/a (cpu)"
    return f"{ms} ms/step, {tok} tok/s, MFU {mfu}, peak memory {peak}"


def resume_matches(llm, distiller, shape, work, f):
    """n + n steps with --resume against 2n straight steps (a constant lr, so max_steps does not change the schedule)."""
    n = 10 if shape == "paper" else 2
    run = lambda name, steps, *extra: train.run(train_args(llm, distiller, shape, "finetune", work / name, steps,
                                                           "--schedule", "constant", *extra))
    straight, first, rest = run("straight.pt", 2 * n), run("resumed.pt", n), run("resumed.pt", 2 * n, "--resume")
    f.write(f"straight {straight}\nresumed {first + rest}\n")
    return "equal" if first + rest == straight else f"DIFFERENT: {straight[-1]} vs {rest[-1]}"


def torchrun_matches(llm, distiller, shape, work, f):
    args = train_args(llm, distiller, shape, "pretrain", work / "plain.pt", 4)
    plain = train.run(args)
    flags = [f"--{k}={v}" for k, v in vars(args).items() if not isinstance(v, bool)]
    flags = [x if not x.startswith("--out=") else f"--out={work / 'torchrun.pt'}" for x in flags]
    rc = shell([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "train.py", *flags], f)
    logged = [float(m) for m in re.findall(r"^step \d+ \| loss ([\d.e+-]+)", (work / "torchrun.log").read_text(), re.M)]
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    same = rc == 0 and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(logged, [loss for _, loss in plain]))
    return f"{backend}, rc {rc}, {len(logged)} steps, losses {'equal' if same else 'DIFFERENT'} to 5 digits"


def eval_agrees(llm, distiller, shape, work, f):
    """bf16 and float32 evaluation of zero-shot and ICL on the same few examples -> share of equal predictions."""
    common = ["--llm", llm, "--data", str(ROOT / "sample_data"), "--partition", "class2class", "--seeds", "100",
              "--max_examples", "8", "--methods", "zeroshot,icl", "--ckpt", str(work / "none.pt"), *BUDGETS[shape][:10]]  # l, k, lengths; not C4's
    reports = {d: evaluate.main(evaluate.get_args([*common, "--dtype", d, "--out", str(work / f"eval_{d}.json")]))
               for d in ("float32", "bfloat16")}
    same = total = 0
    for m, r in reports["float32"]["methods"].items():
        for task, t in r["tasks"].items():
            for s, p in t["predictions"].items():
                q = reports["bfloat16"]["methods"][m]["tasks"][task]["predictions"][s]
                same, total = same + sum(a == b for a, b in zip(p, q)), total + len(p)
    f.write(json.dumps({d: {m: v["average"] for m, v in r["methods"].items()} for d, r in reports.items()}) + "\n")
    return f"{same} of {total} predictions equal in bf16 and float32"


def latency(shape, work, f):
    """flops.py's tables: analytic only in the smoke mode; timed at the paper's five context lengths on the GPU."""
    timed = [] if shape == "smoke" else ["--bench_pair", "gpt2-large", "--batches", "1", "--lengths", ",".join(flops.PAPER_LENGTHS)]
    rc = shell([sys.executable, "flops.py", "--out", str(work), *(timed or ["--bench_pair", "none"])], f)
    return f"rc {rc}; the tables are in latency.log"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for the logs and summary.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps, on CPU")
    args = p.parse_args(argv)
    shape, out = ("smoke" if args.smoke else "paper"), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mend_gpu_"))
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("results/gpu/check.py: no CUDA device; run with --smoke on CPU")
    llm, distiller = build(work, shape)
    step = Step(out)
    if not args.smoke:  # the smoke mode runs from inside the test suite
        step("tests", lambda f: f"pytest rc {shell([sys.executable, '-m', 'pytest', '-q', 'test_mend.py'], f, {'MEND_TEST_DEVICE': 'cuda'})}", "tests")
    dtypes = ("bfloat16", "float16") if torch.cuda.is_available() else ("float32", "bfloat16")
    for stage in ("pretrain", "finetune"):
        for dtype in dtypes:
            step(f"train_{stage}_{dtype}", lambda f: one_training(llm, distiller, shape, stage, dtype, work, f), "train")
    t5 = build_t5(work, shape)
    for stage in ("pretrain", "finetune"):
        step(f"t5_{stage}_bfloat16", lambda f: one_training(t5, T5_DISTILLER[shape], shape, stage, "bfloat16", work, f),
             "train")
    step("resume", lambda f: resume_matches(llm, distiller, shape, work, f), "runs")
    step("torchrun", lambda f: torchrun_matches(llm, distiller, shape, work, f), "runs")
    step("eval", lambda f: eval_agrees(llm, distiller, shape, work, f), "eval")
    step("latency", lambda f: latency(shape, work, f), "latency")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [f"# GPU check ({shape} shapes) on {device}, torch {torch.__version__}", "", "| step | time | result |",
             "|---|---|---|"] + [f"| {n} | {t} | {r} |" for n, t, r in step.rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return step.rows


if __name__ == "__main__":
    main()
