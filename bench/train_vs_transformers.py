"""Training throughput, side by side in one process: mimo (fp32, and bf16 autocast) against a plain PyTorch
loop around transformers.Qwen2ForCausalLM with the same shapes, batch and threads.

    .venv/bin/python bench/train_vs_transformers.py [--preset small] [--batch 4] [--seq 256] [--steps 4]

Prints a markdown table (tokens/s, ratio to transformers fp32, MFU against the measured matmul peaks).
Run it on a quiet machine: other processes on the cores distort every number.
"""

import argparse
import time

import torch

from mimo.bench import matmul_peak_flops, train_flops_per_token
from mimo.config import preset_config
from mimo.model import MiMoForCausalLM
from mimo.train.loop import TrainConfig, autocast_context, make_optimizer


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def mimo_step(model, opt, x, precision):
    def step():
        with autocast_context(precision, torch.device("cpu")):
            out = model(x[:, :-1], targets=x[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_step(model, opt, x):
    def step():
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone())  # HF shifts labels inside
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = preset_config(args.preset)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    tokens = args.batch * args.seq
    hf_cfg = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                         rope_theta=cfg.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa")
    hf = Qwen2ForCausalLM(hf_cfg).train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rows = [("transformers Qwen2, fp32", time_steps(hf_step(hf, hf_opt, x), args.warmup, args.steps), None)]
    del hf, hf_opt
    for mtp in (0, 1):
        cfg.num_nextn_predict_layers = mtp
        model = MiMoForCausalLM(cfg).init_weights(0).train()
        opt = make_optimizer(model, TrainConfig())
        for precision in ("fp32", "bf16"):
            dt = time_steps(mimo_step(model, opt, x, precision), args.warmup, args.steps)
            rows.append((f"mimo, {mtp} MTP layer(s), {precision}{' autocast' if precision == 'bf16' else ''}", dt,
                         (model, precision)))
    peaks = {"fp32": matmul_peak_flops(torch.float32, torch.device("cpu")),
             "bf16": matmul_peak_flops(torch.bfloat16, torch.device("cpu"))}
    base = tokens / rows[0][1]
    print(f"\n{args.preset}: batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads; measured matmul "
          f"peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s\n")
    print("| loop | tokens/s | vs transformers fp32 | MFU |")
    print("|---|---|---|---|")
    for name, dt, extra in rows:
        tps = tokens / dt
        mfu = ""
        if extra:
            model, precision = extra
            mfu = f"{100 * tps * train_flops_per_token(model, args.seq) / peaks[precision]:.0f}%"
        print(f"| {name} | {tps:.0f} | {tps / base:.2f}x | {mfu} |")


if __name__ == "__main__":
    main()
