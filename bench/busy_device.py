"""Decode speed on a busy device: idle against one core taken by another process, under each thread setting.

    python bench/busy_device.py MODEL_DIR_OR_PRESET [--new-tokens 64] [--repeats 3] [--settings default,passive,...]
                                [--quantize int4] [--dtype bfloat16]

Each measurement is a fresh `mimo bench decode --json` process (batch 1, no MTP) with the setting's environment;
"busy" runs it while a pure-Python spin loop (`while True: pass`) holds one core, as another program on a laptop
would. Settings: `default` is what mimo does when the user sets nothing (OMP_WAIT_POLICY=PASSIVE, set in
mimo/__init__.py); `spin` is OpenMP's own default (threads spin-wait between parallel regions); `passive` says
PASSIVE explicitly; `threads1` runs one thread. Prints a markdown table: median tokens/s of --repeats runs (min-max), and busy / idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {},
    "spin": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "threads1": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}


def decode_tps(model: str, setting: str, args) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    cmd = [sys.executable, "-m", "mimo.cli", "bench", "decode", model, "--no-mtp", "--new-tokens",
           str(args.new_tokens), "--json"]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["decode_tokens_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", default="default,spin,passive,threads1")
    p.add_argument("--quantize", default=None)
    p.add_argument("--dtype", default=None)
    args = p.parse_args()
    rows = []
    for setting in args.settings.split(","):
        idle, busy = [], []
        for _ in range(args.repeats):  # idle and busy interleaved, so drift hits both alike
            idle.append(decode_tps(args.model, setting, args))
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(0.5)
                busy.append(decode_tps(args.model, setting, args))
            finally:
                hog.kill()
                hog.wait()
        rows.append((setting, idle, busy))
        print(f"{setting}: idle {idle}, busy {busy}", file=sys.stderr, flush=True)
    print(f"\n{args.model}, batch 1, {args.new_tokens} tokens, {args.quantize or args.dtype or 'as stored'}; "
          f"median of {args.repeats} (min-max)\n")
    print("| setting | idle tokens/s | one core busy | busy / idle |")
    print("|---|---|---|---|")
    for setting, idle, busy in rows:
        mi, mb = statistics.median(idle), statistics.median(busy)
        print(f"| {setting} | {mi:.1f} ({min(idle):.1f}-{max(idle):.1f}) | {mb:.1f} ({min(busy):.1f}-{max(busy):.1f}) "
              f"| {mb / mi:.2f} |")


if __name__ == "__main__":
    main()
