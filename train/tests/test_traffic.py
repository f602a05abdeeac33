"""Traffic-shaped training rows (qr_train/traffic.py), made from the shared corpus's training split."""
import re

import pytest

from qr_train.corpus import load_splits
from qr_train.entities import collect_names
from qr_train.grounding import fold, query_words
from qr_train.traffic import (COMPARATIVES, CONTEXT_LEADS, FIRST_NAMES, NOUNS, ORGANISATION_WORDS, PRODUCTS, TASKS, THINGS, WHO, Facts, TrafficMaker, epoch_rows,
                              lowercase_words)


@pytest.fixture(scope="module")
def train(corpus_path):
    return load_splits(corpus_path)["train"]


@pytest.fixture(scope="module")
def rows(train):
    return epoch_rows(train, Facts.from_examples(train), collect_names(train), seed=13, epoch=2, aug_rate=0.85, n=1500)


def test_the_same_seed_and_epoch_give_the_same_rows(train, rows):
    again = epoch_rows(train, Facts.from_examples(train), collect_names(train), seed=13, epoch=2, aug_rate=0.85, n=1500)
    assert again == rows
    other = epoch_rows(train, Facts.from_examples(train), collect_names(train), seed=13, epoch=3, aug_rate=0.85, n=1500)
    assert other != rows


def test_every_kind_is_made(rows):
    assert {r.kind for r in rows} == set(TrafficMaker.KINDS)


def test_unchanged_kinds_answer_with_the_query_words(rows):
    for r in rows:
        if r.kind in ("open", "keyword"):
            assert len(r.subqueries) == 1
            words = query_words(r.query)
            assert all(fold(w) in words for w in r.subqueries[0].split()), r


def test_long_rows_hold_a_question_whose_target_they_keep(rows, train):
    queries_of = {}
    for ex in train:
        queries_of.setdefault(ex.subqueries, []).append(ex.query)
    long_rows = [r for r in rows if r.kind == "long"]
    assert long_rows
    # Both sources are used: corpus questions (their target is a training target) and single-fact
    # ones; an unswapped corpus question sits whole inside its context, which adds words.
    from_corpus = [r for r in long_rows if r.subqueries in queries_of]
    assert 0 < len(from_corpus) < len(long_rows)
    for r in from_corpus:
        inner = [q for q in queries_of[r.subqueries] if q.lower() in r.query.lower()]
        assert inner and len(r.query) > len(inner[0]), r


def _fixed_open_phrases() -> list[str]:
    return TASKS + PRODUCTS + THINGS + WHO


def test_open_rows_go_beyond_the_fixed_phrase_lists(rows, train):
    """Half the open rows fill their slots from open pools: words outside the fixed lists, some
    invented, some taken from the training questions."""
    fixed_words = {w for p in _fixed_open_phrases() + NOUNS for w in p.lower().split()}
    template_words = {"how", "to", "do", "i", "you", "can", "a", "the", "best", "for", "is", "it", "my", "what",
                      "of", "way", "does", "why", "where", "buy", "vs", "much", "cost", "size", "need", "work",
                      "step", "by", "should", "often", "long", "take", "myself", "safe", "happens", "if", "causes",
                      "guide", "buying", "ideas", "under", "dollars", "compare", "prices", "which", "cheap",
                      "reviews", "worth", "are", "benefits", "important", "easiest", "beginners", "good", "tips",
                      "at", "home", "an"}
    pool = set(lowercase_words(train))
    open_rows = [r for r in rows if r.kind == "open"]
    novel = set()
    for r in open_rows:
        for w in re.findall(r"[a-z]+", r.query.lower()):
            if w not in fixed_words and w not in template_words:
                novel.add(w)
    assert len(novel) > 40, sorted(novel)
    assert novel & pool, "no word of the training questions filled a slot"
    assert novel - pool, "no invented word filled a slot"


def test_lowercase_words_are_lowercase_and_seen_twice():
    from qr_train.corpus import Example
    rows = [Example("What is the elevation of Mount Cook?", ("Mount Cook Elevation",)),
            Example("Is the elevation of Ben Nevis higher?", ("Ben Nevis Elevation",))]
    assert lowercase_words(rows) == ["elevation", "the"]


def test_comparison_rows_ask_one_property_of_two_named_entities(rows):
    # 'Who lived longer' rows ask Lifespan (test_who_lived_longer_asks_the_lifespan_of_both).
    comparisons = [r for r in rows if r.kind == "comparison" and not r.subqueries[0].endswith(" Lifespan")]
    assert len(comparisons) > 30
    for r in comparisons:
        assert len(r.subqueries) == 2, r
        prop = next(p for p in COMPARATIVES if all(s.endswith(" " + p) for s in r.subqueries))
        names = [s[: -len(prop) - 1] for s in r.subqueries]
        assert names[0] != names[1] and all(n in r.query for n in names), r


def test_long_rows_also_lead_into_the_question_with_a_clause(rows):
    """Some context is a clause of the question's own sentence ('Out of curiosity, how tall is X?'),
    not a sentence of its own."""
    led = [r for r in rows if r.kind == "long" and re.match(r"^[^.!?]+, [A-Za-z]", r.query)
           and r.query.split(", ", 1)[0] + "," in {lead.split("{")[0].strip() for lead in CONTEXT_LEADS}]
    assert led, "no long row starts with a fixed leading clause"


def test_some_names_are_titles_with_small_words_inside(rows):
    """'Ink and Ember Publication Date' is one name: the model must not split it at 'and'."""
    titles = [s for r in rows for s in r.subqueries if re.match(r"^\S+ (and|of the) \S+ ", s) or s.startswith("The ")]
    assert titles


def test_some_names_have_an_apostrophe_or_hyphen_inside_and_come_back_whole(rows):
    """'Shaquille O'Neal' came back 'Shaquille O': names with an apostrophe inside a word must be
    in the rows, copied whole into the target."""
    inside = re.compile(r"\w+(?:['’]\w+)+")
    punctuated = [r for r in rows if any(inside.search(s) for s in r.subqueries) and r.kind != "misspelled"]
    assert len(punctuated) >= 20, len(punctuated)
    for r in punctuated:
        for s in r.subqueries:
            for word in inside.findall(s):
                assert word.lower() in r.query.lower(), r


def test_some_long_rows_are_all_lowercase_with_their_names_lowercased_in_the_target(rows):
    lower = [r for r in rows if r.kind == "long" and r.query == r.query.lower()]
    assert len(lower) >= 10, len(lower)
    # A target that starts with a lowercase word starts with the name, written as the query has it.
    named = [r for r in lower if any(s[:1].islower() for s in r.subqueries)]
    assert len(named) >= len(lower) // 2, (len(named), len(lower))
    for r in named:
        words = query_words(r.query)
        assert all(fold(s.split()[0]) in words for s in r.subqueries if s[:1].islower()), r


def test_open_rows_include_topic_questions_without_how(rows):
    topic = [r for r in rows if r.kind == "open" and re.match(r"^(benefits|risks|history|signs|causes) of ", r.query, re.I)]
    assert topic
    assert all(r.subqueries == (r.query.rstrip("?"),) for r in topic), topic


def test_names_asked_a_birth_date_look_like_people_and_founding_dates_like_organisations(rows):
    """'Is X older than Y' means Birth Date for people and Founded for organisations: the swapped
    names carry the cue (a first name; a word such as 'Holdings')."""
    def names_with(prop):
        return [s[: -len(prop) - 1] for r in rows if r.kind in ("single", "comparison")
                for s in r.subqueries if s.endswith(" " + prop)]
    born = names_with("Birth Date")
    founded = names_with("Founded") + names_with("Established")
    first = set(FIRST_NAMES)
    assert born and founded
    assert sum(n.split()[0] in first for n in born) >= len(born) // 5, born[:20]
    assert not any(n.split()[0] in first for n in founded), [n for n in founded if n.split()[0] in first]
    organisations = set(ORGANISATION_WORDS)
    assert sum(n.split()[-1] in organisations for n in founded) >= len(founded) // 5, founded[:20]


def test_who_lived_longer_asks_the_lifespan_of_both(rows):
    lived = [r for r in rows if r.kind == "comparison" and re.search(r"lived? longer|longer life", r.query, re.I)]
    assert len(lived) >= 5, len(lived)
    for r in lived:
        assert len(r.subqueries) == 2 and all(s.endswith(" Lifespan") for s in r.subqueries), r
        assert all(s[: -len(" Lifespan")] in r.query for s in r.subqueries), r
