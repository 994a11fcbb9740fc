"""A random-weight stand-in for a published MiMo checkpoint, written tensor by tensor (never the whole model in
float32: MiMo-7B is 31 GB in fp32), in the published layout: bf16 safetensors shards with an index, Xiaomi's
config.json fields, generation_config.json and a small tokenizer (the Qwen2 tokenizer is not reachable here).

    python bench/write_standin.py OUT_DIR [--shape mimo-7b|1.5b] [--shard-gb 4] [--seed 0]

Shapes: mimo-7b is exactly the published model (36 layers, hidden 4096, FFN 11008, 32/8 heads, vocab 151,680,
one MTP layer: 7.83B parameters, 15.7 GB); 1.5b is the same design at hidden 2048, 18 layers, FFN 5504,
16/4 heads (1.47B). Weights are N(0, 0.02), norms 1, biases 0. Delete the directory after benchmarking.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimo.config import MiMoConfig, mimo_7b_config
from mimo.model import MiMoForCausalLM
from mimo.tokenizer import Tokenizer
from mimo.weights import INDEX_FILE, weights_state_dict

SHAPES = {
    "mimo-7b": mimo_7b_config,
    "1.5b": lambda: MiMoConfig(vocab_size=151680, hidden_size=2048, intermediate_size=5504, num_hidden_layers=18,
                               num_attention_heads=16, num_key_value_heads=4, num_nextn_predict_layers=1,
                               max_position_embeddings=32768, rope_theta=640000.0, torch_dtype="bfloat16"),
}
TOKENIZER_TEXT = ["The quick brown fox jumps over the lazy dog. Let x = 12 + 7; then x = 19.",
                  "Question: what is the gcd of 12 and 18? Reasoning step by step: 6. Answer: 6"] * 50


def write_standin(out: Path, cfg: MiMoConfig, shard_bytes: int, seed: int = 0):
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = MiMoForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in weights_state_dict(meta).items()}
    gen = torch.Generator().manual_seed(seed)
    names = sorted(shapes)
    shards, current, size = [], [], 0
    for name in names:
        nbytes = 2 * torch.Size(shapes[name]).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            t = torch.empty(shapes[name], dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            elif name.endswith(".bias"):
                t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=gen)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        print(f"wrote {fname} ({len(shard)} tensors)", file=sys.stderr, flush=True)
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2) + "\n")
    tok = Tokenizer.train([], vocab_size=1024, min_frequency=1, show_progress=False, texts=TOKENIZER_TEXT)
    tok.save(out)
    cfg.eos_token_id = tok.eos_token_id
    cfg.save(out / "config.json")
    gen_cfg = {"eos_token_id": cfg.eos_token_id, "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="mimo-7b")
    p.add_argument("--shard-gb", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    total = write_standin(args.out, SHAPES[args.shape](), int(args.shard_gb * 1e9), args.seed)
    print(f"{args.out}: {args.shape} stand-in, {total / 1e9:.2f} GB of bf16 weights in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
