"""The MiMo model in plain PyTorch: a Qwen2-style decoder plus multi-token-prediction (MTP) layers.

Module and parameter names follow the published MiMo-7B checkpoints exactly (see ../shared/MIMO.md), so a
state_dict here is a state_dict there:

    model.embed_tokens, model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
    mlp.{gate,up,down}_proj}, model.norm, lm_head,
    model.mtp_layers.{k}.{token_layernorm, hidden_layernorm, input_proj, <decoder block>, final_layernorm}

MTP layer k (0-based) predicts token t+k+2 at position t from the previous stage's hidden state at t (the main
model's final hidden state *before* `model.norm` for k = 0, as vLLM feeds it; the previous MTP block's output,
before its final_layernorm, for k > 0) and the embedding of token t+k+1, zeroed at position 0 as vLLM's and
SGLang's MiMo MTP do (`inputs_embeds[positions == 0] = 0`; mtp_embeds):

    z = input_proj(cat[hidden_layernorm(h_prev[t]), token_layernorm(embed(x[t+k+1]) * (t > 0))])
    z = decoder_block(z)              # attention over the MTP stream, RoPE position t
    logits = lm_head(final_layernorm(z))

The model holds no parallelism code; an optional static KV cache (KVCache) serves inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mimo.config import MiMoConfig
from mimo.memory import lazy_zeros

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32, scale in the input dtype (as Qwen2)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, 1, T, head_dim] (Qwen2's non-interleaved rotary layout)."""
    idx = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (idx / head_dim))  # [D/2]
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Static KV cache, one slot per batch row: k[i], v[i] are [B, n_kv_heads, max_seq_len, head_dim].

    Layer index i covers the main layers (0..L-1) then the MTP layers (L..L+K-1). Each row's tokens sit at
    their absolute positions in the row's slot; attention masks everything past the query position, so
    rolling a row back (speculative decoding) or reusing a slot only needs the caller to track lengths.
    """

    def __init__(self, cfg: MiMoConfig, batch_size: int, max_seq_len: int, dtype=torch.float32, device="cpu"):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        shape = (batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        # zero pages taken as positions are written: a long context costs memory only when it is used
        self.k = [lazy_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.v = [lazy_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.batch_size, self.max_seq_len = batch_size, max_seq_len

    def update(self, i: int, k, v, ctx: AttnContext):
        """Write k, v [B, Hkv, T, D] at ctx.positions; return the cached keys/values to attend over."""
        kc, vc = self.k[i], self.v[i]
        rows = ctx.slots if ctx.slots is not None else torch.arange(k.shape[0], device=k.device)
        kc[rows[:, None], :, ctx.positions] = k.transpose(1, 2)  # advanced index -> [B, T, Hkv, D]
        vc[rows[:, None], :, ctx.positions] = v.transpose(1, 2)
        if ctx.slots is None and k.shape[0] == self.batch_size:
            return kc[:, :, : ctx.kv_len], vc[:, :, : ctx.kv_len]
        return kc[rows, :, : ctx.kv_len], vc[rows, :, : ctx.kv_len]


@dataclass
class AttnContext:
    """What every attention layer of one forward pass shares."""
    cos: torch.Tensor  # [B, 1, T, D]
    sin: torch.Tensor
    positions: torch.Tensor | None = None  # [B, T] absolute positions (cache path)
    cache: KVCache | None = None
    slots: torch.Tensor | None = None  # [B] cache rows of this batch (None: rows 0..B-1)
    kv_len: int = 0  # attend over cache positions [0, kv_len)
    mask: torch.Tensor | None = None  # [B, 1, T, kv_len] bool, True = attend (None without a cache: causal)


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """Causal attention within packed documents: positions [B, T] restart at 0 where each document starts ->
    [B, 1, T, T] bool, True where query t may attend to key s (s <= t, same document)."""
    doc = (positions == 0).cumsum(-1)  # [B, T] document index within the row
    T = positions.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def make_context(cfg: MiMoConfig, positions: torch.Tensor, dtype, cache: KVCache | None = None,
                 slots: torch.Tensor | None = None, packed: bool = False) -> AttnContext:
    """packed (no cache): rows hold several documents, positions restart at 0 at each (document_mask)."""
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)
    if cache is None:
        return AttnContext(cos, sin, mask=document_mask(positions) if packed else None)
    kv_len = int(positions.max()) + 1
    if kv_len > cache.max_seq_len:
        raise ValueError(f"position {kv_len - 1} is past the KV cache length {cache.max_seq_len}")
    keys = torch.arange(kv_len, device=positions.device)
    mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, kv_len]
    return AttnContext(cos, sin, positions, cache, slots, kv_len, mask)


class Attention(nn.Module):
    def __init__(self, cfg: MiMoConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x, ctx: AttnContext, cache_index: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        gqa = self.n_heads != self.n_kv
        if ctx.cache is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None,
                                               enable_gqa=gqa)
        else:
            k, v = ctx.cache.update(cache_index, k, v, ctx)  # [B, Hkv, kv_len, D]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: MiMoConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MiMoConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, ctx: AttnContext, cache_index: int):
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache_index)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(DecoderLayer):
    """One MiMo MTP layer: fuse [hidden, embedding], one decoder block, final_layernorm."""

    def __init__(self, cfg: MiMoConfig):
        super().__init__(cfg)
        self.token_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden, embeds, ctx: AttnContext, cache_index: int):
        """-> (z, the block's output that the next MTP layer reads; final_layernorm(z), for the LM head).
        Both inside this forward, so that FSDP2 (a shard per layer) gathers every weight the layer uses."""
        z = self.input_proj(torch.cat([self.hidden_layernorm(hidden), self.token_layernorm(embeds)], dim=-1))
        z = super().forward(z, ctx, cache_index)
        return z, self.final_layernorm(z)


class MiMoModel(nn.Module):
    def __init__(self, cfg: MiMoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp_layers = nn.ModuleList(MTPLayer(cfg) for _ in range(cfg.num_nextn_predict_layers))


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, H], final hidden state before model.norm (what MTP layer 0 reads)
    loss: torch.Tensor | None = None  # ntp_loss + mtp_weight * mean(mtp_losses)
    ntp_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # only when asked for


def mtp_embeds(embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """An MTP layer's token input: embeds [B, T, H] of x[t+k+1], zero where positions [B, T] == 0. vLLM's and
    SGLang's MiMo drafters (written with Xiaomi) zero it there, so a layer trained here drafts for them as it
    drafts here; a packed document's first position counts as position 0 too."""
    return embeds.masked_fill((positions == 0)[..., None], 0.0)


def cross_entropy(logits, targets):
    """Mean CE over targets != IGNORE_INDEX; 0 (with a graph) when there are none."""
    flat_t = targets.reshape(-1)
    n = (flat_t != IGNORE_INDEX).sum()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_t,
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / n.clamp(min=1)


class MiMoForCausalLM(nn.Module):
    def __init__(self, cfg: MiMoConfig):
        super().__init__()
        self.config = cfg
        self.model = MiMoModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- init and counting -------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.empty(module.weight.shape).normal_(0.0, std, generator=gen)
                module.weight.copy_(w)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        return self

    def num_params(self) -> dict:
        """{'main': ..., 'mtp_per_layer': ..., 'total': ...}; tied weights counted once."""
        mtp_ids = {id(p) for p in self.model.mtp_layers.parameters()}
        main = sum(p.numel() for p in self.parameters() if id(p) not in mtp_ids)
        per = sum(p.numel() for p in self.model.mtp_layers[0].parameters()) if len(self.model.mtp_layers) else 0
        return {"main": main, "mtp_per_layer": per, "total": main + per * len(self.model.mtp_layers)}

    # ---- forward -----------------------------------------------------------------------------------

    @staticmethod
    def _positions(input_ids, positions):
        """The given positions [B, T], or 0..T-1 for every row."""
        if positions is not None:
            return positions
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)

    def _context(self, input_ids, positions, cache, slots):
        """Positions given without a cache are packed documents' (attention stays within each)."""
        packed = positions is not None and cache is None
        positions = self._positions(input_ids, positions)
        dtype = self.model.norm.weight.dtype  # the compute dtype (a frozen embedding may be stored narrower)
        if torch.is_autocast_enabled(input_ids.device.type):
            dtype = torch.get_autocast_dtype(input_ids.device.type)
        return make_context(self.config, positions, dtype, cache, slots, packed)

    def hidden_states(self, input_ids, positions=None, cache: KVCache | None = None, slots=None):
        """input_ids [B, T] -> final hidden state before model.norm [B, T, H]."""
        ctx = self._context(input_ids, positions, cache, slots)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ctx, i)
        return x

    def logits(self, hidden):
        return self.lm_head(self.model.norm(hidden))

    def mtp_step(self, k: int, hidden_prev, next_ids, positions=None, cache: KVCache | None = None, slots=None):
        """Run MTP layer k on h_prev [B, T, H] and tokens x[t+k+1] [B, T] at positions t.
        Returns (z [B, T, H] before final_layernorm, for chaining; logits [B, T, V] for token t+k+2)."""
        layer = self.model.mtp_layers[k]
        ctx = self._context(next_ids, positions, cache, slots)
        embeds = mtp_embeds(self.model.embed_tokens(next_ids), self._positions(next_ids, positions))
        z, normed = layer(hidden_prev, embeds, ctx, self.config.num_hidden_layers + k)
        return z, self.lm_head(normed)

    def forward(self, input_ids, targets=None, *, mtp_weight: float = 0.3, positions=None,
                cache: KVCache | None = None, slots=None, return_mtp_logits: bool = False) -> CausalLMOutput:
        """input_ids [B, T]; targets [B, T] = input_ids shifted left by one (IGNORE_INDEX where masked).
        positions [B, T] without a cache: rows of packed documents, positions restarting at 0 at each; attention
        (the MTP layers' too) stays within a document (document_mask).

        With targets: the next-token loss, each MTP layer's loss (layer k's target at t is targets[t+k+1])
        and loss = ntp + mtp_weight * mean(mtp). Without: logits only (MTP layers skipped).
        """
        hidden = self.hidden_states(input_ids, positions, cache, slots)
        logits = self.logits(hidden)
        out = CausalLMOutput(logits=logits, hidden=hidden)
        if targets is None:
            return out
        out.ntp_loss = cross_entropy(logits, targets)
        T = input_ids.shape[1]
        prev = hidden
        for k in range(len(self.model.mtp_layers)):
            n = T - k - 1  # positions t = 0..n-1 have both x[t+k+1] and a target x[t+k+2]
            if n <= 0:
                break
            z, mtp_logits = self.mtp_step(k, prev[:, :n], input_ids[:, k + 1:], None if positions is None
                                          else positions[:, :n])
            out.mtp_losses.append(cross_entropy(mtp_logits, targets[:, k + 1:]))
            if return_mtp_logits:
                out.mtp_logits.append(mtp_logits)
            prev = z
        out.loss = out.ntp_loss
        if out.mtp_losses:
            out.loss = out.ntp_loss + mtp_weight * torch.stack(out.mtp_losses).mean()
        return out
