"""Rule-based RL rewards: procedural verifiers, math-verify, and the test-difficulty-driven code reward, whose
code runs in the sandbox."""

import json
import sys

import pytest

from mimo.data import reasoning
from mimo.errors import MimoError
from mimo.train import rewards
from mimo.train.rewards import CodeReward, Graded, RLProblem, code_reward, difficulty_levels, group_rewards

# median(xs): easy tests (odd lengths), a medium one (even length), a hard one (the empty list)
MEDIAN = RLProblem(
    id="code/median", kind="code", prompt="", entry_point="median",
    header='def median(xs):\n    """The median of a list of numbers; None for an empty list."""\n',
    tests=["assert median([3, 1, 2]) == 2", "assert median([5]) == 5", "assert median([4, 1, 3, 2]) == 2.5",
           "assert median([]) is None"],
    test_pass_rates=[1.0, 0.9, 0.5, 0.1])  # "from several models": levels easy, easy, medium, hard

CORRECT = """```python
def median(xs):
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
```"""
ODD_ONLY = """```python
def median(xs):
    return sorted(xs)[len(xs) // 2]
```"""  # right on odd lengths, wrong on even, IndexError on []
NO_EVEN = """```python
def median(xs):
    return sorted(xs)[len(xs) // 2] if xs else None
```"""  # passes easy and hard, fails medium
HANGS_ON_EMPTY = """```python
def median(xs):
    while not xs:
        pass
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
```"""  # the hard test times out, the others pass
BROKEN = "```python\ndef median(xs) return 0\n```"
EXITS = "```python\nimport os\nos._exit(0)\n```"  # ends the script before any test reports: no credit


def test_difficulty_levels_and_rewards_by_hand():
    assert difficulty_levels([1.0, 0.9, 0.5, 0.1]) == [0, 0, 1, 2]
    assert difficulty_levels([0.7, 2 / 3, 0.34, 1 / 3]) == [0, 1, 1, 2]  # strictly above the thresholds
    assert difficulty_levels([0.5, 0.2], easy_above=0.4, medium_above=0.1) == [0, 1]
    levels = [0, 0, 1, 2]
    cases = {  # passed -> (strict, soft, pass_all)
        (True, True, True, True): (1.0, 1.0, 1.0),
        (True, True, False, False): (0.2, 0.2, 0.0),
        (True, True, False, True): (0.2, 0.7, 0.0),  # hard passed but medium failed: strict withholds hard
        (True, True, True, False): (0.5, 0.5, 0.0),
        (True, False, True, True): (0.0, 0.9, 0.0),  # one easy test failed: strict gives nothing
        (False, False, False, False): (0.0, 0.0, 0.0),
    }
    for passed, expected in cases.items():
        got = tuple(code_reward(list(passed), levels, mode) for mode in ("strict", "soft", "pass_all"))
        assert got == pytest.approx(expected), passed
    # custom level scores; levels without tests are left out and the rest rescaled to sum to 1
    assert code_reward([True, False], [0, 2], "soft", (0.1, 0.3, 0.6)) == pytest.approx(0.1 / 0.7)
    assert code_reward([True, True], [0, 0], "strict") == pytest.approx(1.0)
    with pytest.raises(MimoError):
        code_reward([True], [0, 1])
    with pytest.raises(MimoError):
        CodeReward(mode="lenient").validate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the code sandbox needs Linux")
def test_code_completions_in_the_sandbox():
    passed = {name: rewards.run_tests(MEDIAN, text, per_test_s=1.0) for name, text in [
        ("correct", CORRECT), ("odd_only", ODD_ONLY), ("no_even", NO_EVEN), ("hangs", HANGS_ON_EMPTY),
        ("broken", BROKEN), ("exits", EXITS)]}
    assert passed == {"correct": [True] * 4, "odd_only": [True, True, False, False],
                      "no_even": [True, True, False, True], "hangs": [True, True, True, False],
                      "broken": [False] * 4, "exits": [False] * 4}
    # levels from the problem's pass-rate table: easy, easy, medium, hard
    graded = [Graded(sum(p) / 4, all(p), p) for p in passed.values()]
    expected = {"strict": [1.0, 0.2, 0.2, 0.5, 0.0, 0.0], "soft": [1.0, 0.2, 0.7, 0.5, 0.0, 0.0],
                "pass_all": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]}
    for mode, want in expected.items():
        assert group_rewards(MEDIAN, graded, CodeReward(mode)) == pytest.approx(want), mode
    # without a table the group's own pass rates set the levels: tests 0, 1 pass in 4/6 (not above 2/3: medium),
    # test 2 in 2/6 (hard), test 3 in 2/6 (hard)
    no_table = RLProblem(**{**MEDIAN.__dict__, "test_pass_rates": None})
    assert rewards.pass_rates([g.tests_passed for g in graded]) == pytest.approx([4 / 6, 4 / 6, 2 / 6, 2 / 6])
    soft = group_rewards(no_table, graded, CodeReward("soft"))
    assert soft == pytest.approx([1.0, 0.3 / 0.8, 0.3 / 0.8 + 0.5 / 1.6, 0.3 / 0.8 + 0.5 / 1.6, 0.0, 0.0])
    strict = group_rewards(no_table, graded, CodeReward("strict"))
    assert strict == pytest.approx([1.0, 0.3 / 0.8, 0.3 / 0.8, 0.3 / 0.8, 0.0, 0.0])


def test_reasoning_and_math_rewards_through_the_pool():
    p = reasoning.generate(["gcd"], 1, seed=5)[0]
    problem = RLProblem(id="gcd", kind="reasoning", prompt=p.question, answer=p.answer, problem=p)
    math = RLProblem(id="m", kind="math", prompt="1/2 + 1/4?", answer="3/4")
    with rewards.RewardPool(workers=2) as pool:
        futures = [pool.submit(problem, f"<think>...</think>\n\\boxed{{{p.answer}}}"),
                   pool.submit(problem, "\\boxed{-1}"),
                   pool.submit(math, "so \\boxed{\\frac{3}{4}}"), pool.submit(math, "\\boxed{0.7}")]
        verdicts = [f.result(timeout=60) for f in futures]
    assert [(g.score, g.correct) for g in verdicts] == [(1.0, True), (0.0, False), (1.0, True), (0.0, False)]


def test_partial_verifier_credit_is_not_reward():
    p = next(q for q in reasoning.generate(["prime_factorization"], 20, seed=2) if "×" in q.answer)
    assert 0 < reasoning.score(p, "\\boxed{2 × 2}") < 1.0  # reasoning-gym's partial credit
    problem = RLProblem(id="pf", kind="reasoning", prompt=p.question, answer=p.answer, problem=p)
    assert rewards.grade(problem, "\\boxed{2 × 2}").score == 0.0


def test_problem_files(tmp_path):
    math_file, code_file = tmp_path / "math.jsonl", tmp_path / "code.jsonl"
    math_file.write_text(json.dumps({"problem": "What is 2+2?", "answer": 4}) + "\n\n")
    code_file.write_text(json.dumps({"prompt": MEDIAN.header, "tests": MEDIAN.tests, "entry_point": "median"}) + "\n")
    problems = rewards.load_problems("gcd", 3, str(math_file), str(code_file), seed=1)
    kinds = sorted(p.kind for p in problems)
    assert kinds == ["code", "math", "reasoning", "reasoning", "reasoning"]
    m = next(p for p in problems if p.kind == "math")
    assert m.answer == "4" and m.prompt.endswith(reasoning_instruction())
    c = next(p for p in problems if p.kind == "code")
    assert "def median" in c.prompt and c.tests == MEDIAN.tests and c.test_pass_rates is None
    code_file.write_text(json.dumps({"prompt": "x", "tests": ["assert 1"], "entry_point": "f",
                                     "test_pass_rates": [0.5, 0.5]}) + "\n")
    with pytest.raises(MimoError, match="one rate"):
        rewards.code_problems(code_file)
    with pytest.raises(MimoError, match="no RL problems"):
        rewards.load_problems("none")


def reasoning_instruction():
    from mimo.eval.tasks import BOXED_INSTRUCTION

    return BOXED_INSTRUCTION
