"""Evaluation tasks: each is a small declarative unit (data, prompt, grader) in a file of its own.

Adding a task: write `mimo/eval/tasks/NAME.py` defining `TASK = Task(...)` and list it in `_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from mimo.errors import MimoError

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# MiMo's evaluation protocol allows 32,768 new tokens for math and code, every task here (a model's context caps it)
PROTOCOL_MAX_NEW_TOKENS = 32_768


@dataclass
class Task:
    name: str
    description: str
    load: Callable[[], list[dict]]  # rows with at least id, problem, answer; fixed order
    chat_prompt: Callable[[dict], str]  # the user message (rendered with the model's chat template)
    raw_prompt: Callable[[dict], str]  # the text a base model continues
    grade: Callable[[dict, str], tuple[str | None, bool]]  # (row, completion) -> (extracted answer, correct)
    default_samples: int = 1
    breakdown: tuple[str, ...] = ()  # row fields to report accuracy by (subject, level, task, ...)
    raw_stop: list[str] = field(default_factory=list)  # stop strings for raw (completion) prompts
    # the raw prompt without a format cue (the model picks steps or a bare answer), where a task has one
    question_prompt: Callable[[dict], str] | None = None
    public_fields: tuple[str, ...] = ("answer",)  # row fields copied into samples.jsonl


def math_chat_prompt(row: dict) -> str:
    return f"{row['problem']}\n{BOXED_INSTRUCTION}"


def math_raw_prompt(row: dict) -> str:
    return f"Question: {row['problem']}\nSolution:\n"


_MODULES = ("math500", "aime", "gsm8k", "humaneval", "reasoning", "math")


def all_tasks() -> dict[str, Task]:
    tasks = {}
    for mod in _MODULES:
        module = importlib.import_module(f"mimo.eval.tasks.{mod}")
        for task in getattr(module, "TASKS", None) or [module.TASK]:
            tasks[task.name] = task
    return tasks


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise MimoError(f"unknown task {name!r} (choose from {', '.join(sorted(tasks))})")
    return tasks[name]
