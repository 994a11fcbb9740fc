"""Weight-read bandwidth of batch-1 decode products over a 7B model's layer shapes, against the machine's own read
bandwidth measured in the same run; and the time of a 512-token prefill through the same layers.

    .venv/bin/python bench/gemv_bandwidth.py [--threads 2] [--layers-mb 600] [--repeat 5] [--prefill 512]

Shapes: MiMo-7B's linears (q 4096x4096, k/v 1024x4096, o 4096x4096, gate/up 11008x4096, down 4096x11008),
as many layers' worth as fill --layers-mb of weights per format (far more than the L3 cache), run layer after
layer at M=1 as decode does. Read bandwidth: fp32 x.sum() over 1 GiB, measured again right before every timed
pass of every kernel (rounds alternate probe, torch kernel, mimo kernel), so each pass is compared with the
bandwidth of its own moment on a shared machine: the table gives the median over rounds of GB/s and of the
per-round share of read bandwidth. Kernels compared:
  bf16: F.linear on the bf16 weight (torch) vs mimo.quantize.bf16_linear (mimo's GEMV)
  int8: torch._weight_int8pack_mm (int8 + a bf16 scale a row, quantize.py before GGML) vs Int8Linear (Q8_0)
  int4: torch.ops.aten._weight_int4pack_mm_for_cpu (groups of 32, bf16 scale + zero) vs Int4Linear (Q4_0)
GB/s counts each format's own bytes (Q8_0: 34 bytes per 32 weights, Q4_0: 18, torch int4: 16 + 4 of scale/zero).
Prints a markdown table.

    .venv/bin/python bench/gemv_bandwidth.py --busy [--busy-layers 4] [--busy-tokens 64]

--busy instead decodes with a random model of MiMo-7B's layer shapes (--busy-layers layers, a 32000-token
vocabulary), Q4_0 and Q8_0, batch 1, with the machine idle and then with a competing busy process
(`python -c "while True: pass"`) pinned to the last core, and prints tokens/s and the busy/idle ratio.

    .venv/bin/python bench/gemv_bandwidth.py --rows 8,16,32,64,128,512

--rows times one 11008x4096 product per format at each number of input rows through the GEMV kernel and through
the dequantize-to-fp32-then-GEMM path (mimo.quantize.GEMV_MAX_ROWS picks between them), medians of 5.

Measured (2-core AMD EPYC Zen 3 VM, torch 2.13, 2 threads; three runs while no other job ran, --layers-mb 600
--repeat 5; read probes 27.7 / 23.7 / 26.3 GB/s median), M=1 share of read bandwidth, median:
    bf16  torch F.linear 70 / 75 / 65%      mimo 92 / 92 / 86%   (26.2 / 22.0 / 24.7 GB/s)
    int8  torch int8pack 72 / 76 / 70%      mimo Q8_0 94 / 90 / 89%   (26.3 / 22.2 / 24.0 GB/s)
    int4  torch int4pack 31 / 37 / 36%      mimo Q4_0 94 / 88 / 89%   (26.1 / 20.4 / 23.2 GB/s)
Prefill, 512 tokens through one 7B layer (--prefill 512): bf16 8450 ms (torch) / 1114 ms (mimo: fp32 chunks + MKL);
int8 2265 / 1302 ms; int4 2704 / 786 ms (231 GFLOP/s). --rows (ms, kernel / dequantize + GEMM), rows 1: q4_0 0.8 /
12.1, q8_0 2.0 / 12.5, bf16 3.9 / 16.3; rows 64: 25.4 / 82.2, 41.2 / 76.5, 61.6 / 87.0; rows 512: 190 / 317,
318 / 312, 505 / 308. --busy (2 layers): busy / idle 0.81 and 0.66 (int4), 0.60 and 0.59 (int8); the OpenMP build
of the same kernels (MIMO_KERNEL_OPENMP=1) 0.43 / 0.60, and with torch imported before mimo (libgomp spinning)
0.17 for int4 where the pool keeps 0.54.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import mimo  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads, as mimo's CLI does)
from mimo import kernels
from mimo.quantize import Int4Linear, Int8Linear, bf16_linear

SHAPES = [("q", 4096, 4096), ("k", 1024, 4096), ("v", 1024, 4096), ("o", 4096, 4096),
          ("gate", 11008, 4096), ("up", 11008, 4096), ("down", 4096, 11008)]
LAYER_WEIGHTS = sum(n * k for _, n, k in SHAPES)


def _time(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def old_int8(w: torch.Tensor):
    w = w.float()
    scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return (lambda x: torch._weight_int8pack_mm(x, q, scales)), q.numel() + 2 * scales.numel()


def old_int4(w: torch.Tensor):
    w = w.float()
    out, n_in = w.shape
    wg = w.view(out, n_in // 32, 32)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo).clamp(min=1e-12) / 15).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    q = q.view(out, -1).to(torch.int32)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)), packed.numel() + 2 * sz.numel()


def build(kind: str, n_layers: int):
    """[(fn(x) -> y, bytes)] for n_layers layers of SHAPES, and the input dtype the fn wants."""
    g = torch.Generator().manual_seed(0)
    fns = []
    for _ in range(n_layers):
        for _, n, k in SHAPES:
            w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
            if kind == "bf16 torch":
                fns.append(((lambda x, w=w: F.linear(x, w)), w.numel() * 2))
            elif kind == "bf16 mimo":
                fns.append(((lambda x, w=w: bf16_linear(x, w)), w.numel() * 2))
            elif kind == "int8 torch":
                fns.append(old_int8(w))
            elif kind == "int4 torch":
                fns.append(old_int4(w))
            else:
                m = (Int8Linear if kind == "int8 mimo" else Int4Linear).from_weight(w)
                fns.append((m.forward, m.blocks.numel()))
            del w
    return fns


def x_for(kind: str, m: int, k: int):
    # the old torch kernels want bf16 activations; mimo's take fp32 (an fp32 model) or bf16
    dtype = torch.bfloat16 if kind in ("bf16 torch", "int8 torch", "int4 torch") else torch.float32
    return torch.randn(m, k).to(dtype)


def run_layers(kind, fns, m, repeat):
    xs = {k: x_for(kind, m, k) for k in {k for _, _, k in SHAPES}}
    ks = [k for _, _, k in SHAPES] * (len(fns) // len(SHAPES))

    def once():
        for (fn, _), k in zip(fns, ks):
            fn(xs[k])
    once()
    return min(_time(once, 1) for _ in range(repeat))


def decode_tokens_per_s(model, tokens: int) -> float:
    from mimo.inference.model_runner import ModelRunner

    runner = ModelRunner(model, 1, tokens + 8)
    ids = torch.tensor([[1]])
    with torch.inference_mode():
        for i in range(4):  # warm-up
            runner.decode(ids, torch.tensor([[i]]), i + 1)
        t = time.perf_counter()
        for i in range(tokens):
            runner.decode(ids, torch.tensor([[i]]), i + 1)
    return tokens / (time.perf_counter() - t)


def busy_decode(args):
    """Decode tokens/s idle and with a busy process pinned to the last core."""
    from mimo.config import MiMoConfig
    from mimo.model import MiMoForCausalLM
    from mimo.quantize import quantize_model

    cfg = MiMoConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.busy_layers,
                     num_attention_heads=32, num_key_value_heads=8, num_nextn_predict_layers=0,
                     max_position_embeddings=4096, torch_dtype="float32")
    print(f"threads {args.threads}; {args.busy_layers} layers of MiMo-7B's shapes, vocabulary 32000, batch 1\n")
    print("| format | idle tokens/s | busy tokens/s (1 core taken) | busy / idle |")
    print("|---|---|---|---|")
    cores = sorted(os.sched_getaffinity(0))
    for method in ("int4", "int8"):
        torch.manual_seed(0)
        model = quantize_model(MiMoForCausalLM(cfg).init_weights(0).eval(), method)
        gc.collect()
        idle = max(decode_tokens_per_s(model, args.busy_tokens) for _ in range(2))
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            os.sched_setaffinity(hog.pid, {cores[-1]})
            time.sleep(0.5)
            busy = max(decode_tokens_per_s(model, args.busy_tokens) for _ in range(2))
        finally:
            hog.kill()
            hog.wait()
        print(f"| {method} | {idle:.2f} | {busy:.2f} | {busy / idle:.2f} |", flush=True)
        del model
        gc.collect()


def rows_crossover(args):
    import statistics

    from mimo import quantize as Q

    def med(fn):
        fn()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    n, k = 11008, 4096
    w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    weights = {"q4_0": Q.quantize_blocks(w, "q4_0"), "q8_0": Q.quantize_blocks(w, "q8_0"), "bf16": w}
    print(f"threads {args.threads}; one {n}x{k} product, ms (median of 5): GEMV kernel / dequantize + fp32 GEMM\n")
    print("| rows | " + " | ".join(weights) + " |")
    print("|---|" + "---|" * len(weights))
    for m in (int(r) for r in args.rows.split(",")):
        x = torch.randn(m, k)
        out = torch.empty(m, n)
        cells = []
        for fmt, wt in weights.items():
            g = med(lambda fmt=fmt, wt=wt, x=x, out=out: kernels.gemv(fmt, wt, n, k, x, out))
            d = med(lambda fmt=fmt, wt=wt, x=x: Q._chunked_linear(fmt, x, wt, n, k, True))
            cells.append(f"{g * 1e3:.1f} / {d * 1e3:.1f}")
        print(f"| {m} | " + " | ".join(cells) + " |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers-mb", type=float, default=600, help="weights per format at M=1 (MB)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens (0: skip)")
    p.add_argument("--kinds", default="bf16,int8,int4")
    p.add_argument("--busy", action="store_true", help="decode idle vs with one core taken (see the docstring)")
    p.add_argument("--busy-layers", type=int, default=4)
    p.add_argument("--busy-tokens", type=int, default=48)
    p.add_argument("--rows", default=None, help="comma-separated input rows: GEMV kernel vs dequantize + GEMM")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.busy:
        return busy_decode(args)
    if args.rows:
        return rows_crossover(args)
    assert kernels.available(), "mimo's kernels did not build"
    import statistics

    probe = torch.ones(256 << 20)  # 1 GiB of fp32
    probe.sum()

    def read_gbs():
        t = time.perf_counter()
        probe.sum()
        return (1 << 30) / (time.perf_counter() - t) / 1e9

    print(f"threads {args.threads}; {args.repeat} rounds of (read probe, torch pass, mimo pass) per format\n", flush=True)
    rows, bws = [], []
    for fam in args.kinds.split(","):
        per_layer = {"bf16": 2, "int8": 34 / 32, "int4": 18 / 32}[fam] * LAYER_WEIGHTS
        n_layers = max(1, round(args.layers_mb * 1e6 / per_layer))
        with torch.inference_mode():
            fns = {impl: build(f"{fam} {impl}", n_layers) for impl in ("torch", "mimo")}
            nbytes = {impl: sum(b for _, b in f) for impl, f in fns.items()}
            gbs, share = {"torch": [], "mimo": []}, {"torch": [], "mimo": []}
            for impl, f in fns.items():  # warm-up
                run_layers(f"{fam} {impl}", f, 1, 1)
            for _ in range(args.repeat):
                for impl in ("torch", "mimo"):
                    bw = read_gbs()
                    bws.append(bw)
                    g = nbytes[impl] / run_layers(f"{fam} {impl}", fns[impl], 1, 1) / 1e9
                    gbs[impl].append(g)
                    share[impl].append(g / bw)
            pre = {}
            if args.prefill:
                for impl in ("torch", "mimo"):
                    pre[impl] = run_layers(f"{fam} {impl}", fns[impl][: len(SHAPES)], args.prefill,
                                           max(1, args.repeat // 2))
        del fns
        gc.collect()
        for impl in ("torch", "mimo"):
            p = pre.get(impl)
            pre_s = "" if p is None else f"{p * 1e3:.0f} ms ({2 * LAYER_WEIGHTS * args.prefill / p / 1e9:.0f} GFLOP/s)"
            rows.append(f"| {fam} | {impl} | {n_layers} | {statistics.median(gbs[impl]):.1f} (best {max(gbs[impl]):.1f}) "
                        f"| {100 * statistics.median(share[impl]):.0f}% | {pre_s} |")
        print(rows[-2] + "\n" + rows[-1], flush=True)
    print(f"\nread bandwidth probes (fp32 sum over 1 GiB): median {statistics.median(bws):.1f} GB/s, "
          f"best {max(bws):.1f}\n")
    print(f"| format | kernel | layers | M=1 GB/s, median | share of read bandwidth, median | "
          f"prefill {args.prefill} tokens, one layer |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))

if __name__ == "__main__":
    main()
