"""Rule-based rewards for RL: procedural problems, math answers, and code under test-difficulty levels.

No learned reward model, no format reward, no length penalty (as MiMo):

- procedural problems (`mimo.data.reasoning`): 1.0 when the task's own reasoning-gym verifier gives full credit,
  else 0.0 (some verifiers give partial credit, e.g. 0.01 for any factorization: that counts as wrong);
- math ({problem, answer} JSONL): 1.0 when the last \\boxed{} answer is equivalent under math-verify;
- code ({prompt, tests, entry_point} JSONL): MiMo's test-difficulty-driven reward. Each test case has a pass
  rate (from a table shipped with the problem, "from several models", or else from the problem's own group of
  rollouts); pass rate > 2/3 makes a test easy, > 1/3 medium, else hard (thresholds configurable). Then
    strict:   a level's score is earned only if all its tests and all easier levels' tests pass;
    soft:     each level's score is split evenly over its tests; the reward is the sum over passed tests;
    pass_all: 1.0 when every test passes (the plain reward).
  Level scores default to 0.2 / 0.3 / 0.5 (easy / medium / hard): MiMo does not publish its values, these are
  ours. Levels with no tests are left out and the rest rescaled, so a solution passing everything scores 1.0.

Model-written code runs only in the sandbox (`mimo.eval.sandbox`): one sandboxed script per completion holds the
solution and a harness that runs each test (an assert statement) with its own time limit and prints which
passed as JSON after a random marker line; a crash, a timeout or missing marker fails every test.

Rewards are computed off the rollout loop's thread: `RewardPool.submit(problem, text)` returns a future at
once. A thread pool suffices because the heavy work already happens in subprocesses (sandboxed code runs;
math-verify comparisons, which `mimo.eval.grading` hands to worker processes when called off the main thread);
the procedural verifiers are pure-Python checks of a few microseconds.
"""

from __future__ import annotations

import json
import random
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from mimo.data import reasoning
from mimo.errors import MimoError
from mimo.eval.grading import grade_math
from mimo.eval.sandbox import run_python
from mimo.eval.tasks import math_chat_prompt
from mimo.jsonl import read_jsonl

LEVELS = ("easy", "medium", "hard")
CODE_MODES = ("strict", "soft", "pass_all")


@dataclass
class RLProblem:
    """One rule-verifiable RL problem: the user message the policy sees and what the reward checks."""

    id: str
    kind: str  # "reasoning" | "math" | "code"
    prompt: str  # the user message (rendered with the chat template by the rollout)
    answer: str | None = None  # reasoning and math: the reference answer
    problem: reasoning.Problem | None = field(default=None, repr=False)  # reasoning: the verifier's item
    header: str = ""  # code: the function signature and docstring the model completes
    entry_point: str = ""  # code: the function the tests call
    tests: list[str] = field(default_factory=list)  # code: one assert statement (or small block) per test
    test_pass_rates: list[float] | None = None  # code: per-test pass rates from several models, if known


@dataclass
class Graded:
    """One completion's verdict. `score` is its reward when it does not depend on the group (not for code)."""

    score: float
    correct: bool  # fully right: exact verifier credit, equivalent answer, or every test passed
    tests_passed: list[bool] | None = None  # code: one entry per test


@dataclass
class CodeReward:
    mode: str = "soft"  # strict | soft | pass_all
    easy_above: float = 2 / 3  # pass rate above this: easy
    medium_above: float = 1 / 3  # above this (and not easy): medium; else hard
    level_scores: tuple[float, float, float] = (0.2, 0.3, 0.5)  # easy, medium, hard (not published by MiMo)

    def validate(self):
        if self.mode not in CODE_MODES:
            raise MimoError(f"code reward must be one of {', '.join(CODE_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.medium_above <= self.easy_above <= 1.0:
            raise MimoError(f"level thresholds must satisfy 0 <= medium ({self.medium_above}) <= easy "
                            f"({self.easy_above}) <= 1")
        if len(self.level_scores) != 3 or min(self.level_scores) < 0 or sum(self.level_scores) <= 0:
            raise MimoError(f"level scores must be three numbers >= 0 with a positive sum, got {self.level_scores}")


# ---- problem sources -------------------------------------------------------------------------------

def reasoning_problems(tasks=None, n: int = 2000, seed: int = 0) -> list[RLProblem]:
    """Procedural problems from the train split; the prompt is the one SFT trains on."""
    return [RLProblem(id=f"{p.task}/{p.seed}/{p.index}", kind="reasoning",
                      prompt=math_chat_prompt({"problem": p.question}), answer=p.answer, problem=p)
            for p in reasoning.generate(tasks, n=n, split="train", seed=seed)]


def _jsonl(path) -> list[tuple[int, dict]]:
    return list(read_jsonl(path, objects_only=True))


def math_problems(path) -> list[RLProblem]:
    """JSONL lines {"problem": str, "answer": str}."""
    out = []
    for n, row in _jsonl(path):
        if not isinstance(row.get("problem"), str) or not isinstance(row.get("answer"), (str, int, float)):
            raise MimoError(f"{path}:{n}: expected 'problem' (text) and 'answer'")
        out.append(RLProblem(id=f"math/{n}", kind="math", prompt=math_chat_prompt(row), answer=str(row["answer"])))
    return out


def code_problems(path) -> list[RLProblem]:
    """JSONL lines {"prompt": header, "tests": [assert, ...], "entry_point": name, "test_pass_rates"?: [...]}."""
    from mimo.eval.tasks.humaneval import TASK as HUMANEVAL

    out = []
    for n, row in _jsonl(path):
        tests, rates = row.get("tests"), row.get("test_pass_rates")
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("entry_point"), str) or not (
                isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
            raise MimoError(f"{path}:{n}: expected 'prompt', 'entry_point' and a non-empty list of 'tests'")
        if rates is not None and (not isinstance(rates, list) or len(rates) != len(tests)
                                  or not all(isinstance(r, (int, float)) and 0 <= r <= 1 for r in rates)):
            raise MimoError(f"{path}:{n}: 'test_pass_rates' needs one rate in [0, 1] per test")
        out.append(RLProblem(id=f"code/{n}", kind="code", prompt=HUMANEVAL.chat_prompt({"problem": row["prompt"]}),
                             header=row["prompt"], entry_point=row["entry_point"], tests=tests,
                             test_pass_rates=None if rates is None else [float(r) for r in rates]))
    return out


def load_problems(tasks: str | None = None, num_problems: int = 2000, math: str | None = None,
                  code: str | None = None, seed: int = 0) -> list[RLProblem]:
    """All sources mixed in one seeded order. tasks: comma-separated mimo.data.reasoning tasks, None for all, "none"
    for no procedural problems; math / code: JSONL files."""
    problems = []
    if tasks != "none" and num_problems > 0:
        names = None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()]
        problems += reasoning_problems(names, num_problems, seed)
    if math:
        problems += math_problems(math)
    if code:
        problems += code_problems(code)
    if not problems:
        raise MimoError("no RL problems: give --tasks (and --num-problems > 0), --math FILE or --code FILE")
    random.Random(seed).shuffle(problems)
    return problems


# ---- code: running tests ---------------------------------------------------------------------------

_HARNESS = '''
def check(candidate):
    import json as _json, signal as _signal

    def _timeout(*_):
        raise TimeoutError("test timed out")

    _signal.signal(_signal.SIGALRM, _timeout)
    _passed = []
    for _test in {tests!r}:
        _signal.setitimer(_signal.ITIMER_REAL, {per_test_s!r})
        try:
            exec(_test, globals())
            _passed.append(True)
        except BaseException:
            _passed.append(False)
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
    print("\\n{marker}" + _json.dumps(_passed), flush=True)
'''


def run_tests(problem: RLProblem, completion: str, per_test_s: float = 2.0, memory_mb: int = 1024) -> list[bool]:
    """Which of the problem's tests the completion's code passes (run in the sandbox, never here)."""
    from mimo.eval.tasks.humaneval import program

    marker = f"@@mimo-tests-{secrets.token_hex(8)}@@"
    harness = _HARNESS.format(tests=problem.tests, per_test_s=float(per_test_s), marker=marker)
    script = program({"problem": problem.header, "entry_point": problem.entry_point, "test": harness}, completion)
    result = run_python(script, timeout_s=min(60.0, 3.0 + per_test_s * len(problem.tests)), memory_mb=memory_mb)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(marker):
            try:
                passed = json.loads(line[len(marker):])
            except json.JSONDecodeError:
                break
            if isinstance(passed, list) and len(passed) == len(problem.tests):
                return [p is True for p in passed]
            break
    return [False] * len(problem.tests)


def pass_rates(tests_passed: list[list[bool]]) -> list[float]:
    """Per-test pass rate over a group of completions: [G][n_tests] -> [n_tests]."""
    return [sum(col) / len(col) for col in zip(*tests_passed)]


def difficulty_levels(pass_rates: list[float], easy_above: float = 2 / 3, medium_above: float = 1 / 3) -> list[int]:
    """Per-test level: 0 easy (rate > easy_above), 1 medium (rate > medium_above), 2 hard."""
    return [0 if r > easy_above else 1 if r > medium_above else 2 for r in pass_rates]


def code_reward(passed: list[bool], levels: list[int], mode: str = "soft",
                level_scores: tuple[float, float, float] = (0.2, 0.3, 0.5)) -> float:
    """The test-difficulty-driven reward of one completion (see the module docstring)."""
    if len(passed) != len(levels):
        raise MimoError(f"{len(passed)} test results for {len(levels)} levelled tests")
    if mode == "pass_all":
        return float(all(passed))
    present = sorted(set(levels))
    total = sum(level_scores[lv] for lv in present)
    scores = {lv: level_scores[lv] / total for lv in present}  # rescaled: passing everything scores 1.0
    if mode == "strict":
        reward = 0.0
        for lv in present:  # easy -> hard; stop at the first level with a failed test
            if not all(p for p, t in zip(passed, levels) if t <= lv):
                break
            reward += scores[lv]
        return reward
    if mode == "soft":
        count = {lv: levels.count(lv) for lv in present}
        return sum(scores[t] / count[t] for p, t in zip(passed, levels) if p)
    raise MimoError(f"code reward must be one of {', '.join(CODE_MODES)}, got {mode!r}")


# ---- grading ---------------------------------------------------------------------------------------

def grade(problem: RLProblem, completion: str) -> Graded:
    """One completion's verdict (safe to call from any thread)."""
    if problem.kind == "reasoning":
        ok = reasoning.is_correct(problem.problem, completion)
        return Graded(float(ok), ok)
    if problem.kind == "math":
        ok = grade_math(completion, problem.answer)[1]
        return Graded(float(ok), ok)
    if problem.kind == "code":
        passed = run_tests(problem, completion)
        return Graded(sum(passed) / len(passed), all(passed), passed)
    raise MimoError(f"unknown problem kind {problem.kind!r}")


def group_rewards(problem: RLProblem, graded: list[Graded], code: CodeReward | None = None) -> list[float]:
    """The rewards of one group of completions of `problem`. Code rewards depend on the group: test levels
    come from the problem's pass-rate table when it has one, else from this group's pass rates."""
    if problem.kind != "code":
        return [g.score for g in graded]
    code = code or CodeReward()
    rates = problem.test_pass_rates or pass_rates([g.tests_passed for g in graded])
    levels = difficulty_levels(rates, code.easy_above, code.medium_above)
    return [code_reward(g.tests_passed, levels, code.mode, code.level_scores) for g in graded]


class RewardPool:
    """Grades completions in worker threads while the caller keeps generating."""

    def __init__(self, workers: int = 4):
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mimo-reward")

    def submit(self, problem: RLProblem, completion: str) -> Future:
        """A future of `grade(problem, completion)`."""
        return self._pool.submit(grade, problem, completion)

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
