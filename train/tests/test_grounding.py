"""The grounding rule against the hand-written golden cases shared with the Rust tests."""
import json

import numpy as np
import pytest

from qr_train import grounding as g

GOLDEN = json.loads(g.GOLDEN.read_text(encoding="utf-8"))
RULES = g.Rules.from_json(GOLDEN["rules"])


def test_defaults_match_the_golden_file():
    d = GOLDEN["defaults"]
    assert g.DEFAULT_GUARDS == d["guards"]
    assert g.DEFAULT_STOPWORDS == d["stopwords"]
    assert g.DEFAULT_FUZZY == d["fuzzy"]


@pytest.mark.parametrize("case", GOLDEN["query_words"], ids=lambda c: c["query"])
def test_query_words(case):
    words = g.query_words(case["query"])
    for w in case["contains"]:
        assert g.fold(w) in words, w
    for w in case["excludes"]:
        assert g.fold(w) not in words, w


@pytest.mark.parametrize("case", GOLDEN["grounded"], ids=lambda c: f'{c["query"]}:{c["word"]}')
def test_grounded(case):
    assert g.QueryContext(case["query"], RULES).grounded(case["word"]) == case["grounded"]


@pytest.mark.parametrize("case", GOLDEN["sanitize"], ids=lambda c: c["text"])
def test_sanitize(case):
    subs, reason = g.sanitize(case["text"], case["query"], RULES)
    assert (subs, reason) == (case["subqueries"], case["fallback"])
    if reason == g.NONE:
        assert not g.is_degenerate(subs, case["query"], RULES)
        assert not g.has_invented_word(subs, case["query"], RULES)


@pytest.mark.parametrize("case", GOLDEN["sanitize_without_rules"], ids=lambda c: c["text"])
def test_sanitize_without_rules(case):
    assert g.sanitize(case["text"], case["query"], None) == (case["subqueries"], case["fallback"])


@pytest.mark.parametrize("case", GOLDEN["degenerate"], ids=lambda c: "|".join(c["subqueries"]))
def test_degenerate(case):
    assert g.is_degenerate(case["subqueries"], case["query"], RULES) == case["degenerate"]


def test_low_confidence_falls_back_when_a_threshold_is_set():
    rules = g.Rules.from_json({**GOLDEN["rules"], "min_mean_logprob": -1.0})
    assert g.sanitize("Tesla Lifespan", "tesla", rules, mean_logprob=-0.5)[1] == g.NONE
    assert g.sanitize("Tesla Lifespan", "tesla", rules, mean_logprob=-2.0) == (["tesla"], g.LOW_CONFIDENCE)


@pytest.mark.parametrize("case", GOLDEN["tokens"]["cases"], ids=lambda c: c["query"])
def test_token_automaton(case):
    tok = GOLDEN["tokens"]
    model = g.TokenGrounding(tok["pieces"], RULES, tok["eos"], tok["special"])
    state = model.for_query(case["query"])
    for piece, allowed in case["steps"]:
        token = tok["pieces"].index(piece)
        assert state.allowed(token) == allowed, piece
        if allowed:
            state.commit(token)


def test_choose_never_takes_a_disallowed_token_even_when_it_ranks_first():
    tok = GOLDEN["tokens"]
    model = g.TokenGrounding(tok["pieces"], RULES, tok["eos"], tok["special"])
    state = model.for_query("How long did Nikola Tesla live?")
    logits = np.full(len(tok["pieces"]), -10.0, dtype=np.float32)
    logits[tok["pieces"].index("▁Edison")] = 9.0
    logits[tok["pieces"].index("<unk>")] = 8.0
    logits[tok["pieces"].index("▁Tesla")] = 1.0
    assert tok["pieces"][state.choose(logits, top_k=2)] == "▁Tesla"


def test_learned_sizes_hold_every_training_target():
    from qr_train.corpus import Example
    rows = [Example("Who lived longer, Ada or Bo?", ("Ada Lifespan", "Bo Lifespan")),
            Example("Where is Lake X?", ("Lake X Located In Country", "Country Country Part Of Continent"))]
    data = g.learn(rows, min_targets=1)
    assert "lifespan" in data["generative_words"] and "ada" not in data["generative_words"]
    assert data["guards"]["max_word_repeats"] == 2 and data["guards"]["max_subquery_words"] == 5
    rules = g.Rules.from_json(data)
    for ex in rows:
        assert g.sanitize(ex.target, ex.query, rules) == (list(ex.subqueries), g.NONE)


def test_guards_are_tightened_only_while_validation_references_survive():
    from qr_train.corpus import Example
    val = [Example("Where is Lake X?", ("Lake X Located In Country Country",)),
           Example("Who is older, Ada or Bo?", ("Ada Birth Date", "Bo Birth Date"))]
    loosest = {"max_subquery_words": 12, "max_word_repeats": 3, "no_repeat_ngram": 4, "max_subqueries": 9}
    assert g.choose_guards(loosest, val) == {"max_subquery_words": 6, "max_word_repeats": 2, "no_repeat_ngram": 2,
                                             "max_subqueries": 2}


def test_traffic_rows_add_known_words_but_no_generative_word(corpus_path):
    """The generative vocabulary is what the model may write anywhere. Traffic rows reuse the
    training split's property phrases in new targets (counting one row's phrase many times) and
    misspelled ones lack the right spelling of their names in the query ('Melbourne' would become
    a word any answer may hold), so they feed only the known words and the guard sizes."""
    train, traffic, _ = g.training_rows(corpus_path)
    assert traffic and not any(r.kind in ("open", "misspelled") for r in traffic)
    alone, both = g.learn(train), g.learn(train, traffic)
    assert both["generative_words"] == alone["generative_words"]
    assert set(both["known_words"]) > set(alone["known_words"])


def test_a_word_written_in_one_target_only_is_not_generative():
    """'Frodo' written once (a row's world knowledge) must not become a word any answer may hold;
    a property written in two distinct targets must."""
    from qr_train.corpus import Example
    rows = [Example("Main characters of The Lord of the Rings?",
                    ("The Lord of the Rings Frodo", "The Lord of the Rings Gandalf")),
            Example("How tall is Ada Tower?", ("Ada Tower Height",)),
            Example("Is Bo Bridge taller than Cy Mast?", ("Bo Bridge Height", "Cy Mast Height"))]
    words = g.learn(rows)["generative_words"]
    assert "height" in words
    assert "frodo" not in words and "gandalf" not in words
    assert "frodo" in g.learn(rows, min_targets=1)["generative_words"]
