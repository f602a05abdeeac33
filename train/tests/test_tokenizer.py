import json
import pytest
from tokenizers import Tokenizer

from qr_train.tokenizer import EOS_ID, PAD_ID, UNK_ID, save_tokenizer, train_tokenizer

TEXTS = [
    "Who was born first, Charles Alton Ellis or Al Gore?",
    "Charles Alton Ellis Birth Date | Al Gore Birth Date",
    "Which plate is the densest among the Philippine Sea Plate and Pacific Plate?",
] * 50


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tok = train_tokenizer(TEXTS, vocab_size=400)
    path = save_tokenizer(tok, tmp_path_factory.mktemp("tok"))
    return Tokenizer.from_file(str(path))  # what the server loads


def test_special_ids_are_t5s(tok):
    assert (tok.token_to_id("<pad>"), tok.token_to_id("</s>"), tok.token_to_id("<unk>")) == (PAD_ID, EOS_ID, UNK_ID)


@pytest.mark.parametrize("text", [
    "Who lived longer, Nikola Tesla or Milutin Milankovic?",
    "Żółć, 東京 and 🙂: never seen | Ærøskøbing",
    "Milutin Milankovic Lifespan | Nikola Tesla Lifespan",
])
def test_round_trip_without_unk(tok, text):
    enc = tok.encode(text)
    assert enc.ids[-1] == EOS_ID
    assert UNK_ID not in enc.ids, enc.tokens
    assert tok.decode(enc.ids, skip_special_tokens=True) == text


def test_unseen_word_splits_into_known_pieces(tok):
    enc = tok.encode("Varenholt")
    assert len(enc.ids) > 2 and UNK_ID not in enc.ids


def test_learned_pieces_have_a_deterministic_order():
    texts = ["Nikola Tesla Lifespan", "Milutin Milankovic Lifespan", "Sky Tower Height", "aa bb cc dd"] * 20
    vocab = json.loads(train_tokenizer(texts, 300).to_str())["model"]["vocab"]
    learned = vocab[3 + 256:]
    assert learned == sorted(learned, key=lambda ps: (-round(ps[1], 9), ps[0]))
