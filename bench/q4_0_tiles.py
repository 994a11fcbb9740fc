"""Q4_0 weights in GGML's rows against Q4_0 tiled by 8 rows (mimo's q4_0x8, used where the AVX-512 tiles run), the
same model loaded both ways in one process, decode steps and 2-token verify passes taking turns.

    .venv/bin/python bench/q4_0_tiles.py MODEL_DIR [--turns 8] [--steps 6]

The model is quantized to int4 as it is read, once with MIMO_Q4_0_TILES=0 (rows) and once tiled; each turn runs
--steps passes of 1 token (a decode step) or 2 tokens (MTP's verify pass) at batch 1 on its own runner, the order
alternating every turn. Prints each side's median step time and the median of the turns' rows / tiles ratios.
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    runners, positions = {}, {}
    for name, env in (("rows", "0"), ("tiles", "1")):
        os.environ["MIMO_Q4_0_TILES"] = env
        t = time.perf_counter()
        model = load_model(args.model_dir, quantize="int4")
        fmt = model.model.layers[0].mlp.up_proj.fmt
        print(f"{name}: loaded in {time.perf_counter() - t:.1f} s, format {fmt}", flush=True)
        runners[name], positions[name] = ModelRunner(model, 1, 16 + 4 * args.turns * args.steps * 2), 4

    def turn(name: str, T: int) -> float:
        r, times = runners[name], []
        for _ in range(args.steps):
            pos = positions[name]
            t = time.perf_counter()
            with r.step_threads(pos + T, T):
                ctx = r.context((torch.arange(T) + pos)[None], None, pos + T, mask=T > 1)
                r.logits(r.hidden(torch.full((1, T), 5), ctx))
            times.append(time.perf_counter() - t)
            positions[name] = pos + T
        return statistics.median(times)

    with torch.no_grad():
        for T, label in ((1, "decode step"), (2, "2-token verify pass")):
            times = {"rows": [], "tiles": []}
            turn("rows", T), turn("tiles", T)  # warm-up
            for i in range(args.turns):
                for name in ("rows", "tiles") if i % 2 == 0 else ("tiles", "rows"):
                    times[name].append(turn(name, T))
            ratios = [a / b for a, b in zip(times["rows"], times["tiles"])]
            print(f"{label}: rows {statistics.median(times['rows']) * 1e3:.1f} ms, tiles "
                  f"{statistics.median(times['tiles']) * 1e3:.1f} ms; rows / tiles median "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)


if __name__ == "__main__":
    main()
