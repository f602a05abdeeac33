from qr_train.corpus import Example
from qr_train.epochs import EpochSource, make_epoch
from qr_train.tokenizer import train_tokenizer

ROWS = [
    Example("Which is taller, Sky Tower or Auckland Harbour Bridge?", ("Sky Tower Height", "Auckland Harbour Bridge Height")),
    Example("Who was born first, Charles Alton Ellis or Al Gore?", ("Charles Alton Ellis Birth Date", "Al Gore Birth Date")),
    Example("What are the populations of Te Anau and Woodend?", ("Te Anau Population", "Woodend Population")),
] * 4


def tokenizer():
    return train_tokenizer([r.query for r in ROWS] + [r.target for r in ROWS], 300)


def test_background_workers_give_the_inline_epochs():
    tok = tokenizer()
    inline = EpochSource(tok, ROWS, ["Nova Park"], seed=5, aug_rate=1.0, workers=0)
    background = EpochSource(tok, ROWS, ["Nova Park"], seed=5, aug_rate=1.0, workers=1)
    try:
        for _ in range(3):
            assert background.next() == inline.next()
    finally:
        background.close()


def test_each_epoch_is_a_fresh_augmentation():
    tok = tokenizer()
    first = make_epoch(tok, ROWS, [], seed=5, epoch=1, aug_rate=1.0)
    second = make_epoch(tok, ROWS, [], seed=5, epoch=2, aug_rate=1.0)
    unaugmented = make_epoch(tok, ROWS, [], seed=5, epoch=1, aug_rate=0.0)
    assert first != second
    assert first != unaugmented
    assert len(first) == len(ROWS)
