"""Does bf16 autocast train like fp32? The same pretraining run twice (same data, seed, steps), once per
precision, with the two loss curves side by side and their gap at the end.

    .venv/bin/python bench/precision_loss_curves.py [--preset nano] [--steps 150] [--out runs/precision]

Writes OUT/precision.png and prints a markdown table of the logged losses.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default="runs/precision")
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "mimo.cli", "data", "build", "--preset", args.preset, "--out",
                        str(data)], check=True)
    curves = {}
    for precision in ("fp32", "bf16"):
        run = out / precision
        subprocess.run([sys.executable, "-m", "mimo.cli", "pretrain", "--preset", args.preset, "--data", str(data),
                        "--out", str(run), "--max-steps", str(args.steps), "--precision", precision], check=True)
        curves[precision] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for precision, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{precision} (train)")
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        ax.plot(*zip(*val), "o--", label=f"{precision} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out / "precision.png", dpi=100)
    print("| step | fp32 loss | bf16 loss | fp32 tok/s | bf16 tok/s |\n|---|---|---|---|---|")
    for a, b in zip(curves["fp32"], curves["bf16"]):
        print(f"| {a['step']} | {a['loss']:.4f} | {b['loss']:.4f} | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} |")
    fa, fb = curves["fp32"][-1], curves["bf16"][-1]
    print(f"\nfinal validation loss: fp32 {fa.get('val_loss'):.4f}, bf16 {fb.get('val_loss'):.4f}")


if __name__ == "__main__":
    main()
