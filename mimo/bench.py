"""`mimo bench`: speed measurements that report against what the machine can do.

    mimo bench train PRESET_OR_MODEL_DIR [--dtype fp32|bf16] [--batch B] [--seq T] [--steps N] [--json]

Training throughput is timed after warm-up on synthetic tokens; MFU is model FLOPs (6 x parameters x tokens
plus attention) per second against this machine's measured matmul peak in the same precision.
"""

from __future__ import annotations

import json
import time

import torch

from mimo.checkpoint import build_model
from mimo.train import TrainConfig, autocast_context, make_optimizer


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, n: int = 1024, seconds: float = 1.0) -> float:
    """Measured FLOP/s of a square matmul in this dtype (the roofline that MFU is quoted against)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def train_flops_per_token(model, seq_len: int) -> float:
    cfg = model.config
    n = model.num_params()["total"] - cfg.vocab_size * cfg.hidden_size  # the embedding lookup costs no FLOPs
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attention = 12 * layers * cfg.num_attention_heads * cfg.head_dim * seq_len / 2  # causal: half the scores
    return 6 * n + attention


def bench_train(spec: str, dtype: str = "fp32", batch: int = 8, seq: int = 512, steps: int = 5, warmup: int = 2,
                device: str = "cpu") -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(spec, dtype="float32", device=dev).train()
    opt = make_optimizer(model, TrainConfig())
    precision = "bf16" if dtype == "bf16" else "fp32"
    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=dev)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast_context(precision, dev):
            out = model(x[:, :-1], targets=x[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    tps = batch * seq / step_s
    peak = matmul_peak_flops(torch.bfloat16 if dtype == "bf16" else torch.float32, dev)
    achieved = tps * train_flops_per_token(model, seq)
    return {"model": spec, "dtype": dtype, "batch": batch, "seq": seq, "steps": steps,
            "parameters": model.num_params()["total"], "step_s": step_s, "train_tokens_per_s": tps,
            "model_flops_per_s": achieved, "matmul_peak_flops_per_s": peak, "mfu": achieved / peak,
            "threads": torch.get_num_threads()}


def cmd_bench_train(args):
    r = bench_train(args.model, args.dtype, args.batch, args.seq, args.steps, device=args.device)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['model']} {r['dtype']}: {r['train_tokens_per_s']:.0f} tokens/s ({r['step_s']:.2f} s/step, batch "
          f"{r['batch']}x{r['seq']}), {r['model_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['mfu']:.1f}% of "
          f"the measured {r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s matmul peak")


def add_arguments(sub):
    t = sub.add_parser("train", help="training throughput (tokens/s, MFU) on synthetic tokens")
    t.add_argument("model", metavar="PRESET_OR_MODEL_DIR")
    t.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = bf16 autocast, fp32 master")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--device", default="cpu")
    t.add_argument("--json", action="store_true", help="last stdout line is one JSON object")
    t.set_defaults(func=cmd_bench_train)
