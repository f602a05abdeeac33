import numpy as np

from qr_train.constraint import WordConstraint, learn_property_words, query_words
from qr_train.corpus import Example

PIECES = ["<pad>", "</s>", "<unk>", "▁Nikola", "▁Tesla", "▁Edison", "▁Lifespan", "▁|", "▁Tes", "la", "▁lifespan",
          "<0xC3>", "<0x86>", "▁Ed"]
EOS = 1


def run(query, ranking_per_step, words=("Lifespan",)):
    """Feed logits whose ranking is given per step; return the chosen pieces."""
    c = WordConstraint(PIECES, list(words), query, EOS, top_k=4)
    out = []
    for ranking in ranking_per_step:
        logits = np.full(len(PIECES), -10.0)
        for rank, token in enumerate(ranking):
            logits[PIECES.index(token)] = 10.0 - rank
        out.append(PIECES[c.choose(logits)])
    return out


def test_memorised_name_is_replaced_by_the_querys():
    # The model prefers 'Edison' (memorised); the query only names Tesla.
    assert run("How long did Nikola Tesla live?", [["▁Nikola"], ["▁Edison", "▁Tesla"], ["▁Lifespan"], ["</s>"]]) == [
        "▁Nikola", "▁Tesla", "▁Lifespan", "</s>"]


def test_words_are_checked_piece_by_piece():
    # 'Tes' + 'la' spells Tesla; 'Ed' is a prefix of nothing allowed.
    assert run("Tesla?", [["▁Ed", "▁Tes"], ["la"], ["</s>"]]) == ["▁Tes", "la", "</s>"]


def test_lowercase_and_property_words_are_free():
    assert run("tesla?", [["▁lifespan"], ["▁Lifespan"], ["</s>"]]) == ["▁lifespan", "▁Lifespan", "</s>"]
    assert "Tesla" in query_words("what about tesla's coils?")


def test_falls_back_to_argmax_when_nothing_allowed_is_in_the_top_k():
    assert run("Tesla?", [["▁Edison", "▁Ed", "▁Nikola", "▁Lifespan"]], words=()) == ["▁Edison"]


def test_property_words_exclude_copied_names():
    rows = [Example(f"When was {n} born?", (f"{n} Birth Date",), "") for n in ("Al Gore", "Bo Li", "Cy Twombly")]
    assert learn_property_words(rows, min_groups=3) == ["Birth", "Date"]


def test_byte_pieces_are_checked_as_they_arrive():
    assert run("Ærø?", [["<0xC3>"], ["<0x86>"]], words=()) == ["<0xC3>", "<0x86>"]
    assert run("x", [["<0xC3>"], ["<0x86>", "la"]], words=()) == ["<0xC3>", "la"]
    assert run("Tesla?", [["▁Tes"], ["<0xC3>", "la"]], words=()) == ["▁Tes", "la"]
