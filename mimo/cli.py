"""The `mimo` command: the table of subcommands. Each is a module with `add_arguments(parser)` and `run(args)`,
thin over the library; `mimo eval score` and `mimo eval contamination` are commands of two words."""

from __future__ import annotations

import argparse
import sys

from mimo import __version__, bench, gguf, info, speedrun, tokenizer
from mimo.data import corpus
from mimo.errors import MimoError
from mimo.eval import contamination, evaluate, score
from mimo.inference import adapters, generate
from mimo.serve import app, chat
from mimo.train import pretrain, rl, sft, tune

# name -> (command module, help line); in `mimo --help` order
COMMANDS = {
    "info": (info, "architecture, parameter counts and weight memory of a model or preset"),
    "generate": (generate, "raw text completion (no chat template); text on stdout, stats on stderr"),
    "chat": (chat, "interactive chat with the chat template, reasoning shown apart"),
    "tokenizer": (tokenizer, "tokenizer tools"),
    "data": (corpus, "reasoning-dense corpora"),
    "eval": (evaluate, "evaluate under MiMo's protocol (also: eval score, eval contamination)"),
    "pretrain": (pretrain, "pretrain with next-token + MTP loss (resumes; torchrun for data parallel)"),
    "sft": (sft, "chain-of-thought SFT in the chat format (loss on assistant tokens)"),
    "rl": (rl, "GRPO with rule-based rewards, MiMo's recipe (resumes)"),
    "tune": (tune, "LoRA on your own notes and chats (base frozen, optionally quantized): a PEFT adapter"),
    "merge": (adapters, "fold a LoRA adapter into its base: a standalone model directory"),
    "speedrun": (speedrun, "the whole recipe end to end (data, pretrain, SFT, RL, eval) + report card"),
    "serve": (app, "OpenAI-compatible server (chat and text completions) with a web chat at /"),
    "export": (gguf, "write a model for other runtimes: export gguf (llama.cpp; mimo loads it too)"),
    "bench": (bench, "speed benchmarks"),
}
# commands of two words, each with a parser of its own (`mimo eval` takes a positional MODEL_DIR)
TWO_WORD_COMMANDS = {("eval", "score"): score, ("eval", "contamination"): contamination}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimo", description="The MiMo recipe: MTP pretraining on reasoning-dense "
                                "data, SFT, RL with verifiable rewards, MTP speculative decoding, evaluation.")
    p.add_argument("--version", action="version", version=f"mimo {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help) in COMMANDS.items():
        s = sub.add_parser(name, help=help)
        module.add_arguments(s)
        s.set_defaults(run=module.run)
    return p


def parse_args(argv) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    module = TWO_WORD_COMMANDS.get(tuple(argv[:2]))
    if module is None:
        return build_parser().parse_args(argv)
    p = argparse.ArgumentParser(prog=f"mimo {' '.join(argv[:2])}")
    module.add_arguments(p)
    p.set_defaults(run=module.run)
    return p.parse_args(argv[2:])


def dispatch(argv: list[str]):
    """Run one command; errors propagate."""
    args = parse_args(argv)
    args.run(args)


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
