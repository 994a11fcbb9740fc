"""Personalisation that works: a generated folder of personal notes about a fictional person (the people in their
life: where each lives, works, what pet, food, sport, instrument, colour they like, their birthday), a few chats
with an assistant about some of those facts, and held-out questions phrased unlike anything in the notes or
chats. Measures answer accuracy before and after `mimo tune` with its defaults, the tuning time, and the held-out
reasoning accuracy (`mimo eval --task reasoning`) of the base and of the merged model, and the drop between them
problem by problem (paired, with its bootstrap interval).

    python bench/personal_notes.py MODEL_DIR --work DIR [--people 30] [--seed 0] [--eval-limit 48] [--tune-args "..."]

Accuracy: a question is answered right when, among every value the notes give that attribute (one per person:
30 cities, 30 birthdays...), the right one makes the likeliest assistant reply (the model's log-probability of
the whole reply, the chat template around it); chance is 1 / people. A finished adapter already in DIR/adapter is
scored again rather than retuned. Reported for all questions, for the people
the chats asked about (in other words) and for the people only the notes mention, and for the chats' own
questions (the words tuning saw). Writes DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

# before torch loads, as every mimo command: spin-waiting OpenMP threads stall on a busy machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimo.checkpoint import load_model_and_tokenizer
from mimo.eval.evaluate import read_samples
from mimo.eval.metrics import estimate
from mimo.inference.adapters import load_adapter
from mimo.inference.lora import attach_adapters

FIRST = ["Tomas", "Lena", "Arjun", "Mireille", "Kofi", "Ines", "Yusuf", "Hana", "Piotr", "Salome", "Dario", "Freya",
         "Emeka", "Noor", "Viktor", "Carmen", "Oskar", "Leila", "Matteo", "Aiko", "Rafael", "Sigrid", "Tariq",
         "Elodie", "Bruno", "Zanele", "Henrik", "Priya", "Luca", "Odile", "Ravi", "Greta", "Marek", "Anouk",
         "Desmond", "Yara", "Felix", "Naledi", "Ismael", "Solveig"]
RELATIONS = ["sister", "brother", "cousin", "neighbour", "colleague", "old school friend", "climbing partner",
             "aunt", "uncle", "landlord", "dentist", "book club friend", "flatmate", "mentor", "godchild"]
VALUES = {
    "city": ["Lisbon", "Valencia", "Tromso", "Cork", "Graz", "Bergen", "Nantes", "Turku", "Bruges", "Porto",
             "Krakow", "Ghent", "Malmo", "Bologna", "Utrecht", "Leeds", "Lyon", "Aarhus", "Brno", "Seville",
             "Galway", "Basel", "Tallinn", "Riga", "Split", "Pisa", "Bilbao", "Dresden", "Leuven", "Oulu",
             "Zagreb", "Kaunas", "Lille", "Genoa", "Bremen", "Tampere", "Cadiz", "Parma", "Linz", "Odense"],
    "job": ["nurse", "carpenter", "baker", "pilot", "librarian", "architect", "plumber", "chemist", "farmer",
            "translator", "dentist", "welder", "florist", "geologist", "tailor", "chef", "surveyor", "midwife",
            "potter", "glazier", "jeweller", "cartographer", "beekeeper", "locksmith", "optician", "sommelier",
            "archivist", "brewer", "luthier", "stonemason", "ferryman", "typesetter", "zookeeper", "curator",
            "blacksmith", "falconer", "puppeteer", "mapmaker", "bookbinder", "diver"],
    "pet": ["a parrot", "a tortoise", "a ferret", "a goldfish", "a rabbit", "a hamster", "a greyhound", "a gecko",
            "a cockatiel", "a pony", "a terrier", "a chinchilla", "a husky", "a hedgehog", "a canary", "a goat",
            "an iguana", "a poodle", "a python", "a duck", "a donkey", "a beagle", "a tarantula", "a lamb",
            "a corgi", "an axolotl", "a pug", "a budgie", "a collie", "a toad", "a mouse", "a dachshund",
            "a siamese cat", "a salamander", "a pigeon", "a llama", "a spaniel", "a newt", "a peacock", "a crow"],
    "food": ["paella", "ramen", "goulash", "lasagne", "falafel", "pierogi", "risotto", "tacos", "dumplings",
             "moussaka", "curry", "sushi", "pancakes", "couscous", "borscht", "gnocchi", "kebab", "fondue",
             "ceviche", "chowder", "waffles", "burritos", "pho", "tagine", "quiche", "gumbo", "bibimbap",
             "shakshuka", "paneer", "polenta", "haggis", "pavlova", "baklava", "churros", "nachos", "samosas",
             "tempura", "ratatouille", "jambalaya", "strudel"],
    "sport": ["rowing", "fencing", "curling", "judo", "squash", "archery", "handball", "surfing", "cricket",
              "badminton", "karate", "polo", "hurling", "sailing", "bouldering", "lacrosse", "biathlon",
              "snooker", "netball", "kayaking", "croquet", "darts", "wrestling", "skiing", "softball", "diving",
              "boxing", "triathlon", "gymnastics", "bowling", "golf", "hockey", "rugby", "tennis", "cycling",
              "skating", "volleyball", "baseball", "swimming", "running"],
    "instrument": ["cello", "banjo", "oboe", "harp", "tuba", "ukulele", "bassoon", "accordion", "sitar",
                   "trombone", "clarinet", "mandolin", "harmonica", "viola", "flute", "bagpipes", "marimba",
                   "saxophone", "trumpet", "piano", "organ", "lute", "drums", "zither", "kalimba", "didgeridoo",
                   "tabla", "theremin", "recorder", "piccolo", "balalaika", "dulcimer", "bugle", "cornet", "fiddle",
                   "glockenspiel", "harpsichord", "ocarina", "tambourine", "xylophone"],
    "colour": ["teal", "maroon", "amber", "lilac", "olive", "crimson", "navy", "ochre", "coral", "mint",
               "indigo", "mustard", "scarlet", "beige", "turquoise", "magenta", "khaki", "lavender", "cobalt",
               "peach", "emerald", "silver", "ivory", "charcoal", "salmon", "plum", "saffron", "jade", "rust",
               "cream", "violet", "bronze", "sepia", "cyan", "aqua", "fuchsia", "tan", "copper", "slate", "pink"],
    "birthday": [f"{d} {m}" for m in ("January", "March", "May", "July", "September", "November")
                 for d in (2, 7, 11, 16, 23, 28, 30)],
}
# two ways the notes say each fact (a profile line, a diary line), how the chats ask it, and how the held-out
# questions ask it: worded unlike any of them
NOTES = {"city": ("{n} lives in {v}.", "Called {n} tonight, it was raining in {v} again."),
         "job": ("{n} works as a {v}.", "{n} had a long day at work, being a {v} is tiring."),
         "pet": ("{n} has {v} at home.", "Visited {n} and played with {v}, the family pet."),
         "food": ("{n}'s favourite dish is {v}.", "Cooked {v} for {n}, who loves it more than anything."),
         "sport": ("{n} plays {v} every weekend.", "Watched {n} compete at {v} on Saturday."),
         "instrument": ("{n} plays the {v}.", "{n} practised the {v} all evening."),
         "colour": ("{n}'s favourite colour is {v}.", "Bought {n} a scarf in {v}, the colour they always pick."),
         "birthday": ("{n}'s birthday is on {v}.", "Reminder: {n} celebrates on {v} every year.")}
CHAT_Q = {"city": "Where does {n} live?", "job": "What does {n} do for a living?", "pet": "What pet does {n} have?",
          "food": "What is {n}'s favourite food?", "sport": "Which sport does {n} play?",
          "instrument": "Which instrument does {n} play?", "colour": "What colour does {n} like best?",
          "birthday": "When is {n}'s birthday?"}
HELD_OUT_Q = {"city": "In which town is {n}'s home?", "job": "What is {n}'s profession?",
              "pet": "Which animal keeps {n} company?", "food": "If I cook for {n}, what should I make?",
              "sport": "What game keeps {n} busy on weekends?", "instrument": "What does {n} make music with?",
              "colour": "Which colour should a present for {n} be?", "birthday": "On what date was {n} born?"}
ANSWER = {"city": "{n} lives in {v}.", "job": "{n} is a {v}.", "pet": "{n} has {v}.",
          "food": "{n} loves {v}.", "sport": "{n} plays {v}.", "instrument": "{n} plays the {v}.",
          "colour": "{n} likes {v}.", "birthday": "{n}'s birthday is {v}."}


def make_person(people: int, seed: int):
    rng = random.Random(seed)
    names = rng.sample(FIRST, people)
    facts: dict[str, dict[str, str]] = {n: {} for n in names}
    for a, vals in VALUES.items():  # each attribute's values distinct over the people
        for n, v in zip(names, rng.sample(vals, people)):
            facts[n][a] = v
    relation = {n: rng.choice(RELATIONS) for n in names}
    return names, facts, relation


def write_data(out: Path, people: int, seed: int) -> list[dict]:
    """Notes (.md), chats about half the people (.jsonl); returns the held-out questions."""
    rng = random.Random(seed + 1)
    names, facts, relation = make_person(people, seed)
    notes = out / "data"
    notes.mkdir(parents=True, exist_ok=True)
    profile = ["# People in my life\n"]
    for n in names:
        profile.append(f"## {n}\n{n} is my {relation[n]}. " + " ".join(NOTES[a][0].format(n=n, v=v)
                                                                       for a, v in facts[n].items()) + "\n")
    (notes / "people.md").write_text("\n".join(profile))
    diary = [NOTES[a][1].format(n=n, v=facts[n][a]) for n in names for a in VALUES]
    rng.shuffle(diary)
    (notes / "diary.txt").write_text("\n".join(diary) + "\n")
    asked = names[: people // 2]
    chats = [{"messages": [{"role": "user", "content": CHAT_Q[a].format(n=n)},
                           {"role": "assistant", "content": ANSWER[a].format(n=n, v=facts[n][a])}]}
             for n in asked for a in VALUES]
    (notes / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    questions = [{"question": HELD_OUT_Q[a].format(n=n), "attribute": a, "name": n, "answer": facts[n][a],
                  "asked_in_chats": n in asked} for n in names for a in VALUES]
    (out / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return questions


@torch.no_grad()
def accuracy(model, tok, questions: list[dict], values: dict[str, list[str]], notes_wording: bool = False) -> dict:
    """The share of questions whose right value gives the likeliest reply among the attribute's values; with
    notes_wording, the likeliest profile line of the notes after the person's heading instead of a chat (what
    the model recalls as a document, before any rephrasing)."""
    right = {"all": [], "asked_in_chats": [], "notes_only": []}
    for q in questions:
        cands, a, n = values[q["attribute"]], q["attribute"], q["name"]
        if notes_wording:
            prompt = tok.encode(f"## {n}\n")
            replies = [tok.encode(NOTES[a][0].format(n=n, v=v)) for v in cands]
        else:
            prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": q["question"]}]))
            replies = [tok.encode(ANSWER[a].format(n=n, v=v) + "<|im_end|>") for v in cands]
        T = len(prompt) + max(len(r) for r in replies)
        ids = torch.zeros(len(cands), T, dtype=torch.long)
        mask = torch.zeros(len(cands), T, dtype=torch.bool)
        for i, r in enumerate(replies):
            ids[i, : len(prompt) + len(r)] = torch.tensor(prompt + r)
            mask[i, len(prompt): len(prompt) + len(r)] = True
        logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        score = (logp * mask[:, 1:]).sum(1)
        ok = cands[int(score.argmax())] == q["answer"]
        right["all"].append(ok)
        right["asked_in_chats" if q["asked_in_chats"] else "notes_only"].append(ok)
    return {k: round(100.0 * sum(v) / len(v), 1) for k, v in right.items() if v}


def scored(model_dir: str, adapter: Path | None, questions, values) -> dict:
    """accuracy() on the held-out questions, plus "chat_questions": the chats' own questions (the exact words
    tuning trained on) for the people the chats asked about, which tells memorising from rephrasing."""
    model, tok = load_model_and_tokenizer(model_dir)
    if adapter is not None:
        attach_adapters(model, [load_adapter(adapter, model, model_dir)])
    seen = [dict(q, question=CHAT_Q[q["attribute"]].format(n=q["name"])) for q in questions if q["asked_in_chats"]]
    return {**accuracy(model.eval(), tok, questions, values),
            "chat_questions": accuracy(model, tok, seen, values)["all"]}


def mimo(*argv) -> float:
    """Run a mimo command (the venv's); its wall-clock seconds."""
    t0 = time.perf_counter()
    cmd = [str(Path(sys.executable).with_name("mimo")), *map(str, argv)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def reasoning_accuracy(model_dir, out: Path, limit: int) -> float:
    mimo("eval", model_dir, "--task", "reasoning", "--prompt-format", "chat", "--out", out, "--seed", 0, "--limit",
         limit, "--samples", 1, "--max-new-tokens", 96)
    return json.loads((out / "summary.json").read_text())


def paired_drop(base_dir: Path, tuned_dir: Path) -> dict:
    """The reasoning accuracy lost by tuning, in points, problem by problem (both evals ran the same problems with
    the same seeds): the mean of base - tuned correctness with its 95% bootstrap interval, tighter than the two
    accuracies' own intervals side by side (a problem's difficulty is shared)."""
    def correct(d):
        return {s["id"]: float(s["correct"]) for s in read_samples(d / "samples.jsonl")}

    base, tuned = correct(base_dir), correct(tuned_dir)
    est = estimate([100.0 * (base[i] - tuned[i]) for i in sorted(base.keys() & tuned.keys())])
    return {k: round(v, 1) if k != "n" else v for k, v in est.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--people", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=480, help="reasoning problems for mimo eval (0: skip)")
    p.add_argument("--tune-args", default="", help="flags for mimo tune beyond its defaults, e.g. \"--epochs 50\"")
    args = p.parse_args()
    questions = write_data(args.work, args.people, args.seed)
    values = {a: sorted({q["answer"] for q in questions if q["attribute"] == a}) for a in VALUES}
    results = {"model": args.model, "people": args.people, "facts": len(questions),
               "notes_chars": sum(len(f.read_text()) for f in (args.work / "data").iterdir()),
               "before": scored(args.model, None, questions, values)}
    print(json.dumps(results), flush=True)
    adapter = args.work / "adapter"
    if (adapter / "adapter_model.safetensors").exists():  # a finished run in --work: scored again, not retimed
        results["tune_seconds"] = None
    else:
        results["tune_seconds"] = round(mimo("tune", args.model, "--data", args.work / "data", "--out", adapter,
                                             *shlex.split(args.tune_args)), 1)
    results["tune_args"] = args.tune_args
    results["after"] = scored(args.model, adapter, questions, values)
    rows = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    results["tune_steps"], results["final_val_loss"] = rows[-1]["step"], rows[-1].get("val_loss")
    print(json.dumps(results), flush=True)
    if args.eval_limit:
        merged = args.work / "merged"
        mimo("merge", args.model, "--adapter", adapter, "--out", merged)
        results["reasoning_base"] = reasoning_accuracy(args.model, args.work / "eval-base", args.eval_limit)
        results["reasoning_tuned"] = reasoning_accuracy(merged, args.work / "eval-tuned", args.eval_limit)
        results["reasoning_drop_points"] = paired_drop(args.work / "eval-base", args.work / "eval-tuned")
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
