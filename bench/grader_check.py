"""Check the math grader against the shipped references.

    python bench/grader_check.py

- MATH-500: the boxed answer of each reference solution must grade correct against the row's answer;
  also counts the answers math-verify turns into a SymPy object (the rest are compared as strings),
  and how many answers wrongly match the next problem's (different) answer.
- GSM8K: the reference solution, graded with the last-number fallback (its "#### N" line), must be correct.
"""

import time
from itertools import pairwise

from math_verify import parse
from sympy import Basic, MatrixBase

from mimo.benchmarks import load_benchmark
from mimo.eval.grading import PARSE_CONFIG, extract_boxed, grade_math, math_equal, normalise_answer


def main() -> None:
    start = time.time()
    math500 = load_benchmark("math500")
    correct = sum(math_equal(extract_boxed(r["solution"]) or "", r["answer"]) for r in math500)
    print(f"MATH-500 reference answers: {correct}/{len(math500)} correct")

    symbolic = sum(isinstance((parse(f"${normalise_answer(r['answer'])}$", PARSE_CONFIG) or [None])[0],
                              (Basic, MatrixBase)) for r in math500)
    print(f"MATH-500 reference answers parsed by SymPy: {symbolic}/{len(math500)}")

    pairs = [(a["answer"], b["answer"]) for a, b in pairwise(math500) if a["answer"] != b["answer"]]
    false_matches = [p for p in pairs if math_equal(*p)]
    print(f"MATH-500 answers equal to the next problem's different answer: {len(false_matches)}/{len(pairs)}"
          + (f" {false_matches}" if false_matches else ""))

    gsm8k = load_benchmark("gsm8k")
    correct = sum(grade_math(r["solution"], r["answer"], fallback_last_number=True)[1] for r in gsm8k)
    print(f"GSM8K reference answers: {correct}/{len(gsm8k)} correct")
    print(f"took {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
