"""HumanEval: the completion (a continuation of the prompt, or a whole function, possibly in a ``` block)
runs against the problem's tests inside the sandbox (mimo.eval.sandbox); never in this process."""

from __future__ import annotations

import re

from mimo.benchmarks import load_benchmark
from mimo.eval.sandbox import run_python
from mimo.eval.tasks import Task

_CODE_BLOCK = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def program(row: dict, completion: str) -> str:
    """The script to run: the solution, then the problem's tests and check(entry_point)."""
    prompt, entry = row["problem"], row["entry_point"]
    blocks = _CODE_BLOCK.findall(completion)
    code = next((b for b in blocks if f"def {entry}" in b), blocks[0] if blocks else completion)
    if re.search(rf"^\s*def {re.escape(entry)}\s*\(", code, re.MULTILINE):
        # a whole function: keep the prompt's imports and helpers ahead of it
        header = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        solution = f"{header}\n{code}"
    else:
        solution = prompt + code
    return f"{solution}\n\n{row['test']}\n\ncheck({entry})\n"


def grade(row: dict, completion: str) -> tuple[str | None, bool]:
    script = program(row, completion)
    result = run_python(script, timeout_s=10.0, memory_mb=1024)
    return result.status, result.passed


TASK = Task(
    name="humaneval",
    description="HumanEval, 164 Python functions; tests run in the sandbox",
    load=lambda: load_benchmark("humaneval"),
    chat_prompt=lambda row: ("Complete the following Python function. Return the whole function in a ```python "
                             f"code block.\n```python\n{row['problem']}```"),
    raw_prompt=lambda row: row["problem"],
    grade=grade,
    default_samples=1,
    raw_stop=["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"],
    public_fields=(),
)
