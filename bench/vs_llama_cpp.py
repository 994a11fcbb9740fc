"""mimo against llama.cpp on the same GGUF files (written by `mimo export gguf`), side by side in one run.

    bash bench/setup_bench_env.sh                     # once: bench/.venv with llama-cpp-python built from source
    bench/.venv/bin/python bench/vs_llama_cpp.py MODEL_DIR --gguf-dir DIR [--types q4_0,q8_0,bf16]
        [--new-tokens 32] [--prefill-tokens 512] [--repeats 2] [--threads 2] [--json FILE]

For each type the model directory is exported once (`mimo export gguf MODEL_DIR --out DIR/model-TYPE.gguf`);
then each repeat runs mimo (`mimo bench decode FILE.gguf --no-mtp`: mimo's own loader and kernels) and
llama.cpp (llama-cpp-python, n_threads = n_threads_batch = --threads) one after the other in fresh processes,
each on the same file: batch 1, greedy, random prompt tokens. Decode tokens/s is timed from the first generated
token to the last (both through their Python APIs); prefill is one --prefill-tokens prompt to its logits. Peak
resident memory is each process's own. Prints a markdown table of medians and the ratios mimo / llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA_RUN = r"""
import json, random, resource, sys, time
import llama_cpp
path, threads, new_tokens, prefill = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=max(1024, prefill + 64),
                      n_batch=512, n_ubatch=512, verbose=False)
load_s = time.perf_counter() - t0
rng = random.Random(0)
vocab = llm.n_vocab()
prompt = [rng.randrange(1000, vocab // 2) for _ in range(32)]
def decode(n):
    llm.reset()
    times = []
    for i, tok in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
        times.append(time.perf_counter())
        if i + 1 >= n:
            break
    return (len(times) - 1) / (times[-1] - times[0])
decode(4)  # warm-up
tps = decode(new_tokens)
prefill_tps = None
if prefill:
    long = [rng.randrange(1000, vocab // 2) for _ in range(prefill)]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long)
    prefill_tps = prefill / (time.perf_counter() - t0)
print(json.dumps({"decode_tokens_per_s": tps, "prefill_tokens_per_s": prefill_tps, "load_s": load_s,
                  "peak_resident_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_json(cmd) -> dict:
    out = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} ... failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mimo_run(path: Path, args) -> dict:
    return run_json([sys.executable, "-m", "mimo.cli", "bench", "decode", str(path), "--no-mtp", "--new-tokens",
                     str(args.new_tokens), "--prefill-tokens", str(args.prefill_tokens), "--json"])


def llama_run(path: Path, args) -> dict:
    return run_json([sys.executable, "-c", LLAMA_RUN, str(path), str(args.threads), str(args.new_tokens),
                     str(args.prefill_tokens)])


def med(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--gguf-dir", type=Path, required=True)
    p.add_argument("--types", default="q4_0,q8_0,bf16")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in args.types.split(","):
        path = args.gguf_dir / f"{args.model_dir.name}-{kind}.gguf"
        if not path.exists():
            subprocess.run([sys.executable, "-m", "mimo.cli", "export", "gguf", str(args.model_dir), "--out",
                            str(path), "--type", kind], cwd=ROOT, check=True)
        mimo, llama = [], []
        for _ in range(args.repeats):
            mimo.append(mimo_run(path, args))
            llama.append(llama_run(path, args))
            print(f"{kind}: mimo {mimo[-1]['decode_tokens_per_s']:.2f} tokens/s, llama.cpp "
                  f"{llama[-1]['decode_tokens_per_s']:.2f}", file=sys.stderr, flush=True)
        results[kind] = {"mimo": mimo, "llama.cpp": llama, "file_bytes": path.stat().st_size}
    import llama_cpp

    print(f"\n{args.model_dir.name}, {args.threads} threads, batch 1, medians of {args.repeats}; llama-cpp-python "
          f"{llama_cpp.__version__}\n")
    print("| GGUF type | file | mimo decode tokens/s | llama.cpp | ratio | mimo prefill of "
          f"{args.prefill_tokens} tokens/s | llama.cpp | ratio | mimo peak memory | llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        md, ld = med(r["mimo"], "decode_tokens_per_s"), med(r["llama.cpp"], "decode_tokens_per_s")
        mp, lp = med(r["mimo"], "prefill_tokens_per_s"), med(r["llama.cpp"], "prefill_tokens_per_s")
        mm, lm = med(r["mimo"], "peak_resident_bytes"), med(r["llama.cpp"], "peak_resident_bytes")
        print(f"| {kind} | {r['file_bytes'] / 1e9:.2f} GB | {md:.2f} | {ld:.2f} | {md / ld:.2f}x | {mp:.1f} | "
              f"{lp:.1f} | {mp / lp:.2f}x | {mm / 1e9:.1f} GB | {lm / 1e9:.1f} GB |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
