#!/usr/bin/env python3
"""Generate the project's own evaluation sets: datasets/test.jsonl and datasets/dev.jsonl.

Every row is built here from templates and entity lists written for this project; no row of
the reference corpus is copied. The subquery style (Title Case properties such as
"Birth Date", chaining relations such as "Located In") follows the corpus so that labels are
consistent with what a model trained on it writes.

    python3 train/make_datasets.py            # (re)write datasets/*.jsonl
    python3 train/make_datasets.py --check    # exit 1 if the committed files differ

Standard library only. Deterministic: a fixed seed, no set iteration, byte-identical output.
When the corpus is available (--corpus, default ../shared/datasets/query-reformulation/
corpus.jsonl relative to the repository root) every entity name is checked to occur nowhere
in it (case-insensitive substring of any query or subqueries value); exit status 2 if one does.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20250611
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "datasets"
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "datasets" / "query-reformulation" / "corpus.jsonl"

N_TEST = {"comparison": 80, "chaining": 40, "expansion": 40}
N_DEV = {"comparison": 90, "chaining": 55, "expansion": 55}

FLAGSHIP = {
    "query": "Who lived longer, Nikola Tesla or Milutin Milankovic?",
    "subqueries": "Nikola Tesla Lifespan|Milutin Milankovic Lifespan",
    "kind": "comparison",
}
FLAGSHIP_ENTITIES = ["Nikola Tesla", "Milutin Milankovic"]

# --------------------------------------------------------------------------------------------
# Entities. A leading "the " is the article used in questions; it is not part of the name.
# Mix of real names absent from the corpus and invented ones (all checked against the corpus).
# --------------------------------------------------------------------------------------------
ENTITIES: dict[str, list[str]] = {
    "person": [
        "Nikola Tesla", "Milutin Milankovic", "Ada Lovelace", "Srinivasa Ramanujan",
        "Emmy Noether", "Hedy Lamarr", "Rosalind Franklin", "Alan Turing", "Johannes Kepler",
        "Tycho Brahe", "Grace Hopper", "Leonhard Euler", "Dmitri Mendeleev", "Lise Meitner",
        "Gregor Mendel", "Frida Kahlo", "Gustav Klimt", "Edvard Munch", "Jean Sibelius",
        "Antonin Dvorak", "Astrid Lindgren", "Fridtjof Nansen", "Roald Amundsen",
        "Chinua Achebe", "Pablo Neruda",
        # invented
        "Oskar Veldmann", "Teodora Halvik", "Mirela Stanek", "Ansel Quarrington",
        "Benedikt Orlow", "Saoirse Tallan", "Halvard Strenn", "Liora Castellane",
    ],
    "city": [
        "Ljubljana", "Tallinn", "Tbilisi", "Yerevan", "Bratislava", "Montevideo", "Windhoek",
        "Ulaanbaatar", "Thimphu", "Vientiane", "Tampere", "Brno", "Graz", "Trieste", "Cusco",
        "Arequipa", "Mombasa", "Da Nang", "Chiang Mai",
        # invented
        "Kestrelmouth", "Port Ambrel", "Valdoria", "Tirnova Vale", "Belvarro", "Saint Oderic",
    ],
    "river": [
        "the Danube", "the Vistula", "the Mekong", "the Zambezi", "the Orinoco", "the Limpopo",
        "the Dnieper", "the Irrawaddy", "the Yenisei", "the Tagus", "the Elbe", "the Drina",
        "the Sava",
        # invented
        "the Quellon River", "the Vardane River", "the Sallowmere River", "the River Ostrel",
    ],
    "lake": [
        "Lake Titicaca", "Lake Baikal", "Lake Ohrid", "Lake Balaton", "Lake Malawi",
        "Lake Tanganyika", "Lake Bled", "Lake Como",
        # invented
        "Lake Quimsorra", "Lake Vessarin", "Lake Dorrowin", "Lake Ambrecht",
    ],
    "bridge": [
        "the Charles Bridge", "the Millau Viaduct", "the Akashi Kaikyo Bridge",
        "the Tsing Ma Bridge", "the Rialto Bridge", "the Ponte Vecchio",
        # invented
        "the Varenholt Bridge", "the Ostmere Viaduct", "the Calloway Narrows Bridge",
        "the Severin Gate Bridge",
    ],
    "tower": [
        "the Tokyo Skytree", "the Ostankino Tower", "the Milad Tower", "the Canton Tower",
        "the Space Needle",
        # invented
        "the Brannock Tower", "the Halden Spire", "the Corvel Tower",
    ],
    "university": [
        "Charles University", "Jagiellonian University", "the University of Bologna",
        "Uppsala University", "Leiden University", "Heidelberg University", "KU Leuven",
        # invented
        "the Halloran Institute of Technology", "Marlowe Polytechnic",
        "Vessarin State University", "the University of Tirnova",
    ],
    "company": [
        "Nokia", "Siemens", "Ericsson", "Philips", "Volvo", "Toyota", "Samsung",
        # invented
        "Tessaline Systems", "Corvane Logistics", "Brightwater Foundry", "Orvik Analytics",
    ],
    "band": [
        "Radiohead", "ABBA", "Kraftwerk", "Sigur Ros", "Nightwish", "Metallica", "Coldplay",
        # invented
        "The Velvet Lanterns", "Copper Meridian", "Hollow Atlas",
    ],
    "mountain": [
        "Mount Elbrus", "Aconcagua", "Kilimanjaro", "Denali", "the Matterhorn", "Mont Blanc",
        "Mount Ararat",
        # invented
        "Mount Tharrow", "Kessrin Peak", "Mount Valdane",
    ],
    "bird": [
        "the Andean condor", "the harpy eagle", "the wandering albatross", "the shoebill",
        "the marabou stork",
    ],
    "moon": ["Ganymede", "Titan", "Europa", "Callisto", "Enceladus", "Triton"],
}


def name_of(display: str) -> str:
    """The name as written in subqueries: 'the Danube' -> 'Danube', 'the harpy eagle' ->
    'Harpy eagle' (corpus style, e.g. "Brown kiwi Weight"); 'The Velvet Lanterns' is kept."""
    name = display[4:] if display.startswith("the ") else display
    return name[:1].upper() + name[1:]


def all_entity_names() -> list[str]:
    names = []
    for pool in ENTITIES.values():
        for d in pool:
            if name_of(d) not in names:
                names.append(name_of(d))
    return names


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# --------------------------------------------------------------------------------------------
# Comparison: the same property of 2-3 entities. label -> categories, 2- and 3-entity phrasings.
# --------------------------------------------------------------------------------------------
COMPARISONS: list[dict] = [
    {"label": "Birth Date", "cats": ["person"],
     "two": ["Who was born first, {A} or {B}?", "Was {A} born before {B}?",
             "Which of {A} and {B} was born earlier?", "Compare the birth dates of {A} and {B}."],
     "three": ["Who was born first: {A}, {B}, or {C}?",
               "Among {A}, {B}, and {C}, who has the earliest birth date?"]},
    {"label": "Death Date", "cats": ["person"],
     "two": ["Who died first, {A} or {B}?", "Did {A} pass away before {B}?",
             "Which of {A} and {B} died earlier?"],
     "three": ["Among {A}, {B}, and {C}, who passed away first?"]},
    {"label": "Lifespan", "cats": ["person"],
     "two": ["Who lived longer, {A} or {B}?", "Did {A} live longer than {B}?",
             "Which of {A} and {B} had the longer life?"],
     "three": ["Who had the longest life: {A}, {B}, or {C}?"]},
    {"label": "Population", "cats": ["city"],
     "two": ["Which city has more people, {A} or {B}?", "Is {A} more populous than {B}?",
             "Does {A} have a larger population than {B}?",
             "Compare the populations of {A} and {B}."],
     "three": ["Which is the most populous: {A}, {B}, or {C}?",
               "Rank {A}, {B}, and {C} by population."]},
    {"label": "Area", "cats": ["city", "lake"],
     "two": ["Which covers a larger area, {A} or {B}?", "Is {A} bigger in area than {B}?",
             "How does the area of {A} compare with that of {B}?"],
     "three": ["Which of {A}, {B}, and {C} covers the largest area?"]},
    {"label": "Established", "cats": ["city", "university"],
     "two": ["Which was established first, {A} or {B}?", "Is {A} older than {B}?",
             "Was {A} established before {B}?"],
     "three": ["Which was established earliest: {A}, {B}, or {C}?"]},
    {"label": "Elevation", "cats": ["city", "mountain", "lake"],
     "two": ["Which is higher, {A} or {B}?", "Does {A} sit at a higher elevation than {B}?",
             "Compare the elevations of {A} and {B}."],
     "three": ["Which has the highest elevation: {A}, {B}, or {C}?"]},
    {"label": "Length", "cats": ["river", "bridge"],
     "two": ["Which is longer, {A} or {B}?", "Is {A} longer than {B}?",
             "How does the length of {A} compare with that of {B}?"],
     "three": ["Which is the longest: {A}, {B}, or {C}?"]},
    {"label": "Discharge", "cats": ["river"],
     "two": ["Which river carries more water, {A} or {B}?",
             "Does {A} have a greater discharge than {B}?"],
     "three": ["Which has the largest discharge: {A}, {B}, or {C}?"]},
    {"label": "Depth", "cats": ["lake"],
     "two": ["Which lake is deeper, {A} or {B}?", "Is {A} deeper than {B}?"],
     "three": ["Which is the deepest: {A}, {B}, or {C}?"]},
    {"label": "Height", "cats": ["bridge", "tower"],
     "two": ["Which is taller, {A} or {B}?", "Is {A} taller than {B}?",
             "Compare the heights of {A} and {B}."],
     "three": ["Which is the tallest: {A}, {B}, or {C}?"]},
    {"label": "Student Population", "cats": ["university"],
     "two": ["Which university has more students, {A} or {B}?",
             "Does {A} enrol more students than {B}?"],
     "three": ["Which has the most students: {A}, {B}, or {C}?"]},
    {"label": "Founded", "cats": ["company"],
     "two": ["Which company was founded first, {A} or {B}?", "Was {A} founded before {B}?",
             "Is {A} an older company than {B}?"],
     "three": ["Which company is the oldest: {A}, {B}, or {C}?"]},
    {"label": "Formed Year", "cats": ["band"],
     "two": ["Which band formed first, {A} or {B}?", "Did {A} form before {B}?"],
     "three": ["Which band formed earliest: {A}, {B}, or {C}?"]},
    {"label": "Wingspan", "cats": ["bird"],
     "two": ["Which has a wider wingspan, {A} or {B}?",
             "Is the wingspan of {A} larger than that of {B}?"],
     "three": ["Which has the widest wingspan: {A}, {B}, or {C}?"]},
    {"label": "Weight", "cats": ["bird"],
     "two": ["Which is heavier, {A} or {B}?", "Does {A} weigh more than {B}?"],
     "three": ["Which is the heaviest: {A}, {B}, or {C}?"]},
    {"label": "Diameter", "cats": ["moon"],
     "two": ["Which moon has the larger diameter, {A} or {B}?", "Is {A} wider than {B}?"],
     "three": ["Which has the largest diameter: {A}, {B}, or {C}?"]},
    {"label": "Density", "cats": ["moon"],
     "two": ["Which is denser, {A} or {B}?", "Does {A} have a higher density than {B}?"],
     "three": ["Which is the densest: {A}, {B}, or {C}?"]},
]

# Short, keyword-like phrasings (dev only, for realistic latency replay).
SHORT_TWO = ["{A} vs {B} {noun}?", "{noun}: {A} or {B}?", "{A} {B} {noun} comparison"]

# --------------------------------------------------------------------------------------------
# Chaining: each step's answer feeds the next. {e} is the start entity.
# --------------------------------------------------------------------------------------------
PLACE = ["lake", "bridge", "tower", "mountain", "city"]
CHAINS: list[dict] = [
    {"steps": ["{e} Located In Country", "Country Has Capital City", "City Population"],
     "cats": ["lake", "bridge", "tower", "mountain"],
     "q": ["What is the population of the capital of the country where {e} is located?",
           "How many people live in the capital city of the country that contains {e}?",
           "In the country that is home to {e}, how populous is the capital?"]},
    {"steps": ["{e} Located In Country", "Country Official Language"],
     "cats": PLACE,
     "q": ["What is the official language of the country in which {e} lies?",
           "Which language is official in the country that is home to {e}?"]},
    {"steps": ["{e} Located In Country", "Country Located In Continent",
               "Continent Highest Point"],
     "cats": PLACE,
     "q": ["What is the highest point of the continent containing the country where {e} is found?",
           "Which summit is the highest point on the continent of the country that contains {e}?"]},
    {"steps": ["{e} Located In Country", "Country Part Of Continent", "Continent Largest Country"],
     "cats": PLACE,
     "q": ["What is the largest country on the continent that includes the country in which {e} is located?",
           "Which is the biggest country on the continent where the country of {e} lies?"]},
    {"steps": ["{e} Located In Country", "Country Currency"],
     "cats": PLACE,
     "q": ["What currency is used in the country where {e} is located?",
           "Which currency would I pay with in the country that has {e}?"]},
    {"steps": ["{e} Located In City", "City Located In Country", "Country Population"],
     "cats": ["bridge", "tower", "university"],
     "q": ["What is the population of the country whose city hosts {e}?",
           "How many people live in the country of the city where {e} stands?"]},
    {"steps": ["{e} Located In Country", "Country Time Zone"],
     "cats": PLACE,
     "q": ["What time zone is used in the country where {e} is located?",
           "Which time zone applies in the country containing {e}?"]},
    {"steps": ["{e} Country Of Citizenship Country", "Country Has Capital City", "City Population"],
     "cats": ["person"],
     "q": ["What is the population of the capital of the country of which {e} was a citizen?",
           "How many people live in the capital of {e}'s country of citizenship?"]},
    {"steps": ["{e} Educated At University", "University Located In City", "City Population"],
     "cats": ["person"],
     "q": ["What is the population of the city where the university attended by {e} is located?",
           "How many people live in the city that hosts the university {e} studied at?"]},
    {"steps": ["{e} Educated At University", "University Established"],
     "cats": ["person"],
     "q": ["When was the university where {e} studied established?",
           "In what year was the university that educated {e} founded?"]},
    {"steps": ["{e} Country Of Citizenship Country", "Country Official Language"],
     "cats": ["person"],
     "q": ["What is the official language of the country {e} was a citizen of?",
           "Which language is official in {e}'s country of citizenship?"]},
    {"steps": ["{e} Flows Into Sea", "Sea Area"],
     "cats": ["river"],
     "q": ["What is the area of the sea that {e} flows into?",
           "How large is the sea into which {e} empties?"]},
    {"steps": ["{e} Flows Through Country", "Country Has Capital City", "City Population"],
     "cats": ["river"],
     "q": ["What is the population of the capital of the country that {e} flows through?",
           "How many people live in the capital of a country crossed by {e}?"]},
    {"steps": ["{e} Flows Into Sea", "Sea Located In Continent", "Continent Largest Country"],
     "cats": ["river"],
     "q": ["What is the largest country on the continent bordering the sea that {e} drains into?"]},
    {"steps": ["{e} Headquartered In City", "City Located In Country", "Country Population"],
     "cats": ["company"],
     "q": ["What is the population of the country where the city hosting the headquarters of {e} is located?",
           "How many people live in the country whose city is home to the head office of {e}?"]},
    {"steps": ["{e} Founded By Person", "Person Birth Date"],
     "cats": ["company"],
     "q": ["When was the founder of {e} born?",
           "What is the birth date of the person who founded {e}?"]},
    {"steps": ["{e} Crosses River", "River Length"],
     "cats": ["bridge"],
     "q": ["How long is the river that {e} crosses?",
           "What is the length of the river spanned by {e}?"]},
    {"steps": ["{e} Crosses River", "River Flows Into Sea", "Sea Area"],
     "cats": ["bridge"],
     "q": ["What is the area of the sea fed by the river that {e} crosses?"]},
    {"steps": ["{e} Located In Country", "Country Part Of Continent", "Continent Largest Country",
               "Country Population"],
     "cats": ["lake", "mountain", "tower"],
     "q": ["What is the population of the largest country on the continent that includes the country where {e} is located?",
           "How many people live in the biggest country of the continent where the country containing {e} lies?"]},
]

# --------------------------------------------------------------------------------------------
# Expansion: aspects of one topic. (a) several entities, one property, listing phrasing;
# (b) one entity, several explicitly named aspects.
# --------------------------------------------------------------------------------------------
EXPANSION_MULTI = {
    # label -> (categories, noun phrase used in the question)
    "Population": (["city"], "population figures"),
    "Area": (["city", "lake"], "areas"),
    "Elevation": (["city", "mountain"], "elevations"),
    "Length": (["river", "bridge"], "lengths"),
    "Height": (["bridge", "tower"], "heights"),
    "Depth": (["lake"], "depths"),
    "Established": (["university", "city"], "founding dates"),
    "Founded": (["company"], "founding years"),
    "Birth Date": (["person"], "birth dates"),
    "Formed Year": (["band"], "formation years"),
    "Wingspan": (["bird"], "wingspans"),
    "Diameter": (["moon"], "diameters"),
}
EXPANSION_MULTI_Q = {
    2: ["What are the {noun} of {A} and {B}?", "List the {noun} for {A} and {B}.",
        "Give me the {noun} of {A} and {B}.", "I need the {noun} for both {A} and {B}."],
    3: ["What are the {noun} of {A}, {B}, and {C}?", "List the {noun} for {A}, {B}, and {C}."],
}
ASPECTS = {
    # category -> [(label, question phrase)]
    "city": [("Population", "population"), ("Area", "area"), ("Elevation", "elevation"),
             ("Climate", "climate"), ("Economy", "economy"), ("History", "history")],
    "person": [("Birth Date", "date of birth"), ("Death Date", "date of death"),
               ("Nationality", "nationality"), ("Occupation", "occupation"),
               ("Notable Works", "notable works"), ("Education", "education")],
    "lake": [("Area", "surface area"), ("Depth", "depth"), ("Elevation", "elevation"),
             ("Volume", "volume")],
    "river": [("Length", "length"), ("Source", "source"), ("Mouth", "mouth"),
              ("Discharge", "discharge")],
    "bridge": [("Length", "length"), ("Height", "height"), ("Architect", "architect"),
               ("Construction Start", "construction start date")],
    "tower": [("Height", "height"), ("Architect", "architect"),
              ("Construction Start", "construction start date")],
    "university": [("Established", "founding date"), ("Student Population", "student population"),
                   ("Faculties", "faculties"), ("Location", "location")],
    "company": [("Founded", "founding date"), ("Headquarters", "headquarters"),
                ("Products", "products"), ("Revenue", "revenue")],
    "band": [("Formed Year", "formation year"), ("Genre", "genre"), ("Members", "members"),
             ("Albums", "albums")],
    "mountain": [("Elevation", "elevation"), ("First Ascent", "first ascent"),
                 ("Location", "location")],
    "bird": [("Wingspan", "wingspan"), ("Weight", "weight"), ("Diet", "diet"),
             ("Habitat", "habitat"), ("Lifespan", "lifespan")],
    "moon": [("Diameter", "diameter"), ("Density", "density"),
             ("Orbital Period", "orbital period"), ("Discovery Year", "discovery year")],
}
ASPECT_Q = {
    2: ["What are the {p1} and {p2} of {e}?", "Tell me the {p1} and the {p2} of {e}.",
        "Can you give me the {p1} and {p2} for {e}?"],
    3: ["What are the {p1}, {p2}, and {p3} of {e}?",
        "Tell me about the {p1}, {p2}, and {p3} of {e}."],
}

# Dev-only wrappers that lengthen questions (latency replay wants a spread of lengths).
PREFIXES = [
    "Quick question: ",
    "For a pub quiz tonight: ",
    "I'm putting together some notes for a school project and keep mixing this up. ",
    "My friend and I were arguing about this over dinner and neither of us could settle it, so: ",
    "I'm planning a long trip next spring and want to get my facts straight before I go. ",
]
SUFFIXES = [
    " Please keep it brief.",
    " I have seen conflicting answers online.",
    " A short answer with sources would be ideal, since I need to cite it in a report.",
]


def join(items: list[str]) -> str:
    return "|".join(items)


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seen_queries: list[str] = []
        self.seen_q: dict[str, None] = {}
        self.seen_sub: dict[str, None] = {}

    def _accept(self, row: dict, entities: list[str], out: list) -> bool:
        q = row["query"]
        if q in self.seen_q or row["subqueries"] in self.seen_sub:
            return False
        self.seen_q[q] = None
        self.seen_sub[row["subqueries"]] = None
        out.append((row, entities))
        return True

    def pick(self, cat: str, k: int) -> list[str]:
        return self.rng.sample(ENTITIES[cat], k)

    # -- comparison ---------------------------------------------------------------------
    def comparison(self, spec: dict, k: int, short: bool = False) -> tuple[dict, list[str]]:
        cat = self.rng.choice(spec["cats"])
        disp = self.pick(cat, k)
        names = [name_of(d) for d in disp]
        if short:
            tpl = self.rng.choice(SHORT_TWO)
            q = tpl.format(A=names[0], B=names[1], noun=spec["label"].lower())
        else:
            tpl = self.rng.choice(spec["two"] if k == 2 else spec["three"])
            q = tpl.format(A=disp[0], B=disp[1], C=disp[2] if k == 3 else "")
        row = {"query": cap(q), "subqueries": join([f"{n} {spec['label']}" for n in names]),
               "kind": "comparison"}
        return row, names

    # -- chaining -----------------------------------------------------------------------
    def chaining(self, spec: dict) -> tuple[dict, list[str]]:
        cat = self.rng.choice(spec["cats"])
        disp = self.pick(cat, 1)[0]
        name = name_of(disp)
        q = self.rng.choice(spec["q"]).format(e=disp)
        row = {"query": cap(q), "subqueries": join([s.format(e=name) for s in spec["steps"]]),
               "kind": "chaining"}
        return row, [name]

    # -- expansion ----------------------------------------------------------------------
    def expansion_multi(self, label: str, k: int) -> tuple[dict, list[str]]:
        cats, noun = EXPANSION_MULTI[label]
        cat = self.rng.choice(cats)
        disp = self.pick(cat, k)
        names = [name_of(d) for d in disp]
        q = self.rng.choice(EXPANSION_MULTI_Q[k]).format(
            noun=noun, A=disp[0], B=disp[1], C=disp[2] if k == 3 else "")
        row = {"query": cap(q), "subqueries": join([f"{n} {label}" for n in names]),
               "kind": "expansion"}
        return row, names

    def expansion_aspects(self, cat: str, k: int) -> tuple[dict, list[str]]:
        disp = self.pick(cat, 1)[0]
        name = name_of(disp)
        aspects = self.rng.sample(ASPECTS[cat], k)
        phrases = {f"p{i + 1}": a[1] for i, a in enumerate(aspects)}
        q = self.rng.choice(ASPECT_Q[k]).format(e=disp, **phrases)
        row = {"query": cap(q), "subqueries": join([f"{name} {a[0]}" for a in aspects]),
               "kind": "expansion"}
        return row, [name]

    # -- sets ---------------------------------------------------------------------------
    def fill(self, out: list, n: int, make) -> None:
        """Call make(i) until n new rows are accepted (i counts attempts)."""
        start = len(out)
        i = 0
        while len(out) - start < n:
            row, ents = make(i)
            self._accept(row, ents, out)
            i += 1
            if i > 100 * n:
                raise RuntimeError("template space exhausted")

    def build(self, counts: dict, dev: bool) -> list[tuple[dict, list[str]]]:
        rows: list[tuple[dict, list[str]]] = []
        rng = self.rng
        cats_aspects = list(ASPECTS)
        multi_labels = list(EXPANSION_MULTI)

        def comp(i: int):
            spec = COMPARISONS[i % len(COMPARISONS)]
            if dev and rng.random() < 0.2:
                return self.comparison(spec, 2, short=True)
            return self.comparison(spec, 3 if rng.random() < 0.3 else 2)

        def chain(i: int):
            return self.chaining(CHAINS[i % len(CHAINS)])

        def expand(i: int):
            if i % 2 == 0:
                label = multi_labels[(i // 2) % len(multi_labels)]
                return self.expansion_multi(label, 3 if rng.random() < 0.3 else 2)
            cat = cats_aspects[(i // 2) % len(cats_aspects)]
            return self.expansion_aspects(cat, 3 if rng.random() < 0.4 else 2)

        self.fill(rows, counts["comparison"], comp)
        self.fill(rows, counts["chaining"], chain)
        self.fill(rows, counts["expansion"], expand)
        if dev:
            # Lengthen about a third of the dev questions with a prefix and/or suffix.
            for row, _ in rows:
                r = rng.random()
                if r < 0.15:
                    row["query"] = rng.choice(PREFIXES) + row["query"]
                elif r < 0.25:
                    row["query"] = row["query"] + rng.choice(SUFFIXES)
                elif r < 0.33:
                    row["query"] = rng.choice(PREFIXES) + row["query"] + rng.choice(SUFFIXES)
            rng.shuffle(rows)
        return rows


def generate() -> dict[str, list[tuple[dict, list[str]]]]:
    """Returns {"test": [(row, entity names)], "dev": [...]}; test first so dev avoids it."""
    gen = Generator(SEED)
    flagship = (dict(FLAGSHIP), list(FLAGSHIP_ENTITIES))
    test: list = []
    gen._accept(flagship[0], flagship[1], test)
    counts = dict(N_TEST)
    counts["comparison"] -= 1
    test += gen.build(counts, dev=False)
    dev = gen.build(N_DEV, dev=True)
    # Queries are unique across both sets by construction; prefixes only lengthen dev rows.
    test_q = {r["query"] for r, _ in test}
    assert not any(r["query"] in test_q for r, _ in dev)
    return {"test": test, "dev": dev}


def render(rows: list[tuple[dict, list[str]]]) -> bytes:
    lines = [json.dumps({"query": r["query"], "subqueries": r["subqueries"], "kind": r["kind"]},
                        ensure_ascii=False) for r, _ in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def corpus_text(path: Path) -> str | None:
    if not path.is_file():
        return None
    parts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                parts.append(obj["query"])
                parts.append(obj["subqueries"])
    return "\n".join(parts).lower()


def entities_in_corpus(names: list[str], text: str) -> list[str]:
    """Names occurring (case-insensitively, also with whitespace collapsed) in the corpus."""
    collapsed = " ".join(text.split())
    return [n for n in names if n.lower() in text or " ".join(n.lower().split()) in collapsed]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--check", action="store_true",
                    help="regenerate in memory; exit 1 if the files on disk differ")
    args = ap.parse_args(argv)

    text = corpus_text(args.corpus)
    if text is None:
        print(f"note: corpus not found at {args.corpus}; skipping the entity-absence check")
    else:
        bad = entities_in_corpus(all_entity_names(), text)
        if bad:
            print(f"error: entities occur in the corpus {args.corpus}: {bad}", file=sys.stderr)
            return 2
        print(f"checked {len(all_entity_names())} entity names: none occurs in {args.corpus}")

    sets = generate()
    status = 0
    for name in ("test", "dev"):
        data = render(sets[name])
        path = args.out_dir / f"{name}.jsonl"
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                print(f"{path}: differs from the generated content; run train/make_datasets.py")
                status = 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        kinds: dict[str, int] = {}
        for r, _ in sets[name]:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        print(f"{name}: {len(sets[name])} rows {kinds}")
    return status


if __name__ == "__main__":
    sys.exit(main())
