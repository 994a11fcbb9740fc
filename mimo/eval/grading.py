"""Grading of math answers: pull the final answer out of a completion, compare it with the reference.

Equivalence is decided by HuggingFace's ``math-verify`` (``parse`` + ``verify``), which turns LaTeX or
plain expressions into SymPy objects and compares them numerically and symbolically: ``1/2``,
``0.5``, ``\\frac{1}{2}`` and ``\\dfrac12`` are one answer, ``[1,2)`` and ``(1,2]`` are not. Before
parsing, both sides get a light normalisation for forms math-verify misreads (see ``normalise_answer``).

Timeouts. math-verify bounds each parse and comparison with ``signal.alarm``, which only works in
the main thread; from any other thread it raises ``ValueError`` unless its timeouts are switched
off, and without them some answers (``(10^{10})!``, ``x^{100000}-1``) keep SymPy busy for minutes.
So ``math_equal`` runs math-verify in-process when called from the main thread, and from any other
thread hands the comparison to a few worker subprocesses (``python -m mimo.eval.grading``, started on
first use), whose main threads can use the signal timeouts; a wall-clock limit on top kills and
replaces a worker that is stuck anyway. POSIX only, like math-verify's timeouts.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from pathlib import Path

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

DEFAULT_TIMEOUT = 5
"""Seconds math-verify may spend on one parse or one comparison."""

PARSE_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
"""How math-verify reads an answer (wrapped in ``$...$``): as LaTeX, else as a plain expression."""

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(
    r"(?:(?<![\w)\].])-)?"  # a minus sign, unless it is a binary minus as in "3-4"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"  # 1,234 or 1234, optional decimals
    r"|(?<![\w.])\.\d+"  # .5
)


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    Escaped braces (``\\{``, ``\\}``) do not count. Returns None when there is no box, or when the
    last one is never closed (a truncated completion has no final answer).
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


def extract_last_number(text: str) -> str | None:
    """The last number written in ``text``, thousands commas removed: "-1,234.5" -> "-1234.5"."""
    numbers = _NUMBER.findall(text.replace("\u2212", "-"))
    return numbers[-1].replace(",", "") if numbers else None


def extract_math_answer(completion: str, fallback_last_number: bool = False) -> str | None:
    """The final answer of ``completion``: its last boxed expression, else (with
    ``fallback_last_number``, as for GSM8K) the last number in the text, else None."""
    boxed = extract_boxed(completion)
    if boxed is not None or not fallback_last_number:
        return boxed
    return extract_last_number(completion)


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
# "1\,000" or "1\;000": a LaTeX space used as a thousands separator (math-verify reads 1*000)
_SPACED_THOUSANDS = re.compile(r"(?<=\d)\\[,;:! ](?=\d{3}(?!\d))")
# "\text{5 inches}": math-verify reads a number inside \text{} as part of a word ("5inches")
_TEXT_WITH_NUMBER = re.compile(r"\\(?:text|textrm|textbf|mathrm|mbox)\{\s*(-?\d[\d.,]*)\s*([^{}]*)\}")


def _move_number_out_of_text(match: re.Match) -> str:
    number, rest = match[1], match[2].strip()
    return f"{number}\\text{{ {rest}}}" if rest else number


def normalise_answer(answer: str) -> str:
    """Rewrite the few answer forms that math-verify misparses, leaving everything else alone.

    - math delimiters ``$`` are dropped (the answer is wrapped in ``$...$`` for parsing; ``\\$`` stays),
    - ``°`` becomes ``^\\circ``,
    - a LaTeX space between digit groups is a thousands separator: ``1\\,000`` -> ``1000``,
    - a number inside ``\\text{}`` moves out of it: ``\\text{5 inches}`` -> ``5\\text{ inches}``.
    """
    answer = _UNESCAPED_DOLLAR.sub("", answer.strip())
    answer = answer.replace("°", "^\\circ")
    answer = _SPACED_THOUSANDS.sub("", answer)
    return _TEXT_WITH_NUMBER.sub(_move_number_out_of_text, answer)


def _math_equal_here(pred: str, ref: str, timeout: int) -> bool:
    """math-verify in the calling thread, whose ``timeout`` (seconds) only works in a main thread."""
    pred, ref = normalise_answer(pred), normalise_answer(ref)
    if not pred or not ref:
        return False
    try:
        gold = parse(f"${ref}$", PARSE_CONFIG, parsing_timeout=timeout)
        answer = parse(f"${pred}$", PARSE_CONFIG, parsing_timeout=timeout)
        return bool(gold and answer and verify(gold, answer, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # noqa: BLE001 - grading never raises: a failure is a wrong answer
        return False


class _WorkerPool:
    """Grader subprocesses (``python -m mimo.eval.grading``) for callers outside the main thread.

    Each worker answers one comparison at a time in its own main thread, so math-verify's signal
    timeouts work there. Workers start on demand, up to ``size``; one that does not answer within
    the hard limit is killed and replaced, without disturbing the others.
    """

    def __init__(self, size: int):
        self._size = size
        self._idle: list[subprocess.Popen] = []
        self._running = 0
        self._changed = threading.Condition()

    def _start(self) -> subprocess.Popen:
        python_path = [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, python_path)))
        worker = subprocess.Popen(
            [sys.executable, "-m", "mimo.eval.grading"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        if worker.stdout.readline() != "ready\n":
            worker.kill()
            raise OSError("grader worker failed to start")
        return worker

    def _acquire(self) -> subprocess.Popen:
        with self._changed:
            while not self._idle and self._running >= self._size:
                self._changed.wait()
            if self._idle:
                return self._idle.pop()
            self._running += 1
        try:
            return self._start()
        except Exception:
            self._release(None, healthy=False)
            raise

    def _release(self, worker: subprocess.Popen | None, healthy: bool) -> None:
        with self._changed:
            if healthy:
                self._idle.append(worker)
            else:
                self._running -= 1
                if worker is not None:
                    worker.kill()
                    worker.wait()
            self._changed.notify()

    def close(self) -> None:
        """Stop the idle workers (at interpreter exit)."""
        with self._changed:
            for worker in self._idle:
                worker.kill()
                worker.wait()
            self._running -= len(self._idle)
            self._idle.clear()

    def __call__(self, pred: str, ref: str, timeout: int) -> bool:
        try:
            worker = self._acquire()
        except OSError:
            return False
        reply = ""
        try:
            worker.stdin.write(json.dumps([pred, ref, timeout]) + "\n")
            worker.stdin.flush()
            # two parses and up to four comparisons may each take `timeout`; past that it is stuck
            if select.select([worker.stdout], [], [], 6 * timeout + 10)[0]:
                reply = worker.stdout.readline()
        except OSError:
            pass
        finally:
            self._release(worker, healthy=reply in ("0\n", "1\n"))
        return reply == "1\n"


def _serve() -> None:
    """Worker loop of ``_WorkerPool``: one JSON ``[pred, ref, timeout]`` per line in, "1"/"0" out."""
    protocol, sys.stdout = sys.stdout, sys.stderr  # nothing else may write to the reply stream
    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin:
        pred, ref, timeout = json.loads(line)
        protocol.write("1\n" if _math_equal_here(pred, ref, timeout) else "0\n")
        protocol.flush()


_worker_pool = _WorkerPool(size=min(4, os.cpu_count() or 1))
atexit.register(_worker_pool.close)


def math_equal(pred: str, ref: str, timeout: int = DEFAULT_TIMEOUT) -> bool:
    """Whether answer ``pred`` is mathematically equivalent to reference answer ``ref``.

    Both are bare answers ("3/4", "\\frac{3}{4}", "(1,2]", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    not whole completions. Never raises: a non-string, empty, unparsable or too slow input is False.
    Safe to call from any thread (see the module docstring).
    """
    if not isinstance(pred, str) or not isinstance(ref, str) or not pred.strip() or not ref.strip():
        return False
    timeout = max(1, int(timeout))
    if threading.current_thread() is threading.main_thread():
        return _math_equal_here(pred, ref, timeout)
    return _worker_pool(pred, ref, timeout)


def grade_math(
    completion: str, ref: str, fallback_last_number: bool = False, timeout: int = DEFAULT_TIMEOUT
) -> tuple[str | None, bool]:
    """Extract the final answer of ``completion`` and grade it against ``ref``: (extracted, correct)."""
    extracted = extract_math_answer(completion, fallback_last_number) if isinstance(completion, str) else None
    if extracted is None:
        return None, False
    return extracted, math_equal(extracted, ref, timeout)


if __name__ == "__main__":
    _serve()
