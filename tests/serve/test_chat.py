import io
import subprocess
import sys

import pytest

from mimo.inference.engine import Completion
from mimo.inference.sampling import SamplingParams
from mimo.serve.chat import DIM, RESET, ThinkingPrinter, chat_loop


def lines(*items):
    """A read() that returns the given lines, then raises EOFError."""
    it = iter(items)

    def read(_prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


class ScriptedEngine:
    """Stands in for Engine: streams a fixed reply in awkward pieces and records the prompts it was given."""

    def __init__(self, tokenizer, pieces):
        self.tokenizer, self.pieces, self.prompts = tokenizer, pieces, []

    def generate(self, prompts, params, on_text=None, mtp=False, num_draft=1):
        self.prompts.append(self.tokenizer.decode(prompts[0]))
        for p in self.pieces:
            on_text(0, p)
        return [Completion(prompt_tokens=prompts[0], tokens=[1, 2, 3], text="".join(self.pieces))]


def test_thinking_shown_apart_even_when_tags_arrive_in_pieces():
    out = io.StringIO()
    printer = ThinkingPrinter(out, color=True)
    for piece in ["<th", "ink>\nfirst ", "add</thi", "nk>\n\nThe answer", " is 4.", "<"]:
        printer.feed(piece)
    printer.close()
    assert printer.thinking == "first add"
    assert printer.answer == "The answer is 4.<"
    assert out.getvalue() == f"{DIM}thinking: first add{RESET}\nThe answer is 4.<\n"


def test_history_keeps_answers_not_thoughts_and_reset_clears_it(tokenizer):
    engine = ScriptedEngine(tokenizer, ["<think>", "hmm", "</think>", "\n\n", "Hi there."])
    out = io.StringIO()
    chat_loop(engine, tokenizer, SamplingParams(), read=lines("hello", "and again", "/reset", "fresh", "/exit",
                                                                 "never read"), out=out, color=False)
    first, second, third = engine.prompts
    assert "hello" in first and "Hi there." not in first
    assert "hello" in second and "Hi there." in second and "hmm" not in second and "and again" in second
    assert "hello" not in third and "fresh" in third
    text = out.getvalue()
    assert text.count("thinking: hmm") == 3 and "(conversation cleared)" in text and "tokens/s" in text


def test_end_of_input_exits_cleanly(model_dir, tokenizer):
    from mimo.checkpoint import load_model
    from mimo.inference.engine import Engine

    out = io.StringIO()
    engine = Engine(load_model(model_dir), tokenizer)
    chat_loop(engine, tokenizer, SamplingParams(max_new_tokens=6, temperature=0.6, seed=1), mtp=True,
              read=lines("What is 12 + 7?"), out=out, color=False)
    text = out.getvalue()
    assert "tokens/s" in text and "acceptance" in text and text.endswith("\n")


@pytest.mark.slow
def test_chat_command_over_stdin(model_dir):
    run = subprocess.run([sys.executable, "-m", "mimo.cli", "chat", str(model_dir), "--max-new-tokens", "5",
                          "--no-mtp"], input="hi\n/reset\nhello\n/exit\n", capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("tokens/s") == 2 and "(conversation cleared)" in run.stdout
    assert "\x1b[" not in run.stdout  # no colours when stdout is not a terminal


def test_think_splitter_streams_the_same_split_as_the_whole_reply():
    from mimo.serve.thinking import ThinkSplitter, split_thinking

    reply = "<think>\nstep one\nstep two\n\n</think>\n\nThe answer is 4.\n"
    assert split_thinking(reply) == ("step one\nstep two", "The answer is 4.\n")
    assert split_thinking("no thinking here") == (None, "no thinking here")
    assert split_thinking("<think>cut off mid-thought") == ("cut off mid-thought", "")
    for size in (1, 2, 3, 7):
        splitter = ThinkSplitter()
        pieces = []
        for i in range(0, len(reply), size):
            pieces += splitter.feed(reply[i:i + size])
        pieces += splitter.close()
        thought = "".join(t for in_thought, t in pieces if in_thought)
        answer = "".join(t for in_thought, t in pieces if not in_thought)
        assert (thought, answer) == split_thinking(reply), size
