"""Procedural reasoning problems with verified step-by-step solutions, from reasoning-gym.

One source of problems for every stage: reasoning-dense pretraining documents, SFT think traces,
RL prompts with a verifier, and a held-out evaluation set. The tasks are small on purpose: the
model is 5-30M parameters, trained for minutes on CPUs, with a ~512-token context, so questions
are short (mostly under 150 characters) and the steps are mechanical enough to imitate.

How a problem is made: reasoning-gym generates the item (question, answer, metadata); a step
generator in `mimo.data.reasoning_steps` writes a plain-text derivation and computes the final answer
from its own steps; the task's own verifier (`dataset.score_answer`) must give 1.0 for that answer
or the item is dropped and counted.

Train/eval split by seed: reasoning-gym draws item i of a dataset with seed s from
``random.Random(s + i)``. Evaluation items use the reserved seeds ``EVAL_SEED + code * SPAN + i``
(i < EVAL_POOL) and training items use ``(seed * 100 + code) * SPAN + i`` with ``seed < MAX_SEED``,
which stays below ``EVAL_SEED``; ``code`` is the task's position in `TASK_NAMES`. Small tasks can
still produce the same question from different seeds ("Calculate 5 - 3."), so training generation
also skips every question that appears anywhere in the evaluation pool (exact match) and counts it.

Config surface (plain data, so JSON/TOML can set it): ``tasks`` is None (all tasks, weight 1), a
list of task names, or a dict ``{name: {"weight": 2.0, <reasoning-gym config overrides>}}``.

API: `generate`, `generate_with_stats`, `eval_problems`, `eval_questions`, `render_pretrain`,
`render_answer_only`, `render_prompt`, `think_trace`, `final_answer`, `extract_answer`, `score`,
`is_correct`. The task table is `TASK_TABLE`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from mimo.data.reasoning_steps import QUESTIONS, STEPS, StepError
from mimo.errors import MimoError

# Default reasoning-gym configs: small numbers, few terms. Order is fixed: a task's position is its
# seed code, so new tasks go at the end.
DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {
        "min_terms": 2,
        "max_terms": 4,
        "min_digits": 1,
        "max_digits": 1,
        "operators": ["+", "-", "*", "/"],
        "allow_parentheses": True,
        "allow_negation": False,
    },
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 3},
    "products": {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2},
    "simple_equations": {"min_terms": 2, "max_terms": 3, "min_value": 1, "max_value": 12},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 100},
    "lcm": {"min_numbers": 2, "max_numbers": 2, "min_value": 2, "max_value": 30},
    "prime_factorization": {"min_value": 2, "max_value": 999},
    "fraction_simplification": {
        "min_value": 1,
        "max_value": 20,
        "min_factor": 2,
        "max_factor": 15,
        "styles": ["plain"],
    },
    "base_conversion": {"min_base": 2, "max_base": 16, "min_value": 1, "max_value": 255},
    "letter_counting": {"min_words": 2, "max_words": 5},
    "number_sorting": {
        "min_numbers": 3,
        "max_numbers": 5,
        "min_decimals": 0,
        "max_decimals": 0,
        "min_value": -99.0,
        "max_value": 99.0,
    },
    "spell_backward": {"min_word_len": 3, "max_word_len": 7},
}
TASK_NAMES: tuple[str, ...] = tuple(DEFAULT_CONFIGS)
assert len(TASK_NAMES) <= 100, "the seed layout below gives each task a code < 100"

TASK_TABLE = """\
| task | default difficulty | solution steps | why this task |
|---|---|---|---|
| basic_arithmetic | 2-4 one-digit terms, + - * /, parentheses | one binary operation per line: parentheses, then * /, then + - | operator precedence and signed one-digit facts |
| chain_sum | 2-3 terms of 1-3 digits, + - | add or subtract one place value at a time, running total | multi-digit addition/subtraction broken into easy steps |
| products | two 2-digit factors | partial product per digit of the second factor, then their sum | long multiplication as short, checkable lines |
| simple_equations | a*x + b = c, small integers | move the constant, then divide by the coefficient | two-step algebra with an exact integer answer |
| gcd | two numbers 1-100 | Euclid: "a = q * b + r" until r = 0 | a classic algorithm with short, uniform lines |
| lcm | two numbers 2-30 | Euclid for the gcd, then a / gcd * b | reuses gcd steps, adds one division and one multiplication |
| prime_factorization | 2-999 | trial division "n / p = m" until a prime is left | repeated division with a clear stopping rule |
| fraction_simplification | reduced parts up to 20, factor 2-15 | Euclid for the gcd, divide numerator and denominator | combines Euclid with division |
| base_conversion | 1-255, bases 2-16 | expand by place values to decimal, then repeated division with remainders | positional notation both ways |
| letter_counting | 2-5 words of English text | one line per word with a running total | counting over characters, not arithmetic |
| number_sorting | 3-5 integers in -99..99 | selection sort: "smallest of ... is ..." | comparison of signed numbers, list manipulation |
| spell_backward | English words of 3-7 letters | spell the letters, then spell them in reverse | character-level manipulation |

Questions are reasoning-gym's own text, except base_conversion and number_sorting, whose long
formatting instructions are restated in one short line (the verifiers never read the question).
"""

EVAL_POOL = 120  # items drawn per task for the evaluation pool (duplicates and drops removed)
SPAN = 1_000_000  # item indices reserved per (seed, task); also the most items one task can draw
MAX_SEED = 10_000_000  # user seeds are 0 <= seed < MAX_SEED
EVAL_SEED = 100 * MAX_SEED * SPAN  # 10**15: every training seed lies below this


@dataclass(frozen=True)
class Problem:
    """One verified problem. (task, seed, index) with the task config reproduces `entry`."""

    task: str
    split: str  # "train" or "eval"
    seed: int  # reasoning-gym dataset seed
    index: int  # item index in that dataset
    question: str
    steps: str
    answer: str
    entry: dict = field(repr=False)  # the raw reasoning-gym item, for the verifier


@dataclass
class TaskSpec:
    name: str
    weight: float
    config: dict[str, Any]

    @property
    def config_json(self) -> str:
        return json.dumps(self.config, sort_keys=True)


def resolve_tasks(tasks: None | list[str] | tuple[str, ...] | dict[str, Any] = None) -> list[TaskSpec]:
    """Normalize the task config (None, a list of names, or {name: {"weight": w, **overrides}})."""
    if tasks is None:
        tasks = list(TASK_NAMES)
    if isinstance(tasks, str):
        tasks = [tasks]
    if isinstance(tasks, (list, tuple)):
        tasks = {name: {} for name in tasks}
    if not isinstance(tasks, dict) or not tasks:
        raise MimoError("reasoning tasks must be a non-empty list of names or a dict of name -> settings")
    specs = []
    for name, settings in tasks.items():
        if name not in DEFAULT_CONFIGS:
            raise MimoError(f"unknown reasoning task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
        settings = dict(settings or {})
        weight = settings.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight < 0:
            raise MimoError(f"reasoning task {name}: weight must be a number >= 0, got {weight!r}")
        for key in ("seed", "size"):
            if key in settings:
                raise MimoError(f"reasoning task {name}: {key!r} is set by mimo, not by the config")
        specs.append(TaskSpec(name, float(weight), {**DEFAULT_CONFIGS[name], **settings}))
    if sum(s.weight for s in specs) <= 0:
        raise MimoError("reasoning tasks: at least one weight must be positive")
    return specs


@lru_cache(maxsize=64)
def _dataset(name: str, seed: int, config_json: str):
    import reasoning_gym  # slow import (~1 s): only when problems are made

    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=SPAN, **json.loads(config_json))
    except (TypeError, ValueError, AssertionError) as e:
        raise MimoError(f"reasoning task {name}: bad config {config_json}: {e}".replace("\n", " ")) from None


def _verifier(task: str):
    """A dataset object whose score_answer checks entries of `task` (these verifiers read only the entry)."""
    if task not in DEFAULT_CONFIGS:
        raise MimoError(f"unknown reasoning task {task!r}; known tasks: {', '.join(TASK_NAMES)}")
    return _dataset(task, 0, json.dumps(DEFAULT_CONFIGS[task], sort_keys=True))


# What reasoning-gym code raises on inputs it does not expect (decimal errors are ArithmeticError).
_BAD_INPUT = (ValueError, TypeError, AttributeError, IndexError, KeyError, ArithmeticError, AssertionError)


def _item(name: str, ds, index: int) -> dict:
    try:
        return ds[index]
    except _BAD_INPUT as e:  # a config that passed reasoning-gym's validation but breaks its generator
        raise MimoError(f"reasoning task {name}: reasoning-gym failed on item {index}: {e!r}") from None


def _question(name: str, entry: dict) -> str:
    short = QUESTIONS.get(name)
    text = short(entry) if short else entry["question"]
    return " ".join(text.split())  # one line: the document format puts a question on one line


def _solve(name: str, ds, entry: dict, question: str, seed: int, index: int, split: str) -> Problem | None:
    """The verified problem for one entry, or None when the steps fail or the verifier rejects them."""
    try:
        steps, answer = STEPS[name](entry)
    except (StepError, KeyError, ValueError, ZeroDivisionError):
        return None
    if ds.score_answer(answer, entry) != 1.0:
        return None
    return Problem(name, split, seed, index, question, steps, answer, entry)


def _code(name: str) -> int:
    return TASK_NAMES.index(name)


@lru_cache(maxsize=64)
def _eval_pool(name: str, config_json: str) -> tuple[tuple[Problem, ...], frozenset[str], dict[str, int]]:
    """The evaluation pool of one task: verified problems with distinct questions, in index order,
    the set of every question drawn from the reserved seeds, and counts."""
    seed = EVAL_SEED + _code(name) * SPAN
    ds = _dataset(name, seed, config_json)
    problems, seen, stats = [], set(), {"drawn": EVAL_POOL, "dropped": 0, "duplicates": 0}
    for i in range(EVAL_POOL):
        entry = _item(name, ds, i)
        question = _question(name, entry)
        if question in seen:
            stats["duplicates"] += 1
            continue
        seen.add(question)
        p = _solve(name, ds, entry, question, seed, i, "eval")
        if p is None:
            stats["dropped"] += 1
        else:
            problems.append(p)
    return tuple(problems), frozenset(seen), stats


def _allocate(n: int, specs: list[TaskSpec]) -> list[int]:
    """Split n over tasks in proportion to weight (largest remainder, ties to the earlier task)."""
    total = sum(s.weight for s in specs)
    exact = [n * s.weight / total for s in specs]
    counts = [int(x) for x in exact]
    order = sorted(range(len(specs)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _eval_take(spec: TaskSpec, k: int) -> list[Problem]:
    pool = _eval_pool(spec.name, spec.config_json)[0]
    if k > len(pool):
        raise MimoError(f"reasoning task {spec.name}: asked for {k} eval problems, the pool has {len(pool)}")
    return list(pool[:k])


def generate_with_stats(
    tasks=None, n: int = 1000, split: str = "train", seed: int = 0
) -> tuple[list[Problem], dict[str, dict[str, int]]]:
    """`n` problems split over `tasks` by weight, and per-task counts.

    train: drawn from seeds derived from `seed`, skipping any question in the eval pool
    ("excluded") and any item whose steps fail verification ("dropped"); shuffled with `seed`.
    eval: the first problems of each task's fixed eval pool, in task order; `seed` is ignored.
    """
    if split not in ("train", "eval"):
        raise MimoError(f"split must be 'train' or 'eval', got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise MimoError(f"number of problems must be an integer >= 0, got {n!r}")
    if not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise MimoError(f"seed must be an integer in [0, {MAX_SEED}), got {seed!r}")
    specs = resolve_tasks(tasks)
    problems: list[Problem] = []
    stats: dict[str, dict[str, int]] = {}
    for spec, k in zip(specs, _allocate(n, specs)):
        if split == "eval":
            problems += _eval_take(spec, k)
            stats[spec.name] = {"made": k, **_eval_pool(spec.name, spec.config_json)[2]}
            continue
        excluded_questions = _eval_pool(spec.name, spec.config_json)[1]
        base = (seed * 100 + _code(spec.name)) * SPAN
        ds = _dataset(spec.name, base, spec.config_json)
        made: list[Problem] = []
        counts = {"made": 0, "excluded": 0, "dropped": 0}
        limit = min(SPAN, 20 * k + 1000)
        i = 0
        while len(made) < k:
            if i >= limit:
                raise MimoError(
                    f"reasoning task {spec.name}: made only {len(made)} of {k} problems from {i} draws "
                    f"({counts['excluded']} in the eval pool, {counts['dropped']} failed); widen its config"
                )
            entry = _item(spec.name, ds, i)
            question = _question(spec.name, entry)
            if question in excluded_questions:
                counts["excluded"] += 1
            else:
                p = _solve(spec.name, ds, entry, question, base, i, "train")
                if p is None:
                    counts["dropped"] += 1
                else:
                    made.append(p)
            i += 1
        counts["made"] = len(made)
        stats[spec.name] = counts
        problems += made
    if split == "train":
        random.Random(seed).shuffle(problems)
    return problems, stats


def generate(tasks=None, n: int = 1000, split: str = "train", seed: int = 0) -> list[Problem]:
    """`n` verified problems over `tasks` (see `generate_with_stats`)."""
    return generate_with_stats(tasks, n, split, seed)[0]


def eval_problems(n_per_task: int = 50, tasks=None) -> list[Problem]:
    """The held-out problems: the first `n_per_task` of each task's eval pool, in a fixed order
    (tasks in the given order). The pools hold about 100 distinct problems per task."""
    if not isinstance(n_per_task, int) or n_per_task < 0:
        raise MimoError(f"n_per_task must be an integer >= 0, got {n_per_task!r}")
    return [p for spec in resolve_tasks(tasks) for p in _eval_take(spec, n_per_task)]


def eval_questions(tasks=None) -> set[str]:
    """Every question text in the eval pools of `tasks`: decontaminate other training data against it."""
    out: set[str] = set()
    for spec in resolve_tasks(tasks):
        out |= _eval_pool(spec.name, spec.config_json)[1]
    return out


# ---------------------------------------------------------------- rendering


def render_pretrain(p: Problem) -> str:
    """The reasoning-dense document: question, solution steps, answer."""
    return f"Question: {p.question}\nSolution:\n{p.steps}\nAnswer: {p.answer}"


def render_answer_only(p: Problem) -> str:
    """The ablation document: question and answer, no steps."""
    return f"Question: {p.question}\nAnswer: {p.answer}"


def render_prompt(p: Problem) -> str:
    """What a raw (non-chat) model is given at eval time; it should continue with steps and "Answer: "."""
    return f"Question: {p.question}\nSolution:\n"


def think_trace(p: Problem) -> str:
    """The reasoning that goes inside <think>...</think> for chat SFT."""
    return p.steps


def final_answer(p: Problem) -> str:
    """The visible chat answer after the think block."""
    return f"\\boxed{{{p.answer}}}"


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


_ANSWER_LINE = re.compile(r"Answer:[ \t]*([^\n]*)")


def extract_answer(completion: str) -> str | None:
    """The final answer in a completion: after any </think>, the last \\boxed{...}, else the text
    after the first "Answer:" up to the end of that line; None when there is none."""
    text = completion.rsplit("</think>", 1)[1] if "</think>" in completion else completion
    boxed = _last_boxed(text)
    if boxed is None:
        m = _ANSWER_LINE.search(text)
        boxed = m.group(1) if m else None
    if boxed is None or not boxed.strip():
        return None
    return boxed.strip()


def score(p: Problem, completion: str) -> float:
    """The task's own verifier on the extracted answer; 0.0 when none is found. Some reasoning-gym
    verifiers give partial credit (e.g. 0.01 for any factorization), so use `is_correct` for accuracy."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    try:
        return float(_verifier(p.task).score_answer(answer, p.entry))
    except _BAD_INPUT:  # a verifier that chokes on malformed text: no credit
        return 0.0


def is_correct(p: Problem, completion: str) -> bool:
    """Full credit from the task's verifier."""
    return score(p, completion) == 1.0
