# MiMo for transformers (trust_remote_code), written by mimo (MIT) on transformers' Qwen2 building blocks.
#
# The main model is exactly Qwen2 (MiMoModel, MiMoForCausalLM: the forward, generate and the KV cache are
# Qwen2's). The multi-token-prediction (MTP) layers are real modules under the published names, so that every
# tensor of the checkpoint loads:
#
#   model.mtp_layers.{k}.{token_layernorm, hidden_layernorm, input_proj, input_layernorm, self_attn.{q,k,v,o}_proj,
#                         post_attention_layernorm, mlp.{gate,up,down}_proj, final_layernorm}
#
# MTP layer k predicts token t+k+2 at position t from the previous stage's hidden state at t and the embedding of
# token t+k+1 (the previous stage is the main model's last decoder layer *before* model.norm for k = 0, as vLLM
# feeds it, and MTP layer k-1's block output before its final_layernorm for k > 0); the embedding is zeroed at
# position 0, as vLLM's and SGLang's MiMo MTP drafters do (`inputs_embeds[positions == 0] = 0`):
#
#   z = input_proj(cat[hidden_layernorm(h_prev[t]), token_layernorm(embed(x[t+k+1]) * (t > 0))])
#   z = z + self_attn(input_layernorm(z)); z = z + mlp(post_attention_layernorm(z))   # causal, RoPE position t
#   logits = lm_head(final_layernorm(z))
#
# MiMoForCausalLM.mtp_logits(input_ids) returns every MTP layer's logits over a sequence (mimo computes the same
# numbers: mimo.model.MiMoForCausalLM.forward(..., return_mtp_logits=True)). Plain forward and generate use the
# main model only; vLLM and SGLang use their own MiMo MTP drafters over these weights.
from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2ForCausalLM,
    Qwen2MLP,
    Qwen2Model,
    Qwen2RMSNorm,
)

from .configuration_mimo import MiMoConfig


def _match_attention_bias(attn: nn.Module, config):
    """Qwen2 always has q/k/v biases; a MiMo config may say it has none (attention_bias false)."""
    if getattr(config, "attention_bias", True):
        return
    for name in ("q_proj", "k_proj", "v_proj"):
        old = getattr(attn, name)
        setattr(attn, name, nn.Linear(old.in_features, old.out_features, bias=False))


class MiMoMTPLayers(nn.Module):
    """One MTP layer: fuse [hidden, embedding], one Qwen2 decoder block, final_layernorm."""

    def __init__(self, config: MiMoConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.token_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(config.hidden_size * 2, config.hidden_size, bias=False)
        self.final_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # built as layer 0 (transformers looks the layer's type up by index), then numbered after the main layers
        self.self_attn = Qwen2Attention(config, layer_idx=0)
        self.self_attn.layer_idx = layer_idx
        _match_attention_bias(self.self_attn, config)
        self.mlp = Qwen2MLP(config)

    def forward(self, input_embeds: torch.Tensor, hidden_states: torch.Tensor, position_embeddings,
                attention_mask: torch.Tensor | None = None):
        """input_embeds: embeddings of tokens x[t+k+1]; hidden_states: the previous stage's h[t], both [B, T, H].
        Returns (z, the block output the next MTP layer reads; final_layernorm(z), for the LM head)."""
        z = self.input_proj(torch.cat([self.hidden_layernorm(hidden_states), self.token_layernorm(input_embeds)],
                                      dim=-1))
        attn = self.self_attn(hidden_states=self.input_layernorm(z), attention_mask=attention_mask,
                              position_embeddings=position_embeddings)
        z = z + (attn[0] if isinstance(attn, tuple) else attn)
        z = z + self.mlp(self.post_attention_layernorm(z))
        return z, self.final_layernorm(z)


class MiMoModel(Qwen2Model):
    config_class = MiMoConfig
    _keys_to_ignore_on_load_unexpected = [r"lm_head\."]  # noqa: RUF012 (the base model from a causal-LM checkpoint)

    def __init__(self, config: MiMoConfig):
        super().__init__(config)
        for layer in self.layers:
            _match_attention_bias(layer.self_attn, config)
        self.mtp_layers = nn.ModuleList(
            [MiMoMTPLayers(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)])
        self.post_init()


class MiMoForCausalLM(Qwen2ForCausalLM):
    config_class = MiMoConfig

    def __init__(self, config: MiMoConfig):
        super(Qwen2ForCausalLM, self).__init__(config)  # Qwen2's PreTrainedModel, without building a Qwen2Model
        self.model = MiMoModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _mtp_mask(self, n: int, key_valid: torch.Tensor | None, dtype, device):
        """Causal attention over the MTP stream's n positions (and padding), in the form the model's attention
        implementation takes: a [B, 1, n, n] additive mask (eager, sdpa), or the 2D padding mask (flash)."""
        if "flash" in str(getattr(self.config, "_attn_implementation", "")):
            return key_valid.long() if key_valid is not None and not bool(key_valid.all()) else None
        allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, :].bool()
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    def mtp_step(self, k: int, hidden_prev: torch.Tensor, next_ids: torch.LongTensor,
                 position_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None):
        """MTP layer k on the previous stage's hidden states [B, T, H] and tokens x[t+k+1] [B, T] at positions t.
        attention_mask [B, T]: 1 where both exist. Returns (z for chaining, logits [B, T, V] for token t+k+2)."""
        B, n = next_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=next_ids.device)[None].expand(B, -1)
        embeds = self.model.embed_tokens(next_ids).masked_fill((position_ids == 0)[..., None], 0.0)
        position_embeddings = self.model.rotary_emb(embeds, position_ids)
        mask = self._mtp_mask(n, attention_mask, embeds.dtype, embeds.device)
        z, normed = self.model.mtp_layers[k](embeds, hidden_prev, position_embeddings, mask)
        return z, self.lm_head(normed)

    def mtp_logits(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.LongTensor | None = None) -> list[torch.Tensor]:
        """Every MTP layer's logits over whole sequences: element k is [B, T-k-1, V], row t predicting token
        x[t+k+2]. Layer 0 reads the main model's last hidden state before model.norm."""
        captured = {}
        hook = self.model.norm.register_forward_hook(lambda module, args, out: captured.setdefault("h", args[0]))
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False)
        finally:
            hook.remove()
        prev, out = captured["h"], []
        T = input_ids.shape[1]
        for k in range(len(self.model.mtp_layers)):
            n = T - k - 1
            if n <= 0:
                break
            valid = None if attention_mask is None else attention_mask[:, :n].bool() & attention_mask[:, k + 1:].bool()
            z, logits = self.mtp_step(k, prev[:, :n], input_ids[:, k + 1:],
                                      None if position_ids is None else position_ids[:, :n], valid)
            out.append(logits)
            prev = z
        return out


__all__ = ["MiMoForCausalLM", "MiMoMTPLayers", "MiMoModel"]
