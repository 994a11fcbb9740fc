"""`mimo chat`: an interactive terminal chat with the tokenizer's chat template, streamed as it is generated.

The model's reasoning, between <think> and </think>, is shown apart from its answer (dim grey, after
"thinking:"); only the answer goes back into the history, as reasoning models are meant to be prompted.
Commands: /reset clears the conversation, /exit (or end of input) leaves. Ctrl-C stops a reply.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from mimo.errors import MimoError
from mimo.inference.engine import Engine
from mimo.inference.engine_args import add_decoding_arguments, load_engine, sampling_params
from mimo.inference.sampling import SamplingParams
from mimo.serve.thinking import ThinkSplitter
from mimo.tokenizer import Tokenizer

DIM, RESET = "\x1b[2;90m", "\x1b[0m"
HELP = "commands: /reset clears the conversation, /exit leaves (so does end of input); Ctrl-C stops a reply"


class ThinkingPrinter:
    """Writes a streamed reply, the <think>...</think> part apart from the answer; tags may arrive in pieces."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.splitter = ThinkSplitter()
        self.in_thought = False
        self.thinking, self.answer = "", ""

    def feed(self, text: str):
        self._write(self.splitter.feed(text))
        self.out.flush()

    def close(self):
        self._write(self.splitter.close())
        if self.in_thought:
            self._switch()
        self.out.write("\n")
        self.out.flush()

    def _switch(self):
        self.in_thought = not self.in_thought
        if self.in_thought:
            self.out.write((DIM if self.color else "") + "thinking: ")
        else:
            self.out.write((RESET if self.color else "") + "\n")

    def _write(self, pieces: list[tuple[bool, str]]):
        for in_thought, text in pieces:
            if in_thought != self.in_thought:
                self._switch()
            if in_thought:
                self.thinking += text
            else:
                self.answer += text
            self.out.write(text)


def chat_loop(engine: Engine, tokenizer: Tokenizer, params: SamplingParams, *, mtp: bool = False,
              num_draft: int = 1, system: str | None = None, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout, color: bool | None = None):
    """Read a line, answer it, repeat. read(prompt) returns a line or raises EOFError at the end of input."""
    color = out.isatty() if color is None else color
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    out.write(HELP + "\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            history = list(start)
            out.write("(conversation cleared)\n")
            continue
        if not command:
            continue
        messages = history + [{"role": "user", "content": line}]
        printer = ThinkingPrinter(out, color)
        try:
            ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
            t0 = time.perf_counter()
            completion = engine.generate([ids], params, on_text=lambda _row, text, p=printer: p.feed(text),
                                         mtp=mtp, num_draft=num_draft)[0]
        except MimoError as e:
            out.write(f"mimo: {e} (/reset starts over)\n")
            continue
        except KeyboardInterrupt:
            printer.close()
            out.write("(stopped)\n")
            continue
        printer.close()
        history = messages + [{"role": "assistant", "content": printer.answer.strip()}]
        elapsed = time.perf_counter() - t0
        n = len(completion.tokens)
        spec = completion.spec
        accept = f", acceptance {spec.acceptance_rate:.2f}" if spec and spec.acceptance_rate is not None else ""
        stats = f"[{n} tokens, {n / elapsed:.1f} tokens/s{accept}]"
        out.write((f"{DIM}{stats}{RESET}" if color else stats) + "\n")


def add_arguments(p):
    p.add_argument("model", metavar="MODEL_DIR")
    add_decoding_arguments(p, temperature=0.6, top_p=0.95, max_new_tokens=2048)
    p.add_argument("--system", default=None, help="a system message")


def run(args):
    engine, tokenizer = load_engine(args)
    params = sampling_params(args)
    params.validate()
    if args.compile:
        print("compiling the decode steps (once, ~15 s) ...", file=sys.stderr, flush=True)
        hello = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]))
        engine.warm_up([hello], params, mtp=args.mtp, num_draft=args.num_draft)
    chat_loop(engine, tokenizer, params, mtp=args.mtp, num_draft=args.num_draft, system=args.system)
