"""RL rollouts: continuous batching through the engine, asynchronous rewards, dynamic sampling, early termination.

`rollout()` samples groups of completions until `batch_prompts` informative groups are accepted (or the resample
cap is hit). Continuous rollout (default): --rollout-slots rows decode together, a finished row's slot takes the
next pending sample at once, and each finished completion goes to the reward pool at once. --naive-rollout
generates a whole round, then grades it (the baseline of MiMo's "2.29x faster training").

Early termination decides when the batch is complete and the remaining rollouts are aborted:
- fifo (default, MiMo's rule): groups are started in order; the batch is the first `batch_prompts` informative
  groups in start order, accepted once every group started before its last one has finished. Which groups are
  trained on does not depend on how fast they finished, so long responses are not under-represented. As soon as
  `batch_prompts` finished groups are informative, groups started after the last of them can never be accepted:
  their rows are aborted at once and no new problems are drawn, so the slots go to the stragglers.
- first-finished: the first `batch_prompts` groups to finish grading informative are accepted at once. Faster per
  step, but it favours groups whose responses are all short.
The step's metrics compare `trained_response_length` (accepted groups) with `response_length` (every rollout
that finished decoding in the step) to show that bias.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams, row_seed
from mimo.train import rewards
from mimo.train.loop import bf16_supported
from mimo.train.rl_config import RLConfig


def rollout_model(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """The weights rollouts decode with (--rollout-precision): the fp32 policy itself, or a bf16 copy that
    sync_rollout_model refreshes after every update. bf16 halves the bytes a decode step reads and, on a CPU,
    hands every block of a decode pass to mimo's kernels in one call (block_kernel): the tiny speedrun model's
    128-row rollout batch decodes ~1.6x faster (docs/benchmarks.md, "RL against a peer")."""
    if precision == "fp32" or (precision == "auto" and not bf16_supported(device)):
        return model
    return copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)


@torch.no_grad()
def sync_rollout_model(rollout: torch.nn.Module, model: torch.nn.Module):
    """Copy the policy's weights into its rollout copy, in place (the engine's kernels keep their pointers)."""
    if rollout is not model:
        for dst, src in zip(rollout.parameters(), model.parameters(), strict=True):
            dst.copy_(src)


class RolloutDecoder:
    """Continuous batching through the engine's session: samples join with add() and leave when they end, and a
    freed slot takes the next pending sample at once. The session runs without a tokenizer (token ids only), so
    a sampled stop token stays in the row's tokens (the policy is trained to emit it) and we end the row there.
    Each sample is seeded from its own index, so what it draws does not depend on which others share the batch
    or on when it was added."""

    def __init__(self, engine: Engine, stop_ids, slots: int, max_len: int, params: SamplingParams, seed: int):
        self.session = engine.session(max_batch=slots, max_seq_len=max_len)
        self.stop, self.params, self.seed, self.slots = set(stop_ids), params, seed, slots
        self.rows: dict[int, tuple[Any, int]] = {}  # request id -> (tag, tokens already checked for a stop)
        self.generated = self.aborted = 0

    @property
    def free(self) -> int:
        return self.slots - len(self.rows)

    def add(self, items: list[tuple[Any, list[int], int]]):
        """Queue (tag, prompt ids, sample index) samples; the next step() prefills them together."""
        for tag, prompt, index in items:
            rid = self.session.add(prompt, dataclasses.replace(self.params, seed=row_seed(self.seed, index)))
            self.rows[rid] = (tag, 0)

    def drop(self, unwanted: Callable[[Any], bool]):
        """Abort the running samples whose tag is unwanted (their slots free at once)."""
        for rid, (tag, _) in list(self.rows.items()):
            if unwanted(tag):
                self.session.abort(rid)
                del self.rows[rid]
                self.aborted += 1

    def step(self) -> list[tuple[Any, list[int], str]]:
        """Advance every row; return (tag, tokens, "stop" | "length") of the rows that ended."""
        self.session.step()
        finished = []
        for rid, (tag, checked) in list(self.rows.items()):
            completion = self.session.completion(rid)
            tokens = completion.tokens
            self.generated += len(tokens) - checked
            stop = next((i for i in range(checked, len(tokens)) if tokens[i] in self.stop), None)
            if stop is not None:
                self.session.abort(rid)
                finished.append((tag, tokens[: stop + 1], "stop"))
            elif completion.finish_reason is not None:
                self.session.abort(rid)
                finished.append((tag, list(tokens), "length"))
            else:
                self.rows[rid] = (tag, len(tokens))
                continue
            del self.rows[rid]
        return finished


@dataclass
class Group:
    index: int  # start order within the step
    problem: rewards.RLProblem
    from_easy: bool
    prompt: list[int]
    tokens: list = field(default_factory=list)  # [G] response token lists (None until generated)
    futures: list = field(default_factory=list)  # [G] Future[Graded]
    rewards: list[float] | None = None
    correct: list[bool] | None = None
    finished: int | None = None  # rank in the order groups finished grading

    @property
    def informative(self) -> bool:
        return self.rewards is not None and informative(self.rewards)


def informative(group_rewards: list[float]) -> bool:
    """Dynamic sampling: a group whose rewards are all equal has zero advantage everywhere, so it is dropped."""
    return max(group_rewards) - min(group_rewards) > 1e-9


def fifo_cutoff(groups: list[Group], target: int) -> int | None:
    """Start index of the `target`-th informative group among the finished ones (None: fewer yet). No group
    started after it can enter the FIFO batch, whatever the unfinished groups before it turn out to be."""
    seen = 0
    for g in groups:
        seen += g.informative
        if seen == target:
            return g.index
    return None


def accepted(groups: list[Group], target: int, rule: str, final: bool = False) -> list[Group] | None:
    """The batch the early-termination rule accepts now, or None while it must wait. final: nothing more will
    finish (the resample cap is spent), so whatever is informative is accepted, up to `target`."""
    if rule == "first-finished":
        valid = sorted((g for g in groups if g.informative), key=lambda g: g.finished)[:target]
        return valid if len(valid) == target or final else None
    cutoff = fifo_cutoff(groups, target)
    if cutoff is None and not final:
        return None
    head = groups if cutoff is None else groups[: cutoff + 1]
    if not final and any(g.rewards is None for g in head):
        return None
    return [g for g in head if g.informative][:target]


class ProblemStream:
    """The train problems in a fixed order walked by a cursor, plus MiMo's easy pool: a problem that every rollout
    of its group solved moves to the pool and leaves the main stream; each drawn problem comes from the pool with
    probability `easy_prob` (removing easy problems outright destabilised MiMo's training)."""

    def __init__(self, problems: list[rewards.RLProblem], easy_prob: float = 0.1, seed: int = 0):
        self.problems, self.easy_prob, self.seed = problems, easy_prob, seed
        self.by_id = {p.id: p for p in problems}
        self.cursor, self.easy = 0, []  # easy: problem ids in the order they joined
        self.rng = random.Random(seed)

    def begin_step(self, step: int):
        """Seed this step's easy-pool draws from the step number (so a resumed run draws the same)."""
        self.rng = random.Random(self.seed * 1_000_003 + step)

    def draw(self, n: int) -> list[tuple[rewards.RLProblem, bool]]:
        """n problems, each with whether it came from the easy pool."""
        out, easy = [], set(self.easy)
        for _ in range(n):
            if self.easy and (len(easy) >= len(self.by_id) or self.rng.random() < self.easy_prob):
                out.append((self.by_id[self.rng.choice(self.easy)], True))
                continue
            while (p := self.problems[self.cursor % len(self.problems)]).id in easy:
                self.cursor += 1
            self.cursor += 1
            out.append((p, False))
        return out

    def mark_easy(self, problem: rewards.RLProblem):
        if problem.id not in self.easy:
            self.easy.append(problem.id)

    def state(self) -> dict:
        return {"cursor": self.cursor, "easy": list(self.easy)}

    def load_state(self, state: dict):
        self.cursor, self.easy = state["cursor"], [i for i in state["easy"] if i in self.by_id]


def rollout(engine: Engine, tokenizer, stream: ProblemStream, pool: rewards.RewardPool, cfg: RLConfig, step: int,
            prompt_ids: dict[str, list[int]], max_len: int) -> tuple[list[Group], dict]:
    """Sample groups until `batch_prompts` informative ones are accepted (or the resample cap is hit); returns them
    and the step's statistics. engine: one Engine on the policy for the whole run (its eager steps see the updated
    weights), so every step's session reuses the same KV cache instead of allocating one per step."""
    G, target = cfg.group_size, cfg.batch_prompts
    cap = target * (1 + cfg.max_resample_rounds)  # most groups drawn in one step
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    dec = RolloutDecoder(engine, tokenizer.stop_token_ids, cfg.rollout_slots or target * G, max_len, params,
                         seed=cfg.seed * 1_000_003 + step)
    groups: list[Group] = []
    queue: deque = deque()  # (group, sample index) waiting for a slot
    finished_count = [0]
    rule = "fifo" if cfg.naive_rollout else cfg.early_termination  # whole rounds: start order
    t0 = time.perf_counter()

    def draw(n):
        for problem, easy in stream.draw(n):
            g = Group(len(groups), problem, easy, prompt_ids[problem.id], [None] * G, [None] * G)
            groups.append(g)
            queue.extend((g, k) for k in range(G))

    def fill():
        n = min(dec.free, len(queue))
        if n:
            dec.add([((g, k), g.prompt, g.index * G + k) for g, k in (queue.popleft() for _ in range(n))])

    def submit(finished):
        for (g, k), tokens, reason in finished:
            g.tokens[k] = tokens
            g.futures[k] = pool.submit(g.problem, tokenizer.decode(tokens[:-1] if reason == "stop" else tokens))

    def harvest():
        for g in groups:
            if g.rewards is None and all(f is not None and f.done() for f in g.futures):
                graded = [f.result() for f in g.futures]
                g.rewards = rewards.group_rewards(g.problem, graded, cfg.code_config())
                g.correct = [x.correct for x in graded]
                g.finished, finished_count[0] = finished_count[0], finished_count[0] + 1
                if all(g.correct) and not g.from_easy:
                    stream.mark_easy(g.problem)

    def pending():
        return [f for g in groups if g.rewards is None for f in g.futures if f is not None and not f.done()]

    batch = None
    if cfg.naive_rollout:  # whole rounds: generate everything, then grade everything
        while len(groups) < cap:
            draw(min(target - sum(g.informative for g in groups), cap - len(groups)))
            done = []
            while queue or dec.rows:
                if not dec.rows:
                    fill()
                done += dec.step()
            submit(done)
            wait(pending())
            harvest()
            if (batch := accepted(groups, target, rule)) is not None:
                break
    else:  # continuous: refill slots at once, grade asynchronously, stop when the rule accepts a batch
        cutoff = None  # fifo: no group started after this one can be accepted
        while (batch := accepted(groups, target, rule)) is None:
            while dec.free and (queue or (len(groups) < cap and cutoff is None)):
                if not queue:
                    draw(1)
                fill()
            if dec.rows:
                submit(dec.step())
            elif waiting := pending():
                wait(waiting, return_when=FIRST_COMPLETED)
            elif not queue:
                break  # the resample cap is spent and everything finished
            harvest()
            last = fifo_cutoff(groups, target) if rule == "fifo" else None
            if last is not None and (cutoff is None or last < cutoff):
                cutoff = last
                dec.drop(lambda tag, c=last: tag[0].index > c)  # never accepted: free their slots now
                kept = [item for item in queue if item[0].index <= last]
                queue.clear()
                queue.extend(kept)
    if batch is None:
        harvest()
        batch = accepted(groups, target, rule, final=True)
    for g in groups:  # early termination: grading nobody will read
        for f in g.futures:
            if f is not None:
                f.cancel()
    dec.drop(lambda tag: True)
    dec.session.close()
    return batch, rollout_stats(groups, batch, dec, time.perf_counter() - t0)


def rollout_stats(groups: list[Group], batch: list[Group], dec: RolloutDecoder, seconds: float) -> dict:
    finished = [g for g in groups if g.rewards is not None]
    all_rewards = [r for g in finished for r in g.rewards]
    all_correct = [c for g in finished for c in g.correct]
    lengths = [len(t) for g in groups for t in g.tokens if t is not None]  # every rollout that finished decoding
    trained = [len(t) for g in batch for t in g.tokens]
    return {"rollout_s": seconds, "groups_sampled": len(finished), "groups_valid": len(batch),
            "dropped_group_fraction": sum(not g.informative for g in finished) / max(len(finished), 1),
            "reward_mean": sum(all_rewards) / max(len(all_rewards), 1),
            "pass_rate": sum(all_correct) / max(len(all_correct), 1),
            "response_length": sum(lengths) / max(len(lengths), 1),
            "trained_response_length": sum(trained) / len(trained) if trained else None,
            "rollouts_finished": len(lengths), "rollouts_aborted": dec.aborted, "tokens_generated": dec.generated}
