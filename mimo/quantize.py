"""Weight-only int8 quantization for inference, and a perplexity helper to check what it costs.

quantize_int8(model) swaps every nn.Linear (main layers, MTP layers, LM head; not the embedding) for an
Int8Linear: symmetric per-output-channel int8 weights with one scale per row, activations kept in float.
Decoding reads every weight once per token, so a quarter of the fp32 bytes is most of the speed-up.

On CPU the matmul is torch._weight_int8pack_mm (an AVX-512 kernel that reads the int8 weights directly) with
bf16 activations; it needs in_features % 16 == 0, so other shapes (and other devices) dequantize on the fly.
Weights are quantized against the bf16-rounded scales, so the kernel's bf16 scales are exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mimo.errors import MimoError
from mimo.model import MiMoForCausalLM, cross_entropy


class Int8Linear(nn.Module):
    """y = x @ (scale[:, None] * w_int8).T + bias, with w_int8 [out, in] and one bf16 scale per output row."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out] bf16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()  # [out, in]
        # quantize against the bf16 scale the kernel uses (clamping the row maximum if rounding shrank it)
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(torch.bfloat16)  # [out]
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias)

    def forward(self, x):
        shape = x.shape[:-1]
        if x.device.type == "cpu" and self.in_features % 16 == 0:
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight_int8,
                                          self.scales).to(x.dtype).view(*shape, self.out_features)
        else:
            y = F.linear(x, self.weight_int8.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def quantize_int8(model: MiMoForCausalLM) -> MiMoForCausalLM:
    """Swap every nn.Linear of the model for an Int8Linear, in place; returns the model (for inference only)."""
    if model.model.embed_tokens.weight.dtype != torch.float32:
        model.float()  # the kernel's bf16 activations are converted from and back to fp32
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    return model.eval()


def quantize_model(model: MiMoForCausalLM, method: str | None) -> MiMoForCausalLM:
    """quantize_model(model, "int8"); None or "none" leaves the model as it is."""
    if method in (None, "none"):
        return model
    if method == "int8":
        return quantize_int8(model)
    raise MimoError(f"unknown quantization {method!r} (choose from int8)")


@torch.no_grad()
def perplexity(model: MiMoForCausalLM, token_ids, chunk: int | None = None) -> float:
    """exp(mean next-token cross-entropy) over token_ids (a list, [T] or [B, T]), in windows of `chunk` tokens
    (default: the model's context) scored independently."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=model.model.embed_tokens.weight.device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[1] < 2:
        raise MimoError("perplexity needs at least two tokens")
    chunk = chunk or model.config.max_position_embeddings
    total, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, chunk):
        window = ids[:, start: start + chunk + 1]
        if window.shape[1] < 2:
            break
        logits = model(window[:, :-1]).logits
        n = window[:, 1:].numel()
        total += float(cross_entropy(logits, window[:, 1:])) * n
        count += n
    return math.exp(total / count)
