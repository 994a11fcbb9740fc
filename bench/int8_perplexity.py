"""int8 weight-only quantization on a trained model: perplexity on held-out data, fp32 against int8.

The held-out data is the validation split of the corpus the model was pretrained on (problems held out by
problem, never trained on), scored in windows of --seq tokens.

    .venv/bin/python bench/int8_perplexity.py runs/speedrun-tiny/base/final runs/speedrun-tiny/data
"""

import argparse
import json

import torch

from mimo.checkpoint import load_model
from mimo.dataloader import PackedTokens
from mimo.quantize import perplexity, quantize_int8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", metavar="MODEL_DIR")
    ap.add_argument("data", metavar="DATA_DIR", help="the corpus whose validation split is scored")
    ap.add_argument("--tokens", type=int, default=65536, help="validation tokens scored (at most the split)")
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    val = PackedTokens(args.data, "val")
    n = min(args.tokens, len(val)) // args.seq * args.seq
    ids = torch.from_numpy(val.slice(0, n).astype("int64")).view(-1, args.seq)  # [windows, seq]
    fp32 = load_model(args.model, dtype=torch.float32)
    ppl_fp32 = perplexity(fp32, ids, chunk=args.seq)
    ppl_int8 = perplexity(quantize_int8(fp32), ids, chunk=args.seq)
    change = ppl_int8 / ppl_fp32 - 1
    print(f"{args.model}: {n:,} held-out tokens; perplexity fp32 {ppl_fp32:.4f}, int8 {ppl_int8:.4f} "
          f"({100 * change:+.2f}%)")
    print(json.dumps({"model": args.model, "tokens": n, "ppl_fp32": ppl_fp32, "ppl_int8": ppl_int8,
                      "relative_change": change}))


if __name__ == "__main__":
    main()
