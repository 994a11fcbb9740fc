"""RL data curation, as MiMo before RL: decontaminate the problems, then keep only those the starting model
sometimes solves.

1. Decontamination. A user problem (--math / --code files) that shares a word 16-gram with a shipped benchmark
   (MiMo's SFT rule), contains a benchmark problem too short to have one, or contains a held-out procedural
   evaluation question is dropped, counted under the first benchmark it matches. Procedural problems need no
   check: they come from the train split, which skips every eval-pool question by construction.
2. Pass-rate filter (--filter-samples N, MiMo's 16): every problem is sampled N times by the starting model
   (temperature and length as the rollouts) through continuous batching; problems solved N/N ("always_solved":
   nothing to learn) and 0/N ("never_solved": every group all-wrong) are dropped. A problem is kept as soon as it
   has one right and one wrong answer, and its remaining samples are aborted. Each sample is seeded from its
   problem and sample number, so the verdicts do not depend on batching or grading order.
`mimo rl` writes the verdicts to RUN_DIR/curation.json once and reads them back on resume (the policy has moved
on by then, so the filter must not run again).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

from tqdm import tqdm

from mimo.errors import MimoError
from mimo.eval.contamination import benchmark_matches
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.train import rewards
from mimo.train.rollout import RolloutDecoder


def problem_text(p: rewards.RLProblem) -> str:
    """What the policy sees and what could leak a benchmark: the question (code: signature, docstring, tests)."""
    return "\n".join([p.header, *p.tests]) if p.kind == "code" else p.prompt


def decontaminate(problems: list[rewards.RLProblem]) -> tuple[list[rewards.RLProblem], dict[str, str]]:
    """User problems (math, code) overlapping a benchmark or a held-out question are dropped.
    Returns (kept problems, {dropped id: benchmark or "eval_split"})."""
    user = [p for p in problems if p.kind != "reasoning"]
    dropped = {p.id: hit for p, hit in zip(user, benchmark_matches([problem_text(p) for p in user])) if hit}
    return [p for p in problems if p.id not in dropped], dropped


def pass_rate_filter(engine: Engine, tokenizer, problems: list[rewards.RLProblem], prompt_ids: dict[str, list[int]],
                     pool: rewards.RewardPool, samples: int, params: SamplingParams, slots: int, max_len: int,
                     seed: int) -> dict[str, str]:
    """Sample each problem `samples` times; returns {problem id: "kept" | "always_solved" | "never_solved"}."""
    dec = RolloutDecoder(engine, tokenizer.stop_token_ids, slots, max_len, params, seed)
    right, wrong = [0] * len(problems), [0] * len(problems)
    verdict: dict[int, str] = {}
    queue = deque((i, k) for i in range(len(problems)) for k in range(samples))  # a problem's samples together
    grading: dict = {}  # Future[Graded] -> problem index
    bar = tqdm(total=len(problems), desc="pass-rate filter", unit="problem", file=sys.stderr, leave=False,
               dynamic_ncols=True, mininterval=1.0)

    def decide():
        for f in [f for f in grading if f.done()]:
            i = grading.pop(f)
            if i in verdict:
                continue
            right[i] += f.result().correct
            wrong[i] += not f.result().correct
            if right[i] and wrong[i]:  # decided: the other samples would change nothing
                verdict[i] = "kept"
                dec.drop(lambda tag, i=i: tag[0] == i)
                rest = [item for item in queue if item[0] != i]
                queue.clear()
                queue.extend(rest)
            elif right[i] + wrong[i] == samples:
                verdict[i] = "always_solved" if right[i] else "never_solved"
            bar.update(i in verdict)

    while queue or dec.rows or grading:
        if n := min(dec.free, len(queue)):
            dec.add([((i, k), prompt_ids[problems[i].id], i * samples + k)
                     for i, k in (queue.popleft() for _ in range(n))])
        if dec.rows:
            for (i, _), tokens, reason in dec.step():
                grading[pool.submit(problems[i], tokenizer.decode(tokens[:-1] if reason == "stop" else tokens))] = i
        else:
            wait(list(grading), return_when=FIRST_COMPLETED)
        decide()
    bar.close()
    dec.session.close()
    return {problems[i].id: verdict[i] for i in range(len(problems))}


def problems_key(problems: list[rewards.RLProblem]) -> str:
    """A digest of the problem pool (ids and prompts): a cached curation belongs to exactly this pool."""
    h = hashlib.sha256()
    for p in sorted(problems, key=lambda p: p.id):
        h.update(f"{p.id}\0{p.prompt}\0".encode())
    return h.hexdigest()[:16]


def curate(path: Path, problems: list[rewards.RLProblem], settings: dict, resuming: bool,
           sample: Callable[[list[rewards.RLProblem]], dict[str, str]] | None) -> tuple[list[rewards.RLProblem], dict]:
    """Decontaminate, then run `sample` (the pass-rate filter; None: off) on what is left; or, when `path` holds
    the curation of the same pool and settings, reuse its verdicts. Writes `path`; returns (kept problems, summary:
    counts per reason)."""
    settings = {**settings, "pool": problems_key(problems)}
    cached = json.loads(path.read_text()) if path.is_file() else None
    if cached is not None and cached.get("settings") == settings:
        verdicts, seconds = cached["verdicts"], cached["seconds"]
    elif resuming and sample is not None:
        raise MimoError(f"{path}: {'made with other settings' if cached else 'missing'}; the pass-rate filter "
                        "must see the starting model, not a resumed policy: resume with the flags the run started "
                        "with, --filter-samples 0, or a new --out")
    else:
        t0 = time.perf_counter()
        clean, dropped = decontaminate(problems)
        verdicts = {**{i: f"contaminated:{hit}" for i, hit in dropped.items()},
                    **(sample(clean) if sample is not None and clean else {p.id: "kept" for p in clean})}
        seconds = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps({"settings": settings, "seconds": seconds, "verdicts": verdicts}, indent=1) + "\n")
    counts = Counter(verdicts[p.id] for p in problems)
    summary = {"problems": len(problems), "kept": counts.pop("kept", 0), "dropped": dict(sorted(counts.items())),
               "filter_samples": settings["filter_samples"], "seconds": seconds}
    kept = [p for p in problems if verdicts[p.id] == "kept"]
    if not kept:
        raise MimoError(f"curation left no problems (dropped: {describe(summary)}): give more problems, or "
                        "--filter-samples 0 to train on them unfiltered")
    return kept, summary


def describe(summary: dict) -> str:
    """One line: what curation dropped and why."""
    parts = [f"{n} {reason}" for reason, n in summary["dropped"].items()]
    return ", ".join(parts) or "none"
