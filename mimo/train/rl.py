"""`mimo rl`: GRPO on rule-verifiable problems, with MiMo's recipe.

    mimo rl --from runs/tiny-sft/final --out runs/tiny-rl [--tasks gcd,lcm] [--math FILE] [--code FILE]

Before step 1, curation (`mimo.train.curation`, once): --math/--code problems overlapping a benchmark are dropped, then
the pass-rate filter samples every problem --filter-samples times with the starting model and drops those it
always or never solves (MiMo: 16 of 16, 0 of 16); counts per reason are printed and stored in run_config.json,
the verdicts in curation.json.

One step = one rollout batch:
1. Rollout (`mimo.train.rollout`). Problems come from the train stream (each from the easy pool with probability
   --easy-prob) and are sampled --group-size times at temperature 1.0, prompted exactly as SFT trains (chat
   template, question, boxed instruction). Continuous rollout (default): --rollout-slots rows decode together, a
   finished row's slot takes the next pending sample at once, each finished completion goes to the reward pool at
   once, and early termination aborts the rest once the batch is accepted: --early-termination fifo (default,
   MiMo's) accepts the first --batch-prompts valid groups in start order once every group started before them has
   finished; first-finished takes the first valid groups to finish (faster, biased to short responses).
   --naive-rollout generates a whole round, then grades it (the baseline of MiMo's "2.29x faster training").
   step_s / rollout_s in metrics.jsonl compare them; trained_response_length against response_length shows the
   length bias. Decoding is mimo.inference.engine's session, on a bf16 copy of the policy refreshed after every
   update where the device multiplies bf16 natively (--rollout-precision; as vLLM's rollouts beside an fp32 trainer),
   else on the fp32 policy itself; --precision is the update's autocast.
2. Dynamic sampling: a group whose rewards are all equal has zero advantage and is dropped; further problems are
   drawn, at most --max-resample-rounds extra batches' worth. A problem every rollout solved joins the easy pool.
3. Update. Advantage (r - mean) / (std + eps) within each group; old log-probs recomputed by a no-grad forward
   pass on the very tensors the update uses (the ratio is exactly 1 on the first mini-batch); clipped surrogate
   with clip-higher [1 - eps_low, 1 + eps_high]; loss summed over all response tokens of a mini-batch and divided
   by their number; no KL unless --kl-coef (k3 estimator against the frozen starting model); --epochs passes over
   mini-batches of --mini-batch sequences, one AdamW step each, grad clip 1.0. MTP layers are frozen (excluded from
   the optimizer); metrics track how far their drafts drift from the policy (first MTP layer's top-1 agreement
   with the sampled token two ahead, on the rollout sequences).

Defaults. MiMo's: no KL, token-level loss, clip-higher, dynamic sampling, easy pool drawn with p = 0.1 (we
apply it per drawn problem), temperature 1.0. MiMo's batch of 512 prompts with mini-batch 32 is scaled down to
16 prompts x 8 samples = 128 sequences a step in mini-batches of 32 sequences (4 optimizer steps a step).
Ours (MiMo does not publish them): group size 8, eps 0.2 / 0.28 (DAPO's), 1 epoch, AdamW betas (0.9, 0.999) and
weight decay 0.01 (verl's), LR 2e-5 constant (MiMo: 1e-6 for 7B; small models need larger steps: an untuned
pick), code reward "soft" with level scores 0.2 / 0.3 / 0.5 (see mimo.train.rewards).

Run directory: metrics.jsonl (one row per step), rl.png, curation.json, checkpoints/step_N (model, optimizer, RNG, the problem
cursor and easy pool; mimo.train.loop's format, the newest two kept), final/ (model directory with tokenizer).
Rerunning the same command resumes from the newest checkpoint. Problems abandoned mid-rollout are consumed from
the stream.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mimo.checkpoint import load_model_and_tokenizer, save_model
from mimo.errors import MimoError
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.parallel import pick_device, print0
from mimo.train import curation, rewards
from mimo.train.loop import (
    TrainConfig,
    autocast_context,
    latest_checkpoint,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    trim_metrics,
)
from mimo.train.rl_config import FLAG_GROUPS, RLConfig, add_flags
from mimo.train.rollout import Group, ProblemStream, rollout, rollout_model, sync_rollout_model

# ---- GRPO pieces -----------------------------------------------------------------------------------

def group_advantages(scores: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [N, G] -> advantages [N, G]: (r - group mean) / (group std + eps), std with Bessel's correction
    (as verl); scale=False keeps r - mean."""
    centred = scores - scores.mean(-1, keepdim=True)
    return centred / (scores.std(-1, keepdim=True) + eps) if scale else centred


def loss_weights(mask: torch.Tensor, mode: str, n_tokens: int, n_seqs: int) -> torch.Tensor:
    """Per-token weights [B, T] of one micro-batch of a mini-batch with n_tokens response tokens in n_seqs sequences.
    token: every response token weighs 1 / n_tokens (MiMo, DAPO), so a long response counts more;
    sequence: each sequence's token mean, averaged over the mini-batch (the original GRPO)."""
    if mode == "token":
        return mask / max(n_tokens, 1)
    return mask / mask.sum(1, keepdim=True).clamp(min=1) / n_seqs


def policy_loss(logp, old_logp, adv, weights, eps_low: float = 0.2, eps_high: float = 0.28, ref_logp=None,
                kl_coef: float = 0.0):
    """Clipped surrogate with clip-higher. logp, old_logp, weights [B, T]; adv [B].
    Returns (loss, clipped [B, T] bool: the clipped branch is active and the token gets no gradient, ratio [B, T])."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    if kl_coef:
        d = ref_logp - logp  # k3 estimator of KL(policy || reference), >= 0
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1)
    return (per_token * weights).sum(), clipped < unclipped, ratio


def freeze_mtp(model):
    """MTP layers stay as pretraining/SFT left them (MiMo freezes them in RL)."""
    for p in model.model.mtp_layers.parameters():
        p.requires_grad_(False)


def sequence_logprobs(model, ids: torch.Tensor, stats: bool = False):
    """ids [B, T] -> log p(ids[:, t+1] | ids[:, :t+1]) [B, T-1]. With stats also the policy's entropy [B, T-1] and
    the first MTP layer's top-1 hit on ids[:, t+2] at position t [B, T-2] (None without MTP layers)."""
    hidden = model.hidden_states(ids)  # [B, T, H]
    logp_all = torch.log_softmax(model.logits(hidden[:, :-1]).float(), dim=-1)  # [B, T-1, V]
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    if not stats:
        return logp, None, None
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    hits = None
    if len(model.model.mtp_layers) and ids.shape[1] > 2:
        _, mtp_logits = model.mtp_step(0, hidden[:, :-2], ids[:, 1:-1])  # [B, T-2, V]: h[t], x[t+1] -> x[t+2]
        hits = mtp_logits.argmax(-1) == ids[:, 2:]
    return logp, entropy, hits


@dataclass
class Micro:
    ids: torch.Tensor  # [b, T] prompt + response, right-padded
    mask: torch.Tensor  # [b, T-1] 1.0 where ids[:, t+1] is a response token
    adv: torch.Tensor  # [b]
    old: torch.Tensor | None = None  # [b, T-1] log-probs before the update
    ref: torch.Tensor | None = None  # [b, T-1] reference log-probs (KL only)


def make_micro(seqs, prompt_lens, advs, device) -> Micro:
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, n - 1: len(s) - 1] = 1.0
    return Micro(ids.to(device), mask.to(device), torch.tensor(advs, dtype=torch.float32, device=device))


def policy_update(model, opt, seqs: list[list[int]], prompt_lens: list[int], advantages: list[float],
                  cfg: RLConfig, ref_model=None, seed: int = 0) -> dict:
    """GRPO update on rollout sequences (prompt + response tokens). Returns the step's statistics."""
    device = next(model.parameters()).device
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
    minis = []  # [mini-batch][micro-batch]: fixed tensors, so the no-grad and the grad passes see the same input
    for i in range(0, len(order), cfg.mini_batch):
        idx = order[i: i + cfg.mini_batch]
        minis.append([make_micro([seqs[k] for k in part], [prompt_lens[k] for k in part],
                                 [advantages[k] for k in part], device)
                      for part in (idx[j: j + cfg.micro_batch] for j in range(0, len(idx), cfg.micro_batch))])
    sums = dict.fromkeys(("tokens", "entropy", "mtp_hits", "mtp_tokens", "kl", "clipped", "loss", "grad_norm"), 0.0)
    model.eval()
    with torch.no_grad(), autocast_context(cfg.precision, device):
        for m in (m for mb in minis for m in mb):
            m.old, entropy, hits = sequence_logprobs(model, m.ids, stats=True)
            sums["tokens"] += m.mask.sum().item()
            sums["entropy"] += (entropy * m.mask).sum().item()
            if hits is not None:
                sums["mtp_hits"] += (hits * m.mask[:, 1:]).sum().item()
                sums["mtp_tokens"] += m.mask[:, 1:].sum().item()
            if ref_model is not None:
                m.ref = sequence_logprobs(ref_model, m.ids)[0]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    first_ratio_dev, updates = 0.0, 0
    for epoch in range(cfg.epochs):
        for j, mb in enumerate(minis):
            n_tokens, n_seqs = int(sum(m.mask.sum().item() for m in mb)), sum(len(m.ids) for m in mb)
            for m in mb:
                weights = loss_weights(m.mask, cfg.loss_norm, n_tokens, n_seqs)
                with autocast_context(cfg.precision, device):
                    logp = sequence_logprobs(model, m.ids)[0]
                loss, clipped, ratio = policy_loss(logp, m.old, m.adv, weights, cfg.eps_low, cfg.eps_high, m.ref,
                                                   cfg.kl_coef)
                loss.backward()
                sums["loss"] += loss.item()
                sums["clipped"] += (clipped * m.mask).sum().item()
                if m.ref is not None:
                    d = m.ref - logp.detach()
                    sums["kl"] += ((torch.exp(d) - d - 1) * m.mask).sum().item()
                if epoch == 0 and j == 0:
                    first_ratio_dev = max(first_ratio_dev, ((ratio.detach() - 1).abs() * m.mask).max().item())
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            updates += 1
    n_tok = max(sums["tokens"], 1.0)
    return {"loss": sums["loss"] / updates, "grad_norm": sums["grad_norm"] / updates,
            "entropy": sums["entropy"] / n_tok, "clip_fraction": sums["clipped"] / (n_tok * cfg.epochs),
            "mtp_acceptance": sums["mtp_hits"] / sums["mtp_tokens"] if sums["mtp_tokens"] else None,
            "kl": sums["kl"] / (n_tok * cfg.epochs) if ref_model is not None else None,
            "first_ratio_dev": first_ratio_dev, "optimizer_steps": updates}


# ---- update ------------------------------------------------------------------------------------

def grpo_update(model, opt, groups: list[Group], cfg: RLConfig, ref_model=None, seed: int = 0) -> dict:
    adv = group_advantages(torch.tensor([g.rewards for g in groups]), cfg.adv_std, cfg.adv_eps)  # [N, G]
    seqs = [g.prompt + t for g in groups for t in g.tokens]
    prompt_lens = [len(g.prompt) for g in groups for _ in g.tokens]
    return policy_update(model, opt, seqs, prompt_lens, adv.flatten().tolist(), cfg, ref_model, seed)


# ---- the loop ------------------------------------------------------------------------------------

PLOTS = (("reward_mean", "reward (mean)"), ("pass_rate", "pass rate"),
         (("response_length", "trained_response_length"), "response tokens (all / trained)"),
         ("entropy", "entropy (nats/token)"), ("clip_fraction", "clip fraction"),
         ("dropped_group_fraction", "groups dropped (dynamic sampling)"), ("easy_pool_size", "easy pool size"),
         ("mtp_acceptance", "MTP top-1 agreement"), ("step_s", "step wall time (s)"))


def plot_rl_metrics(metrics_path: Path, out_png: Path, title: str = "RL"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(3, 3, figsize=(12, 8))
    for ax, (keys, label) in zip(axes.flat, PLOTS):
        for key in (keys,) if isinstance(keys, str) else keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=key if keys != key else None)
        if not isinstance(keys, str):
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def config_from_args(args) -> RLConfig:
    cfg = RLConfig(**{k: getattr(args, k) for k in RLConfig.__dataclass_fields__ if hasattr(args, k)})
    cfg.level_thresholds, cfg.level_scores = tuple(cfg.level_thresholds), tuple(cfg.level_scores)
    cfg.validate()
    return cfg


def run(args) -> dict:
    """Train (or resume) a GRPO run; returns the last metrics row."""
    cfg = config_from_args(args)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(getattr(args, "device", "auto"))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(args.from_dir)
    model = model.float().to(device)
    freeze_mtp(model)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    opt = make_optimizer(model, TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, beta1=cfg.beta1,
                                            beta2=cfg.beta2))
    problems = rewards.load_problems(cfg.tasks, cfg.num_problems, cfg.math, cfg.code, cfg.seed)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}]) for p in problems]
    prompt_ids = {p.id: ids for p, ids in zip(problems, tokenizer.encode_batch(texts))}
    longest, context = max(map(len, prompt_ids.values())), model.config.max_position_embeddings
    if longest >= context:
        raise MimoError(f"a prompt of {longest} tokens does not fit the model's context of {context}")
    max_len = min(context, longest + cfg.max_new_tokens)

    metrics_path, start, state = run_dir / "metrics.jsonl", 0, None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        start = state["step"]
        trim_metrics(metrics_path, start)
        print0(f"resuming from step {start} ({ckpt})")
    if start >= cfg.max_steps and (run_dir / "final" / "config.json").exists():
        print0(f"{run_dir}: already trained to step {start}")
        return {}
    last: dict = {}
    policy = rollout_model(model, cfg.rollout_precision, device)
    engine = Engine(policy, None, max_len)
    with rewards.RewardPool(cfg.reward_workers) as pool:
        def pass_rates(candidates):
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
            return curation.pass_rate_filter(engine, tokenizer, candidates, prompt_ids, pool, cfg.filter_samples,
                                             params, cfg.rollout_slots or cfg.batch_prompts * cfg.group_size,
                                             max_len, seed=cfg.seed * 1_000_003 - 1)

        settings = {"from": str(Path(args.from_dir).resolve()), "filter_samples": cfg.filter_samples, "seed": cfg.seed,
                    "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens}
        problems, curated = curation.curate(run_dir / "curation.json", problems, settings, ckpt is not None,
                                            pass_rates if cfg.filter_samples else None)
        print0(f"curation: {curated['problems']} problems, dropped {curation.describe(curated)}"
               + (f" (pass-rate filter: {cfg.filter_samples} samples each, {curated['seconds']:.0f} s)"
                  if cfg.filter_samples else "") + f"; {curated['kept']} left")
        stream = ProblemStream(problems, cfg.easy_prob, cfg.seed)
        if state is not None:
            stream.load_state(state["stream"])
        (run_dir / "run_config.json").write_text(json.dumps(
            {"command": "rl", "from": str(args.from_dir), "problems": len(problems), "curation": curated,
             "rl": asdict(cfg)}, indent=2))
        mode = "naive" if cfg.naive_rollout else f"continuous ({cfg.early_termination} early termination)"
        print0(f"GRPO on {len(problems)} problems: {cfg.batch_prompts} groups x {cfg.group_size} samples per step, "
               f"{mode} rollout in {str(policy.lm_head.weight.dtype).removeprefix('torch.')}, {cfg.max_steps} steps, "
               f"device {device}")
        t_train = time.perf_counter()
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            stream.begin_step(step)
            groups, roll = rollout(engine, tokenizer, stream, pool, cfg, step, prompt_ids, max_len)
            t1 = time.perf_counter()
            upd = grpo_update(model, opt, groups, cfg, ref_model, seed=cfg.seed * 1_000_003 + step) if groups else {}
            sync_rollout_model(policy, model)
            done = step + 1
            last = {"step": done, **roll, "rollout_mode": "naive" if cfg.naive_rollout else "continuous",
                    "early_termination": None if cfg.naive_rollout else cfg.early_termination,
                    "easy_pool_size": len(stream.easy), "lr": cfg.lr,
                    **{k: upd.get(k) for k in ("loss", "grad_norm", "entropy", "clip_fraction", "mtp_acceptance",
                                               "kl", "first_ratio_dev", "optimizer_steps")},
                    "update_s": time.perf_counter() - t1, "step_s": time.perf_counter() - t0}
            with metrics_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            print0(f"step {done}/{cfg.max_steps}: reward {last['reward_mean']:.3f} pass {last['pass_rate']:.3f} "
                   f"len {last['response_length']:.0f} (trained {last['trained_response_length'] or 0:.0f}) "
                   f"groups {roll['groups_valid']}/{roll['groups_sampled']} "
                   f"easy {len(stream.easy)} {last['step_s']:.1f}s")
            out_of_time = cfg.max_minutes > 0 and time.perf_counter() - t_train >= 60 * cfg.max_minutes
            if done % cfg.save_every == 0 or done == cfg.max_steps or out_of_time:
                state = {"step": done, "stream": stream.state(), "config": asdict(cfg)}
                save_checkpoint(run_dir, done, model, opt, tokenizer, state, cfg.keep_checkpoints, True)
            if out_of_time:
                print0(f"--max-minutes {cfg.max_minutes:g}: stopping after step {done}")
                break
    save_model(model, run_dir / "final", tokenizer=tokenizer)
    plot_rl_metrics(metrics_path, run_dir / "rl.png", f"GRPO {run_dir.name}")
    return last


def add_arguments(p):
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--from", dest="from_dir", required=True, metavar="MODEL_DIR", help="the SFT model to start from")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    groups = {title: p.add_argument_group(title) for title in FLAG_GROUPS}
    for title, names in FLAG_GROUPS.items():
        add_flags(groups[title], names)
    groups["optimisation"].add_argument("--device", default="auto", help="auto | cpu | cuda")
