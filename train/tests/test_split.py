from collections import defaultdict

from qr_train.corpus import classify_kind, load_corpus, load_splits, split_of, split_target


def test_every_group_lands_on_exactly_one_side(corpus_path):
    splits = load_splits(corpus_path)
    sides = defaultdict(set)
    for name, examples in splits.items():
        for ex in examples:
            sides[ex.subqueries].add(name)
    leaked = {k: v for k, v in sides.items() if len(v) > 1}
    assert not leaked, f"{len(leaked)} groups on more than one side, e.g. {next(iter(leaked))}"


def test_split_sizes_are_roughly_80_10_10(corpus_path):
    splits = load_splits(corpus_path)
    total = sum(len(v) for v in splits.values())
    assert total == len(load_corpus(corpus_path))
    for name, lo, hi in (("train", 0.75, 0.85), ("validation", 0.07, 0.13), ("test", 0.07, 0.13)):
        assert lo < len(splits[name]) / total < hi, (name, len(splits[name]))


def test_split_depends_only_on_the_group_value():
    a = "Charles Alton Ellis Birth Date|Al Gore Birth Date"
    assert split_of(a) == split_of(str(a))
    sides = {split_of(f"Entity {i} Population|Other {i} Population") for i in range(200)}
    assert sides == {"train", "validation", "test"}


def test_split_target_cleans_double_spaces_and_empties():
    assert split_target("Needles  California Part Of Desert| |Desert Located In Country") == (
        "Needles California Part Of Desert", "Desert Located In Country")


def test_kind_heuristic():
    assert classify_kind(("Desert Located In Country", "Country Part Of Continent")) == "chaining"
    assert classify_kind(("X Birth Date", "Y Birth Date")) == "comparison"
    assert classify_kind(("Haka Origin", "Haka Meaning")) == "expansion"
