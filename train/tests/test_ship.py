import json

from qr_train import ship
from qr_train.corpus import REPO_ROOT

SHIPPED = REPO_ROOT / "models" / "qreformulate-t5"


def test_model_card_of_the_shipped_model_is_what_its_metrics_give():
    """MODEL_CARD.md is generated from metrics.json: regenerating it changes nothing."""
    report = json.loads((SHIPPED / "metrics.json").read_text())
    assert ship.model_card(SHIPPED, report, True) == (SHIPPED / "MODEL_CARD.md").read_text()


def test_model_card_says_where_a_fine_tune_took_its_tokenizer():
    report = json.loads((SHIPPED / "metrics.json").read_text())
    args = report["training"]["args"]
    args.update(init="../models/qreformulate-t5/pytorch", tokenizer=None)
    assert "Taken from the `--init` checkpoint" in ship.model_card(SHIPPED, report, True)
    args.update(init=None, tokenizer=None)
    assert "never mix the two" not in ship.model_card(SHIPPED, report, True)
