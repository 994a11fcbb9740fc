"""Decode steps with the decoder blocks in C (mimo/kernels/block.c) against the torch blocks, taking turns in one
process on one ModelRunner (ModelRunner.block_kernel set and unset), so both see the same machine minute.

    .venv/bin/python bench/decode_blocks.py MODEL_DIR [--quantize int4|int8] [--turns 8] [--steps 6] [--position 4]

Each turn decodes --steps single tokens (batch 1) from --position on (the cache is not filled before: attention
reads zeros, which costs what any keys cost); the order alternates every turn. Prints each turn's median step
time and the median of the turns' torch / C ratios with their range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mimo  # noqa: F401, I001  (first: OMP_WAIT_POLICY=PASSIVE before torch loads)
import torch

from mimo.checkpoint import load_model
from mimo.inference.model_runner import ModelRunner


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--quantize", choices=["int4", "int8"], default=None)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--position", type=int, default=4)
    args = p.parse_args()
    model = load_model(args.model_dir, quantize=args.quantize)
    capacity = args.position + args.turns * 2 * args.steps + 8
    runner = ModelRunner(model, 1, capacity)
    kernel = runner.block_kernel
    if kernel is None:
        sys.exit("the C blocks do not take this model (fp32 weights, or no C compiler)")
    pos = args.position

    def turn() -> float:
        nonlocal pos
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            with runner.step_threads(pos + 1):
                runner.decode(torch.tensor([[5]]), torch.tensor([[pos]]), pos + 1)
            times.append(time.perf_counter() - t)
            pos += 1
        return statistics.median(times)

    times = {"C": [], "torch": []}
    with torch.no_grad():
        turn()  # warm-up
        for i in range(args.turns):
            for name in ("C", "torch") if i % 2 == 0 else ("torch", "C"):
                runner.block_kernel = kernel if name == "C" else None
                times[name].append(turn())
    for name, ts in times.items():
        print(f"{name:5s} ms a step: {' '.join(f'{t * 1e3:.1f}' for t in ts)}; median {statistics.median(ts) * 1e3:.1f}")
    ratios = [a / b for a, b in zip(times["torch"], times["C"])]
    print(f"torch / C: median {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
