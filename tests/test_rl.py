"""GRPO pieces checked by hand, the rollout's dynamic sampling and easy pool, frozen MTP layers, and a short
`mimo rl` run end to end on a tiny model with resume."""

import argparse
import json
import math

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from mimo import rewards, rl
from mimo.engine import Engine
from mimo.rewards import Graded, RLProblem
from mimo.train import TrainConfig, make_optimizer


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 1.0, 0.0]])
    std0 = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    std1 = math.sqrt((0 + 0 + 0.25 + 0.25) / 3)
    want = torch.tensor([[0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0], [0.0, 0.0, 0.5 / std1, -0.5 / std1]])
    assert torch.allclose(rl.group_advantages(r, eps=0.0), want)
    assert torch.allclose(rl.group_advantages(r, scale=False), torch.tensor([[.5, -.5, -.5, .5], [0, 0, .5, -.5]]))
    assert torch.equal(rl.group_advantages(torch.ones(1, 4)), torch.zeros(1, 4))  # eps keeps it finite
    assert rl.informative([0.0, 1.0, 0.0]) and not rl.informative([1.0] * 4) and not rl.informative([0.3] * 2)


def test_token_level_normalisation():
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # a 1-token and a 3-token response
    token = rl.loss_weights(mask, "token", n_tokens=4, n_seqs=2)
    seq = rl.loss_weights(mask, "sequence", n_tokens=4, n_seqs=2)
    assert torch.allclose(token, mask / 4)
    assert torch.allclose(seq, torch.tensor([[0.5, 0, 0], [1 / 6, 1 / 6, 1 / 6]]))
    zeros, adv = torch.zeros(2, 3), torch.tensor([1.0, -1.0])
    # ratio 1: the loss is -sum(w * A): token level the long negative response outweighs the short positive one
    assert rl.policy_loss(zeros, zeros, adv, token)[0].item() == pytest.approx(-(1 / 4 - 3 / 4))
    assert rl.policy_loss(zeros, zeros, adv, seq)[0].item() == pytest.approx(0.0, abs=1e-6)
    # split into micro-batches with the mini-batch's totals, the sum equals the whole
    halves = sum(rl.policy_loss(zeros[i:i + 1], zeros[i:i + 1], adv[i:i + 1],
                                rl.loss_weights(mask[i:i + 1], "token", 4, 2))[0] for i in range(2))
    assert halves.item() == pytest.approx(0.5)


def test_clip_higher_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.25, 0.75, 1.5])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0])
    logp = torch.log(ratio)[:, None].clone().requires_grad_(True)  # one token per sequence, old log-prob 0
    loss, clipped, _ = rl.policy_loss(logp, torch.zeros(5, 1), adv, torch.ones(5, 1), eps_low=0.2, eps_high=0.28)
    # per token -min(r A, clip(r, 0.8, 1.28) A): -1.28, 0.8, -1.25, 0.8, 1.5
    assert loss.item() == pytest.approx(-1.28 + 0.8 - 1.25 + 0.8 + 1.5)
    assert clipped.squeeze(1).tolist() == [True, True, False, True, False]
    loss.backward()  # clipped tokens get no gradient; d(-A r)/d logp = -A r elsewhere
    assert logp.grad.squeeze(1).tolist() == pytest.approx([0.0, 0.0, -1.25, 0.0, 1.5])
    # with a symmetric 0.2 the 1.25 ratio would be clipped too: clip-higher leaves room for low-probability tokens
    assert rl.policy_loss(logp, torch.zeros(5, 1), adv, torch.ones(5, 1), 0.2, 0.2)[1][2].item()


def test_rollout_decoder_stops_and_refills(tokenizer):
    """Continuous batching (2 slots, 5 prompts, refilled as rows end) decodes exactly what the engine does."""
    from mimo.engine import Engine, SamplingParams

    model = tiny_model(vocab_size=tokenizer.vocab_size)
    prompts = [tokenizer.encode(t) for t in ("Question: 12 + 7", "gcd", "The quick brown fox", "1234 5678", "x")]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    full = [o.tokens for o in Engine(model, tokenizer).generate(prompts, params)]
    # also stop on a token the greedy outputs contain, so rows end (and slots refill) at different steps
    extra = max({t for f in full for t in f}, key=lambda t: sum(t in f for f in full))
    want = [f[: f.index(extra)] if extra in f else f for f in full]
    assert len({len(w) for w in want}) > 1
    dec = rl.RolloutDecoder(Engine(model, None, 64), [*tokenizer.stop_token_ids, extra], slots=2, max_len=64,
                            params=params, seed=0)
    pending, got = list(enumerate(prompts)), {}
    while pending or dec.rows:
        if dec.free and pending:
            dec.add([pending.pop(0) for _ in range(min(dec.free, len(pending)))])
        for i, tokens, reason in dec.step():
            got[i] = tokens[:-1] if reason == "stop" else tokens
    assert [got[i] for i in range(len(prompts))] == want


def problems(n):
    return [RLProblem(id=f"p{i}", kind="reasoning", prompt=f"q{i}") for i in range(n)]


def test_easy_pool_moves_and_redraws():
    stream = rl.ProblemStream(problems(10), easy_prob=0.0, seed=3)
    stream.begin_step(0)
    assert [p.id for p, easy in stream.draw(3)] == ["p0", "p1", "p2"]
    stream.mark_easy(stream.by_id["p3"])
    stream.mark_easy(stream.by_id["p5"])
    drawn = stream.draw(12)
    assert not any(easy for _, easy in drawn)
    assert [p.id for p, _ in drawn] == ["p4", "p6", "p7", "p8", "p9", "p0", "p1", "p2", "p4", "p6", "p7", "p8"]
    stream.easy_prob = 1.0
    assert all(easy and p.id in ("p3", "p5") for p, easy in stream.draw(20))
    stream.easy_prob = 0.1
    stream.begin_step(7)
    assert 150 < sum(easy for _, easy in stream.draw(2000)) < 250  # about 10% from the easy pool
    state = stream.state()  # what a checkpoint stores; the draws are seeded by the step
    stream.begin_step(8)
    first = [(p.id, easy) for p, easy in stream.draw(50)]
    again = rl.ProblemStream(problems(10), easy_prob=0.1, seed=3)
    again.load_state(json.loads(json.dumps(state)))
    again.begin_step(8)
    assert [(p.id, easy) for p, easy in again.draw(50)] == first and again.easy == ["p3", "p5"]


@pytest.fixture
def fake_grade(monkeypatch):
    """Rewards by problem id: "easy" always solved, "hard" never, "mixed" by the parity of the text's length."""
    def grade(problem, text):
        ok = {"easy": True, "hard": False}.get(problem.id.split("-")[0], len(text) % 2 == 1)
        return Graded(float(ok), ok)
    monkeypatch.setattr(rewards, "grade", grade)


@pytest.mark.parametrize("naive", [False, True])
def test_rollout_dynamic_sampling_and_easy_pool(tokenizer, fake_grade, naive):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    items = [RLProblem(id=f"{kind}-{i}", kind="reasoning", prompt=f"question {i}")
             for i in range(4) for kind in ("easy", "hard", "mixed")]
    prompt_ids = {p.id: tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}]))
                  for p in items}
    cfg = rl.RLConfig(group_size=4, batch_prompts=2, max_new_tokens=6, max_resample_rounds=3, easy_prob=0.0,
                      naive_rollout=naive, rollout_slots=5)
    stream = rl.ProblemStream(items, easy_prob=0.0)
    with rewards.RewardPool(2) as pool:
        groups, stats = rl.rollout(Engine(model, None, 128), tokenizer, stream, pool, cfg, 0, prompt_ids, max_len=128)
    assert 1 <= len(groups) <= 2 and all(g.problem.id.startswith("mixed") for g in groups)
    assert all(rl.informative(g.rewards) and len(g.tokens) == 4 for g in groups)
    assert stats["groups_sampled"] <= 8 and stats["dropped_group_fraction"] > 0
    assert "easy-0" in stream.easy and all(i.startswith("easy") for i in stream.easy)
    assert all(0 < len(t) <= 6 for g in groups for t in g.tokens)


def test_update_freezes_mtp_and_recomputes_old_logprobs():
    torch.manual_seed(0)
    model = tiny_model(vocab_size=64)
    rl.freeze_mtp(model)
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    mtp = dict(model.model.mtp_layers.named_parameters())
    assert mtp and not any(id(p) in in_opt for p in mtp.values())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seqs = [torch.randint(0, 64, (n,)).tolist() for n in (9, 12, 7, 10)]
    cfg = rl.RLConfig(mini_batch=2, micro_batch=1, epochs=2, precision="fp32")
    stats = rl.policy_update(model, opt, seqs, [4, 5, 3, 6], [1.0, -1.0, 0.5, -0.5], cfg, seed=1)
    assert stats["first_ratio_dev"] == 0.0  # old log-probs from the same forward path: ratio exactly 1
    assert stats["optimizer_steps"] == 4 and stats["clip_fraction"] >= 0 and stats["entropy"] > 0
    assert 0 <= stats["mtp_acceptance"] <= 1 and stats["kl"] is None
    after = model.state_dict()
    assert all(torch.equal(before[f"model.mtp_layers.{k}"], after[f"model.mtp_layers.{k}"]) for k in mtp)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def rl_args(model_dir, out, steps):
    p = argparse.ArgumentParser()
    rl.add_arguments(p)
    return p.parse_args(["--from", str(model_dir), "--out", str(out), "--tasks", "gcd,lcm", "--num-problems", "16",
                         "--group-size", "4", "--batch-prompts", "2", "--mini-batch", "4", "--micro-batch", "4",
                         "--max-new-tokens", "8", "--max-steps", str(steps), "--save-every", "1", "--kl-coef", "0.01",
                         "--precision", "fp32", "--device", "cpu", "--reward-workers", "2", "--easy-prob", "0.5"])


def test_run_end_to_end_and_resume(model_dir, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(rewards, "grade", lambda problem, text: Graded(float(len(text) % 2), len(text) % 2 == 1))
    out = tmp_path / "run"
    rl.run(rl_args(model_dir, out, steps=2))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    keys = {"reward_mean", "pass_rate", "response_length", "entropy", "clip_fraction", "dropped_group_fraction",
            "easy_pool_size", "mtp_acceptance", "step_s", "rollout_s", "rollout_mode", "kl", "loss"}
    assert all(keys <= r.keys() for r in rows)
    assert (out / "rl.png").stat().st_size > 0 and (out / "final" / "config.json").exists()
    state = json.loads((out / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["stream"]["cursor"] > 0
    start = load_file(str(model_dir / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(start[k], final[k]) for k in start if ".mtp_layers." in k)

    # a stopped run (no final/) resumes from its newest checkpoint and goes on
    import shutil

    shutil.rmtree(out / "final")
    capfd.readouterr()
    rl.run(rl_args(model_dir, out, steps=3))
    assert "resuming from step 2" in capfd.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and (out / "final" / "config.json").exists()
