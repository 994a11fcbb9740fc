"""Held-out procedural reasoning problems (reasoning-gym seeds reserved for evaluation, never trained on),
graded by each task's own verifier, with a per-task breakdown."""

from mimo.data import reasoning
from mimo.eval.tasks import BOXED_INSTRUCTION, Task

PER_TASK = 50  # eval problems drawn per procedural task; --limit takes a round-robin prefix


def load() -> list[dict]:
    """Round-robin over the tasks, so that the first N problems cover every task evenly."""
    by_task: dict[str, list] = {}
    for p in reasoning.eval_problems(PER_TASK):
        by_task.setdefault(p.task, []).append(p)
    rows = []
    for i in range(PER_TASK):
        for task, problems in by_task.items():
            if i < len(problems):
                p = problems[i]
                rows.append({"id": f"{task}/{p.index}", "problem": p.question, "answer": p.answer, "task": task,
                             "problem_obj": p})
    return rows


def grade(row: dict, completion: str) -> tuple[str | None, bool]:
    extracted = reasoning.extract_answer(completion)
    return extracted, reasoning.is_correct(row["problem_obj"], completion)


TASK = Task(
    name="reasoning",
    description="held-out procedural reasoning problems (reasoning-gym, evaluation seeds), task verifiers",
    load=load,
    chat_prompt=lambda row: f"{row['problem']}\n{BOXED_INSTRUCTION}",
    raw_prompt=lambda row: reasoning.render_prompt(row["problem_obj"]),
    question_prompt=lambda row: f"Question: {row['problem']}\n",
    grade=grade,
    default_samples=1,
    breakdown=("task",),
    raw_stop=["\nQuestion:"],
    public_fields=("answer", "task"),
)
