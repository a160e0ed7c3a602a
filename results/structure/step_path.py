"""
Issue 40: the project's functions one stage-1 step passes through, from train.train_step to the loss (and its
backward and optimizer step), with the number of switches between files, traced on a tiny random-init Llama.

    python results/structure/step_path.py        # prints each function once, in call order, then the counts
"""
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402


def traced_step(llm_path, out):
    """Run train.train_step once under a tracer -> [(file, function)] of the project's calls, in order."""
    args = train.get_args(["--stage", "pretrain", "--llm", llm_path, "--distiller", "layers:1", "--n_vectors", "3",
                           "--c4_max_tokens", "48", "--val_items", "0", "--max_steps", "1", "--out", str(out)])
    calls, project = [], {str(p) for p in ROOT.glob("*.py")} | {str(p) for p in ROOT.glob("extensions/*.py")}

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_filename in project:
            calls.append((Path(frame.f_code.co_filename).relative_to(ROOT).as_posix(), frame.f_code.co_name))
        return None
    real = train.train_step

    def step(*a):
        sys.setprofile(tracer)
        try:
            return real(*a)
        finally:
            sys.setprofile(None)
    train.train_step = step
    train.run(args)
    return calls


def main():
    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=300)).save_pretrained(folder / "llm")
    data.byte_tokenizer(folder).save_pretrained(folder / "llm")
    calls = traced_step(str(folder / "llm"), folder / "s.pt")
    seen = list(dict.fromkeys(c for c in calls if c[1] not in ("<lambda>", "<genexpr>", "<listcomp>", "<dictcomp>")))
    switches = sum(a[0] != b[0] for a, b in zip(calls, calls[1:]))
    for f, name in seen:
        print(f"{f}:{name}")
    print(f"{len(seen)} functions in {len({f for f, _ in seen})} files, {switches} switches between files")


if __name__ == "__main__":
    main()
