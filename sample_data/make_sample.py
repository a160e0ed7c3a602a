"""Writes the project's own small sample data (c4/ and metaicl/), generated from templates, so every command runs on a
fresh machine without downloads. Deterministic: `python sample_data/make_sample.py` rewrites the same files."""
import json
import random
from pathlib import Path

ROOT = Path(__file__).parent
SEEDS = (100, 13, 21, 42, 87)
WORDS = "apple river garden window music doctor orange teacher mountain pencil rocket yellow castle dragon".split()
OPPOSITE = dict(hot="cold", big="small", up="down", early="late", happy="sad", fast="slow", light="dark", old="new",
                open="closed", full="empty", wet="dry", loud="quiet", hard="soft", rich="poor", high="low")
GOOD = "delicious wonderful friendly bright lovely excellent cheerful".split()
BAD = "awful boring rude dirty terrible broken gloomy".split()
THINGS = "soup hotel movie service park concert train".split()
TOPICS = {"sports": "the team scored a late goal|the runner won the race|the coach praised the players",
          "science": "the lab measured the particle|the telescope found a new star|cells divide to grow",
          "cooking": "simmer the sauce slowly|the bread needs more flour|roast the vegetables until golden"}


def classify(rng, make, options):
    x, y = make(rng)
    return {"input": x, "output": y, "options": options}


def choice(rng, question, answer, distractors):
    opts = [answer] + rng.sample(distractors, 3)
    rng.shuffle(opts)
    return {"input": question, "output": answer, "options": opts}


def parity(rng):
    n = rng.randrange(1000)
    return classify(rng, lambda r: (f"Number: {n}", "even" if n % 2 == 0 else "odd"), ["even", "odd"])


def sentiment(rng):
    good = rng.random() < 0.5
    text = f"The {rng.choice(THINGS)} was {rng.choice(GOOD if good else BAD)}."
    return {"input": text, "output": "positive" if good else "negative", "options": ["negative", "positive"]}


def topic(rng):
    name = rng.choice(sorted(TOPICS))
    return {"input": rng.choice(TOPICS[name].split("|")).capitalize() + ".", "output": name, "options": sorted(TOPICS)}


def compare(rng):
    a, b = rng.sample(range(100), 2)
    return {"input": f"Which is larger, {a} or {b}?", "output": "first" if a > b else "second",
            "options": ["first", "second"]}


def same_words(rng):
    words = rng.sample(WORDS, 3)
    other = words[:] if rng.random() < 0.5 else rng.sample(WORDS, 3)
    rng.shuffle(other)
    same = sorted(words) == sorted(other)
    return {"input": f"A: {' '.join(words)} B: {' '.join(other)}", "output": "yes" if same else "no",
            "options": ["no", "yes"]}


def arithmetic(rng):
    a, b = rng.randrange(20), rng.randrange(20)
    wrong = [str(v) for v in range(40) if v != a + b]
    return choice(rng, f"What is {a} plus {b}?", str(a + b), wrong)


def opposite(rng):
    word = rng.choice(sorted(OPPOSITE))
    return choice(rng, f"What is the opposite of {word}?", OPPOSITE[word],
                  [v for v in OPPOSITE.values() if v != OPPOSITE[word]])


def next_letter(rng):
    i = rng.randrange(24)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return choice(rng, f"Which letter comes after {letters[i]}?", letters[i + 1],
                  [c for c in letters if c != letters[i + 1]])


def first_word(rng):
    words = rng.sample(WORDS, 4)
    return {"input": "Which word comes first in the dictionary?", "output": min(words), "options": words}


def reverse(rng):
    words = rng.sample(WORDS, 3)
    return {"input": f"Reverse: {' '.join(words)}", "output": " ".join(words[::-1]), "options": []}


TASKS = {"sample-parity": parity, "sample-sentiment": sentiment, "sample-topic": topic, "sample-compare": compare,
         "sample-same_words": same_words, "sample-arithmetic": arithmetic, "sample-opposite": opposite,
         "sample-next_letter": next_letter, "sample-first_word": first_word, "sample-reverse": reverse}
CLASS_TRAIN, CLASS_TEST = ["sample-parity", "sample-topic", "sample-compare"], ["sample-sentiment", "sample-same_words"]
QA_TRAIN, QA_TEST = ["sample-arithmetic", "sample-next_letter", "sample-reverse"], ["sample-opposite", "sample-first_word"]
PARTITIONS = {  # the seven MetaICL partition names, mapped onto the sample tasks
    "hr2lr": ("hr_to_lr", CLASS_TRAIN + QA_TRAIN, CLASS_TEST + QA_TEST),
    "class2class": ("class_to_class", CLASS_TRAIN, CLASS_TEST),
    "nonclass2class": ("non_class_to_class", QA_TRAIN, CLASS_TEST),
    "qa2qa": ("qa_to_qa", QA_TRAIN, QA_TEST),
    "nonqa2qa": ("non_qa_to_qa", CLASS_TRAIN, QA_TEST),
    "nonnli2nli": ("non_nli_to_nli", CLASS_TRAIN + QA_TRAIN, ["sample-same_words"]),
    "nonpara2para": ("non_paraphrase_to_paraphrase", CLASS_TRAIN + QA_TRAIN, ["sample-same_words"]),
}


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def c4_document(rng):
    subjects = ["The town council", "A local baker", "Our science club", "The river trail", "This small museum"]
    verbs = ["opened a new exhibit", "planted trees along the road", "hosted a weekend market",
             "repaired the old bridge", "published a short guide", "invited visitors to a free concert"]
    tails = ["Many families came to see it.", "Volunteers helped all day.", "Tickets sold out quickly.",
             "The weather stayed sunny and mild.", "Photos were shared online later.", "Everyone hopes to return."]
    sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} in {rng.choice(['May', 'June', 'April', 'October'])}. "
                 f"{rng.choice(tails)}" for _ in range(rng.randrange(3, 9))]
    return {"text": " ".join(sentences)}


def main():
    for name, make in TASKS.items():
        rng = random.Random(name)
        for seed in SEEDS:
            write(ROOT / "metaicl" / name / f"{name}_16_{seed}_train.jsonl",
                  [{"task": name, **make(random.Random(f"{name}-{seed}-{i}"))} for i in range(16)])
        write(ROOT / "metaicl" / name / f"{name}_16_100_test.jsonl", [{"task": name, **make(rng)} for _ in range(24)])
    parts = {k: {"config": c, "train": tr, "test": te, "unseen_domain_test": []} for k, (c, tr, te) in PARTITIONS.items()}
    (ROOT / "metaicl" / "partitions.json").write_text(json.dumps(parts, indent=1) + "\n")
    rng = random.Random(0)
    write(ROOT / "c4" / "c4-sample.jsonl", [c4_document(rng) for _ in range(64)])


if __name__ == "__main__":
    main()
