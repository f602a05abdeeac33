#!/usr/bin/env python3
"""Generate datasets/robustness.jsonl: queries shaped like real search traffic, labelled.

Every row is built here from templates and entity lists written for this project (no row of
the reference corpus or any other corpus is copied), about entities that occur nowhere in the
corpus (checked when the corpus is there). The kinds:

- single:     one fact about one entity        'how tall is the Corvel Tower' -> 'Corvel Tower Height'
- keyword:    already a search query            'Marrowgate Abbey founded' -> unchanged
- lowercase:  lowercase, unpunctuated questions 'who was born first ...' -> one subquery per entity
- misspelled: typos in the question words       'wich is longer, the ...' -> as if spelled right
- long:       a question inside chatty context  'My daughter asked me ... how deep is X?' -> 'X Depth'
- open:       how-to, shopping, open questions  'how to descale a kettle' -> unchanged

"Unchanged" labels are the query's words with edge punctuation dropped (the echo baseline gets
ROUGE-L 1.0 there: those kinds measure that the model leaves such queries alone).

    python3 train/make_robustness.py           # (re)write datasets/robustness.jsonl
    python3 train/make_robustness.py --check   # exit 1 if the committed file differs

Standard library only, fixed seed, byte-identical output.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20261130
PER_KIND = 55
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "train"))
from qr_train.traffic import echo_target, typo  # noqa: E402  (standard library only, like this script)
OUT = REPO_ROOT / "datasets" / "robustness.jsonl"
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "datasets" / "query-reformulation" / "corpus.jsonl"

# Entities by type; a leading "the " is the article of questions, not part of the name.
ENTITIES: dict[str, list[str]] = {
    "person": ["Caspar Wendholm", "Ilse Marrowby", "Tomasz Quellen", "Adaeze Korrin", "Fenwick Ashgrove",
               "Rhiannon Vasterby", "Emeric Tallow", "Ines Harrowgate", "Yusuf Delmare", "Petra Ostrowen",
               "Lucian Brembeck", "Sunniva Kjellan"],
    "city": ["Port Selwick", "Marrowgate", "Ostrava Nova", "Kelvindale", "Santa Brisa", "Varnholm", "Tellurie",
             "Amberley Cross", "Novo Kestrel", "Dunmorrow"],
    "river": ["the Ashwater River", "the River Callen", "the Tessaro River", "the Brennock River", "the Ulvane River"],
    "lake": ["Lake Morvenna", "Lake Ottaquin", "Lake Sellaby", "Lake Varrow"],
    "tower": ["the Corvel Spire", "the Ambrel Tower", "the Harwick Needle", "the Selmont Tower"],
    "mountain": ["Mount Caddrin", "Mount Oswyn", "Brannoch Peak", "Mount Tellevar"],
    "company": ["Quillfeather Labs", "Ostrander Freight", "Pellucid Motors", "Harrowby Mills", "Verdance Energy"],
    "book": ["The Glass Orchard", "Salt and Lanterns", "A Winter in Kelvindale", "The Tallow Years"],
    "language": ["Vessaric", "Old Tellurian", "Ambrish"],
}
# (type, property label, question templates); {x} is the entity as written in a question.
FACTS = [
    ("person", "Birth Date", ["when was {x} born", "what is the birth date of {x}", "{x} date of birth?"]),
    ("person", "Death Date", ["when did {x} die", "what year did {x} pass away"]),
    ("person", "Age", ["how old is {x}", "what is the age of {x}"]),
    ("city", "Population", ["what is the population of {x}", "how many people live in {x}", "how big is the population of {x}"]),
    ("city", "Area", ["how large is {x}", "what is the area of {x}"]),
    ("city", "Founded", ["when was {x} founded", "what year was {x} founded"]),
    ("city", "Located In Country", ["which country is {x} in", "in what country is {x}"]),
    ("river", "Length", ["how long is {x}", "what is the length of {x}"]),
    ("lake", "Depth", ["how deep is {x}", "what is the depth of {x}"]),
    ("lake", "Area", ["how big is {x}", "what is the surface area of {x}"]),
    ("tower", "Height", ["how tall is {x}", "what is the height of {x}", "how high is {x}"]),
    ("mountain", "Elevation", ["how high is {x}", "what is the elevation of {x}"]),
    ("company", "Founded", ["when was {x} founded", "when did {x} start"]),
    ("book", "Publication Date", ["when was {x} published", "what year did {x} come out"]),
    ("language", "Speakers", ["how many people speak {x}", "how many speakers does {x} have"]),
]
# Two entities compared on one property: (type, property, templates with {a} and {b}).
COMPARISONS = [
    ("person", "Birth Date", ["who was born first, {a} or {b}", "is {a} older than {b}"]),
    ("city", "Population", ["which has more people, {a} or {b}", "is {a} bigger than {b} by population"]),
    ("river", "Length", ["which is longer, {a} or {b}", "is {a} longer than {b}"]),
    ("tower", "Height", ["which is taller, {a} or {b}", "is {a} taller than {b}"]),
    ("mountain", "Elevation", ["which is higher, {a} or {b}", "is {a} higher than {b}"]),
    ("company", "Founded", ["which was founded first, {a} or {b}", "is {a} older than {b}"]),
]
CONTEXT = [
    "My daughter asked me this at breakfast and I had no idea.", "I am putting together a quiz for my class.",
    "This came up during a long car ride and nobody could agree.", "Hi there, hoping you can settle something.",
    "I keep forgetting this and it is driving me mad.", "For a trivia night at the local library,",
    "Writing a travel blog post and want to get the facts right.",
]
CONTEXT_AFTER = ["Thank you so much!", "Sources would be nice.", "Asking for a friend.", ""]
OPEN = [
    "how to descale a kettle", "how do I repot an orchid", "how to get rid of fruit flies", "how can I stop snoring",
    "best way to store fresh herbs", "how to patch a bike tube", "how to season a wok", "tips for a job interview",
    "how do I unclog a drain", "how to make oat milk", "best hiking boots for wide feet", "cheap noise cancelling headphones",
    "gaming monitor under 300 dollars", "which robot vacuum is best for pet hair", "ergonomic mouse reviews",
    "warmest sleeping bag for camping", "is an air fryer worth it", "why do cats purr", "why is the ocean salty",
    "what causes hiccups", "benefits of drinking water", "ideas for a rainy day with kids", "birthday gift ideas for dad",
    "easy dinner recipes", "how to write a haiku", "beginner woodworking projects", "how to clean white sneakers",
    "how to keep cut flowers fresh", "best budget smartphone", "quiet dishwasher reviews", "how to learn to juggle",
    "how to stay focused while studying", "signs of dehydration", "how to build a birdhouse", "best board games for two",
    "how to fold a paper crane", "how to remove rust from tools", "good books for teenagers", "how to grow basil indoors",
    "how to measure ring size at home", "lightweight travel stroller", "how do solar panels work",
    "how to train for a half marathon", "why do leaves change color", "best pizza dough recipe",
    "how to calm a crying baby", "how to change a car battery", "waterproof phone case reviews", "how do vaccines work",
    "how to sharpen garden shears", "how to make a budget spreadsheet", "best time to plant garlic",
    "how to get wax out of carpet", "tips for better sleep", "how to start a compost pile", "how to clean a yoga mat",
]


def name_of(display: str) -> str:
    name = display[4:] if display.startswith("the ") else display
    return name[:1].upper() + name[1:]


def echo(query: str) -> str:
    return echo_target(query)[0]


class Maker:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def fact(self) -> tuple[str, str]:
        kind, prop, templates = self.rng.choice(FACTS)
        x = self.rng.choice(ENTITIES[kind])
        return self.rng.choice(templates).format(x=x), f"{name_of(x)} {prop}"

    def comparison(self) -> tuple[str, str]:
        kind, prop, templates = self.rng.choice(COMPARISONS)
        a, b = self.rng.sample(ENTITIES[kind], 2)
        return self.rng.choice(templates).format(a=a, b=b), f"{name_of(a)} {prop}|{name_of(b)} {prop}"

    def question(self) -> tuple[str, str]:
        return self.fact() if self.rng.random() < 0.5 else self.comparison()

    def single(self) -> dict:
        q, label = self.fact()
        if self.rng.random() < 0.5:
            q = q[:1].upper() + q[1:] + ("" if q.endswith("?") else "?")
        return {"query": q, "subqueries": label, "kind": "single"}

    def keyword(self) -> dict:
        kind, prop, _ = self.rng.choice(FACTS)
        x = name_of(self.rng.choice(ENTITIES[kind]))
        q = self.rng.choice([f"{x} {prop.lower()}", f"{x} {prop}", x, f"{x.lower()} {prop.lower()}"])
        return {"query": q, "subqueries": echo(q), "kind": "keyword"}

    def lowercase(self) -> dict:
        q, label = self.question()
        return {"query": q.lower().replace(",", ""), "subqueries": label, "kind": "lowercase"}

    def misspelled(self) -> dict:
        q, label = self.question()
        names = {w.lower() for part in label.split("|") for w in part.split()}
        words = q.split()
        plain = [i for i, w in enumerate(words) if len(w.strip(",?")) >= 4 and w.strip(",?").lower() not in names]
        for i in self.rng.sample(plain, min(len(plain), self.rng.choice([1, 2]))):
            core = words[i].rstrip(",?")
            words[i] = typo(core, self.rng) + words[i][len(core):]
        return {"query": " ".join(words), "subqueries": label, "kind": "misspelled"}

    def long(self) -> dict:
        q, label = self.question()
        q = q[:1].upper() + q[1:] + "?"
        text = " ".join(p for p in (self.rng.choice(CONTEXT), q, self.rng.choice(CONTEXT_AFTER)) if p)
        return {"query": text, "subqueries": label, "kind": "long"}

    def open(self, i: int) -> dict:
        q = OPEN[i % len(OPEN)]
        if self.rng.random() < 0.3:
            q = q[:1].upper() + q[1:] + "?"
        return {"query": q, "subqueries": echo(q), "kind": "open"}


def generate() -> list[dict]:
    m = Maker(SEED)
    rows: list[dict] = []
    seen: set[str] = set()  # unique across kinds: a typo that changes nothing repeats a question
    for kind in ("single", "keyword", "lowercase", "misspelled", "long"):
        made = 0
        while made < PER_KIND:
            row = getattr(m, kind)()
            if row["query"] not in seen and row["query"].lower() not in seen:
                seen.update((row["query"], row["query"].lower()))
                rows.append(row)
                made += 1
    rows += [m.open(i) for i in range(PER_KIND)]
    return rows


def render(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def names_in_corpus(corpus: Path) -> list[str]:
    text = corpus.read_text(encoding="utf-8").lower()
    return [name_of(e) for pool in ENTITIES.values() for e in pool if name_of(e).lower() in text]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if datasets/robustness.jsonl differs")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    args = p.parse_args(argv)
    corpus = Path(args.corpus)
    if corpus.is_file():
        found = names_in_corpus(corpus)
        if found:
            print(f"entities present in the corpus: {found}", file=sys.stderr)
            return 2
    data = render(generate())
    if args.check:
        same = OUT.is_file() and OUT.read_bytes() == data
        print("datasets/robustness.jsonl is up to date" if same else "datasets/robustness.jsonl differs")
        return 0 if same else 1
    OUT.write_bytes(data)
    print(f"wrote {OUT} ({len(data.splitlines())} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
