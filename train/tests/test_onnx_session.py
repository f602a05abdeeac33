"""qr_train.onnx_loop.open_session: exact int8 products, as the server's sessions have them."""
import warnings
from pathlib import Path

import numpy as np
import pytest

from qr_train.onnx_loop import open_session

DATA = Path(__file__).resolve().parents[2] / "server" / "tests" / "data"


def test_int8_products_are_exact_on_every_cpu():
    # make_int8_fixtures.py: without exact products, CPUs without VNNI give 1048544 and ~4112.
    session = open_session(DATA / "saturating_matmul.onnx")
    y_int, y_float = session.run(["Y_int", "Y_float"], {"A": np.full((1, 64), 255, np.uint8),
                                                         "X": np.ones((1, 64), np.float32)})
    assert (y_int == 255 * 127 * 64).all()
    assert y_float == pytest.approx(np.full((1, 16), 127.0 * 64), abs=0.01)


def test_a_shared_int8_weight_still_opens():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning is for CPUs without VNNI only
        session = open_session(DATA / "shared_int8_weights.onnx")
    y_1, y_2 = session.run(None, {"A": np.ones((1, 64), np.uint8)})
    assert (y_1 == 127 * 64).all() and (y_2 == 127 * 64).all()
