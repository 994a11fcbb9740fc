"""Device fit of `mimo tune`: QLoRA on a 1.5B-parameter MiMo-shaped stand-in (bench/write_standin.py --shape 1.5b:
random bf16 weights, Qwen2's vocabulary size) with an int4 base. Runs the command as a user would and reports its
peak resident memory (the child process's maxrss) and the training tokens/s from its metrics.jsonl.

    python bench/tune_device_fit.py --standin /work/standins/mimo-1.5b --data NOTES --out DIR [--quantize int4]
        [--max-steps 2] [--seq-len 128] [--micro-batch 1] [--replay 64]

Write the stand-in first, in its own command (its writer's memory must not count here), and delete it after:
    python bench/write_standin.py /work/standins/mimo-1.5b --shape 1.5b
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--standin", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quantize", default="int4", choices=["int4", "int8"])
    ap.add_argument("--max-steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--replay", type=int, default=64, help="mimo tune --replay: its generation takes minutes on a "
                    "random-weight stand-in (no reply ever stops); memory does not grow with it")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    if not (args.standin / "config.json").exists():
        sys.exit(f"{args.standin}: no model directory (bench/write_standin.py writes one)")
    cmd = [str(bin_dir / "mimo"), "tune", str(args.standin), "--data", str(args.data), "--out", str(args.out),
           "--quantize", args.quantize, "--max-steps", str(args.max_steps), "--seq-len", str(args.seq_len),
           "--micro-batch", str(args.micro_batch), "--replay", str(args.replay), "--val-fraction", "0", "--save-every", str(args.max_steps)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    rows = [json.loads(line) for line in (args.out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((args.out / "tune_config.json").read_text())
    print(json.dumps({"standin": str(args.standin), "quantize": args.quantize, "steps": rows[-1]["step"],
                      "tokens": rows[-1]["tokens"], "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                      "trainable_parameters": config["data_stats"]["trainable_parameters"],
                      "peak_rss_gb": round(peak / 1e9, 2), "tokens_per_s": round(rows[-1]["tokens_per_s"], 1),
                      "wall_s": round(wall, 1)}, indent=2))


if __name__ == "__main__":
    main()
