"""Inference engine: batched prefill and decode over a static KV cache, sampling, stop conditions, streaming.

Every caller (generate, chat, evaluation, RL rollouts, the server) goes through `Engine.generate`.
Rows are independent: each owns one KV-cache slot, prompts of different lengths share a batch, and each
row stops on its own (end-of-text, stop strings, max tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mimo.errors import MimoError
from mimo.model import KVCache, MiMoForCausalLM
from mimo.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise MimoError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise MimoError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise MimoError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise MimoError(f"top_k must be >= 0, got {self.top_k!r}")


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the sampling distribution's model
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    time_to_first_token_s: float = 0.0
    decode_time_s: float = 0.0


class IncrementalDetokenizer:
    """Streams text as tokens arrive without ever splitting a UTF-8 character (as vLLM's detokenizer)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.tokens, self.prefix_offset, self.read_offset = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix):]


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None):
    """logits [B, V] -> (tokens [B], log-probs of those tokens under the model [B])."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if p.temperature == 0.0:
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.multinomial(filtered_probs(logits, p), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The sampling distribution: temperature, then top-k, then top-p (nucleus). logits [B, V] -> probs [B, V]."""
    scores = logits.float() / max(p.temperature, 1e-6)
    if p.top_k and p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the tokens before it already reach top_p (the top token always stays)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.softmax(scores, dim=-1)


class Engine:
    def __init__(self, model: MiMoForCausalLM, tokenizer: Tokenizer, max_seq_len: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cfg = model.config
        self.max_seq_len = max_seq_len or self.cfg.max_position_embeddings
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if tokenizer.vocab_size > self.cfg.vocab_size:
            raise MimoError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                            f"{self.cfg.vocab_size}")

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Complete each prompt (token ids). on_text(row, new_text) streams text as it is produced."""
        params.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise MimoError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest >= self.max_seq_len:
            raise MimoError(f"prompt of {longest} tokens does not fit the context of {self.max_seq_len}")
        B = len(prompts)
        seq_len = min(self.max_seq_len, longest + params.max_new_tokens)
        cache = KVCache(self.cfg, B, seq_len, self.dtype, self.device)
        gen = torch.Generator(device=self.device).manual_seed(params.seed) if params.seed is not None else None
        outs = [Completion(prompt_tokens=list(p)) for p in prompts]
        detok = [IncrementalDetokenizer(self.tokenizer) for _ in prompts]
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        t0 = time.perf_counter()

        # prefill: right-padded batch; padding writes past a row's length are masked, then overwritten
        ids = torch.zeros(B, longest, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        positions = torch.arange(longest, device=self.device)[None].expand(B, -1)
        hidden = self.model.hidden_states(ids, positions, cache)
        last = hidden[torch.arange(B), lengths - 1]  # [B, H]
        logits = self.model.logits(last)  # [B, V]

        active = [params.max_new_tokens > 0 for _ in prompts]
        for o in outs:
            o.finish_reason = None if params.max_new_tokens > 0 else "length"
        t_first = None
        while any(active):
            tokens, logprobs = sample_next(logits, params, gen)
            if t_first is None:
                t_first = time.perf_counter()
            for i in range(B):
                if active[i]:
                    active[i] = self._append(i, outs[i], detok[i], int(tokens[i]), float(logprobs[i]),
                                             params, seq_len, on_text)
            if not any(active):
                break
            rows = torch.tensor([i for i in range(B) if active[i]], device=self.device)
            slots = None if len(rows) == B else rows
            step_pos = lengths[rows][:, None]  # [b, 1]: each live row's next position
            lengths[rows] += 1
            hidden = self.model.hidden_states(tokens[rows][:, None], step_pos, cache, slots)
            logits = torch.zeros(B, self.cfg.vocab_size, device=self.device)
            logits[rows] = self.model.logits(hidden[:, -1]).float()
        t_end = time.perf_counter()
        for o in outs:
            o.time_to_first_token_s = (t_first or t_end) - t0
            o.decode_time_s = t_end - (t_first or t_end)
        return outs

    def _append(self, i, out: Completion, detok: IncrementalDetokenizer, token: int, logprob: float,
                params: SamplingParams, seq_len: int, on_text) -> bool:
        """Add one token to a row; return whether the row goes on."""
        if token in self.tokenizer.stop_token_ids:
            out.finish_reason = "stop"
            new = detok.flush()
        else:
            out.tokens.append(token)
            out.logprobs.append(logprob)
            new = detok.push(token)
            if len(out.tokens) >= params.max_new_tokens or len(out.prompt_tokens) + len(out.tokens) >= seq_len:
                out.finish_reason = "length"
                new += detok.flush()
        if new:
            before = len(out.text)
            out.text += new
            for s in params.stop:
                at = out.text.find(s, max(0, before - len(s) + 1))
                if at >= 0:
                    new = new[: max(0, at - before)]
                    out.text = out.text[:at]
                    out.finish_reason = "stop"
                    break
            if new and on_text:
                on_text(i, new)
        return out.finish_reason is None
