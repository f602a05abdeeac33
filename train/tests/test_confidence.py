import pytest

from qr_train.confidence import sweep


def test_a_threshold_wins_only_when_low_confidence_answers_lose_to_the_echo():
    # The 10% least confident answers score 0 where the query itself would score 1.
    rows = [(-3.0, 0.0, 1.0)] * 10 + [(-0.1, 0.8, 0.3)] * 90
    points = sweep(rows)
    assert points[0] == {"threshold": None, "rouge_l": pytest.approx(0.72), "fallback_rate": 0.0}
    best = max(points, key=lambda p: p["rouge_l"])
    assert best["threshold"] is not None and best["rouge_l"] > 0.72 + 0.09
    # Confidently wrong: the low scores are spread evenly, so no threshold beats none.
    rows = [(-0.1 * (i % 10), 0.7, 0.3) for i in range(100)]
    points = sweep(rows)
    assert max(points, key=lambda p: p["rouge_l"])["threshold"] is None
