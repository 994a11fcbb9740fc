"""Benchmark metrics from per-problem samples, each with a 95% bootstrap interval over problems.

Input is one list per problem: ``correct[i][j]`` says whether sample ``j`` of problem ``i`` was graded
correct, ``answers[i][j]`` is the answer extracted from it (None when there was none).

- avg@k: mean accuracy of the first k samples of each problem, averaged over problems (MiMo's
  "mean over 32 samples" for AIME is avg@32).
- pass@k: probability that at least one of k samples is correct, with the unbiased estimator of
  Chen et al. 2021 (Codex paper) over all n samples of a problem: 1 - C(n-c, k) / C(n, k).
- maj@k: the most frequent answer among the first k samples is graded (self-consistency). Answers are
  compared as strings with whitespace removed; None never wins; a tie goes to the answer seen first.

Every metric is a mean of per-problem scores, so its interval comes from resampling problems with
replacement (percentile bootstrap, fixed seed): it shows how much the number would move on another
draw of problems of the same kind, not the sampling noise within a problem.
Metrics are returned as JSON-ready dicts ``{"value", "ci_low", "ci_high", "n"}`` with values in [0, 1]
and ``n`` the number of problems.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mimo.errors import MimoError

RESAMPLES = 1000
SEED = 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct out of ``n`` samples.

    The numerically stable product form of 1 - C(n-c, k) / C(n, k) from Chen et al. 2021.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise MimoError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    Answers count as equal when equal after removing whitespace. Ties go to the answer that appears
    first, and the winning index is that answer's first occurrence.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        key = "".join(str(answer).split())
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    winner = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[winner]


def bootstrap_ci(scores: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores``, resampling them with replacement."""
    scores = np.asarray(scores, dtype=float)
    if len(scores) == 0:
        raise MimoError("no problems to compute a metric over")
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(resamples, len(scores)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def estimate(scores: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """``{"value", "ci_low", "ci_high", "n"}`` for the mean of per-problem ``scores``."""
    low, high = bootstrap_ci(scores, resamples, seed)
    return {"value": float(np.mean(scores)), "ci_low": low, "ci_high": high, "n": len(scores)}


def _samples_per_problem(correct: Sequence[Sequence[bool]]) -> int:
    if not correct:
        raise MimoError("no problems to compute a metric over")
    n = min(len(c) for c in correct)
    if n == 0:
        raise MimoError("every problem needs at least one graded sample")
    return n


def _check_k(k: int, n: int, name: str) -> None:
    if not 1 <= k <= n:
        raise MimoError(f"{name}@{k} needs between 1 and {n} samples per problem (the fewest any problem has)")


def avg_at(correct: Sequence[Sequence[bool]], k: int | None = None) -> dict:
    """avg@k: mean accuracy over the first ``k`` samples of each problem (default: as many as all have)."""
    k = k or _samples_per_problem(correct)
    _check_k(k, _samples_per_problem(correct), "avg")
    return estimate([float(np.mean(c[:k])) for c in correct])


def pass_at(correct: Sequence[Sequence[bool]], k: int) -> dict:
    """pass@k, the unbiased estimate from all samples of each problem."""
    _check_k(k, _samples_per_problem(correct), "pass")
    return estimate([pass_at_k(len(c), int(sum(map(bool, c))), k) for c in correct])


def maj_at(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence[str | None]],
           k: int | None = None) -> dict:
    """maj@k: a problem counts as solved when the majority answer of its first ``k`` samples is correct."""
    if len(answers) != len(correct) or any(len(a) != len(c) for a, c in zip(answers, correct)):
        raise MimoError("answers and correct must have the same shape (one entry per sample)")
    k = k or _samples_per_problem(correct)
    _check_k(k, _samples_per_problem(correct), "maj")
    scores = []
    for c, a in zip(correct, answers):
        winner = majority_index(a[:k])
        scores.append(float(winner is not None and bool(c[winner])))
    return estimate(scores)


def default_ks(n: int) -> list[int]:
    """The k reported for n samples per problem: powers of two below n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence[str | None]] | None = None,
              ks: Sequence[int] | None = None) -> dict[str, dict]:
    """The headline metrics of a run: ``avg@n``, then ``pass@k`` for k > 1 and ``maj@n`` (with answers)
    when there are n > 1 samples per problem. ``ks`` overrides the k of pass@k (default: ``default_ks``).

    pass@1 is not listed separately: its unbiased estimate equals avg@n.
    """
    n = _samples_per_problem(correct)
    metrics = {f"avg@{n}": avg_at(correct, n)}
    if n > 1:
        for k in ks or default_ks(n):
            if k > 1:
                metrics[f"pass@{k}"] = pass_at(correct, k)
        if answers is not None:
            metrics[f"maj@{n}"] = maj_at(correct, answers, n)
    return metrics


def breakdown(rows: Sequence[dict], key: str = "group") -> dict:
    """Mean accuracy (all samples of each problem) per value of ``row[key]``, with intervals.

    ``rows`` are per-problem dicts with ``key`` (a subject, a level, a task...) and ``correct`` (the
    list of sample results). Groups come back sorted, a missing (None) group last.
    """
    groups: dict = {}
    for row in rows:
        if not row["correct"]:
            raise MimoError(f"problem in group {row.get(key)!r} has no graded samples")
        groups.setdefault(row.get(key), []).append(float(np.mean(row["correct"])))
    order = sorted(groups, key=lambda g: (g is None, type(g).__name__, g if g is not None else 0))
    return {group: estimate(groups[group]) for group in order}
