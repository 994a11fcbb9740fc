"""Metrics against hand-computed values: pass@k, avg@k, maj@k, bootstrap intervals, breakdowns."""

import json
import math

import pytest

from mimo.errors import MimoError
from mimo.eval.metrics import (
    avg_at,
    bootstrap_ci,
    breakdown,
    default_ks,
    estimate,
    maj_at,
    majority_index,
    pass_at,
    pass_at_k,
    summarize,
)

T, F = True, False


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (4, 0, 2, 0.0),
    (3, 2, 2, 1.0),  # n - c < k: any 2 samples include a correct one
    (4, 4, 4, 1.0),
    (1000, 1, 1, 0.001),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_the_binomial_formula_where_it_is_exact():
    for n, c, k in [(200, 13, 1), (200, 13, 10), (200, 13, 100), (64, 50, 8), (32, 1, 16)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)]:
        with pytest.raises(MimoError):
            pass_at_k(n, c, k)


@pytest.mark.parametrize("answers, winner", [
    (["1", "2", "2"], 1),
    (["1", "2"], 0),  # tie: the answer seen first
    (["a", "b", "b", "a"], 0),  # tie again, "a" came first
    ([None, None, "3"], 2),  # None never wins, however many
    (["a", None, None, "b"], 0),
    ([None, None], None),
    ([], None),
    ([" 1/2", "3", "1 / 2 "], 0),  # whitespace does not split the vote
])
def test_majority_index(answers, winner):
    assert majority_index(answers) == winner


CORRECT = [[T, F], [T, T], [F, F], [T, F]]
ANSWERS = [["1", "2"], ["3", "3"], [None, "4"], ["5", "6"]]


def test_avg_at():
    assert avg_at(CORRECT)["value"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    assert avg_at(CORRECT, 1)["value"] == pytest.approx(3 / 4)
    assert avg_at(CORRECT)["n"] == 4


def test_pass_at():
    assert pass_at(CORRECT, 1)["value"] == pytest.approx(avg_at(CORRECT)["value"])
    assert pass_at(CORRECT, 2)["value"] == pytest.approx(3 / 4)


def test_maj_at():
    # problem 0: tie 1/2 -> "1" (correct); 1: "3" correct; 2: only "4", wrong; 3: tie -> "5", correct
    assert maj_at(CORRECT, ANSWERS)["value"] == pytest.approx(3 / 4)
    correct = [[F, T, T, F], [T, F, F, F], [F, F, F, F]]
    answers = [["7", "8", "8", None], ["1", "2", "2", "3"], [None, None, None, None]]
    # problem 0: "8" wins (correct); 1: "2" wins (wrong); 2: no answer at all (wrong)
    assert maj_at(correct, answers)["value"] == pytest.approx(1 / 3)
    # with k=1 only the first sample votes
    assert maj_at(correct, answers, 1)["value"] == pytest.approx(1 / 3)
    with pytest.raises(MimoError):
        maj_at(correct, answers[:2])


def test_bootstrap_interval():
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    low, high = bootstrap_ci([0.0, 1.0] * 50)  # mean 0.5, standard error 0.05
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert bootstrap_ci([0.0, 1.0, 1.0, 0.5] * 5) == bootstrap_ci([0.0, 1.0, 1.0, 0.5] * 5)  # fixed seed
    wide, narrow = bootstrap_ci([0.0, 1.0] * 5), bootstrap_ci([0.0, 1.0] * 500)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]
    m = estimate([0.0, 0.5, 1.0, 1.0])
    assert m["value"] == pytest.approx(0.625) and m["ci_low"] <= m["value"] <= m["ci_high"] and m["n"] == 4


def test_summarize():
    assert list(summarize([[T], [F]], [["1"], ["2"]])) == ["avg@1"]
    assert list(summarize(CORRECT, ANSWERS)) == ["avg@2", "pass@2", "maj@2"]
    assert list(summarize(CORRECT)) == ["avg@2", "pass@2"]
    many = summarize([[T] * 31 + [F]] * 3, [["1"] * 32] * 3)
    assert list(many) == ["avg@32", "pass@2", "pass@4", "pass@8", "pass@16", "pass@32", "maj@32"]
    assert list(summarize(CORRECT, ks=[2])) == ["avg@2", "pass@2"]
    json.dumps(summarize(CORRECT, ANSWERS))  # goes straight into summary.json


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(10) == [1, 2, 4, 8, 10]


def test_unequal_sample_counts_use_the_fewest():
    assert avg_at([[T, F, F], [T]])["value"] == pytest.approx(1.0)  # first sample of each
    with pytest.raises(MimoError):
        pass_at([[T, F, F], [T]], 2)


def test_bad_inputs():
    for call in (lambda: avg_at([]), lambda: avg_at([[T], []]), lambda: avg_at(CORRECT, 3), lambda: estimate([])):
        with pytest.raises(MimoError):
            call()


def test_breakdown():
    rows = [
        {"level": 2, "subject": "Algebra", "correct": [T, F]},
        {"level": 1, "subject": "Geometry", "correct": [T, T]},
        {"level": 1, "subject": "Algebra", "correct": [F, F]},
        {"level": None, "subject": "Algebra", "correct": [T]},
    ]
    by_level = breakdown(rows, "level")
    assert list(by_level) == [1, 2, None]
    assert by_level[1]["value"] == pytest.approx(0.5) and by_level[1]["n"] == 2
    assert by_level[2]["value"] == pytest.approx(0.5) and by_level[2]["n"] == 1
    assert by_level[None]["value"] == 1.0
    by_subject = breakdown(rows, "subject")
    assert list(by_subject) == ["Algebra", "Geometry"]
    assert by_subject["Algebra"]["value"] == pytest.approx((0.5 + 0 + 1) / 3) and by_subject["Algebra"]["n"] == 3
    grouped = breakdown([{"group": r["subject"], "correct": r["correct"]} for r in rows])  # evaluate.py's form
    assert grouped == by_subject
    with pytest.raises(MimoError):
        breakdown([{"group": "x", "correct": []}])
