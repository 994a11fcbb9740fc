"""`mimo generate`: raw text completion (no chat template) with the engine; text on stdout as it streams, timings
and speculative-decoding counters on stderr (or everything as one JSON object)."""

from __future__ import annotations

import json
import sys
import time

from mimo.inference.engine_args import add_decoding_arguments, load_engine, sampling_params


def add_arguments(p):
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("prompt", metavar="PROMPT")
    add_decoding_arguments(p, temperature=0.0, top_p=1.0, max_new_tokens=128)
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and timings")


def run(args):
    engine, tokenizer = load_engine(args)
    prompt_ids = tokenizer.encode(args.prompt)
    params = sampling_params(args)
    stream = None if args.json else (lambda _row, text: (sys.stdout.write(text), sys.stdout.flush()))
    if args.compile:  # compile first, so that the times below are the compiled engine's
        engine.warm_up([prompt_ids], params, mtp=args.mtp, num_draft=args.num_draft)
    t0 = time.perf_counter()
    out = engine.generate([prompt_ids], params, on_text=stream, mtp=args.mtp, num_draft=args.num_draft)[0]
    elapsed = time.perf_counter() - t0
    decode_tps = (len(out.tokens) - 1) / out.decode_time_s if out.decode_time_s > 0 else 0.0
    spec = out.spec
    stats = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out.tokens),
             "finish_reason": out.finish_reason, "time_to_first_token_s": round(out.time_to_first_token_s, 4),
             "decode_tokens_per_s": round(decode_tps, 2), "total_time_s": round(elapsed, 4),
             "mtp": spec is not None, "num_draft": args.num_draft if spec else 0, "quantize": args.quantize,
             "draft_quantize": args.draft_quantize if spec else None,
             "acceptance_rate": spec.acceptance_rate if spec else None,
             "first_acceptance_rate": spec.first_acceptance_rate if spec else None,
             "mean_accepted_length": spec.mean_accepted_length if spec else None}
    if args.json:
        print(json.dumps({"text": out.text, **stats}))
    else:
        sys.stdout.write("\n")
        print(json.dumps(stats), file=sys.stderr)
