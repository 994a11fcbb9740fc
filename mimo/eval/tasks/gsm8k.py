"""GSM8K test set: boxed answer, falling back to the last number in the completion."""

from mimo.benchmarks import load_benchmark
from mimo.eval.grading import grade_math
from mimo.eval.tasks import Task, math_chat_prompt, math_raw_prompt

TASK = Task(
    name="gsm8k",
    description="GSM8K test, 1,319 grade-school word problems; boxed answer or the last number",
    load=lambda: load_benchmark("gsm8k"),
    chat_prompt=math_chat_prompt,
    raw_prompt=math_raw_prompt,
    grade=lambda row, completion: grade_math(completion, row["answer"], fallback_last_number=True),
    raw_stop=["\nQuestion:"],
)
