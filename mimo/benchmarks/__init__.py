"""The evaluation benchmarks shipped inside the package, loaded as plain lists of dicts.

Every row comes back with the same three keys whatever the benchmark:

- ``id``: a stable, unique identifier (MATH-500 ``unique_id``; GSM8K ``gsm8k/<index>``;
  HumanEval ``task_id``; AIME ``id`` such as ``2024-I-1``),
- ``problem``: the question text (HumanEval: the function prompt),
- ``answer``: the reference final answer as a string (GSM8K: the text after ``####`` with the
  thousands commas removed; HumanEval: None, it is graded by running tests),

plus the original fields of the source file (``subject``, ``level``, ``solution`` for MATH-500;
``entry_point``, ``test``, ``canonical_solution`` for HumanEval; ...). Where the data came from,
under which license, and the sha256 of each file: ``SOURCES.md`` next to this module.
"""

from __future__ import annotations

import json
from importlib import resources

from mimo.errors import MimoError

FILES = {
    "math500": "math500.jsonl",
    "aime2024": "aime2024.jsonl",
    "aime2025": "aime2025.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "humaneval": "humaneval.jsonl",
}
BENCHMARKS = tuple(FILES)


def _read_jsonl(filename: str) -> list[dict]:
    text = resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def gsm8k_final_answer(answer_text: str) -> str:
    """The final answer of a GSM8K reference: the text after ``####``, without thousands commas."""
    if "####" not in answer_text:
        raise MimoError(f"GSM8K reference has no '####' final-answer marker: {answer_text[-80:]!r}")
    return answer_text.rsplit("####", 1)[1].strip().replace(",", "")


def _normalise(name: str, index: int, row: dict) -> dict:
    if name == "math500":
        return {"id": row["unique_id"], **row}
    if name == "gsm8k":
        return {
            "id": f"gsm8k/{index}",
            "problem": row["question"],
            **row,
            "solution": row["answer"],
            "answer": gsm8k_final_answer(row["answer"]),
        }
    if name == "humaneval":
        return {"id": row["task_id"], "problem": row["prompt"], "answer": None, **row}
    return dict(row)  # aime2024 / aime2025 already have id, problem, answer


def load_benchmark(name: str) -> list[dict]:
    """All rows of benchmark ``name`` (one of ``BENCHMARKS``), in file order, normalised as above.

    For GSM8K the original worked solution (the source's ``answer`` field) is kept as ``solution``
    and ``question`` is kept alongside ``problem``.
    """
    if name not in FILES:
        raise MimoError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return [_normalise(name, i, row) for i, row in enumerate(_read_jsonl(FILES[name]))]


def benchmark_texts(name: str) -> list[str]:
    """Every text of benchmark ``name`` that training data must not contain, for n-gram decontamination.

    Problems plus their worked solutions or reference answers (HumanEval: the prompt and the
    canonical solution together, since a solution alone is rarely quoted verbatim without its prompt).
    """
    texts = []
    for row in load_benchmark(name):
        texts.append(row["problem"])
        if name == "humaneval":
            texts.append(row["prompt"] + row["canonical_solution"])
        elif row.get("solution"):
            texts.append(row["solution"])
        elif row.get("answer"):
            texts.append(row["answer"])
    return texts
