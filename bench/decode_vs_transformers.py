"""mimo's engine against Hugging Face transformers' generate() on the same checkpoint, side by side.

    python bench/decode_vs_transformers.py [--new-tokens 256] [--prompt-tokens 32] [--repeats 3] [--threads N]
                                           [--configs 125m,25m] [--no-compile] [--quantize int8,int4] [--json FILE]

Batch 1, fp32, greedy, random weights (saved once with mimo, loaded by both). Decode tokens/s is
(new_tokens - 1) / (time to generate new_tokens - time to generate 1 token), the same external clock for both
engines, best of --repeats; mimo runs eager and with its torch.compile'd decode step (compiled in the warm-up).
Also int8 and int4 weight-only quantization against fp32 on the 125M model: speed and perplexity (on text
sampled from the fp32 model). Prints a markdown table with the ratios and the targets.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimo.checkpoint import load_model, save_model
from mimo.config import MiMoConfig
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.model import MiMoForCausalLM
from mimo.quantize import perplexity, quantize_model

CONFIGS = {
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
             "intermediate_size": 2048},
    "25m": {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 1024},
}
TARGETS = {"125m": 2.0, "25m": 2.5}  # mimo / transformers
INT8_TARGET = 1.7  # int8 / fp32 on 125m, perplexity within 1%


def make_checkpoint(name: str, out: Path, max_len: int) -> Path:
    cfg = MiMoConfig(vocab_size=32000, num_nextn_predict_layers=1, max_position_embeddings=max_len,
                     rope_theta=10000.0, torch_dtype="float32", **CONFIGS[name])
    torch.manual_seed(0)
    return save_model(MiMoForCausalLM(cfg).init_weights(0), out / name)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def decode_rate(generate, new_tokens: int, repeats: int) -> float:
    """(new_tokens - 1) / (time for new_tokens - time for 1 token): decode only, prefill cancels out."""
    t_full = best_time(lambda: generate(new_tokens), repeats)
    t_one = best_time(lambda: generate(1), repeats)
    return (new_tokens - 1) / (t_full - t_one)


def mimo_generator(model, prompt, compile: bool = False):
    engine = Engine(model, None, max_seq_len=model.config.max_position_embeddings, compile=compile)

    def run(n):
        return engine.generate([prompt], SamplingParams(max_new_tokens=n))[0].tokens
    return run


def hf_generator(model_dir: Path, prompt):
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])

    @torch.inference_mode()
    def run(n):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
        return out[0, ids.shape[1]:].tolist()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--configs", default="125m,25m")
    ap.add_argument("--quantize", default="int8,int4", help="weight-only methods compared with fp32 on 125m ('' for none)")
    ap.add_argument("--no-compile", action="store_true", help="skip mimo with its torch.compile'd decode step")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 32000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    max_len = args.prompt_tokens + args.new_tokens + 8
    modes = (False,) if args.no_compile else (False, True)
    rows, results = [], {"threads": torch.get_num_threads(), "new_tokens": args.new_tokens}

    def mimo_rates(model, reference=None):
        """{mode: tokens/s} for eager and compiled mimo; with reference tokens, {mode: how many leading tokens
        match} (random weights make near-ties, where float rounding may pick the other token)."""
        rates, same = {}, {}
        for compile in modes:
            run = mimo_generator(model, prompt, compile)
            mode = "compiled" if compile else "eager"
            if reference is not None:
                same[mode] = next((i for i, (a, b) in enumerate(zip(run(32), reference)) if a != b), 32)
            rates[mode] = decode_rate(run, args.new_tokens, args.repeats)
        return rates, same

    def cells(rates, base):
        return " | ".join(f"{rates[m]:.1f} ({rates[m] / base:.2f}x)" if m in rates else "-"
                          for m in ("eager", "compiled"))

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            model_dir = make_checkpoint(name, Path(tmp), max_len)
            model = load_model(model_dir)
            theirs = hf_generator(model_dir, prompt)
            tps_hf = decode_rate(theirs, args.new_tokens, args.repeats)
            rates, same = mimo_rates(model, theirs(32))
            results[name] = {"transformers_tokens_per_s": tps_hf, "mimo_tokens_per_s": rates,
                             "ratio": {m: r / tps_hf for m, r in rates.items()}, "target": TARGETS[name],
                             "same_greedy_tokens": same}
            agree = ", ".join(f"{m} {n}/32" for m, n in same.items())
            rows.append(f"| {name} fp32 | {tps_hf:.1f} | {cells(rates, tps_hf)} | >= {TARGETS[name]}x vs "
                        f"transformers | greedy tokens equal to transformers': {agree} |")
            methods = [m for m in args.quantize.split(",") if m] if name == "125m" else []
            if methods:
                text = torch.tensor(Engine(model, None).generate([prompt], SamplingParams(
                    max_new_tokens=max_len, temperature=1.0, seed=0))[0].tokens)
                ppl_fp32 = perplexity(model, text)
            for method in methods:
                q = quantize_model(load_model(model_dir), method)
                ppl_q = perplexity(q, text)
                q_rates, _ = mimo_rates(q)
                results[f"125m_{method}"] = {"mimo_tokens_per_s": q_rates,
                                             "ratio_vs_fp32": {m: r / rates[m] for m, r in q_rates.items()},
                                             "perplexity_fp32": ppl_fp32, f"perplexity_{method}": ppl_q,
                                             "perplexity_change": ppl_q / ppl_fp32 - 1}
                ratios = ", ".join(f"{m} {q_rates[m] / rates[m]:.2f}x" for m in q_rates)
                target = f">= {INT8_TARGET}x vs fp32" if method == "int8" else "vs fp32"
                rows.append(f"| 125m {method} | - | {cells(q_rates, tps_hf)} | {target} ({ratios}) | "
                            f"perplexity {100 * (ppl_q / ppl_fp32 - 1):+.2f}% |")
                del q
            del model
    print(f"decode tokens/s (ratio to transformers), batch 1, greedy, {args.new_tokens} new tokens, "
          f"{results['threads']} threads\n")
    print("| model | transformers | mimo | mimo compiled | target | check |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
