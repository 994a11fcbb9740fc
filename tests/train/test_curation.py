"""RL data curation: user problems decontaminated against the shipped benchmarks; the pass-rate filter drops what the
starting model always or never solves, whatever the batching; `mimo rl` curates once and reuses it on resume."""

import argparse
import json
from concurrent.futures import Future

import pytest
from helpers import tiny_model

from mimo.benchmarks import load_benchmark
from mimo.errors import MimoError
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.train import curation, rewards, rl
from mimo.train.rewards import Graded, RLProblem


def test_user_problems_overlapping_a_benchmark_are_dropped(tmp_path):
    math500, gsm8k = load_benchmark("math500")[3]["problem"], load_benchmark("gsm8k")[0]["problem"]
    human = load_benchmark("humaneval")[0]
    math = tmp_path / "math.jsonl"
    math.write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": math500, "answer": "1"},  # verbatim
        {"problem": "Solve this first. " + gsm8k + " Show your work.", "answer": "2"},  # embedded
        {"problem": "A farmer has 17 sheep and buys 25 more at the market on a sunny Tuesday morning. How many "
                    "sheep does the farmer have now, counting every animal in the flock?", "answer": "42"}]))
    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"prompt": human["prompt"], "tests": ["assert True"],
                                "entry_point": human["entry_point"]}) + "\n")
    problems = rewards.load_problems("gcd", 5, str(math), str(code))
    kept, dropped = curation.decontaminate(problems)
    assert dropped == {"math/1": "math500", "math/2": "gsm8k", "code/1": "humaneval"}
    assert sorted(p.id for p in kept if p.kind != "reasoning") == ["math/3"]
    assert sum(p.kind == "reasoning" for p in kept) == 5  # procedural train problems are not checked


@pytest.fixture
def by_name(monkeypatch):
    """Grades by problem id: "easy" always right, "hard" never, "mixed" by the parity of the text's length (graded at
    submission, so the test does not wait on threads)."""
    calls = []

    def grade(problem, text):
        ok = {"easy": True, "hard": False}.get(problem.id.split("-")[0], len(text) % 2 == 1)
        return Graded(float(ok), ok)

    def submit(self, problem, text):
        calls.append(problem.id)
        f = Future()
        f.set_result(grade(problem, text))
        return f

    monkeypatch.setattr(rewards, "grade", grade)
    monkeypatch.setattr(rewards.RewardPool, "submit", submit)
    return calls


def test_pass_rate_filter_verdicts_do_not_depend_on_batching(tokenizer, by_name):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    items = [RLProblem(id=f"{kind}-{i}", kind="reasoning", prompt=f"question {i}")
             for i in range(3) for kind in ("easy", "hard", "mixed")]
    prompt_ids = {p.id: tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}]))
                  for p in items}
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    runs, mixed_samples = [], []
    for slots in (3, 40):
        by_name.clear()
        with rewards.RewardPool(1) as pool:
            runs.append(curation.pass_rate_filter(Engine(model, None, 128), tokenizer, items, prompt_ids, pool, 8,
                                                  params, slots, 128, seed=5))
        assert all(by_name.count(p.id) == 8 for p in items if not p.id.startswith("mixed"))
        mixed_samples.append(sum(i.startswith("mixed") for i in by_name))
    assert runs[0] == runs[1]
    assert {i: v for i, v in runs[0].items() if not i.startswith("mixed")} == {
        **{f"easy-{i}": "always_solved" for i in range(3)}, **{f"hard-{i}": "never_solved" for i in range(3)}}
    assert all(runs[0][f"mixed-{i}"] == "kept" for i in range(3))
    # a mixed problem stops sampling once it has a right and a wrong answer
    assert mixed_samples[0] < 24 and mixed_samples[1] < 24


def rl_args(model_dir, out, *extra):
    p = argparse.ArgumentParser()
    rl.add_arguments(p)
    return p.parse_args(["--from", str(model_dir), "--out", str(out), "--tasks", "gcd,lcm", "--num-problems", "6",
                         "--group-size", "2", "--batch-prompts", "1", "--mini-batch", "2", "--micro-batch", "2",
                         "--max-new-tokens", "6", "--precision", "fp32", "--device", "cpu", "--reward-workers", "1",
                         "--filter-samples", "8", *extra])


def test_rl_curates_once_and_reuses_it_on_resume(model_dir, tmp_path, monkeypatch, capfd):
    """Problems ending in 0 or 1 are always / never solved; the rest by parity: the filter drops exactly the first."""
    def grade(problem, text):
        ok = {"0": True, "1": False}.get(problem.id[-1], len(text) % 2 == 1)
        return Graded(float(ok), ok)

    monkeypatch.setattr(rewards, "grade", grade)
    out = tmp_path / "run"
    rl.run(rl_args(model_dir, out, "--max-steps", "1"))
    verdicts = json.loads((out / "curation.json").read_text())["verdicts"]
    assert len(verdicts) == 6
    for pid, v in verdicts.items():
        assert v == {"0": "always_solved", "1": "never_solved"}.get(pid[-1], "kept"), pid
    summary = json.loads((out / "run_config.json").read_text())["curation"]
    kept = sum(v == "kept" for v in verdicts.values())
    assert summary["problems"] == 6 and summary["kept"] == kept and sum(summary["dropped"].values()) == 6 - kept
    assert "curation: 6 problems, dropped" in capfd.readouterr().err

    # resumed to more steps: the verdicts come from curation.json (the policy is no longer the starting model)
    monkeypatch.setattr(curation, "pass_rate_filter", lambda *a, **kw: pytest.fail("filter ran again"))
    rl.run(rl_args(model_dir, out, "--max-steps", "2"))
    assert json.loads((out / "curation.json").read_text())["verdicts"] == verdicts
    with pytest.raises(MimoError, match="made with other settings"):
        rl.run(rl_args(model_dir, out, "--max-steps", "3", "--filter-samples", "16"))
    (out / "curation.json").unlink()
    with pytest.raises(MimoError, match="curation.json: missing"):
        rl.run(rl_args(model_dir, out, "--max-steps", "3"))
    rl.run(rl_args(model_dir, out, "--max-steps", "3", "--filter-samples", "0"))  # unfiltered: nothing to redo
    assert set(json.loads((out / "curation.json").read_text())["verdicts"].values()) == {"kept"}


def test_filter_samples_must_be_zero_or_at_least_two(model_dir, tmp_path):
    with pytest.raises(MimoError, match="--filter-samples must be 0"):
        rl.run(rl_args(model_dir, tmp_path / "run", "--filter-samples", "1"))
