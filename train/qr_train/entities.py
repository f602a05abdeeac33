"""Entity names in (query, subqueries) pairs: finding them, and swapping them consistently.

Real traffic is mostly about entities the model never saw, so it must copy names from the
query instead of writing ones it memorised. Training swaps entity names for other names
(invented ones, or names from other groups) in query and subqueries alike; evaluation swaps
held-out rows' names for invented names that never occur in training and counts how many
come back exactly.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .corpus import Example

_WORD = re.compile(r"[\w'’.-]+", re.UNICODE)
# What may separate two words of one name in a query: spaces, commas ("Woodend, Victoria").
_SEP = r"[\s,]+"


@dataclass(frozen=True)
class Mention:
    """One entity: its text in the subqueries and the exact substring it occupies in the query."""

    name: str
    query_text: str


def _query_pattern(words: list[str]) -> re.Pattern:
    return re.compile(
        r"(?<![\w])" + _SEP.join(re.escape(w) for w in words) + r"(?![\w])", re.IGNORECASE
    )


def find_mentions(example: Example) -> list[Mention]:
    """Entities = the longest leading word run of each subquery that also occurs in the query.

    'Charles Alton Ellis Birth Date' in a query naming 'Charles Alton Ellis' gives that name;
    the property words after it stay. A run must start with a capital letter or digit in the
    subquery and in the query, so a type word in a chaining step ('Country Part Of Continent',
    asked as '... the country ...') is never taken for a name.
    """
    mentions: dict[str, Mention] = {}
    for sub in example.subqueries:
        words = sub.split()
        if not words or not (words[0][0].isupper() or words[0][0].isdigit()):
            continue
        for end in range(len(words), 0, -1):
            # Leave at least one property word when the subquery has more than one word.
            if end == len(words) and len(words) > 1:
                continue
            match = next(
                (m for m in _query_pattern(words[:end]).finditer(example.query)
                 if m.group(0)[0].isupper() or m.group(0)[0].isdigit()),
                None,
            )
            if match:
                name = " ".join(words[:end])
                if len(name) >= 3 and name.lower() not in mentions:
                    mentions[name.lower()] = Mention(name, match.group(0))
                break
    # Longest first, so a name never gets replaced inside a longer one.
    return sorted(mentions.values(), key=lambda m: -len(m.name))


def substitute(example: Example, mapping: dict[str, str]) -> Example:
    """Replace each mention (by subquery name) with mapping[name], in query and subqueries."""
    query = example.query
    subs = list(example.subqueries)
    for mention in find_mentions(example):
        new = mapping.get(mention.name)
        if new is None:
            continue
        query = _query_pattern(mention.query_text.replace(",", " ").split()).sub(lambda _: new, query)
        word_re = re.compile(r"(?<![\w])" + re.escape(mention.name) + r"(?![\w])")
        subs = [word_re.sub(lambda _: new, s) for s in subs]
    return Example(query, tuple(subs), example.kind)


_ONSETS = ["b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kl", "l", "m", "n",
           "p", "pr", "qu", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z", "zh", ""]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ou", "y", "ia", "ä", "é"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "k", "x", "nd", "rt", "st", "v"]
_TYPE_WORDS = ["River", "Bridge", "Tower", "University", "Lake", "Mountain", "Island", "City",
               "District", "Company", "Museum", "Club", "Airport", "Park", "Republic", "Band",
               "Institute", "Valley", "Bay", "Festival"]


# Share of swapped-in training names written with an apostrophe or hyphen inside
# ("Kea O'Thrommel", "Brasta-Vell"). The corpus has 5 training targets with an apostrophe inside
# a word, so the model had learnt to stop a name at one: "Shaquille O'Neal" came back "Shaquille O".
PUNCTUATED_NAME_RATE = 0.06


class NameFactory:
    """Invents plausible names ('Vorlasten Bridge', 'Kea Thrommel') from random syllables."""

    def __init__(self, seed: int, real_names: list[str] | None = None, forbidden: set[str] | None = None,
                 punctuated_rate: float = 0.0):
        self.rng = random.Random(seed)
        self.real_names = real_names or []
        self.forbidden = {f.lower() for f in (forbidden or set())}
        # 0 draws nothing from the rng, so the probe's names (unseen.py) stay what they were.
        self.punctuated_rate = punctuated_rate

    def word(self) -> str:
        n = self.rng.choice([1, 2, 2, 2, 3, 3])
        text = "".join(
            self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS) for _ in range(n)
        )
        if self.rng.random() < 0.05:
            text += str(self.rng.randint(2, 99))
        return text[:1].upper() + text[1:]

    def invented(self, like: str | None = None) -> str:
        while True:
            words = [self.word() for _ in range(self.rng.choice([1, 2, 2, 2, 3]))]
            last = like.split()[-1] if like else None
            if last and last in _TYPE_WORDS and self.rng.random() < 0.5:
                words[-1] = last  # keep 'Bridge' in 'X Bridge' half of the time
            elif self.rng.random() < 0.15:
                words.append(self.rng.choice(_TYPE_WORDS))
            name = " ".join(words)
            if name.lower() not in self.forbidden:
                return name

    def recombined(self) -> str:
        """Words of real names put together anew ('Waiheke Napier University'): familiar pieces,
        unfamiliar whole."""
        picks = [self.rng.choice(self.real_names).split() for _ in range(self.rng.choice([2, 2, 3]))]
        name = " ".join(self.rng.choice([w for w in p if w[:1].isupper()] or ["Nova"]) for p in picks)
        return name if name.lower() not in self.forbidden else self.invented()

    def punctuated(self) -> str:
        """An invented name with an apostrophe or hyphen inside a word, as Irish, French, Italian
        and double-barrelled names have ("Kea O'Thrommel", "Vel d'Astrua", "Brasta-Vell")."""
        w = self.word
        apostrophe = self.rng.choice(["'", "'", "'", "’"])
        return self.rng.choice([
            f"{w()} O{apostrophe}{w()}", f"{w()} D{apostrophe}{w()}", f"{w()} d{apostrophe}{w()}",
            f"{w()} {w()}-{w()}", f"{w()}-{w()}", f"{w()}{apostrophe}s {self.rng.choice(_TYPE_WORDS)}",
        ])

    def any_name(self, like: str | None = None) -> str:
        """Mostly invented names; some recombined or real names from elsewhere in the corpus, and
        (with `punctuated_rate`) some with an apostrophe or hyphen inside."""
        if self.punctuated_rate and self.rng.random() < self.punctuated_rate:
            return self.punctuated()
        r = self.rng.random()
        if self.real_names and r < 0.2:
            return self.rng.choice(self.real_names)
        if self.real_names and r < 0.4:
            return self.recombined()
        return self.invented(like)


def augment(example: Example, names: NameFactory, rate: float) -> Example:
    """With probability `rate`, swap every entity of the example for another name."""
    if names.rng.random() >= rate:
        return example
    mentions = find_mentions(example)
    if not mentions:
        return example
    return substitute(example, {m.name: names.any_name(m.name) for m in mentions})


def collect_names(examples: list[Example]) -> list[str]:
    """Entity names of the examples, less single common nouns ('Island', 'Country')."""
    common = {w for ex in examples for w in _WORD.findall(ex.query) if w.islower()}
    seen: dict[str, None] = {}
    for ex in examples:
        for m in find_mentions(ex):
            if len(m.name) >= 4 and not (" " not in m.name and m.name.lower() in common):
                seen.setdefault(m.name, None)
    return list(seen)
