import sys
from pathlib import Path

import pytest

TRAIN_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TRAIN_DIR))

from qr_train.corpus import DEFAULT_CORPUS  # noqa: E402


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    if not DEFAULT_CORPUS.exists():
        pytest.skip(f"the shared corpus is not at {DEFAULT_CORPUS}")
    return DEFAULT_CORPUS
