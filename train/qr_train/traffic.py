"""Training rows that look like real search traffic, built from the training split itself.

The corpus holds comparison, chaining and expansion questions in one careful writing style.
Real traffic also has single-fact questions, keyword queries already in search form,
lowercase and unpunctuated questions, misspellings, long questions with context around the
part that matters, and how-to, shopping or open questions. The model has seen none of those,
so it invents words for them. Each epoch mixes in rows of those shapes, made with the templates
below from the training rows' own entities and property phrases (never from held-out rows):

- single:     'how tall is X' -> 'X Height' (a property phrase the corpus uses for X)
- keyword:    'X population' -> unchanged (already a search query)
- lowercase:  a training question lowercased, punctuation dropped -> its target, names as written
- misspelled: a training question with typos in its non-name words -> its target; sometimes a
              typo in a name too, and the target keeps the name spelled right
- comparison: 'is X taller than Y' -> 'X Height | Y Height' (two entities sharing a property phrase);
              'who lived longer, A or B' -> 'A Lifespan | B Lifespan' for people
- long:       a training, single-fact or comparison question inside sentences of context -> its
              target; the context is sometimes joined to the question by a comma
- open:       how-to, shopping and open questions -> unchanged (the words that matter are all there)

Open and long rows fill their slots half the time from open pools (the training questions'
lowercase words, invented words), so the model learns to copy or ignore words, not phrases.
Swapped-in names are shaped like what they name where the property says (a first name for a
birth date, '... Holdings' for a founding date), and some have an apostrophe or hyphen inside
("Kea O'Thrommel", entities.PUNCTUATED_NAME_RATE).

"Unchanged" targets are the query's words with the edge punctuation dropped, so every target
word is grounded in its query (see grounding.py).
"""
from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass

from .corpus import Example
from .entities import PUNCTUATED_NAME_RATE, NameFactory, augment, find_mentions

# How people ask for a property the corpus names. {x} is the entity.
PROPERTY_QUESTIONS: dict[str, list[str]] = {
    "Population": ["what is the population of {x}", "how many people live in {x}", "population of {x}",
                   "how populated is {x}"],
    "Area": ["how big is {x}", "what is the area of {x}", "how large is {x}", "size of {x}"],
    "Area km²": ["how many square kilometers is {x}", "what is the area of {x} in km²"],
    "Established": ["when was {x} established", "what year was {x} established", "how old is {x}"],
    "Founded": ["when was {x} founded", "what year was {x} founded", "who founded {x} and when"],
    "Birth Date": ["when was {x} born", "what is the birth date of {x}", "what is {x}'s birthday",
                   "when is {x}'s birthday"],
    "Death Date": ["when did {x} die", "when did {x} pass away", "what year did {x} die"],
    "Height": ["how tall is {x}", "how high is {x}", "what is the height of {x}"],
    "Elevation": ["what is the elevation of {x}", "how high above sea level is {x}", "altitude of {x}"],
    "Length": ["how long is {x}", "what is the length of {x}"],
    "Depth": ["how deep is {x}", "what is the depth of {x}"],
    "Weight": ["how much does {x} weigh", "how heavy is {x}", "weight of a {x}"],
    "Membership": ["how many members does {x} have", "what is the membership of {x}"],
    "Duration": ["how long did {x} last", "what was the duration of {x}"],
    "Origin": ["where does {x} come from", "what is the origin of {x}"],
    "Located In Country": ["which country is {x} in", "what country is {x} located in", "where is {x}"],
    "Release Date": ["when was {x} released", "when did {x} come out"],
    "Publication Date": ["when was {x} published", "when did {x} come out"],
    "Speakers": ["how many people speak {x}", "how many speakers does {x} have"],
    "Wingspan": ["what is the wingspan of {x}", "how wide are the wings of {x}"],
    "Discovery Year": ["when was {x} discovered", "what year was {x} discovered"],
    "Start Date": ["when did {x} start", "when did {x} begin"],
    "End Date": ["when did {x} end", "when was the end of {x}"],
    "Latitude": ["what is the latitude of {x}"],
    "Longitude": ["what is the longitude of {x}"],
    "Coordinates": ["where exactly is {x}", "what are the coordinates of {x}"],
    "Temperature": ["how hot is {x}", "what is the temperature of {x}"],
    "Distance": ["how far is {x}", "what is the distance of {x}"],
    "Located In Continent": ["which continent is {x} in", "what continent is {x} on", "on which continent is {x}"],
    "Located In City": ["which city is {x} in", "what city is {x} located in"],
    "Highest Point": ["what is the highest point of {x}", "what is the highest point in {x}", "highest peak in {x}"],
    "Independence Date": ["when did {x} become independent", "when did {x} gain independence"],
    "Salinity": ["how salty is {x}", "what is the salinity of {x}"],
    "Discovery Date": ["when was {x} discovered", "when did someone discover {x}"],
}
# Two entities compared on a property the corpus names: the comparative people write for it.
COMPARATIVES: dict[str, list[str]] = {
    "Population": ["more populous", "more populated", "bigger by population"],
    "Area": ["bigger", "larger", "bigger in area"],
    "Area km²": ["larger in square kilometers"],
    "Established": ["older", "established earlier"],
    "Founded": ["older", "founded earlier"],
    "Birth Date": ["older", "born earlier", "younger"],
    "Height": ["taller", "higher"],
    "Elevation": ["higher", "higher above sea level"],
    "Length": ["longer"],
    "Depth": ["deeper"],
    "Weight": ["heavier", "lighter"],
    "Membership": ["bigger by membership"],
    "Release Date": ["released earlier", "newer"],
    "Publication Date": ["published earlier", "newer"],
    "Speakers": ["more widely spoken", "spoken by more people"],
    "Wingspan": ["wider in wingspan"],
    "Distance": ["farther away"],
    "Temperature": ["hotter", "colder"],
}
COMPARISON_QUESTIONS = ["is {a} {adj} than {b}", "which one is {adj}, {a} or {b}", "{a} or {b}: which is {adj}",
                        "what is {adj}, {a} or {b}", "{a} vs {b}, which is {adj}", "tell me if {a} is {adj} than {b}",
                        "between {a} and {b}, which is {adj}", "do you know whether {a} is {adj} than {b}"]
# Any other property phrase P of entity X.
GENERIC_QUESTIONS = ["what is the {p} of {x}", "tell me the {p} of {x}", "whats the {p} of {x}",
                     "{x} {p}?", "do you know the {p} of {x}", "I need the {p} of {x}"]
# People compared on how long they lived.
LIFESPAN_QUESTIONS = ["who lived longer, {a} or {b}", "did {a} live longer than {b}", "which one lived longer, {a} or {b}",
                      "{a} or {b}: who had the longer life", "was {a}'s life longer than {b}'s",
                      "between {a} and {b}, who lived longer"]
# 'how old is X' -> 'X Age' for people (entities with a birth date).
AGE_QUESTIONS = ["how old is {x}", "what age is {x}", "how old was {x}"]

# 'Is X older than Y' asks Birth Date of people and Founded or Established of organisations;
# with syllable names alone the model could not tell which (it answered 'Established' for two
# people). Swapped names for these properties are shaped like the kind of thing they name.
PERSON_PROPERTIES = {"Birth Date", "Death Date", "Age", "Lifespan"}
ORGANISATION_PROPERTIES = {"Founded", "Established", "Membership"}
FIRST_NAMES = ["Anna", "Marco", "Sofia", "Liam", "Noah", "Emma", "Olivia", "Lucas", "Mia", "Hugo", "Elena", "Mateo",
               "Clara", "Jonas", "Freya", "Omar", "Aisha", "Kenji", "Priya", "Diego", "Nadia", "Viktor", "Greta",
               "Henrik", "Maya", "Tariq", "Leila", "Pablo", "Ingrid", "Samuel", "Julia", "Felix", "Zara", "Ivan",
               "Chloe", "Arjun", "Mei", "Oscar", "Rosa", "Tobias", "Agnes", "Bruno", "Dmitri", "Fatima", "Gustav",
               "Hana", "Isaac", "Kofi", "Lena", "Magnus", "Nora", "Otto", "Rafael", "Sven", "Theo", "Ursula", "Wanda"]
ORGANISATION_WORDS = ["Industries", "Group", "Company", "Corporation", "Holdings", "Systems", "Bank", "Airlines",
                      "Records", "Foods", "Brewery", "Studios", "Works", "Partners", "Trust", "Society", "College",
                      "Hospital", "Press", "Shipping", "Pharmaceuticals", "Textiles", "Steel", "Railway"]

CONTEXT_BEFORE = [
    "I am writing a school report and need one fact.", "Quick question for a pub quiz tonight:",
    "My friend and I were arguing about this over dinner.", "I was reading an article yesterday and got curious.",
    "Sorry if this is obvious, but", "For a presentation at work next week,", "Settle a bet for me please.",
    "I have been trying to find this out for a while now, and the search results are confusing.",
    "Hello! I hope you can help me with something.", "We are planning a family trip next summer.",
]
CONTEXT_AFTER = [
    "Thanks in advance!", "I need it for my homework.", "Any help is appreciated.",
    "Please keep it short.", "I could not find it anywhere.", "Just curious.",
    "A link to a reference would be great.", "Please cite where it comes from.", "Quick answer please.",
]
# Context written as the start of the question's own sentence ('While making a poster, how tall is X?').
CONTEXT_LEADS = ["While {doing},", "Since {subject} {verb_past} me {when},", "Before my exam tomorrow,",
                 "Out of curiosity,", "For {subject}'s homework,", "As part of {doing},", "Just wondering,",
                 "Random thought {when}:", "Because of a debate {when},", "For a short quiz at work,"]

OPEN_TEMPLATES = [
    "how to {task}", "how do I {task}", "how can I {task} at home", "best way to {task}",
    "tips to {task}", "what is the easiest way to {task}", "step by step guide to {task}",
    "best {product} for {who}", "cheap {product}", "{product} reviews", "which {product} should I buy",
    "{product} under 100 dollars", "compare {product} prices", "is a {product} worth it",
    "why is {thing} important", "what are the benefits of {thing}", "ideas for {thing}",
    "{thing} for beginners", "is {thing} good for {who}",
]
TASKS = ["bake bread", "fix a leaking tap", "learn guitar", "train a puppy", "grow tomatoes", "tie a tie",
         "clean a cast iron pan", "change a flat tire", "write a cover letter", "save money on groceries",
         "make cold brew coffee", "paint a room", "start running", "sleep better", "remove a stripped screw",
         "knit a scarf", "brew beer", "meditate", "plant a tree", "back up a phone", "speed up a laptop",
         "lower a water bill", "fold a fitted sheet", "sharpen a knife", "improve handwriting"]
PRODUCTS = ["running shoes", "laptop", "office chair", "electric kettle", "coffee grinder", "headphones",
            "backpack", "rice cooker", "standing desk", "tent", "winter jacket", "air purifier",
            "baby stroller", "mechanical keyboard", "yoga mat", "water bottle", "e-reader", "blender"]
WHO = ["students", "beginners", "kids", "seniors", "travel", "small apartments", "gamers", "runners",
       "families", "programmers"]
THINGS = ["meditation", "composting", "journaling", "strength training", "public libraries",
          "recycling", "vitamin d", "a birthday party", "a vegetable garden", "remote work",
          "bird watching", "cold showers", "board games", "learning languages"]

# Open vocabulary. With only the lists above, the model learnt those phrases, not the rule
# ("copy the whole question"): a how-to question about anything else came back with words of
# the generative vocabulary swapped in ('how to desert a kettle'). Half of the open and long rows
# are therefore built from these pools, the training split's own lowercase words and invented
# words, so the slots hold words the model cannot have memorised. (The robustness set's words
# were kept out of these lists on purpose: it must stay a test of generalisation.)
VERBS = ["fix", "clean", "build", "choose", "cook", "store", "wash", "paint", "repair", "install",
         "replace", "plant", "grow", "sell", "buy", "rent", "fold", "cut", "measure", "organize",
         "decorate", "cancel", "renew", "update", "unlock", "reset", "register", "prepare", "freeze",
         "polish", "stretch", "feed", "adopt", "protect", "insulate", "recycle", "charge", "pack",
         "heat", "cool", "sew", "iron", "sand", "glue", "hang", "move", "test", "learn", "teach", "draw"]
NOUNS = ["window", "fence", "garage door", "bookshelf", "sofa", "mattress", "printer", "router",
         "dishwasher", "freezer", "chimney", "gutter", "ceiling fan", "balcony", "lawn", "hedge",
         "sweater", "leather boots", "wool socks", "passport", "driving licence", "tax return",
         "pension", "mortgage", "savings account", "credit card", "spreadsheet", "password",
         "smartwatch", "camera lens", "microphone", "drone", "violin", "piano", "chess set",
         "aquarium", "hamster", "parrot", "rabbit", "tortoise", "beehive", "compost heap",
         "pumpkin", "lentils", "pancakes", "dumplings", "lasagna", "omelette", "smoothie",
         "hiking boots", "ski goggles", "canoe", "scooter", "motorbike", "caravan", "sunscreen",
         "toothbrush", "shampoo", "wallpaper", "tiles", "laminate floor", "radiator", "boiler",
         "curtains", "candles", "soap", "jam", "pickles", "yogurt", "noodles", "cheese"]
OPEN_EXTRA_TEMPLATES = [
    "how to {verb} a {noun}", "how do you {verb} {noun}", "how long does it take to {verb} a {noun}",
    "can I {verb} a {noun} myself", "what is the best way to {verb} {noun}", "is it safe to {verb} a {noun}",
    "how often should I {verb} my {noun}", "why does my {noun} {verb2}", "what happens if you {verb} a {noun}",
    "where to buy {noun}", "best {noun} for {who}", "{noun} buying guide", "{noun} vs {noun2}",
    "how much does a {noun} cost", "{adj} {noun} ideas", "what size {noun} do I need",
    "how does a {noun} work", "what causes {noun} to {verb2}", "{verb} {noun} step by step",
    # Topic questions with no "how": the model read some as property look-ups of a made-up
    # entity ("benefits of X" -> "benefits of Tributary To River").
    "benefits of {gerund} {noun}", "{gerund} {noun} benefits", "signs of a broken {noun}", "causes of {noun} {verb2}",
    "why do {noun}s {verb2}", "why is my {noun} so {adj}", "{adj} {noun} recipes", "{noun} ideas for {who}",
    "gift ideas for {who}", "is {gerund} good for you", "risks of {gerund} {noun}", "history of the {noun}",
    "{gerund} tips for {who}", "what to wear for {gerund}", "{noun} near me",
]
# -ing words for the topic templates ("benefits of cycling"). Kept clear of the robustness set.
GERUNDS = ["walking", "cycling", "swimming", "reading", "cooking", "sailing", "climbing", "baking", "gardening",
           "fishing", "jogging", "skating", "rowing", "painting", "singing", "fasting", "stretching", "dancing"]
VERBS_INTRANSITIVE = ["leak", "smell", "squeak", "break", "overheat", "freeze", "shrink", "crack",
                      "rattle", "flicker", "beep", "stop working", "fade", "wobble"]
ADJECTIVES = ["cheap", "easy", "quick", "healthy", "small", "quiet", "durable", "portable", "modern",
              "simple", "vegan", "budget", "eco friendly", "kid friendly", "waterproof"]
# Sentences of context around a question, built from slots (plus the fixed lists above).
CONTEXT_FRAMES = [
    "{Opener} {subject} {verb_past} me about this {when}.", "{subject_cap} and I {verb_past2} about it {when}.",
    "I am {doing} and {need}.", "{Opener} I am {doing}.", "This came up while I was {doing}.",
    "{subject_cap} {verb_past} me this {when} and I did not know.", "Not urgent, but {need}.",
    "{Opener} {name} here.", "I saw something about {topic} {when}.", "{Opener} I hope this is the right place.",
]
OPENERS = ["Hi.", "Hello,", "Hey,", "Good morning.", "Good evening!", "Hi all,", "Greetings.", "Okay so", "Um,"]
SUBJECTS = ["my brother", "my sister", "my neighbour", "my teacher", "my boss", "my grandmother",
            "my roommate", "my uncle", "a coworker", "my son", "my niece", "our coach", "my partner"]
VERBS_PAST = ["asked", "told", "reminded", "texted", "emailed", "quizzed"]
VERBS_PAST2 = ["argued", "talked", "joked", "wondered", "disagreed", "read"]
WHENS = ["yesterday", "last week", "this morning", "on the bus", "during lunch", "at dinner",
         "over the weekend", "on a podcast", "in class", "at work today"]
DOINGS = ["preparing a presentation", "filling in a worksheet", "making flash cards", "writing an essay",
          "editing a newsletter", "checking some notes", "planning a lesson", "making a poster",
          "updating a wiki page", "drafting a speech", "studying for an exam", "building a slide deck"]
NEEDS = ["I need one quick fact", "I want to double check", "I would like a short answer",
         "I keep getting different numbers", "I only need the basics", "a link would help"]
AFTER_FRAMES = ["Thanks, {name}!", "Cheers.", "Much appreciated.", "Have a nice day.", "No rush.",
                "Ok thanks.", "Best wishes, {name}.", "That is all.", "{Opener} that is my question."]

_EDGE = re.compile(r"^[^\w]+|[^\w]+$", re.UNICODE)
_KEYBOARD = {c: n for c, n in zip("qwertyuiopasdfghjklzxcvbnm", "wqrtyuiopoasdfghjkllzxcvbnm")}


def echo_target(query: str) -> tuple[str, ...]:
    """The query as one subquery, edge punctuation dropped from every word."""
    words = [_EDGE.sub("", w) for w in query.split()]
    return (" ".join(w for w in words if w),)


def typo(word: str, rng: random.Random) -> str:
    """One keyboard slip: swap, drop, double or mistype a letter (never the first)."""
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(4)
    if op == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:
        return word[:i] + word[i + 1:]
    if op == 2:
        return word[:i] + word[i] + word[i:]
    return word[:i] + _KEYBOARD.get(word[i].lower(), word[i]) + word[i + 1:]


def _lowercase_names(ex: Example) -> tuple[str, ...]:
    """The example's subqueries with each name written as a lowercased query writes it."""
    subs = ex.subqueries
    for m in find_mentions(ex):
        subs = tuple(re.sub(r"(?<!\w)" + re.escape(m.name) + r"(?!\w)", m.name.lower(), s) for s in subs)
    return subs


def _unpunctuate(text: str) -> str:
    return " ".join(w for w in (re.sub(r"[?!.,;:]+$", "", t) for t in text.split()) if w)


@dataclass
class Facts:
    """(entity, property phrase) pairs of the training rows, and their entities' names."""

    pairs: list[tuple[str, str]]
    people: list[str]

    @classmethod
    def from_examples(cls, train: list[Example], min_entities: int = 5) -> "Facts":
        """Properties asked of at least `min_entities` entities: a phrase seen once is more
        often a mis-split name ('168 84') than a property."""
        pairs: dict[tuple[str, str], None] = {}
        for ex in train:
            for m in find_mentions(ex):
                for sub in ex.subqueries:
                    if sub.startswith(m.name + " "):
                        prop = sub[len(m.name) + 1:]
                        if len(prop.split()) <= 4 and prop[:1].isupper():
                            pairs.setdefault((m.name, prop), None)
        entities: dict[str, set[str]] = defaultdict(set)
        for name, prop in pairs:
            entities[prop].add(name)
        kept = [(n, p) for n, p in pairs if len(entities[p]) >= min_entities]
        people = sorted(entities["Birth Date"] | entities["Death Date"])
        return cls(kept, people)


def lowercase_words(train: list[Example], min_count: int = 2) -> list[str]:
    """The lowercase words (3+ letters) of the training questions, each seen at least `min_count`
    times: filler for open questions and context that the model must copy or ignore, not learn."""
    counts: dict[str, int] = defaultdict(int)
    for ex in train:
        for w in re.findall(r"[A-Za-z]+", ex.query):
            if w.islower() and len(w) >= 3:
                counts[w] += 1
    return sorted(w for w, n in counts.items() if n >= min_count) or ["notes"]


class TrafficMaker:
    """Makes traffic-shaped rows for one epoch; a pure function of (train, seed, epoch)."""

    KINDS = ("single", "comparison", "keyword", "lowercase", "misspelled", "long", "open")

    def __init__(self, train: list[Example], facts: Facts, names: NameFactory, aug_rate: float, seed: int):
        self.train, self.facts, self.names, self.aug_rate = train, facts, names, aug_rate
        self.rng = random.Random(seed)
        self.pool = lowercase_words(train)
        self.comparable = sorted({p for _, p in facts.pairs if p in COMPARATIVES})
        self.surnames = sorted({n.split()[-1] for n in facts.people if len(n.split()) >= 2 and n.split()[-1].isalpha()})

    def _entity(self, name: str, prop: str | None = None) -> str:
        """`name`, or (at aug_rate) another name; shaped like a person's or an organisation's
        name when the property says which it is."""
        rng = self.rng
        if rng.random() >= self.aug_rate:
            return name
        if prop in PERSON_PROPERTIES and rng.random() < 0.8:
            return self._person()
        if prop in ORGANISATION_PROPERTIES and rng.random() < 0.7:
            return f"{self.names.invented()} {rng.choice(ORGANISATION_WORDS)}"
        return self._title() if rng.random() < 0.08 else self.names.any_name(name)

    def _person(self) -> str:
        """A first name and a surname. Half the first names are invented: a listed one alone
        taught the model a list ('Fenwick Ashgrove', not on it, was taken for a company)."""
        rng = self.rng
        surname = rng.choice(self.surnames) if self.surnames and rng.random() < 0.3 else self.names.word()
        first = rng.choice(FIRST_NAMES) if rng.random() < 0.5 else self.names.word()
        return f"{first} {surname}"

    def _title(self) -> str:
        """A name with small words inside, as titles have ('The Quiet Harbour', 'Ink and Ember'):
        the whole title is the name, not two names joined by 'and'."""
        w = self.names.word
        return self.rng.choice([f"{w()} and {w()}", f"The {w()} {w()}", f"{w()} of the {w()}", f"The {w()}s"])

    def comparison(self) -> Example:
        rng = self.rng
        if self.facts.people and rng.random() < 0.08:
            return self._lifespan_comparison()
        if not self.comparable:
            return self.single()
        prop = rng.choice(self.comparable)
        names = [n for n, p in self.facts.pairs if p == prop]
        a, b = (self._entity(n, prop) for n in rng.sample(names, 2)) if len(names) >= 2 else (self._entity(names[0], prop),) * 2
        if a == b:
            return self.single()
        q = rng.choice(COMPARISON_QUESTIONS).format(a=a, b=b, adj=rng.choice(COMPARATIVES[prop]))
        return self._styled(q, (f"{a} {prop}", f"{b} {prop}"), "comparison")

    def _lifespan_comparison(self) -> Example:
        """'Who lived longer, A or B' -> 'A Lifespan | B Lifespan': the corpus asks Lifespan of
        animals only, and answered the README's first example with 'Length'."""
        rng = self.rng
        a, b = (self._entity(n, "Lifespan") for n in rng.sample(self.facts.people, 2))
        if a == b:
            return self.single()
        q = rng.choice(LIFESPAN_QUESTIONS).format(a=a, b=b)
        return self._styled(q, (f"{a} Lifespan", f"{b} Lifespan"), "comparison")

    def _question(self) -> Example:
        """A question of the kinds the other shapes are made of: the corpus's, single-fact or comparison."""
        r = self.rng.random()
        return self._corpus_row() if r < 0.5 else self.single() if r < 0.75 else self.comparison()

    def single(self) -> Example:
        rng = self.rng
        if self.facts.people and rng.random() < 0.08:
            x = self._entity(rng.choice(self.facts.people), "Age")
            return self._styled(rng.choice(AGE_QUESTIONS).format(x=x), (f"{x} Age",), "single")
        name, prop = rng.choice(self.facts.pairs)
        x = self._entity(name, prop)
        templates = PROPERTY_QUESTIONS.get(prop) or GENERIC_QUESTIONS
        if prop in PROPERTY_QUESTIONS and rng.random() < 0.25:
            templates = GENERIC_QUESTIONS
        q = rng.choice(templates).format(x=x, p=prop.lower())
        return self._styled(q, (f"{x} {prop}",), "single")

    def _styled(self, q: str, target: tuple[str, ...], kind: str) -> Example:
        """Half written carefully (capital, question mark), half as typed into a search box."""
        if self.rng.random() < 0.5:
            q = q[:1].upper() + q[1:]
            q = q if q.endswith("?") else q + "?"
        return Example(q, target, kind)

    def keyword(self) -> Example:
        rng = self.rng
        name, prop = rng.choice(self.facts.pairs)
        x = self._entity(name, prop)
        q = rng.choice([f"{x} {prop}", f"{x} {prop.lower()}", f"{x.lower()} {prop.lower()}", x, f"{prop.lower()} {x}"])
        return Example(q, echo_target(q), "keyword")

    def _corpus_row(self) -> Example:
        return augment(self.rng.choice(self.train), self.names, self.aug_rate)

    def lowercase(self) -> Example:
        ex = self._question()
        q = ex.query.lower()
        if self.rng.random() < 0.7:
            q = _unpunctuate(q)
        return Example(q, _lowercase_names(ex), "lowercase")

    def misspelled(self) -> Example:
        rng = self.rng
        ex = rng.choice(self.train) if rng.random() < 0.3 else self._question()
        name_words = {w.lower() for m in find_mentions(ex) for w in m.query_text.split()}
        words = ex.query.split()
        plain = [i for i, w in enumerate(words) if len(w) >= 4 and w.lower().strip("?,.!") not in name_words]
        for i in rng.sample(plain, min(len(plain), rng.choice([1, 1, 2]))):
            words[i] = typo(words[i], rng)
        if ex in self.train and rng.random() < 0.5:
            # A misspelled known name: the target keeps the spelling the training data uses.
            names = [i for i, w in enumerate(words) if len(w) >= 5 and w.lower().strip("?,.!") in name_words]
            if names:
                i = rng.choice(names)
                words[i] = typo(words[i], rng)
        q = " ".join(words)
        if rng.random() < 0.4:
            q = q.lower()
        return Example(q, ex.subqueries, "misspelled")

    def long(self) -> Example:
        """A question inside sentences of context, or led into by a clause of context."""
        rng = self.rng
        ex = self._question()
        if rng.random() < 0.3:
            lead = self._fill(rng.choice(CONTEXT_LEADS))
            q = ex.query if rng.random() < 0.5 else ex.query[:1].upper() + ex.query[1:]
            parts = [lead, q]
        else:
            parts = [self._context(CONTEXT_BEFORE, CONTEXT_FRAMES), ex.query]
        if rng.random() < 0.2:
            parts.insert(0, self._context(CONTEXT_BEFORE, CONTEXT_FRAMES))
        if rng.random() < 0.5:
            parts.append(self._context(CONTEXT_AFTER, AFTER_FRAMES))
        if rng.random() < 0.2:
            # Typed all in lowercase, as chat messages often are: the names too.
            return Example(" ".join(parts).lower(), _lowercase_names(ex), "long")
        return Example(" ".join(parts), ex.subqueries, "long")

    def _context(self, fixed: list[str], frames: list[str]) -> str:
        """One sentence of context: a fixed one, a frame with its slots filled, or random words."""
        rng = self.rng
        r = rng.random()
        if r < 0.3:
            return rng.choice(fixed)
        if r < 0.8:
            return self._fill(rng.choice(frames))
        words = [self._noun() if rng.random() < 0.4 else rng.choice(self.pool) for _ in range(rng.randint(4, 9))]
        text = " ".join(words)
        return text[:1].upper() + text[1:] + rng.choice([".", ".", "!", "..."])

    def _fill(self, frame: str) -> str:
        rng = self.rng
        subject = rng.choice(SUBJECTS)
        return frame.format(
            Opener=rng.choice(OPENERS), subject=subject, subject_cap=subject[:1].upper() + subject[1:],
            verb_past=rng.choice(VERBS_PAST), verb_past2=rng.choice(VERBS_PAST2), when=rng.choice(WHENS),
            doing=rng.choice(DOINGS), need=rng.choice(NEEDS), name=self.names.word(), topic=self._noun())

    def _noun(self) -> str:
        """A noun phrase the model cannot have memorised: a listed noun, a word of the training
        questions, or an invented word (sometimes with a listed noun after it)."""
        rng = self.rng
        r = rng.random()
        if r < 0.45:
            return rng.choice(NOUNS)
        if r < 0.7:
            return rng.choice(self.pool)
        word = self.names.word().lower()
        return f"{word} {rng.choice(NOUNS).split()[-1]}" if rng.random() < 0.3 else word

    def open(self) -> Example:
        rng = self.rng
        if rng.random() < 0.5:
            q = rng.choice(OPEN_TEMPLATES).format(task=rng.choice(TASKS), product=rng.choice(PRODUCTS),
                                                  who=rng.choice(WHO), thing=rng.choice(THINGS))
        else:
            q = rng.choice(OPEN_EXTRA_TEMPLATES).format(
                verb=rng.choice(VERBS), noun=self._noun(), noun2=self._noun(), verb2=rng.choice(VERBS_INTRANSITIVE),
                who=rng.choice(WHO), adj=rng.choice(ADJECTIVES), gerund=rng.choice(GERUNDS))
        if rng.random() < 0.3:
            q = q[:1].upper() + q[1:] + "?"
        return Example(q, echo_target(q), "open")

    def rows(self, n: int) -> list[Example]:
        # Copying lowercase names and leaving search-form queries alone took the longest to learn.
        # Long and open rows were raised from 0.12 and 0.14 when their slots went open-vocabulary.
        # Comparison rows were added beside the corpus's own comparisons, in the plainer forms
        # people type; long rows took more weight when their questions went beyond the corpus's.
        weights = {"single": 0.15, "comparison": 0.08, "keyword": 0.14, "lowercase": 0.17, "misspelled": 0.14,
                   "long": 0.19, "open": 0.13}
        kinds = self.rng.choices(list(weights), weights=list(weights.values()), k=n)
        return [getattr(self, kind)() for kind in kinds]


def epoch_rows(train: list[Example], facts: Facts, real_names: list[str], seed: int, epoch: int,
               aug_rate: float, n: int) -> list[Example]:
    names = NameFactory(seed * 7_919 + epoch, real_names, punctuated_rate=PUNCTUATED_NAME_RATE)
    return TrafficMaker(train, facts, names, aug_rate, seed * 1_000_003 + epoch).rows(n)


def kind_counts(rows: list[Example]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in rows:
        out[r.kind] += 1
    return dict(out)
