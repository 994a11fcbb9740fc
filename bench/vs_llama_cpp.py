"""mimo against llama.cpp on the same GGUF files (written by `mimo export gguf`), taking turns in one run.

    bash bench/setup_bench_env.sh                     # once: bench/.venv with llama-cpp-python built from source
    bench/.venv/bin/python bench/vs_llama_cpp.py MODEL_DIR --gguf-dir DIR [--types q4_0,q8_0,bf16]
        [--new-tokens 16] [--prefill-tokens 512] [--rounds 5] [--threads 2] [--json FILE]

For each type the model directory is exported once (`mimo export gguf MODEL_DIR --out DIR/model-TYPE.gguf`).
Then both engines load that file at once, each in its own long-lived worker process (mimo: `load_gguf` and its
Engine, its own loader and kernels, no MTP; llama.cpp: llama-cpp-python, n_threads = n_threads_batch =
--threads); both map the file, so its pages are in memory once. After a warm-up each, the workers take turns,
one at a time, for --rounds rounds (order ABBA: mimo first in even rounds, llama.cpp first in odd ones): a greedy
decode of --new-tokens tokens from the same random 32-token prompt (tokens/s from the first generated token to
the last), then a prefill of one --prefill-tokens prompt to its logits. On a shared machine whose read bandwidth
drifts from minute to minute (this VM's moves 23-57 GB/s), each round's ratio compares the two engines a few
seconds apart; the table gives the median of the rounds' ratios with their range, beside each side's median.
Peak resident memory is each process's own (the shared file pages count in both).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 32


def peak_resident() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MimoWorker:
    def __init__(self, path: str, threads: int, context: int):
        import mimo  # noqa: F401, I001  (first: OMP_WAIT_POLICY=PASSIVE before torch loads, as mimo's CLI does)
        import torch

        from mimo.gguf import load_gguf
        from mimo.inference.engine import Engine
        from mimo.inference.sampling import SamplingParams

        torch.set_num_threads(threads)
        self.model = load_gguf(path, mtp=False)[0]
        self.engine = Engine(self.model, None, max_seq_len=context)
        self.params = SamplingParams

    def vocab(self) -> int:
        return self.model.config.vocab_size

    def decode(self, prompt: list[int], n: int) -> float:
        out = self.engine.generate([prompt], self.params(max_new_tokens=n))[0]
        return (len(out.tokens) - 1) / out.decode_time_s

    def prefill(self, prompt: list[int]) -> float:
        out = self.engine.generate([prompt], self.params(max_new_tokens=1))[0]
        return len(prompt) / out.time_to_first_token_s


class LlamaWorker:
    def __init__(self, path: str, threads: int, context: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=context,
                                   n_batch=512, n_ubatch=512, verbose=False)

    def vocab(self) -> int:
        return self.llm.n_vocab()

    def decode(self, prompt: list[int], n: int) -> float:
        self.llm.reset()
        times = []
        for i, _ in enumerate(self.llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            times.append(time.perf_counter())
            if i + 1 >= n:
                break
        return (len(times) - 1) / (times[-1] - times[0])

    def prefill(self, prompt: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - t0)


def serve_worker(engine: str, path: str, threads: int, new_tokens: int, prefill_tokens: int):
    """One engine on stdin/stdout: loads, warms up, says so, then answers one JSON line per 'round' line."""
    t0 = time.perf_counter()
    context = max(1024, prefill_tokens + PROMPT_TOKENS + new_tokens + 8)
    worker = (MimoWorker if engine == "mimo" else LlamaWorker)(path, threads, context)
    load_s = time.perf_counter() - t0
    rng = random.Random(0)
    prompt = [rng.randrange(1000, worker.vocab() // 2) for _ in range(PROMPT_TOKENS)]
    long = [rng.randrange(1000, worker.vocab() // 2) for _ in range(prefill_tokens)]
    worker.decode(prompt, 4)  # warm-up (and first-call work) before any timed turn
    if prefill_tokens:
        worker.prefill(long[:64])
    print(json.dumps({"load_s": load_s}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        out = {"decode_tokens_per_s": worker.decode(prompt, new_tokens)}
        out["prefill_tokens_per_s"] = worker.prefill(long) if prefill_tokens else None
        out["peak_resident_bytes"] = peak_resident()
        print(json.dumps(out), flush=True)


class Turns:
    """A worker process driven one round at a time."""

    def __init__(self, engine: str, path: Path, args):
        self.name = engine
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", engine, str(path), "--threads",
                                      str(args.threads), "--new-tokens", str(args.new_tokens), "--prefill-tokens",
                                      str(args.prefill_tokens)], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.name} worker ended early (exit code {self.proc.wait()})")
        return json.loads(line)

    def round(self) -> dict:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def compare(path: Path, args) -> dict:
    mimo = Turns("mimo", path, args)
    llama = Turns("llama.cpp", path, args)
    rows = {"mimo": [], "llama.cpp": []}
    for r in range(args.rounds):
        for side in ((mimo, llama) if r % 2 == 0 else (llama, mimo)):
            rows[side.name].append(side.round())
        m, ll = rows["mimo"][-1], rows["llama.cpp"][-1]
        print(f"{path.name} round {r + 1}: decode mimo {m['decode_tokens_per_s']:.2f} / llama.cpp "
              f"{ll['decode_tokens_per_s']:.2f} tokens/s", file=sys.stderr, flush=True)
    mimo.close()
    llama.close()
    return {"rounds": rows, "load_s": {"mimo": mimo.ready["load_s"], "llama.cpp": llama.ready["load_s"]},
            "file_bytes": path.stat().st_size}


def summary(r: dict, key: str) -> tuple[float, float, str]:
    m = [x[key] for x in r["rounds"]["mimo"]]
    ll = [x[key] for x in r["rounds"]["llama.cpp"]]
    return statistics.median(m), statistics.median(ll), spread([a / b for a, b in zip(m, ll)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--gguf-dir", type=Path, default=None)
    p.add_argument("--types", default="q4_0,q8_0,bf16")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--rounds", "--repeats", type=int, default=5, help="turns each (--repeats: the older name)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", choices=["mimo", "llama.cpp"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return serve_worker(args.worker, str(args.model_dir), args.threads, args.new_tokens, args.prefill_tokens)
    if args.gguf_dir is None:
        p.error("--gguf-dir is required")
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in args.types.split(","):
        path = args.gguf_dir / f"{args.model_dir.name}-{kind}.gguf"
        if not path.exists():
            subprocess.run([sys.executable, "-m", "mimo.cli", "export", "gguf", str(args.model_dir), "--out",
                            str(path), "--type", kind], cwd=ROOT, check=True)
        results[kind] = compare(path, args)
    import llama_cpp

    print(f"\n{args.model_dir.name}, {args.threads} threads each, batch 1, {args.rounds} rounds taking turns "
          f"(medians; ratio: median of the rounds' ratios, range); llama-cpp-python {llama_cpp.__version__}\n")
    print(f"| GGUF type | file | mimo decode tokens/s | llama.cpp | ratio | mimo prefill of {args.prefill_tokens}, "
          "tokens/s | llama.cpp | ratio | mimo peak memory | llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        md, ld, dr = summary(r, "decode_tokens_per_s")
        pre = summary(r, "prefill_tokens_per_s") if args.prefill_tokens else (float("nan"),) * 2 + ("-",)
        mm, lm = (max(x["peak_resident_bytes"] for x in r["rounds"][s]) for s in ("mimo", "llama.cpp"))
        print(f"| {kind} | {r['file_bytes'] / 1e9:.2f} GB | {md:.2f} | {ld:.2f} | {dr} | {pre[0]:.1f} | "
              f"{pre[1]:.1f} | {pre[2]} | {mm / 1e9:.1f} GB | {lm / 1e9:.1f} GB |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
