"""Splitting a reasoning model's streamed output into its thinking (inside <think>...</think>) and its answer.

Used by `mimo chat` (thinking shown apart) and `mimo serve` (thinking returned as `reasoning_content`, as
DeepSeek's API and vLLM's reasoning parsers do). Tags may arrive split over several pieces of text.
"""

from __future__ import annotations

from mimo.tokenizer import THINK_END, THINK_START


class ThinkSplitter:
    """feed(text) -> [(in_thought, text), ...]; a piece with empty text marks a switch between the two parts.

    The newlines around the thinking ("<think>\\n...\\n</think>\\n\\n") are dropped, so each part starts with
    its first real character and the thinking ends with its last.
    """

    def __init__(self):
        self.pending = ""  # text that may be the beginning of a tag
        self.in_thought = False
        self.started = {True: False, False: False}  # whether each part has had a visible character

    def feed(self, text: str) -> list[tuple[bool, str]]:
        pieces: list[tuple[bool, str]] = []
        self.pending += text
        while self.pending:
            tag = THINK_END if self.in_thought else THINK_START
            at = self.pending.find(tag)
            if at >= 0:
                before = self.pending[:at]
                self._emit(pieces, before.rstrip("\n") if self.in_thought else before)
                self.pending = self.pending[at + len(tag):]
                self.in_thought = not self.in_thought
                pieces.append((self.in_thought, ""))
                continue
            keep = next((n for n in range(min(len(tag) - 1, len(self.pending)), 0, -1)
                         if tag.startswith(self.pending[-n:])), 0)
            if self.in_thought:  # newlines that end the thought are dropped with the tag
                rest = self.pending[: len(self.pending) - keep]
                keep += len(rest) - len(rest.rstrip("\n"))
            self._emit(pieces, self.pending[: len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep:]
            break
        return pieces

    def close(self) -> list[tuple[bool, str]]:
        """The text held back at the end (a partial tag is text after all)."""
        pieces: list[tuple[bool, str]] = []
        self._emit(pieces, self.pending)
        self.pending = ""
        return pieces

    def _emit(self, pieces: list, text: str):
        if not self.started[self.in_thought]:
            text = text.lstrip("\n")
            self.started[self.in_thought] = bool(text)
        if text:
            pieces.append((self.in_thought, text))


def split_thinking(text: str) -> tuple[str | None, str]:
    """A whole reply -> (reasoning or None when there is no <think> part, answer)."""
    splitter = ThinkSplitter()
    reasoning, answer, thought = "", "", False
    for in_thought, piece in splitter.feed(text) + splitter.close():
        thought = thought or in_thought
        if in_thought:
            reasoning += piece
        else:
            answer += piece
    return (reasoning if thought else None), answer
