"""Weight-only quantization on a trained model: perplexity on held-out data, fp32 against int8 and int4.

The held-out data is the validation split of the corpus the model was pretrained on (problems held out by
problem, never trained on), scored in windows of --seq tokens.

    .venv/bin/python bench/quant_perplexity.py runs/speedrun-tiny/base/final runs/speedrun-tiny/data [--methods int8,int4]
"""

import argparse
import json

import torch

from mimo.checkpoint import load_model
from mimo.data.loader import PackedTokens
from mimo.quantize import perplexity, quantize_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", metavar="MODEL_DIR")
    ap.add_argument("data", metavar="DATA_DIR", help="the corpus whose validation split is scored")
    ap.add_argument("--methods", default="int8,int4")
    ap.add_argument("--tokens", type=int, default=65536, help="validation tokens scored (at most the split)")
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    val = PackedTokens(args.data, "val")
    n = min(args.tokens, len(val)) // args.seq * args.seq
    ids = torch.from_numpy(val.slice(0, n).astype("int64")).view(-1, args.seq)  # [windows, seq]
    result = {"model": args.model, "tokens": n, "ppl_fp32": perplexity(load_model(args.model, dtype=torch.float32),
                                                                        ids, chunk=args.seq)}
    line = f"{args.model}: {n:,} held-out tokens; perplexity fp32 {result['ppl_fp32']:.4f}"
    for method in args.methods.split(","):
        ppl = perplexity(quantize_model(load_model(args.model, dtype=torch.float32), method), ids, chunk=args.seq)
        result[f"ppl_{method}"], result[f"change_{method}"] = ppl, ppl / result["ppl_fp32"] - 1
        line += f", {method} {ppl:.4f} ({100 * (ppl / result['ppl_fp32'] - 1):+.2f}%)"
    print(line)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
