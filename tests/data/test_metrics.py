"""Metrics against values computed by hand the official way (GT-Vision-Lab/VQA vqaEval.py)."""

from __future__ import annotations

import pytest

from cliptd.data.metrics import (
    accuracy,
    per_qtype,
    vcr_metrics,
    vqa_accuracy,
    vqa_normalize,
    vqa_process_punctuation,
    vqa_soft_score,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),  # period stripped, number word -> digit, lower-case
        ("1,000", "1000"),  # comma inside a number: punctuation deleted, not spaced
        ("a, b", "b"),  # ", " next to a space: deleted; then the article goes
        ("yes/no", "yes no"),  # a mark not next to a space becomes a space
        ("hello ?", "hello"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("The cat's toy", "cat s toy"),
        ("an apple", "apple"),
        ("none", "0"),
        ("dont", "don’t"),  # contractions are restored with the typographic apostrophe
        ("isnt", "isn’t"),
        ("Im", "im"),  # the table's "Im" key never matches after lower-casing (official)
        ("  red\tcar\n", "red car"),
        ("." * 40, "." * 8),  # official quirk: at most 32 periods are stripped
    ],
)
def test_vqa_normalize(raw, normalized):
    assert vqa_normalize(raw) == normalized


def test_punctuation_step_alone():
    assert vqa_process_punctuation("red.") == "red"
    assert vqa_process_punctuation("dark-red") == "dark-red"  # '-' is not in the table


# Ten annotators; for m annotators matching the prediction, by hand:
# the m matching ones see m-1 others, the 10-m others see m; each scores min(1, x/3).
@pytest.mark.parametrize(
    ("m", "expected"),
    [
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(m, expected):
    answers = ["cat"] * m + [f"other{i}" for i in range(10 - m)]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalizes_prediction_and_ground_truth_the_official_way():
    answers = ["red"] * 7 + ["dark red", "red.", "maroon"]
    # "red." becomes "red" (annotators disagree, so the GT gets the punctuation step): 8 matches
    assert vqa_accuracy("Red", answers) == 1.0
    assert vqa_accuracy("maroon", answers) == pytest.approx(0.3)
    # The prediction's number word is mapped, the GT's is not (GT gets punctuation only).
    answers = ["2", "two", "2", "2", "3", "2", "2", "two", "2", "2"]
    assert vqa_accuracy("two", answers) == 1.0  # "two" -> "2": 7 matches
    assert vqa_accuracy("3", answers) == pytest.approx(0.3)
    # Unanimous annotators: the GT is used as is.
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("no", ["yes"] * 10) == 0.0


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_soft_scores():
    assert [vqa_soft_score(c) for c in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        vqa_soft_score(-1)


def test_vcr_metrics_by_hand():
    m = vcr_metrics([0, 1, 2, 3], [0, 1, 0, 3], [1, 1, 1, 0], [1, 0, 1, 0])
    # Q->A right on 0, 1, 3; QA->R right on 0, 2, 3; both on 0 and 3.
    assert m == {"q_a": 0.75, "qa_r": 0.75, "q_ar": 0.5}


def test_accuracy_and_errors():
    assert accuracy([0, 1, 2], [0, 2, 2]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy([0], [0, 1])
    with pytest.raises(ValueError):
        accuracy([], [])
    with pytest.raises(ValueError):
        vcr_metrics([0], [0], [0], [])


def test_per_qtype():
    assert per_qtype([1, 0, 1, 1], ["why", "why", "who", "who"]) == {
        "who": {"score": 1.0, "n": 2},
        "why": {"score": 0.5, "n": 2},
    }
