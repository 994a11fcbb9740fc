"""What the decode-step settings of mimo/inference/model_runner.py are worth: the same model decoding with each setting on
and off, alternated in one process, at a short and a long context.

    .venv/bin/python bench/decode_settings.py MODEL [--quantize int4|int8] [--contexts 8,1000] [--new-tokens 9]
        [--repeats 2]

MODEL: a model directory (loaded as stored, --quantize applied as each tensor is read) or a GGUF file. Settings
compared (each against its "off" value, the other at its default):
  single-thread torch ops  ModelRunner.SINGLE_THREAD_MAX_KV (off: -1): torch's own ops on one thread in steps whose
                           products all run in mimo's kernels (kernels.torch_ops_single_threaded)
  fp32 decode attention    ModelRunner.FP32_ATTENTION_MAX_TOKENS (off: 0): a bf16 model's decode attention as fp32
                           matmuls instead of torch's bf16 SDPA
For each context (prompt length, random ids) it prints the fastest of --repeats decode steps (ms, greedy, batch 1,
MTP off) per setting on and off, and the draft-and-verify step with MTP on (ms) with everything at its default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mimo  # noqa: F401, I001  (before torch: OMP_WAIT_POLICY=PASSIVE, as mimo's CLI; libgomp reads it once)
import torch
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.inference.model_runner import ModelRunner

SETTINGS = {"single-thread torch ops": ("SINGLE_THREAD_MAX_KV", -1),
            "fp32 decode attention": ("FP32_ATTENTION_MAX_TOKENS", 0)}


def load(spec: str, quantize: str | None):
    if spec.endswith(".gguf"):
        from mimo.gguf import load_gguf

        return load_gguf(spec, "auto", quantize)[0]
    from mimo.checkpoint import load_model

    return load_model(spec, quantize=quantize)


def step_ms(engine: Engine, prompt: list[int], new_tokens: int, mtp: bool = False) -> float:
    o = engine.generate([prompt], SamplingParams(max_new_tokens=new_tokens), mtp=mtp)[0]
    steps = o.spec.verify_steps if mtp else len(o.tokens) - 1
    return o.decode_time_s / steps * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--contexts", default="8,1000", help="prompt lengths, comma-separated")
    p.add_argument("--new-tokens", type=int, default=9)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    model = load(args.model, args.quantize)
    contexts = [int(c) for c in args.contexts.split(",")]
    engine = Engine(model, None, max_seq_len=max(contexts) + args.new_tokens + 2)
    g = torch.Generator().manual_seed(0)
    defaults = {attr: getattr(ModelRunner, attr) for attr, _ in SETTINGS.values()}
    print(f"{args.model} ({args.quantize or 'as stored'}), {torch.get_num_threads()} threads; decode step ms, "
          f"fastest of {args.repeats}")
    for ctx in contexts:
        prompt = torch.randint(0, model.config.vocab_size, (ctx,), generator=g).tolist()
        step_ms(engine, prompt, 3)  # warm-up
        best: dict[tuple[str, bool], float] = {}
        for _ in range(args.repeats):
            for name, (attr, off) in SETTINGS.items():
                for on in (True, False):
                    setattr(ModelRunner, attr, defaults[attr] if on else off)
                    t = step_ms(engine, prompt, args.new_tokens)
                    best[name, on] = min(best.get((name, on), t), t)
                setattr(ModelRunner, attr, defaults[attr])
        mtp = min(step_ms(engine, prompt, args.new_tokens, mtp=True) for _ in range(args.repeats))
        plain = min(best[name, True] for name in SETTINGS)
        for name in SETTINGS:
            print(f"  context {ctx:5d}  {name:24s} on {best[name, True]:7.1f}  off {best[name, False]:7.1f}  "
                  f"({best[name, False] / best[name, True]:.2f}x)")
        print(f"  context {ctx:5d}  draft-and-verify step {mtp:7.1f} ms = {mtp / plain:.2f}x the plain step", flush=True)


if __name__ == "__main__":
    main()
