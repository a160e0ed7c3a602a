"""
Data for MEND: hand-rolled JSONL readers for C4 (stage 1) and MetaICL (stage 2 and evaluation), the
prompt format, the demonstration budgets, and collation with the padding the models expect (paper
sections 3.2 and 4.1).

A data folder holds `c4/` (files of `{"text": ...}` lines, plain or gzipped) and `metaicl/`
(MetaICL's layout: `{task}/{task}_{k}_{seed}_{split}.jsonl`, lines `{"task", "input", "output",
"options"}`, and optionally `partitions.json`). Every item is a dict of token-id lists:

    teacher_demo    demonstrations in LLM tokens        (the teacher reads these before the query)
    distiller_demo  the same demonstrations in distiller tokens
    queries         Q lists of LLM tokens the loss is taken on, all after the same demonstrations
                    (stage 1: the last 20% of a document, Q=1; stage 2: input ; output of Q examples of the task)
    answer_masks    Q lists, 1 on the output tokens of each query (stage 2 CE), else 0

An addition of ours (extensions/) adds its own fields to an item through a `fields` function.

Format (our choice, see README): a demonstration is `input \\n output \\n\\n`, the query is `input
\\n` and an option is scored as the tokens of `output`. Newlines are what MetaICL's own training
format uses; the official MEND code joins GPT-2 demos with no separator, which suits no tokenizer
but GPT-2's. A tokenizer that drops newlines (T5's SentencePiece turns "\\n" into a space) gets
separators that survive instead: `input Answer: output ;`.

The command-line helpers shared by train.py, eval.py, flops.py and analyze.py come last: one-line
errors, argparse types that check every flag's range when it is parsed, outputs written atomically.
"""
import argparse
import functools
import gzip
import json
import math
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

# input QUERY_SEP output DEMO_SEP input QUERY_SEP output DEMO_SEP ...
QUERY_SEP, DEMO_SEP = "\n", "\n\n"
# the same for a tokenizer without newlines (T5): input Answer: output ; ...
PLAIN_SEPS = (" Answer: ", " ; ")


class DataError(ValueError):
    """Bad input: a data file (the message names the file and line), a checkpoint or a model that
    cannot be read."""


# -----------------------------------------------------------------------------
# JSONL reading with file:line errors


def read_jsonl(path):
    """Yield (line number, object) from a .jsonl / .json / .json.gz file of one JSON object per
    line, in UTF-8 (a leading byte-order mark is skipped, as utf-8-sig reads it)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(byte_lines(f, path), 1):
            line = decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def byte_lines(f, path):
    """The lines of an open binary file; a gzip file cut short or corrupt ends in one error naming
    the file."""
    try:
        yield from f
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: cut short or corrupt ({e})") from None


def decode_line(raw, path, lineno):
    """One line's bytes as UTF-8 text (line 1 as utf-8-sig: a byte-order mark is dropped); else an
    error at file:line."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 "
                        f"(byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def read_c4(folder):
    """Stream the `text` of every document in the *.json, *.json.gz and *.jsonl files of a folder,
    in name order."""
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: no such folder (--stage pretrain reads C4 text from c4/ in --data)")
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith((".json", ".json.gz", ".jsonl")))
    if not files:
        raise DataError(f"{folder}: no *.json, *.json.gz or *.jsonl files")
    for path in files:
        for lineno, obj in read_jsonl(path):
            if not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: missing string field 'text'")
            yield obj["text"]


def read_metaicl(path):
    """A MetaICL file -> list of examples, each validated: task/input/output strings, options a list
    of strings that contains the output whenever it is non-empty (empty options = a generation task,
    meta-train only: then every line of the file has none, and a line without options among lines
    with options is an error)."""
    examples, with_options = [], {}  # with_options: has options? -> the first line of each kind
    for lineno, ex in read_jsonl(path):
        for key in ("task", "input", "output"):
            if not isinstance(ex.get(key), str):
                raise DataError(f"{path}:{lineno}: missing string field '{key}'")
        options = ex.get("options")
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise DataError(f"{path}:{lineno}: 'options' must be a list of strings")
        if options and ex["output"] not in options:
            raise DataError(f"{path}:{lineno}: output {ex['output']!r} is not among the options {options}")
        with_options.setdefault(bool(options), lineno)
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples")
    if len(with_options) == 2:
        raise DataError(f"{path}:{with_options[False]}: 'options' is empty, but line "
                        f"{with_options[True]} has options (only a generation task's lines have "
                        f"none, and then all of them)")
    return examples


# -----------------------------------------------------------------------------
# MetaICL partitions and files


METAICL = Path(__file__).with_name("metaicl.json")  # MetaICL's partitions and task types
METAICL_TYPES = {t: set(names) for t, names in json.loads(METAICL.read_text())["task_types"].items()}


def is_classification(examples, task=None):
    """Classification (macro-F1) or multiple choice (accuracy): MetaICL's task type when its task
    configs list the task (METAICL_TYPES), else one fixed option set for every example =
    classification."""
    fixed = len({tuple(sorted(ex["options"])) for ex in examples}) == 1
    if task in METAICL_TYPES["classification"] and not fixed:
        raise DataError(f"{task}: MetaICL types it classification, but its examples offer different option sets")
    return fixed if task not in METAICL_TYPES["multi-choice"] else False


def macro_f1(predictions, golds):
    """MetaICL's macro-F1: mean over the gold classes of per-class F1 (a class never predicted has
    precision 1)."""
    f1s = []
    for c in sorted(set(golds)):
        hits = sum(p == g == c for p, g in zip(predictions, golds))
        predicted, actual = sum(p == c for p in predictions), sum(g == c for g in golds)
        precision, recall = (hits / predicted if predicted else 1.0), hits / actual
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return 100 * float(np.mean(f1s))


def accuracy(predictions, golds):
    return 100 * float(np.mean([p == g for p, g in zip(predictions, golds)]))


def partition(data_dir, name):
    """{'train': [...], 'test': [...], 'config': ...} for a short name (qa2qa) or MetaICL config
    name (qa_to_qa), read from metaicl/partitions.json when the data folder has one, else from
    MetaICL's (metaicl.json)."""
    path = Path(data_dir) / "metaicl" / "partitions.json"
    table = json.loads((path if path.exists() else METAICL).read_text())
    table = table.get("partitions", table)  # metaicl.json also holds the task types
    for short, part in table.items():
        if name in (short, part.get("config")):
            return part
    raise SystemExit(f"unknown partition {name!r}; choose one of {', '.join(table)}")


def task_file(data_dir, task, k, seed, split):
    return Path(data_dir) / "metaicl" / task / f"{task}_{k}_{seed}_{split}.jsonl"


def meta_train_pools(data_dir, tasks, log=print):
    """Meta-training pools {task: examples}: MetaICL's {task}_16384_100_train.jsonl when present,
    else the task's {task}_16_100_test.jsonl (the shared data's substitute). Missing tasks are
    skipped with a warning."""
    pools = {}
    for task in tasks:
        big, small = task_file(data_dir, task, 16384, 100, "train"), task_file(data_dir, task, 16, 100, "test")
        path = big if big.exists() else small
        if not path.exists():
            log(f"warning: meta-train task {task} not found under {Path(data_dir) / 'metaicl'}, skipped")
            continue
        pools[task] = read_metaicl(path)
    if not pools:
        raise SystemExit(f"none of the {len(tasks)} meta-train tasks exist under {Path(data_dir) / 'metaicl'}")
    log(f"meta-train: {len(pools)} of {len(tasks)} tasks, {sum(map(len, pools.values())):,} examples")
    return pools


# -----------------------------------------------------------------------------
# tokenization, the prompt format and the demonstration budgets


def byte_tokenizer(folder):
    """A tokenizer built offline, for random-initialised models of real shapes (the tests,
    results/gpu): GPT-2's byte-to-unicode alphabet as a BPE with no merges, one token per byte, plus
    <eos> = 256. Its spec goes to folder/tokenizer.json."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
            "added_tokens": [{"id": 256, "content": "<eos>", "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}],
            "pre_tokenizer": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": vocab, "merges": []}}
    path = Path(folder) / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<eos>", pad_token="<eos>")


def encode(tok, text):
    return tok(text, add_special_tokens=False).input_ids


@functools.lru_cache(maxsize=16)
def separators(tok):
    """(query separator, demonstration separator) of a tokenizer: newlines where it keeps them, else
    PLAIN_SEPS."""
    return (QUERY_SEP, DEMO_SEP) if "\n" in tok.decode(encode(tok, "\n")) else PLAIN_SEPS


def encode_example(tok, ex, max_len, answer_len=None):
    """(input ids ending in the query separator, output ids). The input is cut so input+output fit
    in max_len tokens (MetaICL's per-example rule); answer_len overrides the output length used for
    the cut (the longest option)."""
    # scoring options needs no output
    x, y = encode(tok, ex["input"]), encode(tok, ex.get("output", ""))
    sep = encode(tok, separators(tok)[0])
    keep = max(1, max_len - len(sep) - (len(y) if answer_len is None else answer_len))
    return x[:keep] + sep, y


def encode_demos(tok, demos, max_len):
    """Each demonstration as `input QUERY_SEP output DEMO_SEP` token ids (or the PLAIN_SEPS, see
    separators)."""
    sep = encode(tok, separators(tok)[1])
    return [sum(encode_example(tok, d, max_len), []) + sep for d in demos]


def fit_demos(encoded, budgets):
    """Join whole demonstrations, in order, while every tokenizer's version fits its budget (the
    same demos for the teacher and the distiller). encoded: one list of per-demo id lists per
    tokenizer -> one joined list each."""
    n = 0
    while n < len(encoded[0]) and all(sum(map(len, e[:n + 1])) <= b for e, b in zip(encoded, budgets)):
        n += 1
    return [sum(e[:n], []) for e in encoded]


def demo_item(toks, demos, budgets, max_len):
    """(teacher ids, distiller ids) of a demonstration set; toks = (LLM tokenizer, distiller
    tokenizer)."""
    same = toks[0] is toks[1]
    encoded = [encode_demos(toks[0], demos, max_len)]
    encoded.append(encoded[0] if same else encode_demos(toks[1], demos, max_len))
    return fit_demos(encoded, budgets)


def demo_ids(toks, demos, budgets, max_len):
    """demo_item of (input, output) dicts, or of one formatted string: each tokenizer's ids of its
    end, within budget."""
    if not isinstance(demos, str):
        return demo_item(toks, demos, budgets, max_len)
    if not demos.strip():
        raise ValueError("the demonstration text is empty")
    # keep the end, nearest the query
    return [encode(tok, demos)[-budget:] for tok, budget in zip(toks, budgets)]


def meta_item(toks, targets, demo_pool, rng, k, budgets, max_len, exclude=(), relabel=None, fields=None):
    """One stage-2 item: the target examples as Q queries, k examples of demo_pool (none of
    `exclude`) in random order as demonstrations; relabel maps output words to other words, the same
    for demonstrations and queries. fields(item, demos, targets) adds what an addition of ours reads
    (distill.Paper.fields)."""
    others = [j for j in rng.permutation(len(demo_pool))[:k + len(exclude)] if j not in exclude][:k]
    swap = (lambda ex: {**ex, "output": relabel.get(ex["output"], ex["output"]),
                        "options": [relabel.get(o, o) for o in ex["options"]]}) if relabel else (lambda ex: ex)
    demos = [swap(demo_pool[j]) for j in others]
    teacher, distiller = demo_item(toks, demos, budgets, max_len)
    targets = [swap(t) for t in targets]
    pairs = [encode_example(toks[0], t, max_len) for t in targets]
    item = dict(teacher_demo=teacher, distiller_demo=distiller, queries=[x + y for x, y in pairs],
                answer_masks=[[0] * len(x) + [1] * len(y) for x, y in pairs])
    return {**item, **(fields(item, demos, targets) if fields else {})}


def label_map(options, vocabulary, rng):
    """Symbol tuning against label priors: each label word of a task -> a distinct word drawn from
    `vocabulary` (the label words of all training tasks), so only the demonstrations tell which word
    answers what."""
    words = [w for w in vocabulary if w not in options]
    if len(words) < len(options):
        return None  # too few other labels to swap in: the item keeps its own
    picks = rng.choice(len(words), size=len(options), replace=False)
    return {o: words[int(j)] for o, j in zip(options, picks)}


def meta_train_item(pools, toks, index, seed, k, budgets, max_len, queries=1, relabel=0.0, fields=None):
    """Training item number `index`, deterministic in (seed, index) so a resumed or multi-process
    run sees the same data: an example drawn uniformly from all pools, plus queries-1 more of its
    task, with k other examples of the task as demonstrations. With probability `relabel`, a
    classification task's labels are mapped to other tasks' labels."""
    rng = np.random.default_rng([seed, index])
    ends = np.cumsum([len(p) for p in pools.values()])
    flat = int(rng.integers(ends[-1]))
    t = int(np.searchsorted(ends, flat, side="right"))
    pool = list(pools.values())[t]
    i = flat - (int(ends[t - 1]) if t else 0)
    more = [int(j) for j in rng.permutation(len(pool)) if j != i][:queries - 1] if queries > 1 else []
    mapping = None
    if relabel and pool[i]["options"] and rng.random() < relabel and is_classification(pool):
        mapping = label_map(pool[i]["options"], label_vocabulary(pools), rng)
    targets = [pool[j] for j in [i] + more]
    return meta_item(toks, targets, pool, rng, k, budgets, max_len, exclude=[i] + more, relabel=mapping, fields=fields)


def label_vocabulary(pools):
    """Every label word of the classification pools, sorted (deterministic)."""
    return sorted({o for p in pools.values() if is_classification(p) for ex in p for o in ex["options"]})


PERTURBATIONS = {  # eval.py --perturb: what is left of each demonstration (paper's analysis of the vectors)
    "gold": lambda ex, rng: ex,
    "random_labels": lambda ex, rng: {**ex, "output": ex["options"][int(rng.integers(len(ex["options"])))]},
    "no_labels": lambda ex, rng: {**ex, "output": ""},
    "no_inputs": lambda ex, rng: {**ex, "input": ""},
}


def perturb_demos(demos, name, seed):
    """Demonstrations with their labels randomised (a random option of the task, seeded) or removed,
    or inputs removed."""
    rng = np.random.default_rng([seed, 7])
    return [PERTURBATIONS[name](ex, rng) for ex in demos]


def split_pools(pools, n_held_out):
    """Hold out the last n examples of each pool as validation targets: -> (train pools, held-out
    pools)."""
    return {t: p[:-n_held_out] for t, p in pools.items()}, {t: p[-n_held_out:] for t, p in pools.items()}


def meta_val_items(train_pools, held_out, toks, seed, n, k, budgets, max_len, fields=None):
    """n fixed validation items: held-out targets, task by task, with demonstrations from the task's
    training pool."""
    tasks, items = list(held_out), []
    for j in range(n):
        task = tasks[j % len(tasks)]
        target = held_out[task][(j // len(tasks)) % len(held_out[task])]
        rng = np.random.default_rng([seed, 1, j])
        items.append(meta_item(toks, [target], train_pools[task], rng, k, budgets, max_len, fields=fields))
    return items


def c4_ids(tok, text, max_tokens):
    """A document's first max_tokens LLM token ids as int32: 4 bytes a token, as its text (a Python
    list takes 18 times more), so a run tokenizes C4 once and holds it whole."""
    return np.array(encode(tok, text)[:max_tokens], dtype=np.int32)


def c4_item(ids, toks, max_tokens, demo_fraction=0.8):
    """Stage-1 item from one document's LLM token ids (c4_ids): the first 80% as 'demonstrations',
    the rest as the query (KL only, no answer). The distiller re-tokenizes the demonstration text if
    its tokenizer differs."""
    ids = ids.tolist()
    m = int(demo_fraction * len(ids))
    if m < 1 or m == len(ids):
        return None  # too short to split
    distiller = ids[:m] if toks[0] is toks[1] else encode(toks[1], toks[0].decode(ids[:m]))[:max_tokens]
    return dict(teacher_demo=ids[:m], distiller_demo=distiller, queries=[ids[m:]], answer_masks=[[0] * (len(ids) - m)])


# -----------------------------------------------------------------------------
# collation


def pad(seqs, value, left, length=None):
    """List of id lists -> (B, S) tensor and (B, S) 0/1 mask, padded on the left or right to the
    longest (or to `length`)."""
    S = max(1, max(map(len, seqs))) if length is None else length
    ids = torch.full((len(seqs), S), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(S - len(s), S) if left else slice(0, len(s))
        ids[b, sl], mask[b, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def collate(items, device="cpu"):
    """Items -> a batch of tensors: demonstrations left-padded (so the distiller's placeholders and
    the teacher's query sit at the end), queries right-padded (so teacher and student query rows
    line up column by column). An item with Q queries gives Q query rows; query_item[r] is the item
    (demonstration row) that query row r belongs to."""
    t, tm = pad([it["teacher_demo"] for it in items], 0, left=True)             # (B, D)
    d, dm = pad([it["distiller_demo"] for it in items], 0, left=True)           # (B, D')
    q, qm = pad([x for it in items for x in it["queries"]], 0, left=False)      # (B*Q, T)
    a, _ = pad([x for it in items for x in it["answer_masks"]], 0, left=False)  # (B*Q, T)
    owner = torch.tensor([b for b, it in enumerate(items) for _ in it["queries"]])  # (B*Q,)
    batch = dict(teacher_demo_ids=t, teacher_demo_mask=tm, distiller_demo_ids=d, distiller_demo_mask=dm,
                 query_ids=q, query_mask=qm, answer_mask=a, query_item=owner)
    return {k: v.to(device) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# plumbing: the scripts' command lines (every flag's range checked when it is parsed, one-line
# errors), and outputs written atomically, replacing only their own kind of file


def run_cli(main):
    """Run a script's entry point: bad input (a DataError, or a SystemExit with a message) ends in
    one line `error: ...` on stderr and exit status 2, never in a traceback; Ctrl-C in one line and
    status 130 (the scripts write their results through write_atomically, so none is left
    half-written). Integer exits (NaN stop, train.py's own Ctrl-C line) pass through."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): stopped; files already written are whole, none is half-written", file=sys.stderr)
        raise SystemExit(130) from None
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(f"error: {e.code}", file=sys.stderr)
        raise SystemExit(2) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value out of range) end as run_cli's do: one
    `error: ...` line and status 2, without the usage."""

    def error(self, message):
        raise SystemExit(message)


def checked(kind, ok, allowed):
    """An argparse type: kind(text) where ok(value), else an error naming the value and what is
    allowed."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {allowed}")
        return value
    return convert


def int_list(text):
    return [int(x) for x in text.split(",")]


positive_int = checked(int, lambda v: v >= 1, "an integer >= 1")
count = checked(int, lambda v: v >= 0, "an integer >= 0")
positive = checked(float, lambda v: 0 < v < math.inf, "a number > 0")
non_negative = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
fraction = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
positive_ints = checked(int_list, lambda v: min(v) >= 1, "comma-separated integers >= 1")
seed_list = checked(int_list, lambda v: min(v) >= 0, "comma-separated integers >= 0")
model_name = checked(str, lambda v: not (v.startswith(("/", ".")) or v.count("/") > 1) or Path(v).exists(),
                     "a hub name (gpt2-large, org/name) or an existing local folder")


def budget_error(args):
    """Why args' demonstration budgets cannot hold one demonstration of --max_len_per_example
    tokens, or None."""
    for flag in ("teacher_demo_tokens", "distiller_demo_tokens"):
        if getattr(args, flag) < args.max_len_per_example:
            return (f"--{flag} {getattr(args, flag)}: must be at least --max_len_per_example "
                    f"({args.max_len_per_example}), so that one demonstration fits")
    return None


def check_output(path, flag, folder=False, kind=None):
    """Refuse, before any work, an output that cannot be written: a file (folder=False) must not be
    a folder, and its folder must exist (it is not made) and be writable; a folder (folder=True) is
    made when missing, so its nearest existing ancestor must be a writable folder. A file that
    exists is replaced only when its content shows it is the command's own kind of output (kind, a
    key of OUTPUTS): a command never overwrites a file it did not make."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise SystemExit(f"{flag} {path}: {'not ' if folder else ''}a folder")
    parent = path if folder else path.parent
    while folder and not parent.exists():
        parent = parent.parent
    if not parent.exists():
        raise SystemExit(f"{flag} {path}: no folder {parent} (it is not made: create it first)")
    if not parent.is_dir():
        raise SystemExit(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SystemExit(f"{flag} {path}: {path if path.exists() else parent} cannot be written")
    if kind and path.is_file() and not OUTPUTS[kind][1](path):
        raise SystemExit(f"{flag} {path}: the file exists and is not {OUTPUTS[kind][0]}, so it is "
                         f"not replaced; choose another path or remove the file first")


def json_keys(path):
    """The keys of a file holding one JSON object; an empty set for any other file."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):  # not JSON, or not UTF-8
        return set()
    return set(obj) if isinstance(obj, dict) else set()


def checkpoint_keys(path):
    """The keys of a torch checkpoint holding a dict (read as load_checkpoint reads it); an empty
    set otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch reports a foreign file as one of several zip/pickle/mmap errors
        return set()
    return set(state) if isinstance(state, dict) else set()


def starts_with(path, prefix):
    try:
        with open(path, "rb") as f:
            return f.read(len(prefix)) == prefix
    except OSError:
        return False


# what the scripts write, each told by its content: kind -> (what it is, test of an existing file)
OUTPUTS = {
    "checkpoint": ("a checkpoint of train.py (a torch file with 'model' and 'config')",
                   lambda path: {"model", "config"} <= checkpoint_keys(path)),
    "eval": ("a result of eval.py (a JSON object with 'partition' and 'llm')",
             lambda path: {"partition", "llm"} <= json_keys(path)),
    "attention": ("an attention map of analyze.py (a JSON object with 'task', 'ckpt' and 'query')",
                  lambda path: {"task", "ckpt", "query"} <= json_keys(path)),
    "flops_json": ("a flops.json of flops.py (a JSON object with 'config', 'flops' and 'goals')",
                   lambda path: {"config", "flops", "goals"} <= json_keys(path)),
    "flops_md": ("a flops.md of flops.py (its first line: '## Analytic FLOPs per test query')",
                 lambda path: starts_with(path, b"## Analytic FLOPs per test query")),
    "png": ("a PNG image", lambda path: starts_with(path, b"\x89PNG\r\n\x1a\n")),
}


def write_atomically(path, write):
    """write(a temp path), then rename the temp file to path: a crash or Ctrl-C mid-write leaves the
    old file whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)
