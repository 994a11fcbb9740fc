"""GRPO pieces checked by hand, the rollout's dynamic sampling and easy pool, frozen MTP layers, and a short
`mimo rl` run end to end on a tiny model with resume."""

import argparse
import json
import math
from concurrent.futures import Future

import pytest
import torch
from helpers import run_killed_at_checkpoint, tiny_model
from safetensors.torch import load_file

from mimo.errors import MimoError
from mimo.inference.engine import Engine
from mimo.train import rewards, rl, rl_config, rollout
from mimo.train.loop import TrainConfig, make_optimizer
from mimo.train.rewards import Graded, RLProblem


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 1.0, 0.0]])
    std0 = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    std1 = math.sqrt((0 + 0 + 0.25 + 0.25) / 3)
    want = torch.tensor([[0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0], [0.0, 0.0, 0.5 / std1, -0.5 / std1]])
    assert torch.allclose(rl.group_advantages(r, eps=0.0), want)
    assert torch.allclose(rl.group_advantages(r, scale=False), torch.tensor([[.5, -.5, -.5, .5], [0, 0, .5, -.5]]))
    assert torch.equal(rl.group_advantages(torch.ones(1, 4)), torch.zeros(1, 4))  # eps keeps it finite
    assert rollout.informative([0.0, 1.0, 0.0]) and not rollout.informative([1.0] * 4) and not rollout.informative([0.3] * 2)


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


def test_sequence_logprobs_are_the_models_next_token_logprobs():
    """log p(ids[t+1] | ids[:t+1]) at position t: log_softmax of the model's own logits gathered at the next
    token; entropy of the same distribution; the first MTP layer's top-1 at t against ids[t+2]."""
    model = tiny_model(vocab_size=64)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in range(0, 7, 2):  # every other token is the MTP draft's top-1 (it reads ids[:t+2] only): hits
            ids[:, t + 2] = model(ids, targets=ids, return_mtp_logits=True).mtp_logits[0][:, t].argmax(-1)
        out = model(ids, targets=ids.roll(-1, 1), return_mtp_logits=True)
        logp, entropy, hits = rl.sequence_logprobs(model, ids, stats=True)
    lp = torch.log_softmax(out.logits.float(), -1)  # [B, T, V]
    want = torch.tensor([[lp[b, t, ids[b, t + 1]].item() for t in range(8)] for b in range(3)])
    assert logp.shape == (3, 8) and torch.allclose(logp, want, atol=1e-5)
    assert torch.allclose(entropy, -(lp[:, :-1].exp() * lp[:, :-1]).sum(-1), atol=1e-5)
    assert torch.equal(hits, out.mtp_logits[0][:, :7].argmax(-1) == ids[:, 2:])
    assert hits[:, ::2].all() and hits.shape == (3, 7)


def test_response_mask_covers_exactly_the_response_tokens():
    """make_micro pads right; mask[i, t] is 1 exactly where ids[i, t+1] is a response token, so the masked sum of
    sequence_logprobs is each response's log-likelihood given its prompt, computed here one sequence at a time."""
    model = tiny_model(vocab_size=64)
    seqs = [[5, 9, 2, 7, 1], [3, 8, 4], [1, 2, 3, 4, 5, 6, 7], [6, 6]]
    prompt_lens = [2, 1, 4, 1]  # responses: [2, 7, 1], [8, 4], [5, 6, 7], [6]
    m = rl.make_micro(seqs, prompt_lens, [1.0, -1.0, 0.5, 0.0], torch.device("cpu"))
    assert m.ids.shape == (4, 7) and m.mask.shape == (4, 6)
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        assert m.ids[i].tolist() == s + [0] * (7 - len(s))
        assert m.mask[i].tolist() == [1.0 if n <= t + 1 < len(s) else 0.0 for t in range(6)]
    assert m.mask.sum().item() == 3 + 2 + 3 + 1
    with torch.no_grad():
        got = (rl.sequence_logprobs(model, m.ids)[0] * m.mask).sum(1)
        for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
            lp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)
            want = sum(lp[t - 1, s[t]].item() for t in range(n, len(s)))
            assert got[i].item() == pytest.approx(want, abs=1e-4)


def test_kl_term_by_hand():
    """--kl-coef adds beta * k3 per token, k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, weighted like the
    surrogate, with gradient beta * (1 - exp(ref - logp)) w.r.t. logp."""
    ratio = torch.tensor([1.0, 1.1, 1.5, 0.9])
    adv = torch.tensor([1.0, -1.0, 1.0, 0.5])
    ref = torch.tensor([0.0, math.log(0.5), math.log(2.0), 0.3])[:, None]
    weights = torch.tensor([0.5, 0.25, 0.125, 0.0])[:, None]
    logp = torch.log(ratio)[:, None].clone().requires_grad_(True)
    beta = 0.2
    loss, clipped, _ = rl.policy_loss(logp, torch.zeros(4, 1), adv, weights, 0.2, 0.28, ref_logp=ref, kl_coef=beta)

    def k3(r, ref_lp):  # r: the ratio to the old policy (old log-prob 0), so logp = log r
        d = ref_lp - math.log(r)
        return math.exp(d) - d - 1

    surrogate = [-1.0, 1.1, -1.28, -0.45]  # -min(r A, clip(r, 0.8, 1.28) A)
    kl = [k3(1.0, 0.0), k3(1.1, math.log(0.5)), k3(1.5, math.log(2.0)), k3(0.9, 0.3)]
    assert kl[0] == 0 and all(x > 0 for x in kl[1:])
    want = sum(w * (s + beta * k) for w, s, k in zip([0.5, 0.25, 0.125, 0.0], surrogate, kl))
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert clipped.squeeze(1).tolist() == [False, False, True, False]
    loss.backward()
    grad_kl = [beta * (1 - math.exp(ref_lp - math.log(r))) for r, ref_lp in zip([1.0, 1.1, 1.5], ref[:3, 0].tolist())]
    want_grad = [0.5 * (-1.0 + grad_kl[0]), 0.25 * (1.1 + grad_kl[1]), 0.125 * grad_kl[2], 0.0]
    assert logp.grad.squeeze(1).tolist() == pytest.approx(want_grad, rel=1e-5, abs=1e-7)
    # without the coefficient the reference is ignored: the plain clipped surrogate
    plain = rl.policy_loss(logp, torch.zeros(4, 1), adv, weights, 0.2, 0.28, ref_logp=ref, kl_coef=0.0)[0]
    assert plain.item() == pytest.approx(sum(w * s for w, s in zip([0.5, 0.25, 0.125, 0.0], surrogate)), rel=1e-6)


def test_rollout_decoder_stops_and_refills(tokenizer):
    """Continuous batching (2 slots, 5 prompts, refilled as rows end) decodes exactly what the engine does."""
    from mimo.inference.engine import Engine
    from mimo.inference.sampling import SamplingParams

    model = tiny_model(vocab_size=tokenizer.vocab_size)
    prompts = [tokenizer.encode(t) for t in ("Question: 12 + 7", "gcd", "The quick brown fox", "1234 5678", "x")]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    full = [o.tokens for o in Engine(model, tokenizer).generate(prompts, params)]
    # also stop on a token the greedy outputs contain, so rows end (and slots refill) at different steps
    extra = max({t for f in full for t in f}, key=lambda t: sum(t in f for f in full))
    want = [f[: f.index(extra)] if extra in f else f for f in full]
    assert len({len(w) for w in want}) > 1
    dec = rollout.RolloutDecoder(Engine(model, None, 64), [*tokenizer.stop_token_ids, extra], slots=2, max_len=64,
                                 params=params, seed=0)
    pending, got = [(i, p, i) for i, p in enumerate(prompts)], {}
    while pending or dec.rows:
        if dec.free and pending:
            dec.add([pending.pop(0) for _ in range(min(dec.free, len(pending)))])
        for i, tokens, reason in dec.step():
            got[i] = tokens[:-1] if reason == "stop" else tokens
    assert [got[i] for i in range(len(prompts))] == want


def problems(n):
    return [RLProblem(id=f"p{i}", kind="reasoning", prompt=f"q{i}") for i in range(n)]


def test_easy_pool_moves_and_redraws():
    stream = rollout.ProblemStream(problems(10), easy_prob=0.0, seed=3)
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
    again = rollout.ProblemStream(problems(10), easy_prob=0.1, seed=3)
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


def group(index, rewards_=None, finished=None):
    g = rollout.Group(index, RLProblem(id=f"p{index}", kind="reasoning", prompt=""), False, [1])
    g.rewards, g.finished = rewards_, finished
    return g


def test_early_termination_rules():
    """Start order 0..5, target 2. Finished so far: 4 (informative) first, then 1 (informative), 2 (all equal),
    3 (informative); 0 and 5 still running."""
    mixed, same = [0.0, 1.0], [1.0, 1.0]
    groups = [group(0), group(1, mixed, 1), group(2, same, 2), group(3, mixed, 3), group(4, mixed, 0), group(5)]
    index = [g.index for g in rollout.accepted(groups, 2, "first-finished")]
    assert index == [4, 1]  # the first two informative groups to finish
    assert rollout.fifo_cutoff(groups, 2) == 3  # groups 4 and 5 can never enter the FIFO batch
    assert rollout.accepted(groups, 2, "fifo") is None  # group 0, started first, is still running
    groups[0].rewards, groups[0].finished = same, 4
    assert [g.index for g in rollout.accepted(groups, 2, "fifo")] == [1, 3]
    groups[0].rewards = mixed
    assert rollout.fifo_cutoff(groups, 2) == 1 and [g.index for g in rollout.accepted(groups, 2, "fifo")] == [0, 1]
    assert rollout.accepted(groups, 5, "fifo") is None and rollout.accepted(groups, 5, "first-finished") is None
    # nothing more will finish (resample cap spent): what is informative, up to the target
    assert [g.index for g in rollout.accepted(groups, 5, "fifo", final=True)] == [0, 1, 3, 4]
    assert [g.index for g in rollout.accepted(groups, 3, "first-finished", final=True)] == [4, 1, 3]


@pytest.mark.parametrize("mode", ["naive", "fifo", "first-finished"])
def test_rollout_dynamic_sampling_and_easy_pool(tokenizer, fake_grade, mode):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    items = [RLProblem(id=f"{kind}-{i}", kind="reasoning", prompt=f"question {i}")
             for i in range(4) for kind in ("easy", "hard", "mixed")]
    prompt_ids = {p.id: tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}]))
                  for p in items}
    cfg = rl_config.RLConfig(group_size=4, batch_prompts=2, max_new_tokens=6, max_resample_rounds=3, easy_prob=0.0,
                      naive_rollout=mode == "naive", early_termination="first-finished" if mode == "naive" else mode,
                      rollout_slots=5)
    stream = rollout.ProblemStream(items, easy_prob=0.0)
    seen = []
    real_accepted = rollout.accepted

    def spy(groups, *a, **kw):
        seen[:] = groups
        return real_accepted(groups, *a, **kw)

    with rewards.RewardPool(2) as pool, pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout, "accepted", spy)
        groups, stats = rollout.rollout(Engine(model, None, 128), tokenizer, stream, pool, cfg, 0, prompt_ids,
                                        max_len=128)
    assert 1 <= len(groups) <= 2 and all(g.problem.id.startswith("mixed") for g in groups)
    assert all(rollout.informative(g.rewards) and len(g.tokens) == 4 for g in groups)
    assert stats["groups_sampled"] <= 8 and stats["dropped_group_fraction"] > 0
    assert "easy-0" in stream.easy and all(i.startswith("easy") for i in stream.easy)
    assert all(0 < len(t) <= 6 for g in groups for t in g.tokens)
    lengths = [len(t) for g in groups for t in g.tokens]
    assert stats["trained_response_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert 0 < stats["response_length"] <= 6 and stats["rollouts_finished"] >= len(lengths)
    if mode != "first-finished":  # start order: the first informative groups, everything before them finished
        last = groups[-1].index
        assert all(g.rewards is not None for g in seen[:last + 1])
        assert [g.index for g in seen[:last + 1] if g.informative] == [g.index for g in groups]
    else:  # finishing order
        ranks = sorted(g.finished for g in seen if g.informative)
        assert [g.finished for g in groups] == ranks[:len(groups)]


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
    cfg = rl_config.RLConfig(mini_batch=2, micro_batch=1, epochs=2, precision="fp32")
    stats = rl.policy_update(model, opt, seqs, [4, 5, 3, 6], [1.0, -1.0, 0.5, -0.5], cfg, seed=1)
    assert stats["first_ratio_dev"] == 0.0  # old log-probs from the same forward path: ratio exactly 1
    assert stats["optimizer_steps"] == 4 and stats["clip_fraction"] >= 0 and stats["entropy"] > 0
    assert 0 <= stats["mtp_acceptance"] <= 1 and stats["kl"] is None
    after = model.state_dict()
    assert all(torch.equal(before[f"model.mtp_layers.{k}"], after[f"model.mtp_layers.{k}"]) for k in mtp)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_rollouts_decode_with_a_bf16_copy_refreshed_after_each_update():
    from mimo.train.rollout import rollout_model, sync_rollout_model

    model = tiny_model(vocab_size=64)
    cpu = torch.device("cpu")
    assert rollout_model(model, "fp32", cpu) is model
    copy = rollout_model(model, "bf16", cpu)
    assert copy is not model and copy.lm_head.weight.dtype == torch.bfloat16 and not copy.lm_head.weight.requires_grad
    kept = copy.model.layers[0].mlp.up_proj.weight.data_ptr()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    sync_rollout_model(copy, model)
    assert copy.model.layers[0].mlp.up_proj.weight.data_ptr() == kept  # in place: the engine's kernels keep it
    for (name, a), b in zip(model.named_parameters(), copy.parameters(), strict=True):
        assert torch.equal(a.detach().to(torch.bfloat16), b), name
    sync_rollout_model(model, model)  # the fp32 policy itself: nothing to copy


def rl_args(model_dir, out, steps, save_every=1):
    p = argparse.ArgumentParser()
    rl.add_arguments(p)
    return p.parse_args(["--from", str(model_dir), "--out", str(out), "--tasks", "gcd,lcm", "--num-problems", "16",
                         "--group-size", "4", "--batch-prompts", "2", "--mini-batch", "4", "--micro-batch", "2",
                         "--max-new-tokens", "8", "--max-steps", str(steps), "--save-every", str(save_every),
                         "--kl-coef", "0.01", "--precision", "fp32", "--device", "cpu", "--reward-workers", "2",
                         "--easy-prob", "0.5", "--filter-samples", "0"])


@pytest.fixture
def parity_rewards(monkeypatch):
    """Reward = parity of the completion's length (problems .../1 always solved: they join the easy pool), graded
    at submission: the continuous rollout then takes the same groups on every run (with worker threads, which
    groups finish grading first is a race)."""
    def grade(problem, text):
        ok = problem.id.endswith("/1") or len(text) % 2 == 1
        return Graded(float(ok), ok)

    def submit(self, problem, text):
        f = Future()
        f.set_result(grade(problem, text))
        return f

    monkeypatch.setattr(rewards, "grade", grade)
    monkeypatch.setattr(rewards.RewardPool, "submit", submit)


def metric_rows(run_dir):
    """metrics.jsonl without the wall-clock columns."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def test_run_end_to_end_then_killed_and_resumed_equals_uninterrupted(model_dir, tmp_path, monkeypatch, capfd,
                                                                    parity_rewards):
    ref = tmp_path / "ref"
    rl.run(rl_args(model_dir, ref, steps=3, save_every=2))
    rows = metric_rows(ref)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["groups_valid"] == 2 and r["optimizer_steps"] == 2  # 2 groups x 4 samples, mini-batches of 4
        assert r["first_ratio_dev"] == 0.0 and r["rollout_mode"] == "continuous" and r["early_termination"] == "fifo"
        assert 0 < r["trained_response_length"] <= 8
        assert 0 < r["reward_mean"] < 1 and 0 < r["response_length"] <= 8 and r["entropy"] > 0
        assert r["kl"] >= 0 and 0 <= r["clip_fraction"] <= 1 and 0 <= r["mtp_acceptance"] <= 1
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert rows[-1]["kl"] > 0  # the policy has moved away from the reference
    assert rows[-1]["easy_pool_size"] >= 1 and any(r["dropped_group_fraction"] > 0 for r in rows[1:])
    assert (ref / "rl.png").stat().st_size > 0 and (ref / "final" / "config.json").exists()
    state = json.loads((ref / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["stream"]["cursor"] > 0
    start = load_file(str(model_dir / "model.safetensors"))
    final = load_file(str(ref / "final" / "model.safetensors"))
    assert all(torch.equal(start[k], final[k]) for k in start if ".mtp_layers." in k)
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"], final["model.layers.0.mlp.up_proj.weight"])

    # killed during step 3 (its metrics row written, its checkpoint not), then rerun: it resumes from step 2,
    # redoes step 3, and ends exactly where the uninterrupted run did
    out = tmp_path / "killed"
    run_killed_at_checkpoint(monkeypatch, rl, 3, lambda: rl.run(rl_args(model_dir, out, steps=3, save_every=2)))
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3] and not (out / "final").exists()
    capfd.readouterr()
    rl.run(rl_args(model_dir, out, steps=3, save_every=2))
    assert "resuming from step 2" in capfd.readouterr().err
    assert metric_rows(out) == rows
    resumed = load_file(str(out / "final" / "model.safetensors"))
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)


def test_max_minutes_stops_after_the_step_that_passes_the_budget(model_dir, tmp_path, capfd, parity_rewards):
    out = tmp_path / "budget"
    args = rl_args(model_dir, out, steps=5, save_every=10)
    args.max_minutes = 1e-9  # passed by the first step
    rl.run(args)
    assert [r["step"] for r in metric_rows(out)] == [1]
    assert "--max-minutes 1e-09: stopping after step 1" in capfd.readouterr().err
    assert (out / "checkpoints" / "step_000001").is_dir() and (out / "final" / "config.json").exists()
    args.max_minutes = -1
    with pytest.raises(MimoError, match="--max-minutes"):
        rl.run(args)
