"""`mimo bench`: speed measurements that report against what the machine can do.

    mimo bench train PRESET_OR_MODEL_DIR [--dtype fp32|bf16] [--batch B] [--seq T] [--steps N] [--json]
    mimo bench decode PRESET_OR_MODEL_DIR [--batch B] [--new-tokens N] [--prompt-tokens P] [--mtp/--no-mtp]
                      [--num-draft K] [--quantize int8|int4] [--draft-quantize int8|int4]
                      [--compile] [--dtype auto|float32|bfloat16] [--prefill-tokens N] [--mtp-cost]
                      [--repeats N] [--json]

Training throughput is timed after warm-up on synthetic tokens; MFU is model FLOPs (6 x parameters x tokens
plus attention) per second against this machine's measured matmul peak in the same precision.

Every timing is repeated (train: each step; decode: --repeats whole runs) and reported as the median with its
min-max range, beside the machine's load average before and after (mimo.timing: "busy" when another job held a
core); figures that contradict each other are flagged, not reported.

Decoding is memory-bound: each decode step reads every weight once, so the roofline is weight bytes per step
x steps per second against the machine's measured read bandwidth (a sum over a 1 GiB array).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from mimo.checkpoint import build_model
from mimo.config import QUANTIZATIONS
from mimo.errors import MimoError
from mimo.inference.engine_args import DRAFT_VOCAB
from mimo.memory import module_bytes
from mimo.timing import Load, Spread, load_average, speedup_contradiction, spread_warning
from mimo.train.loop import TrainConfig, autocast_context, make_optimizer


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, n: int = 1024, seconds: float = 1.0) -> float:
    """Measured FLOP/s of a square matmul in this dtype (the roofline that MFU is quoted against)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def train_flops_per_token(model, seq_len: int) -> float:
    cfg = model.config
    n = model.num_params()["total"] - cfg.vocab_size * cfg.hidden_size  # the embedding lookup costs no FLOPs
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attention = 12 * layers * cfg.num_attention_heads * cfg.head_dim * seq_len / 2  # causal: half the scores
    return 6 * n + attention


def bench_train(spec: str, dtype: str = "fp32", batch: int = 8, seq: int = 512, steps: int = 5, warmup: int = 2,
                device: str = "cpu") -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(spec, dtype="float32", device=dev).train()
    opt = make_optimizer(model, TrainConfig())
    precision = "bf16" if dtype == "bf16" else "fp32"
    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=dev)
    times, load_before = [], load_average()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast_context(precision, dev):
            out = model(x[:, :-1], targets=x[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    load = Load(load_before, load_average(), torch.get_num_threads(), os.cpu_count() or 1)
    step = Spread.of(times)
    tps = batch * seq / step.median
    peak = matmul_peak_flops(torch.bfloat16 if dtype == "bf16" else torch.float32, dev)
    achieved = tps * train_flops_per_token(model, seq)
    flags = timing_flags(load, spread_warning("step time", step))
    return {"model": spec, "dtype": dtype, "batch": batch, "seq": seq, "steps": steps,
            "parameters": model.num_params()["total"], "step_s": step.median, "step_s_min": step.low,
            "step_s_max": step.high, "train_tokens_per_s": tps, "model_flops_per_s": achieved,
            "matmul_peak_flops_per_s": peak, "mfu": achieved / peak, "threads": torch.get_num_threads(),
            "load": load.as_dict(), "flags": flags}


def cmd_bench_train(args):
    if args.steps < 1:
        raise MimoError(f"--steps must be at least 1, got {args.steps}")
    r = bench_train(args.model, args.dtype, args.batch, args.seq, args.steps, device=args.device)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['model']} {r['dtype']}: {r['train_tokens_per_s']:.0f} tokens/s ({r['step_s']:.2f} s/step, median of "
          f"{r['steps']}: {r['step_s_min']:.2f}-{r['step_s_max']:.2f}; batch {r['batch']}x{r['seq']}), "
          f"{r['model_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['mfu']:.1f}% of the measured "
          f"{r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s matmul peak; {_load_line(r['load'])}")
    print_flags(r["flags"])


def memory_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """Measured read bandwidth (bytes/s): the best of a few sums over a 1 GiB float32 array."""
    x = torch.ones(nbytes // 4, device=device)
    x.sum()  # first touch
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def decode_step_bytes(model, num_draft: int = 0, drafter=None) -> int:
    """Weight bytes one decode step reads: every main-model weight but the input embedding (a few rows), plus,
    with MTP, per draft its MTP layer (the last one again for chained drafts) and the LM head. drafter: the
    (MTP layers, LM head) that draft (Engine.drafter), if not the model's own."""
    main = module_bytes(model.model.layers) + module_bytes(model.model.norm) + module_bytes(model.lm_head)
    mtp, head = drafter or (model.model.mtp_layers, model.lm_head)
    drafts = sum(module_bytes(mtp[min(i, len(mtp) - 1)]) + module_bytes(head) for i in range(num_draft))
    return main + drafts


def timing_flags(load: Load, *warnings: str | None) -> list[str]:
    """What a reader of these timings must know: a busy machine, repeats that disagree, contradictions."""
    busy = [f"another job held a core ({load.numbers()}): the timings are approximate"] if load.busy else []
    return busy + [w for w in warnings if w]


def _load_line(load: dict) -> str:
    return Load(load["before"], load["after"], load["threads"], load["cores"]).describe()


def print_flags(flags: list[str]):
    for flag in flags:
        print(f"flagged: {flag}")


def median_run(runs: list, seconds) -> tuple:
    """(the run whose time is the median, Spread of the times); seconds(run) -> its time."""
    times = [seconds(r) for r in runs]
    order = sorted(range(len(runs)), key=times.__getitem__)
    return runs[order[len(order) // 2]], Spread.of(times)


def bench_decode(spec: str, batch: int = 1, new_tokens: int = 128, prompt_tokens: int = 32, mtp: bool = False,
                 num_draft: int = 1, quantize: str | None = None, device: str = "cpu", seed: int = 0,
                 compile: bool = False, draft_quantize: str | None = None, dtype: str | None = None,
                 prefill_tokens: int = 0, mtp_cost: bool = False, repeats: int = 3,
                 draft_vocab: int | None = None) -> dict:
    """Greedy decoding of random prompts (no stop tokens: every row makes exactly new_tokens tokens), timed
    after a warm-up run (which also compiles, with compile=True), `repeats` times: the median run's figures,
    with the range of decode tokens/s and the load average around the timed runs. A model directory loads as
    stored (dtype None) with quantize applied as each tensor is read; a preset builds random fp32 weights.
    prefill_tokens: also time one prompt of that many tokens to its first token (prefill tokens/s). mtp_cost:
    also decode the same prompts with MTP (num_draft drafts a step) and report a draft-and-verify step's time
    against a plain step's. draft_vocab: MTP drafts among the vocabulary's first ids only (Engine's)."""
    from pathlib import Path

    from mimo.checkpoint import load_model
    from mimo.inference.engine import Engine
    from mimo.inference.sampling import SamplingParams
    from mimo.inference.speculative import SpecStats
    from mimo.memory import peak_resident_bytes

    dev = torch.device(device)
    bandwidth = memory_bandwidth(dev)  # first: its 1 GiB array must not add to the model's peak memory
    t0 = time.perf_counter()
    if Path(spec).is_file() and spec.endswith(".gguf"):
        from mimo.gguf import load_gguf

        model = load_gguf(spec, dtype or "auto", quantize)[0].to(dev)
    elif Path(spec).exists():
        model = load_model(spec, dtype=dtype, device=dev, quantize=quantize)
    else:
        model = build_model(spec, dtype=dtype or "float32", device=dev, seed=seed)
        if quantize:
            from mimo.quantize import quantize_model

            model = quantize_model(model, quantize)
    load_s = time.perf_counter() - t0
    mtp = mtp and model.config.num_nextn_predict_layers > 0
    engine = Engine(model, None, max_seq_len=max(prompt_tokens + new_tokens, prefill_tokens) + 1, compile=compile,
                    draft_quantize=draft_quantize, draft_vocab=draft_vocab)
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=g).tolist()
    params = SamplingParams(max_new_tokens=new_tokens)
    cold = engine.generate(prompts[:1], SamplingParams(max_new_tokens=2), mtp=mtp, num_draft=num_draft)[0]
    engine.warm_up(prompts, params, mtp=mtp, num_draft=num_draft, tokens=4)
    with_cost = mtp_cost and not mtp and model.config.num_nextn_predict_layers > 0
    if with_cost:
        engine.warm_up(prompts, params, mtp=True, num_draft=num_draft, tokens=4)
    load_before = load_average()
    runs, spec_runs = [], []
    for _ in range(repeats):  # with_cost: plain and speculative runs take turns, so each pair shares the minute
        runs.append(engine.generate(prompts, params, mtp=mtp, num_draft=num_draft))
        if with_cost:
            spec_runs.append(engine.generate(prompts, params, mtp=True, num_draft=num_draft))

    def run_s(run):
        return max(o.decode_time_s for o in run)

    outs, decode = median_run(runs, run_s)
    decode_s = run_s(outs)
    decoded = sum(len(o.tokens) - 1 for o in outs)
    stats = SpecStats.merge(o.spec for o in outs) if mtp else None
    steps = max(o.spec.verify_steps for o in outs) if mtp else new_tokens - 1
    step_bytes = decode_step_bytes(model, num_draft if mtp else 0, engine.drafter)
    cost = {}
    warnings = [spread_warning("decode time", decode)]
    if with_cost:
        def step_s(run):
            return run_s(run) / max(o.spec.verify_steps for o in run)

        ratios = Spread.of([step_s(spec) / (run_s(plain) / steps) for plain, spec in zip(runs, spec_runs)])
        spec_outs, _ = median_run(spec_runs, run_s)
        merged = SpecStats.merge(o.spec for o in spec_outs)
        cost = {"mtp_step_s": step_s(spec_outs), "mtp_step_cost": ratios.median,
                "mtp_step_cost_min": ratios.low, "mtp_step_cost_max": ratios.high,
                "mtp_tokens_per_step": merged.mean_accepted_length,
                "mtp_decode_tokens_per_s": sum(len(o.tokens) - 1 for o in spec_outs) / run_s(spec_outs)}
        warnings.append(speedup_contradiction(cost["mtp_decode_tokens_per_s"] * decode_s / decoded,
                                              merged.mean_accepted_length))
    prefill_tps = None
    if prefill_tokens:
        long = torch.randint(0, model.config.vocab_size, (1, prefill_tokens), generator=g).tolist()
        first, _ = median_run([engine.generate(long, SamplingParams(max_new_tokens=1))[0] for _ in range(repeats)],
                              lambda o: o.time_to_first_token_s)
        prefill_tps = prefill_tokens / first.time_to_first_token_s
    load = Load(load_before, load_average(), torch.get_num_threads(), os.cpu_count() or 1)
    used = step_bytes * steps / decode_s if decode_s > 0 else 0.0
    return {"model": spec, "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "mtp": mtp, "num_draft": num_draft if mtp else 0, "quantize": quantize, "compile": compile,
            "dtype": str(model.model.embed_tokens.weight.dtype).removeprefix("torch."),
            "draft_quantize": draft_quantize if mtp else None, "load_s": load_s,
            "draft_vocab": engine.drafter[1].out_features if mtp or cost else None,
            "time_to_first_token_s": sum(o.time_to_first_token_s for o in outs) / len(outs),
            "first_request_time_to_first_token_s": cold.time_to_first_token_s,
            "repeats": repeats, "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else 0.0,
            "decode_tokens_per_s_min": decoded / decode.high if decode.high > 0 else 0.0,
            "decode_tokens_per_s_max": decoded / decode.low if decode.low > 0 else 0.0,
            "decode_steps_per_s": steps / decode_s if decode_s > 0 else 0.0,
            "decode_step_s": decode_s / steps if steps else 0.0,
            "prefill_tokens": prefill_tokens, "prefill_tokens_per_s": prefill_tps,
            "weight_bytes_per_step": step_bytes, "bandwidth_used_bytes_per_s": used,
            "measured_bandwidth_bytes_per_s": bandwidth, "bandwidth_fraction": used / bandwidth,
            "acceptance_rate": stats.acceptance_rate if stats else None,
            "first_acceptance_rate": stats.first_acceptance_rate if stats else None,
            "mean_accepted_length": stats.mean_accepted_length if stats else None,
            "peak_resident_bytes": peak_resident_bytes(), "threads": torch.get_num_threads(), **cost,
            "load": load.as_dict(), "flags": timing_flags(load, *warnings)}


def cmd_bench_decode(args):
    if args.repeats < 1:
        raise MimoError(f"--repeats must be at least 1, got {args.repeats}")
    r = bench_decode(args.model, args.batch, args.new_tokens, args.prompt_tokens, args.mtp, args.num_draft,
                     args.quantize, args.device, compile=args.compile, draft_quantize=args.draft_quantize,
                     dtype=None if args.dtype == "auto" else args.dtype, prefill_tokens=args.prefill_tokens,
                     mtp_cost=args.mtp_cost, repeats=args.repeats, draft_vocab=args.draft_vocab)
    drafts = f"{r['num_draft']} {r['draft_quantize']}" if r["draft_quantize"] else str(r["num_draft"])
    mtp = (f", MTP {drafts} draft(s): acceptance {r['acceptance_rate']:.2f} (first "
           f"{r['first_acceptance_rate']:.2f}), {r['mean_accepted_length']:.2f} tokens/step") if r["mtp"] else ""
    cost = (f", a draft-and-verify step costs {r['mtp_step_cost']:.2f} plain steps (median of {r['repeats']} runs taking "
            f"turns with plain ones: {r['mtp_step_cost_min']:.2f}-{r['mtp_step_cost_max']:.2f}; "
            f"{r['mtp_tokens_per_step']:.2f} tokens a step, drafts over {r['draft_vocab']:,} ids)") \
        if "mtp_step_cost" in r else ""
    prefill = (f", prefill of {r['prefill_tokens']} tokens {r['prefill_tokens_per_s']:.1f} tokens/s"
               if r["prefill_tokens"] else "")
    spread = (f" (median of {r['repeats']}: {r['decode_tokens_per_s_min']:.1f}-{r['decode_tokens_per_s_max']:.1f})"
              if r["repeats"] > 1 else "")
    print(f"{r['model']} {r['quantize'] or r['dtype']} batch {r['batch']}: {r['decode_tokens_per_s']:.1f} tokens/s"
          f"{spread}, first token {1000 * r['time_to_first_token_s']:.1f} ms "
          f"({1000 * r['first_request_time_to_first_token_s']:.1f} ms for the first request after loading), {r['weight_bytes_per_step'] / 2**20:.0f} MiB "
          f"of weights per step x {r['decode_steps_per_s']:.1f} steps/s = {r['bandwidth_used_bytes_per_s'] / 1e9:.1f} "
          f"GB/s, {100 * r['bandwidth_fraction']:.0f}% of the measured {r['measured_bandwidth_bytes_per_s'] / 1e9:.1f} "
          f"GB/s{mtp}{prefill}{cost}; loaded in {r['load_s']:.1f} s, peak memory {r['peak_resident_bytes'] / 1e9:.2f} GB"
          f"; {_load_line(r['load'])}")
    print_flags(r["flags"])
    if args.json:
        print(json.dumps(r))


def add_arguments(p):
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    t = sub.add_parser("train", help="training throughput (tokens/s, MFU) on synthetic tokens")
    t.add_argument("model", metavar="PRESET_OR_MODEL_DIR")
    t.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = bf16 autocast, fp32 master")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up; the median is reported")
    t.add_argument("--device", default="cpu")
    t.add_argument("--json", action="store_true", help="last stdout line is one JSON object")

    d = sub.add_parser("decode", help="decode tokens/s, time to first token and memory-bandwidth use")
    d.add_argument("model", metavar="PRESET_OR_MODEL_DIR")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--new-tokens", type=int, default=128)
    d.add_argument("--prompt-tokens", type=int, default=32)
    d.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=False,
                   help="speculative decoding with the MTP layers")
    d.add_argument("--num-draft", type=int, default=1, help="tokens drafted per step with --mtp")
    d.add_argument("--quantize", choices=QUANTIZATIONS, default=None, help="weight-only quantization")
    d.add_argument("--draft-quantize", choices=QUANTIZATIONS, default=None,
                   help="draft with quantized copies of the MTP layers and LM head")
    d.add_argument("--draft-vocab", type=int, default=DRAFT_VOCAB, metavar="N",
                   help="MTP drafts among the vocabulary's first N ids (0: all), as mimo generate's --draft-vocab")
    d.add_argument("--compile", action="store_true", help="torch.compile the decode step (compiled in warm-up)")
    d.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: a directory as stored, a preset in float32")
    d.add_argument("--prefill-tokens", type=int, default=0, help="also time the first token of a prompt this long")
    d.add_argument("--mtp-cost", action="store_true",
                   help="with --no-mtp: also decode with MTP and report a draft-and-verify step against a plain one")
    d.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the median is reported")
    d.add_argument("--device", default="cpu")
    d.add_argument("--json", action="store_true", help="last stdout line is one JSON object")


def run(args):
    {"train": cmd_bench_train, "decode": cmd_bench_decode}[args.bench_command](args)
