"""Tests for mimo.data.reasoning: verified step-by-step problems, the seed split, rendering and scoring."""

import pytest

from mimo.data import reasoning as R
from mimo.errors import MimoError


@pytest.mark.parametrize("task", R.TASK_NAMES)
def test_every_task_makes_verified_solutions(task):
    problems, stats = R.generate_with_stats([task], 50, "train", seed=1)
    assert len(problems) == 50 and stats[task]["made"] == 50
    assert stats[task]["dropped"] == 0
    for p in problems:
        assert p.task == task and p.split == "train"
        assert p.steps.strip() and p.answer.strip()
        assert "\n" not in p.question
        assert R.score(p, p.steps + "\nAnswer: " + p.answer) == 1.0
        assert R.is_correct(p, f"<think>\n{R.think_trace(p)}\n</think>\n{R.final_answer(p)}")
        assert len(R.render_pretrain(p)) < 600  # fits a ~512-token context with room to spare


def test_train_and_eval_are_disjoint():
    eval_qs = R.eval_questions()
    evals = R.eval_problems(20)
    assert {p.question for p in evals} <= eval_qs
    assert all(p.seed >= R.EVAL_SEED and p.split == "eval" for p in evals)
    train, stats = R.generate_with_stats(None, 2400, "train", seed=7)
    assert not {p.question for p in train} & eval_qs
    assert all(p.seed + p.index < R.EVAL_SEED for p in train)
    # Small tasks collide with the eval pool by chance; those draws are skipped and counted.
    assert sum(s["excluded"] for s in stats.values()) > 0
    assert sum(s["made"] for s in stats.values()) == 2400


def test_generation_is_deterministic():
    def key(ps):
        return [(p.task, p.seed, p.index, p.question, p.steps, p.answer) for p in ps]

    a = R.generate(["gcd", "chain_sum", "spell_backward"], 90, seed=3)
    b = R.generate(["gcd", "chain_sum", "spell_backward"], 90, seed=3)
    c = R.generate(["gcd", "chain_sum", "spell_backward"], 90, seed=4)
    assert key(a) == key(b) and key(a) != key(c)
    assert key(R.eval_problems(10)) == key(R.eval_problems(10))
    assert key(R.generate(None, 24, "eval", seed=1)) == key(R.generate(None, 24, "eval", seed=2))


def test_eval_problems_fixed_order_and_unique():
    evals = R.eval_problems(30)
    assert len(evals) == 30 * len(R.TASK_NAMES)
    assert [p.task for p in evals[::30]] == list(R.TASK_NAMES)
    assert len({(p.task, p.question) for p in evals}) == len(evals)
    assert R.eval_problems(5, ["lcm"]) == R.eval_problems(30, ["lcm"])[:5]


def test_weights_and_config_overrides():
    ps, stats = R.generate_with_stats({"gcd": {"weight": 3}, "lcm": {"weight": 1, "max_value": 12}}, 8)
    assert stats["gcd"]["made"] == 6 and stats["lcm"]["made"] == 2
    assert all(max(p.entry["metadata"]["numbers"]) <= 12 for p in ps if p.task == "lcm")
    assert R.generate({"gcd": {"weight": 1}, "lcm": {"weight": 0}}, 5)[0].task == "gcd"


def test_rendering():
    p = R.generate(["basic_arithmetic"], 1, seed=0)[0]
    doc = R.render_pretrain(p)
    assert doc == f"Question: {p.question}\nSolution:\n{p.steps}\nAnswer: {p.answer}"
    assert doc.startswith(R.render_prompt(p)) and R.render_prompt(p).endswith("Solution:\n")
    assert R.render_answer_only(p) == f"Question: {p.question}\nAnswer: {p.answer}"
    assert R.final_answer(p) == "\\boxed{" + p.answer + "}" and R.think_trace(p) == p.steps


def test_extract_answer():
    assert R.extract_answer("5 - 3 = 2\nAnswer: 2") == "2"
    assert R.extract_answer("x\nAnswer: 42\nQuestion: y\nSolution:\nAnswer: 7") == "42"
    assert R.extract_answer("so \\boxed{3/5}.") == "3/5"
    assert R.extract_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert R.extract_answer("<think>\\boxed{1}\nAnswer: 1</think>\n\\boxed{2}") == "2"
    assert R.extract_answer("<think>Answer: 1</think> I give up") is None
    assert R.extract_answer("Answer:   \n") is None
    assert R.extract_answer("no answer here") is None
    assert R.extract_answer("\\boxed{unclosed") is None


def test_score_right_and_wrong():
    p = R.eval_problems(1, ["products"])[0]
    assert R.score(p, f"Answer: {p.answer}") == 1.0
    assert R.score(p, f"Answer: {int(p.answer) + 1}") < 1.0
    assert R.score(p, "I don't know") == 0.0
    assert not R.is_correct(p, f"\\boxed{{{int(p.answer) - 10}}}")
    q = R.eval_problems(1, ["prime_factorization"])[0]
    assert R.score(q, "Answer: 2") < 1.0 and not R.is_correct(q, "Answer: 2")
    s = R.eval_problems(1, ["number_sorting"])[0]
    assert R.score(s, "Answer: [") == 0.0  # malformed list: no credit, no exception


def test_errors_are_mimo_errors():
    with pytest.raises(MimoError, match="unknown reasoning task 'nope'"):
        R.generate(["nope"], 5)
    with pytest.raises(MimoError, match="unknown reasoning task"):
        R.eval_problems(5, {"gcd": {}, "sudoku_9000": {}})
    with pytest.raises(MimoError):
        R.generate({"gcd": {"no_such_option": 3}}, 5)
    with pytest.raises(MimoError):
        R.generate({"gcd": {"min_value": 10, "max_value": 2}}, 5)
    with pytest.raises(MimoError):
        R.generate(["gcd"], 5, split="test")
    with pytest.raises(MimoError):
        R.generate(["gcd"], 5, seed=-1)
    with pytest.raises(MimoError):
        R.eval_problems(10_000, ["gcd"])
    with pytest.raises(MimoError):
        R.generate({"gcd": {"weight": 0}}, 5)
    with pytest.raises(MimoError) as info:
        R.generate({"gcd": {"max_value": "many"}}, 5)
    assert "\n" not in str(info.value)
