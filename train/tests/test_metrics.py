import pytest

from qr_train import subqueries as sq
from qr_train.metrics import MetricTable, exact_match, levenshtein_score, rouge_l, word_tokens


def test_word_tokens_lowercase_alnum_runs():
    assert word_tokens(["Area km²", "Needles,  California"]) == ["area", "km²", "needles", "california"]


def test_rouge_l_by_hand():
    # pred tokens: a b c d ; gold tokens: a c d e f -> LCS 3 (a c d); P = 3/4, R = 3/5
    p, r = 3 / 4, 3 / 5
    assert rouge_l(["a b", "c d"], ["a c d", "e f"]) == pytest.approx(2 * p * r / (p + r))
    assert rouge_l([], ["a"]) == 0.0
    assert rouge_l(["X Y"], ["x y"]) == 1.0


def test_exact_match_is_case_and_space_insensitive_but_ordered():
    assert exact_match(["Al  Gore Birth date"], ["al gore birth date"])
    assert not exact_match(["A", "B"], ["B", "A"])


def test_levenshtein_score():
    assert levenshtein_score(["abcd"], ["abcf"]) == pytest.approx(0.75)
    assert levenshtein_score(["abc"], ["abc", "d"]) == 0.0
    assert levenshtein_score(["ab", "x"], ["ab", "y"]) == pytest.approx(0.5)


def test_table_rows_overall_and_per_kind():
    t = MetricTable()
    t.add(["a b"], ["a b"], "comparison")
    t.add(["c"], ["d", "e"], "chaining")
    rows = {r.name: r for r in t.rows()}
    assert rows["overall"].examples == 2 and rows["overall"].exact_match == 0.5
    assert rows["chaining"].count_accuracy == 0.0 and rows["comparison"].rouge_l == 1.0


def test_split_rule_matches_server():
    assert sq.split(" A  b | | a B |C ", "q") == ["A b", "C"]
    assert sq.split(" | ", " the query ") == ["the query"]
    assert sq.split(sq.join(["x", "y"]), "q") == ["x", "y"]
