"""The training loop shared by pretraining and SFT: next-token + MTP loss, AdamW, schedules, accumulation,
bf16 autocast, optional torch.compile, DDP/FSDP2 from outside the model, atomic checkpoints and exact resume.

A run directory holds:
    checkpoints/step_000100/{model/, optimizer.safetensors, trainer_state.json}   (the newest two are kept)
    metrics.jsonl   one JSON object per logged step (step, tokens, loss, ntp_loss, mtp_loss, lr, tokens_per_s, ...)
    loss.png        the loss curves
    final/          a model directory (HF layout, tokenizer included)
Rerunning the same command resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from tqdm import tqdm

from mimo.checkpoint import load_model, replace_dir, save_model
from mimo.errors import MimoError
from mimo.parallel import DistInfo, all_reduce_mean, barrier, no_sync, print0, wrap_model


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seq_len: int = 512
    global_batch_seqs: int = 32  # sequences per optimizer step, over all processes
    micro_batch: int = 8  # sequences per forward pass per process
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    decay_fraction: float = 0.3  # the last 30% of steps decay (cosine) to min_lr_ratio * lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # MiMo: 0.3 for the first 40% of tokens,
    mtp_weight_late: float = 0.1  # then 0.1
    mtp_switch_fraction: float = 0.4
    precision: str = "auto"  # auto (bf16 autocast where supported) | fp32 | bf16
    compile: bool = False
    fsdp: bool = False
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0

    def with_overrides(self, args, world_size: int) -> TrainConfig:
        """The flags a training command shares (`--max-steps` etc., when given), and a micro batch that
        divides the global batch over world_size processes."""
        cfg = self
        for key in ("max_steps", "save_every", "micro_batch", "lr", "eval_every"):
            if getattr(args, key, None) is not None:
                cfg = replace(cfg, **{key: getattr(args, key)})
        if cfg.global_batch_seqs % (cfg.micro_batch * world_size):
            cfg = replace(cfg, micro_batch=max(1, cfg.global_batch_seqs // world_size))
        return cfg

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_start = int(self.max_steps * (1 - self.decay_fraction))
        if step < decay_start:
            return self.lr
        progress = (step - decay_start) / max(1, self.max_steps - decay_start)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def mtp_weight_at(self, step: int) -> float:
        return self.mtp_weight if step < self.mtp_switch_fraction * self.max_steps else self.mtp_weight_late


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast ('auto' where the hardware runs bf16 matmuls natively); fp32 master weights always."""
    if precision == "fp32" or (precision == "auto" and not bf16_supported(device)):
        return nullcontext()
    if precision not in ("auto", "bf16"):
        raise MimoError(f"unknown precision {precision!r} (auto, fp32 or bf16)")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings included), none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


# ---- checkpoints -----------------------------------------------------------------------------------

CKPT_RE = re.compile(r"^step_(\d{6,})$")


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*")
                   if (m := CKPT_RE.match(p.name)) and (p / "trainer_state.json").exists())
    return ckpts[-1][1] if ckpts else None


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ModelStore:
    """What a run's checkpoints and final output hold: here the whole model, as a model directory (pretraining,
    SFT); mimo.train.tune.AdapterStore keeps a LoRA adapter instead. state_dicts is a collective under FSDP2."""

    def state_dicts(self, model, opt) -> tuple[dict, dict | None]:
        """(full model state, full optimizer state); opt None: the model's only."""
        if opt is None:
            return get_model_state_dict(model, options=FULL_STATE), None
        return get_state_dict(model, opt, options=FULL_STATE)

    def save(self, model, out_dir: Path, tokenizer, state_dict: dict):
        save_model(model, out_dir, tokenizer=tokenizer, state_dict=state_dict)

    def restore(self, path: Path, model, opt, optim_sd: dict):
        """Load the weights saved at path (save's out_dir) and the optimizer state into model and opt."""
        model_sd = load_model(path, dtype=torch.float32).state_dict()
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))

    def final_dir(self, run_dir: Path) -> Path:
        return run_dir / "final"

    def is_saved(self, out_dir: Path) -> bool:
        return (out_dir / "config.json").exists()


def save_checkpoint(run_dir: Path, step: int, model, opt, tokenizer, state: dict, keep: int, is_main: bool,
                    store: ModelStore | None = None):
    """Gather full model and optimizer state (a collective under FSDP2: every rank calls), rank 0 writes it
    into a temporary directory and renames it into place, so a crash never damages the last good one."""
    store = store or ModelStore()
    model_sd, optim_sd = store.state_dicts(model, opt)
    if not is_main:
        return
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        store.save(model, tmp / "model", tokenizer, model_sd)
        tensors = {f"{name}::{key}": v.detach().cpu().contiguous()
                   for name, st in optim_sd["state"].items() for key, v in st.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = {**state, "optimizer_param_groups": optim_sd["param_groups"]}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        replace_dir(tmp, ckpt_dir / f"step_{step:06d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in ckpt_dir.glob("step_*") if CKPT_RE.match(p.name))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, opt, store: ModelStore | None = None) -> dict:
    """Restore weights, optimizer moments and the RNG; every rank reads the same files."""
    store = store or ModelStore()
    state = json.loads((path / "trainer_state.json").read_text())
    optim_state: dict = {}
    for key, value in load_file(str(path / "optimizer.safetensors")).items():
        name, field = key.split("::")
        optim_state.setdefault(name, {})[field] = value
    store.restore(path / "model", model, opt, {"state": optim_state, "param_groups": state["optimizer_param_groups"]})
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["cpu"])
    return state


# ---- metrics ---------------------------------------------------------------------------------------

def trim_metrics(path: Path, last_step: int):
    """On resume, drop rows logged after the checkpoint (they are about to be redone)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= last_step]
    path.write_text("".join(r + "\n" for r in kept))


def plot_metrics(metrics_path: Path, out_png: Path, title: str = "training", stages=()):
    """The loss curves; stages: the data stages as (name, first step, end step), shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in rows if "loss" in r]
    if len(stages) > 1:
        shade_stages(ax, stages)
    for key, label in (("loss", "total"), ("ntp_loss", "next-token"), ("mtp_loss", "MTP (t+2)")):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation (next-token)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def shade_stages(ax, stages: list[tuple[str, int, int]]):
    """Alternate bands behind the curves, one per data stage (name, first step, end step), named at the top."""
    for i, (name, first, end) in enumerate(stages):
        if end > first:
            ax.axvspan(first, end, color="tab:gray", alpha=0.14 if i % 2 == 0 else 0.05, lw=0)
            ax.text((first + end) / 2, 0.98, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=8, color="dimgray")


# ---- the loop --------------------------------------------------------------------------------------

def unpack_batch(batch: tuple) -> tuple:
    """(x, y) or (x, y, positions) -> x, y, positions (None: each row is one causal sequence; else packed
    documents whose positions restart at 0 at each, attending within it)."""
    return (*batch, None) if len(batch) == 2 else batch


@torch.no_grad()
def evaluate(model, batches, precision: str, device) -> dict:
    """Validation next-token loss and the first MTP layer's top-1 accuracy on token t+2."""
    model.eval()
    losses, correct, total = [], 0, 0
    for batch in batches:
        x, y, positions = unpack_batch(batch)
        with autocast_context(precision, device):
            out = model(x, targets=y, positions=positions, return_mtp_logits=True)
        losses.append(out.ntp_loss.float())
        if out.mtp_logits:
            t = y[:, 1:]
            mask = t != -100
            correct += ((out.mtp_logits[0].argmax(-1) == t) & mask).sum().item()
            total += mask.sum().item()
    model.train()
    result = {"val_loss": all_reduce_mean(torch.stack(losses).mean()).item() if losses else None}
    if total:
        result["val_mtp_top1"] = all_reduce_mean(torch.tensor(correct / total)).item()
    return result


def train(model, tokenizer, batches, cfg: TrainConfig, run_dir, info: DistInfo, val_batches=None,
          title: str = "training", extra_state: dict | None = None, store: ModelStore | None = None,
          after_step=None):
    """Run (or resume) training; returns the final metrics row. `batches.micro_batches(step)` yields (x, y);
    `val_batches()` returns an iterable of validation (x, y). store: what checkpoints and the final output hold
    (default: the whole model)."""
    store = store or ModelStore()
    run_dir = Path(run_dir)
    device = info.device
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    wrapped = wrap_model(model, info, fsdp=cfg.fsdp)  # before the optimizer: FSDP2 swaps in sharded parameters
    opt = make_optimizer(model, cfg)
    start = 0
    metrics_path = run_dir / "metrics.jsonl"
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt, store)
        start = state["step"]
        print0(f"resuming from step {start} ({ckpt})")
        if info.is_main:
            trim_metrics(metrics_path, start)
    if start >= cfg.max_steps and store.is_saved(store.final_dir(run_dir)):
        print0(f"{run_dir}: already trained to step {start}")
        return {}
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    tokens_per_step = cfg.global_batch_seqs * cfg.seq_len
    stages = [(st.name, st.first_step, st.end_step) for st in getattr(batches, "stages", ())]  # pretraining data
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not info.is_main, desc=title, unit="step",
               dynamic_ncols=True, mininterval=1.0)
    last_row: dict = {}
    t_log, tokens_since = time.perf_counter(), 0
    for step in range(start, cfg.max_steps):
        lr, w = cfg.lr_at(step), cfg.mtp_weight_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        sums = torch.zeros(3, device=device)  # loss, ntp, mtp
        micro = list(batches.micro_batches(step))
        for m, batch in enumerate(micro):
            x, y, positions = unpack_batch(batch)
            with no_sync(wrapped, sync=m == len(micro) - 1), autocast_context(cfg.precision, device):
                out = forward(x, targets=y, mtp_weight=w, positions=positions)
                (out.loss / len(micro)).backward()
            mtp = torch.stack(out.mtp_losses).mean().detach() if out.mtp_losses else torch.zeros((), device=device)
            sums += torch.stack([out.loss.detach().float(), out.ntp_loss.detach().float(), mtp.float()])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        tokens_since += tokens_per_step
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            avg = all_reduce_mean(sums / len(micro)).tolist()
            now = time.perf_counter()
            row = {"step": done, "tokens": done * tokens_per_step, "loss": avg[0], "ntp_loss": avg[1],
                   "mtp_loss": avg[2] if model.config.num_nextn_predict_layers else None, "lr": lr,
                   "mtp_weight": w, "grad_norm": float(grad_norm), "tokens_per_s": tokens_since / (now - t_log)}
            if stages:  # pretraining: the data stage this step read
                row["stage"] = batches.stage(step).name
            t_log, tokens_since = now, 0
            if val_batches is not None and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                row.update(evaluate(model, val_batches(), cfg.precision, device))
            if info.is_main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{avg[0]:.3f}", ntp=f"{avg[1]:.3f}", mtp=f"{avg[2]:.3f}",
                            tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            last_row = row
        bar.update(1)
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            state = {"step": done, "tokens": done * tokens_per_step, "data_position": done * cfg.global_batch_seqs,
                     "config": asdict(cfg), **(extra_state or {})}
            save_checkpoint(run_dir, done, model, opt, tokenizer, state, cfg.keep_checkpoints, info.is_main, store)
            barrier()
    bar.close()
    final_sd, _ = store.state_dicts(model, None)
    if info.is_main:
        store.save(model, store.final_dir(run_dir), tokenizer, final_sd)
        plot_metrics(metrics_path, run_dir / "loss.png", title, stages)
    barrier()
    return last_row
