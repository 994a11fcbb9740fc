"""MTP speculative decoding on a trained model, on held-out reasoning prompts: first-draft acceptance, mean
accepted length and decode tokens/s with and without MTP (batch 1, greedy, same prompts, one process).

    .venv/bin/python bench/mtp_on_reasoning.py MODEL_DIR [--prompts 24] [--new-tokens 128] [--num-draft 1]
        [--format raw|chat] [--draft-quantize int8|int4] [--compile]
"""

import argparse
import time

from mimo.checkpoint import load_model_and_tokenizer
from mimo.eval.tasks import get_task
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.inference.speculative import SpecStats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--num-draft", type=int, default=1)
    ap.add_argument("--format", choices=["raw", "chat"], default="raw")
    ap.add_argument("--draft-quantize", choices=["int8", "int4"], default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode and draft-verify steps")
    args = ap.parse_args()
    model, tok = load_model_and_tokenizer(args.model, "float32")
    engine = Engine(model, tok, draft_quantize=args.draft_quantize, compile=args.compile)
    task = get_task("reasoning")
    rows = task.load()[: args.prompts]
    texts = [task.raw_prompt(r) if args.format == "raw" else
             tok.apply_chat_template([{"role": "user", "content": task.chat_prompt(r)}]) for r in rows]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    for mtp in (False, True):  # warm-up (and compilation)
        engine.generate([tok.encode(texts[0])], params, mtp=mtp, num_draft=args.num_draft)
    results = {}
    for mtp in (False, True):
        tokens, seconds, stats, outs = 0, 0.0, [], []
        for t in texts:
            t0 = time.perf_counter()
            out = engine.generate([tok.encode(t)], params, mtp=mtp, num_draft=args.num_draft)[0]
            seconds += time.perf_counter() - t0 - out.time_to_first_token_s
            tokens += max(0, len(out.tokens) - 1)
            outs.append(out.tokens)
            if out.spec:
                stats.append(out.spec)
        results[mtp] = (tokens / seconds, outs, stats)
    same = results[True][1] == results[False][1]
    spec = SpecStats.merge(results[True][2]) if results[True][2] else None
    plain, fast = results[False][0], results[True][0]
    print(f"{args.model}: {len(texts)} held-out reasoning prompts ({args.format}), greedy, batch 1, "
          f"{args.new_tokens} new tokens max, {args.num_draft} {args.draft_quantize or 'fp32'} draft(s)"
          f"{', compiled' if args.compile else ''}")
    print(f"decode tokens/s: plain {plain:.1f}, MTP {fast:.1f} ({fast / plain:.2f}x); greedy outputs identical: {same}")
    if spec:
        print(f"acceptance {spec.acceptance_rate:.3f}, first-draft acceptance {spec.first_acceptance_rate:.3f}, "
              f"mean accepted length {spec.mean_accepted_length:.2f} tokens per verify step")


if __name__ == "__main__":
    main()
