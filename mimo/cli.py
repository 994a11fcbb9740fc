"""The `mimo` command: one subcommand per stage; each stays thin and calls into the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mimo import __version__
from mimo.engine_args import add_engine_arguments, load_engine
from mimo.errors import MimoError


def cmd_info(args):
    import torch

    from mimo.config import MiMoConfig, preset_config
    from mimo.model import MiMoForCausalLM

    path = Path(args.model)
    if path.is_file() and path.suffix == ".gguf":
        from mimo.gguf import gguf_config

        cfg = gguf_config(path)
    elif path.exists():
        cfg = MiMoConfig.load(path / "config.json") if path.is_dir() else MiMoConfig.load(path)
    elif "/" in args.model or args.model.startswith("."):
        raise MimoError(f"{args.model}: no such file or directory")
    else:
        cfg = preset_config(args.model)
    with torch.device("meta"):
        counts = MiMoForCausalLM(cfg).num_params()
    info = {
        "model": args.model,
        "architecture": {k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_nextn_predict_layers", "max_position_embeddings",
            "rope_theta", "rms_norm_eps", "tie_word_embeddings", "attention_bias")},
        "parameters": counts,
        "weight_bytes": {name: counts["total"] * nbytes for name, nbytes in
                         (("fp32", 4), ("bf16", 2), ("int8", 1))},
    }
    if args.json:
        print(json.dumps(info))
        return
    a = info["architecture"]
    print(f"{args.model}: MiMo decoder, {a['num_hidden_layers']} layers, hidden {a['hidden_size']}, "
          f"FFN {a['intermediate_size']}, {a['num_attention_heads']} query / {a['num_key_value_heads']} KV heads "
          f"(head_dim {a['head_dim']}), vocab {a['vocab_size']}, rope_theta {a['rope_theta']:g}, "
          f"{a['num_nextn_predict_layers']} MTP layer(s)")
    print(f"parameters: main {counts['main']:,}  per MTP layer {counts['mtp_per_layer']:,}  "
          f"total {counts['total']:,}")
    print("weights: " + "  ".join(f"{k} {_human_bytes(v)}" for k, v in info["weight_bytes"].items()))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_generate(args):
    from mimo.engine import SamplingParams

    engine, tokenizer = load_engine(args)
    prompt_ids = tokenizer.encode(args.prompt)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
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


def cmd_chat(args):
    from mimo.chat import chat_loop
    from mimo.engine import SamplingParams

    engine, tokenizer = load_engine(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    params.validate()
    if args.compile:
        print("compiling the decode steps (once, ~15 s) ...", file=sys.stderr, flush=True)
        hello = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]))
        engine.warm_up([hello], params, mtp=args.mtp, num_draft=args.num_draft)
    chat_loop(engine, tokenizer, params, mtp=args.mtp, num_draft=args.num_draft, system=args.system)


def add_decoding_arguments(s, temperature: float, top_p: float, max_new_tokens: int):
    s.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    s.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=top_p)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None)
    add_engine_arguments(s)


def cmd_tokenizer_train(args):
    from mimo.tokenizer import Tokenizer

    tok = Tokenizer.train(args.files, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"wrote {out / 'tokenizer.json'} ({tok.vocab_size} tokens)", file=sys.stderr)


def cmd_pretrain(args):
    from mimo.pretrain import run

    run(args)


def cmd_data_build(args):
    from mimo.data import build_corpus, default_config, load_config

    if args.config and args.text:
        raise MimoError("--text adds a source to the preset's config; with --config, list it in the config's sources")
    config = load_config(args.config) if args.config else default_config(args.preset, text=args.text)
    if args.seed is not None:
        config["seed"] = args.seed
    manifest = build_corpus(config, Path(args.out))
    train = manifest["splits"]["train"]
    print(f"wrote {args.out}: {train['tokens']:,} training tokens in {len(train['shards'])} shard(s), "
          f"{manifest['splits']['val']['tokens']:,} validation tokens", file=sys.stderr)


def cmd_merge(args):
    from mimo.adapters import load_adapter
    from mimo.checkpoint import load_model_and_tokenizer, save_model
    from mimo.lora import merge_adapter

    model, tokenizer = load_model_and_tokenizer(args.model, "auto")
    adapter = load_adapter(args.adapter, model, args.model)
    merge_adapter(model, adapter)
    save_model(model, args.out, tokenizer=tokenizer)
    print(f"wrote {args.out}: {args.model} with {args.adapter} merged into {len(adapter.updates)} linears",
          file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimo", description="The MiMo recipe: MTP pretraining on reasoning-dense "
                                "data, SFT, RL with verifiable rewards, MTP speculative decoding, evaluation.")
    p.add_argument("--version", action="version", version=f"mimo {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("info", help="architecture, parameter counts and weight memory of a model or preset")
    s.add_argument("model", metavar="MODEL_DIR_OR_PRESET")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("generate", help="raw text completion (no chat template); text on stdout, stats on stderr")
    s.add_argument("model", metavar="MODEL_DIR")
    s.add_argument("prompt", metavar="PROMPT")
    add_decoding_arguments(s, temperature=0.0, top_p=1.0, max_new_tokens=128)
    s.add_argument("--json", action="store_true", help="print one JSON object with the text and timings")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive chat with the chat template, reasoning shown apart")
    s.add_argument("model", metavar="MODEL_DIR")
    add_decoding_arguments(s, temperature=0.6, top_p=0.95, max_new_tokens=2048)
    s.add_argument("--system", default=None, help="a system message")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE with the chat special tokens on text/JSONL files")
    t.add_argument("files", nargs="+", metavar="FILE")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, metavar="DIR", help="writes DIR/tokenizer.json and tokenizer_config.json")
    t.set_defaults(func=cmd_tokenizer_train)

    s = sub.add_parser("data", help="reasoning-dense corpora")
    dsub = s.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = dsub.add_parser("build", help="procedural reasoning data + your files -> dedup, decontamination, density "
                        "filter, staged mixture -> tokenized shards and a manifest")
    d.add_argument("--config", metavar="FILE", help="JSON config (default: the preset's)")
    d.add_argument("--preset", default="nano", help="default config to use without --config: nano | tiny | small")
    d.add_argument("--text", nargs="+", metavar="PATH", help="your general text (files, directories, globs of "
                   ".txt/.md/.jsonl) as a source of every stage of the preset's config: half of stage 1")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--out", required=True, metavar="DATA_DIR")
    d.set_defaults(func=cmd_data_build)

    sub.add_parser("eval", help="evaluate under MiMo's protocol (also: eval score, eval contamination)",
                   add_help=False)

    from mimo import pretrain

    s = sub.add_parser("pretrain", help="pretrain with next-token + MTP loss (resumes; torchrun for data parallel)")
    pretrain.add_arguments(s)
    s.set_defaults(func=cmd_pretrain)

    from mimo import sft

    s = sub.add_parser("sft", help="chain-of-thought SFT in the chat format (loss on assistant tokens)")
    sft.add_arguments(s)
    s.set_defaults(func=lambda args: sft.run(args))

    from mimo import rl

    s = sub.add_parser("rl", help="GRPO with rule-based rewards, MiMo's recipe (resumes)")
    rl.add_arguments(s)
    s.set_defaults(func=lambda args: rl.run(args))

    from mimo import tune

    s = sub.add_parser("tune", help="LoRA on your own notes and chats (base frozen, optionally quantized): a PEFT "
                       "adapter")
    tune.add_arguments(s)
    s.set_defaults(func=lambda args: tune.run(args))

    s = sub.add_parser("merge", help="fold a LoRA adapter into its base: a standalone model directory")
    s.add_argument("model", metavar="MODEL_DIR")
    s.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="a PEFT LoRA adapter for MODEL_DIR")
    s.add_argument("--out", required=True, metavar="OUT_DIR")
    s.set_defaults(func=cmd_merge)

    from mimo import speedrun

    s = sub.add_parser("speedrun", help="the whole recipe end to end (data, pretrain, SFT, RL, eval) + report card")
    speedrun.add_arguments(s)
    s.set_defaults(func=lambda args: speedrun.run(args))

    from mimo import server

    s = sub.add_parser("serve", help="OpenAI-compatible server (chat and text completions) with a web chat at /")
    server.add_arguments(s)
    s.set_defaults(func=lambda args: server.run(args))

    from mimo import gguf as gguf_file

    s = sub.add_parser("export", help="write a model for other runtimes: export gguf (llama.cpp; mimo loads it too)")
    gguf_file.add_arguments(s)

    from mimo import bench

    s = sub.add_parser("bench", help="speed benchmarks")
    bench.add_arguments(s.add_subparsers(dest="bench_command", metavar="WHAT", required=True))
    return p


def parse_args(argv):
    """`mimo eval` takes a positional MODEL_DIR and has subcommands of its own: routed by hand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        from mimo.evaluate import build_parsers

        parsers = build_parsers()
        if argv[1:2] and argv[1] in ("score", "contamination"):
            return parsers[argv[1]].parse_args(argv[2:])
        return parsers["eval"].parse_args(argv[1:])
    return build_parser().parse_args(argv)


def dispatch(argv: list[str]):
    """Run one command; errors propagate (the speedrun chains commands through this)."""
    args = parse_args(argv)
    args.func(args)


def main(argv=None) -> int:
    try:
        dispatch(argv)
        return 0
    except MimoError as e:
        print(f"mimo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimo: interrupted", file=sys.stderr)
        return 130
    finally:
        from mimo.parallel import cleanup

        cleanup()


if __name__ == "__main__":
    sys.exit(main())
