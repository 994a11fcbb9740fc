"""MATH-500 (the "Let's Verify Step by Step" test split): boxed answer, graded with math-verify."""

from mimo.benchmarks import load_benchmark
from mimo.eval.grading import grade_math
from mimo.eval.tasks import Task, math_chat_prompt, math_raw_prompt

TASK = Task(
    name="math500",
    description="MATH-500, 500 competition problems; one run (MiMo protocol), math-verify grading",
    load=lambda: load_benchmark("math500"),
    chat_prompt=math_chat_prompt,
    raw_prompt=math_raw_prompt,
    grade=lambda row, completion: grade_math(completion, row["answer"]),
    default_samples=1,
    breakdown=("subject", "level"),
    raw_stop=["\nQuestion:"],
    public_fields=("answer", "subject", "level"),
)
