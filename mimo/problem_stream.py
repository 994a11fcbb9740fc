"""Which RL problems a step draws: the train stream, MiMo's easy pool, and task sampling by informativeness.

MiMo filters its RL set before training: problems the SFT model solves in 16 of 16 samples and problems it never
solves are removed, because their groups carry no advantage. `--task-sampling informative` is the online form
of that filter at the level of a problem's source (its reasoning task, or "math" / "code"): each source is drawn
in proportion to its share of the problems times the recent rate at which its groups were informative (rewards
not all equal), estimated with a Beta(1, 1) prior over exponentially decayed counts, so a task the policy never
or always solves costs few rollouts but is still drawn now and then (the policy changes). `uniform` walks the
shuffled problems in order, as MiMo's filtered set is walked.
"""

from __future__ import annotations

import random

from mimo import rewards

TASK_SAMPLING = ("uniform", "informative")


def source(problem: rewards.RLProblem) -> str:
    """The task a problem comes from: its reasoning task, or its kind (math, code)."""
    return problem.problem.task if problem.problem is not None else problem.kind


class ProblemStream:
    """The train problems in a fixed order walked by a cursor, plus MiMo's easy pool: a problem that every rollout
    of its group solved moves to the pool and leaves the main stream; each drawn problem comes from the pool with
    probability `easy_prob` (removing easy problems outright destabilised MiMo's training).
    task_sampling "informative": the next non-easy problem comes from a source picked by weight() (one cursor per
    source); "uniform": from the shuffled list in order. decay: how much of a source's counts survive a step."""

    def __init__(self, problems: list[rewards.RLProblem], easy_prob: float = 0.1, seed: int = 0,
                 task_sampling: str = "uniform", decay: float = 0.8):
        if task_sampling not in TASK_SAMPLING:
            raise ValueError(f"task_sampling must be one of {TASK_SAMPLING}, got {task_sampling!r}")
        self.problems, self.easy_prob, self.seed = problems, easy_prob, seed
        self.task_sampling, self.decay = task_sampling, decay
        self.by_id = {p.id: p for p in problems}
        self.cursor, self.easy = 0, []  # easy: problem ids in the order they joined
        self.rng = random.Random(seed)
        self.by_source: dict[str, list[rewards.RLProblem]] = {}
        for p in problems:
            self.by_source.setdefault(source(p), []).append(p)
        self.cursors = dict.fromkeys(self.by_source, 0)
        self.counts = {s: [0.0, 0.0] for s in self.by_source}  # decayed [informative groups, groups]

    def begin_step(self, step: int):
        """Seed this step's easy-pool draws from the step number (so a resumed run draws the same)."""
        self.rng = random.Random(self.seed * 1_000_003 + step)

    def weight(self, s: str) -> float:
        """A source's draw weight: its share of the problems x its estimated informative-group rate."""
        informative, groups = self.counts[s]
        return len(self.by_source[s]) / len(self.problems) * (informative + 1) / (groups + 2)

    def weights(self) -> dict[str, float]:
        """Every source's probability of being drawn next (outside the easy pool)."""
        if self.task_sampling == "uniform":
            return {s: len(ps) / len(self.problems) for s, ps in self.by_source.items()}
        w = {s: self.weight(s) for s in self.by_source}
        total = sum(w.values())
        return {s: v / total for s, v in w.items()}

    def draw(self, n: int) -> list[tuple[rewards.RLProblem, bool]]:
        """n problems, each with whether it came from the easy pool."""
        out, easy = [], set(self.easy)
        for _ in range(n):
            if self.easy and (len(easy) >= len(self.by_id) or self.rng.random() < self.easy_prob):
                out.append((self.by_id[self.rng.choice(self.easy)], True))
                continue
            out.append((self._next_informative(easy) if self.task_sampling == "informative"
                        else self._next_in_order(easy), False))
        return out

    def _next_in_order(self, easy: set[str]) -> rewards.RLProblem:
        while (p := self.problems[self.cursor % len(self.problems)]).id in easy:
            self.cursor += 1
        self.cursor += 1
        return p

    def _next_informative(self, easy: set[str]) -> rewards.RLProblem:
        open_sources = [s for s, ps in self.by_source.items() if any(p.id not in easy for p in ps)]
        s = self.rng.choices(open_sources, weights=[self.weight(s) for s in open_sources])[0]
        ps = self.by_source[s]
        while (p := ps[self.cursors[s] % len(ps)]).id in easy:
            self.cursors[s] += 1
        self.cursors[s] += 1
        return p

    def observe(self, results: list[tuple[rewards.RLProblem, bool]]):
        """One step's finished groups as (problem, informative): decay every source's counts, then add these."""
        for c in self.counts.values():
            c[0] *= self.decay
            c[1] *= self.decay
        for problem, informative in results:
            c = self.counts[source(problem)]
            c[0] += float(informative)
            c[1] += 1.0

    def mark_easy(self, problem: rewards.RLProblem):
        if problem.id not in self.easy:
            self.easy.append(problem.id)

    def state(self) -> dict:
        return {"cursor": self.cursor, "easy": list(self.easy), "cursors": dict(self.cursors),
                "counts": {s: list(c) for s, c in self.counts.items()}}

    def load_state(self, state: dict):
        self.cursor, self.easy = state["cursor"], [i for i in state["easy"] if i in self.by_id]
        self.cursors.update({s: c for s, c in state.get("cursors", {}).items() if s in self.cursors})
        self.counts.update({s: list(c) for s, c in state.get("counts", {}).items() if s in self.counts})
