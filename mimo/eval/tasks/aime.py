"""AIME 2024 and AIME 2025: integer answers 0-999; MiMo reports the mean over 32 samples."""

from mimo.benchmarks import load_benchmark
from mimo.eval.grading import grade_math
from mimo.eval.tasks import Task, math_chat_prompt, math_raw_prompt

TASKS = [
    Task(
        name=f"aime{year}",
        description=f"AIME {year} I and II, 30 problems; avg@32 by default (MiMo protocol)",
        load=lambda year=year: load_benchmark(f"aime{year}"),
        chat_prompt=math_chat_prompt,
        raw_prompt=math_raw_prompt,
        grade=lambda row, completion: grade_math(completion, row["answer"]),
        default_samples=32,
        raw_stop=["\nQuestion:"],
    )
    for year in (2024, 2025)
]
