"""Sampling, the leaf under the engine and the speculator (as vLLM's sampling_params and sampler below spec_decode).

Every KV-cache slot has its own temperature / top-k / top-p as tensors, and its own seed: the uniform behind
the token at position t of a row is hash(row seed, t, stream), so a row samples the same tokens whatever else
shares its batch. Tokens are drawn by inverse CDF from the filtered distribution; greedy rows get a one-hot
distribution, which makes them a special case of speculative decoding's acceptance rule
(mimo/inference/speculative.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mimo.errors import MimoError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate through end-of-turn tokens up to max_new_tokens (fixed-length benchmarks)

    def validate(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise MimoError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise MimoError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise MimoError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise MimoError(f"top_k must be >= 0, got {self.top_k!r}")


def filtered_probs_rows(logits, temperature, top_k, top_p, max_top_k: int, any_top_p: bool,
                        any_greedy: bool = True) -> torch.Tensor:
    """Per-row sampling distributions. logits [N, V]; temperature, top_p [N] float; top_k [N] long (0 = off);
    max_top_k / any_top_p / any_greedy: host-side summaries that skip unused work. Temperature-0 rows get a
    one-hot at the argmax, so greedy rows fit the speculative acceptance rule unchanged. -> probs [N, V] float32"""
    V = logits.shape[-1]
    logits = logits.float()  # (an argmax over bf16 logits takes 4x one over fp32 on a CPU)
    scores = logits / temperature.clamp(min=1e-6)[:, None]
    if 0 < max_top_k:
        k = top_k.clamp(max=V)
        kth = torch.topk(scores, min(max_top_k, V), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
        kth = kth.masked_fill((k == 0)[:, None], float("-inf"))  # [N, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if any_top_p:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the tokens before it already reach top_p (the top token always stays)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p[:, None]
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    if not any_greedy:
        return probs
    greedy = (temperature == 0)[:, None]
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]: logits [..., V], tokens [...] -> [...] float32."""
    logits = logits.float()
    return logits.gather(-1, tokens[..., None])[..., 0] - logits.logsumexp(-1)


_M32 = 0xFFFFFFFF
SAMPLE, ACCEPT, DRAFT = 0, 1, 2  # random streams: a token's final sample, its draft's acceptance test, its draft


def _mul32(x, c: int):
    """(x * c) mod 2^32 for uint32 values held in int64 (tensors or ints) without overflowing int64."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _M32


def mix32(x):
    """A 32-bit integer hash (Chris Wellons' lowbias32), on int64 tensors or Python ints in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a batch generated with one seed (rows must not all draw the same numbers)."""
    return mix32((mix32(seed & _M32) + row * 0x9E3779B9) & _M32)


@dataclass(frozen=True)
class SamplingFlags:
    """Host-side summary of the running rows' settings: which work a batched sampling call can skip."""
    greedy: bool  # every row is greedy
    max_top_k: int
    any_top_p: bool
    any_greedy: bool  # some row is greedy


class RowSampler:
    """Each slot's sampling settings as tensors, so one batched call samples every row with its own settings.

    The uniform for the token at position t of a row is hash(row seed, t, stream): counter-based, so a row's
    samples depend on its seed and its own tokens only, never on the batch it shares or on the step count.
    """

    def __init__(self, n_slots: int, device):
        self.temperature = torch.zeros(n_slots, device=device)
        self.top_k = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(n_slots, device=device)
        self.seed = torch.zeros(n_slots, dtype=torch.long, device=device)  # mixed 32-bit seeds
        self.params: list[SamplingParams | None] = [None] * n_slots

    def set(self, slot: int, p: SamplingParams, seed: int):
        self.params[slot] = p
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = p.temperature, p.top_k, p.top_p
        self.seed[slot] = mix32(seed & _M32)

    def flags(self, slots) -> SamplingFlags:
        ps = [self.params[s] for s in slots]
        return SamplingFlags(all(p.temperature == 0 for p in ps), max((p.top_k for p in ps), default=0),
                             any(p.top_p < 1.0 for p in ps), any(p.temperature == 0 for p in ps))

    def probs(self, logits, rows, flags: SamplingFlags):
        """logits [N, V], rows [N] slot index of each row -> filtered sampling distributions [N, V]."""
        return filtered_probs_rows(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows],
                                   flags.max_top_k, flags.any_top_p, flags.any_greedy)

    def uniforms(self, rows, positions, stream: int):
        """rows [N] slots, positions [N] or [N, T] -> float64 uniforms in (0, 1), same shape as positions."""
        seeds = self.seed[rows]
        if positions.dim() == 2:
            seeds = seeds[:, None]
        h = mix32(mix32((positions + stream * 0x632BE5AB) & _M32) ^ seeds)
        return (h.double() + 0.5) * 2.0**-32

    def sample_from(self, probs, rows, positions, stream: int = SAMPLE):
        """Inverse-CDF sampling: probs [N, V] (need not be normalised), positions [N] -> tokens [N]."""
        cdf = probs.double().cumsum(-1)
        x = self.uniforms(rows, positions, stream) * cdf[:, -1]
        return torch.searchsorted(cdf, x[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)

    def sample(self, logits, rows, positions, flags: SamplingFlags):
        """logits [N, V] -> tokens [N]: the argmax for greedy rows, else a draw from the filtered distribution."""
        if flags.greedy:
            return logits.argmax(-1)
        return self.sample_from(self.probs(logits, rows, flags), rows, positions)


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The sampling distribution: temperature, then top-k, then top-p (nucleus). logits [B, V] -> probs [B, V]."""
    B = logits.shape[0]
    return filtered_probs_rows(logits, torch.full((B,), float(p.temperature)), torch.full((B,), p.top_k),
                               torch.full((B,), float(p.top_p)), p.top_k, p.top_p < 1.0, p.temperature == 0)
