import re

from qr_train.corpus import Example
from qr_train.entities import NameFactory, augment, find_mentions, substitute


def ex(q, *subs):
    return Example(q, tuple(subs), "")


def test_finds_names_not_properties():
    e = ex("Who was born first, Charles Alton Ellis or Al Gore?", "Charles Alton Ellis Birth Date", "Al Gore Birth Date")
    assert sorted(m.name for m in find_mentions(e)) == ["Al Gore", "Charles Alton Ellis"]


def test_lowercase_type_words_in_chains_are_not_names():
    e = ex("Which country borders the country where Gifu Prefecture is?",
           "Gifu Prefecture Located In Country", "Country Has Neighbor Country")
    assert [m.name for m in find_mentions(e)] == ["Gifu Prefecture"]


def test_substitute_is_consistent_and_handles_commas():
    e = ex("What are the populations of Te Anau and Woodend, Victoria?", "Te Anau Population", "Woodend Victoria Population")
    out = substitute(e, {"Te Anau": "Quarn", "Woodend Victoria": "Zel Hollow"})
    assert out.query == "What are the populations of Quarn and Zel Hollow?"
    assert out.subqueries == ("Quarn Population", "Zel Hollow Population")


def test_augment_swaps_every_name_in_both_sides():
    e = ex("Which is taller, Sky Tower or Auckland Harbour Bridge?", "Sky Tower Height", "Auckland Harbour Bridge Height")
    out = augment(e, NameFactory(3), rate=1.0)
    assert "Sky Tower" not in out.query and "Auckland Harbour Bridge" not in out.query
    for sub in out.subqueries:
        name = sub.rsplit(" Height", 1)[0]
        assert name in out.query


_INSIDE = re.compile(r"\w['’-]\w")


def test_punctuated_names_have_an_apostrophe_or_hyphen_inside_a_word():
    names = NameFactory(5)
    made = [names.punctuated() for _ in range(200)]
    assert all(_INSIDE.search(n) for n in made), [n for n in made if not _INSIDE.search(n)]
    assert any("'" in n for n in made) and any("’" in n for n in made) and any("-" in n for n in made)


def test_punctuated_rate_sets_the_share_of_such_names_and_zero_draws_none():
    e = ex("Which is taller, Sky Tower or Auckland Harbour Bridge?", "Sky Tower Height", "Auckland Harbour Bridge Height")
    always = NameFactory(3, punctuated_rate=1.0)
    for _ in range(20):
        out = augment(e, always, rate=1.0)
        assert all(_INSIDE.search(s.rsplit(" Height", 1)[0]) for s in out.subqueries), out
        assert all(s.rsplit(" Height", 1)[0] in out.query for s in out.subqueries), out
    # The default (0) leaves the rng stream as it was: these are the names the code before the
    # rate gave, so corpus rows and the unseen-name probe keep theirs.
    old = NameFactory(3, ["Al Gore", "Te Anau"])
    assert [old.any_name("Sky Tower") for _ in range(4)] == ["Al Te Anau", "Gore Anau", "Suvzhyrt10 Tower",
                                                             "Triastäzou65 Tower"]
    plain = NameFactory(3)
    assert not any(_INSIDE.search(plain.invented()) for _ in range(300))
