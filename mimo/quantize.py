"""Weight-only int8 and int4 quantization for inference, and a perplexity helper to check what it costs.

quantize_model(model, "int8" | "int4") swaps every nn.Linear (main layers, MTP layers, LM head; not the
embedding) for a quantized module; activations stay in float. Decoding reads every weight once per token, so
reading a quarter (int8) or an eighth (int4) of the fp32 bytes is most of the speed-up.

- Int8Linear: symmetric int8 with one scale per output row. On CPU the matmul is torch._weight_int8pack_mm
  (an AVX-512 kernel that reads the int8 weights directly) with bf16 activations; it needs
  in_features % 16 == 0.
- Int4Linear: asymmetric 4-bit in groups of 32 input features (a bf16 scale and zero point per group, as
  gpt-fast and torchao's int4 weight-only), two weights per byte. On CPU the matmul is
  torch.ops.aten._weight_int4pack_mm_for_cpu with bf16 activations; it needs out_features % 16 == 0 and
  in_features % 32 == 0.

Other shapes (and other devices) dequantize on the fly. Weights are quantized against the bf16-rounded
scales (and zero points) the kernels use, so those are exact.
"""

from __future__ import annotations

import copy
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


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W[o, i] = (q[o, i] - 8) * scale[g, o] + zero[g, o], g = i // group_size, q in 0..15.

    Buffers: weight_int4, uint8 two weights per byte: [out, in/2] in the CPU kernel's own layout when it applies
    (cpu_kernel), else [out, ceil(in/2)] with the even input feature in the low nibble; scales_zeros
    [groups, out, 2] bf16 (the kernel's layout)."""

    def __init__(self, weight_int4, scales_zeros, group_size: int, in_features: int, cpu_kernel: bool, bias):
        super().__init__()
        self.out_features, self.in_features, self.group_size = weight_int4.shape[0], in_features, group_size
        self.cpu_kernel = cpu_kernel
        self.register_buffer("weight_int4", weight_int4)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, cpu_kernel: bool | None = None) -> Int4Linear:
        """cpu_kernel None: the CPU kernel's layout wherever it applies; False: the portable layout."""
        w = linear.weight.detach().float()  # [out, in]
        out, n_in = w.shape
        groups = math.ceil(n_in / group_size)
        wg = F.pad(w, (0, groups * group_size - n_in)).view(out, groups, group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)  # [out, groups]
        scale = ((hi - lo).clamp(min=1e-12) / 15).to(torch.bfloat16)
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # W = (q - 8) * scale + zero
        q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
        q = q.view(out, -1)[:, :n_in].to(torch.int32)  # [out, in]
        scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # [groups, out, 2]
        fits = w.device.type == "cpu" and out % 16 == 0 and n_in % group_size == 0 and group_size % 32 == 0
        cpu_kernel = fits if cpu_kernel is None else cpu_kernel and fits
        if cpu_kernel:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [out, in/2] uint8
        else:
            q = F.pad(q, (0, n_in % 2))
            packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # [out, ceil(in/2)]
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, scales_zeros, group_size, n_in, cpu_kernel, bias)

    def dequantized(self, dtype) -> torch.Tensor:
        """The weight [out, in] the quantized values stand for (the fallback path; not for the kernel layout)."""
        p = self.weight_int4.to(torch.int32)
        q = torch.stack([p & 15, p >> 4], -1).view(self.out_features, -1)  # [out, 2 * ceil(in/2)]
        sz = self.scales_zeros.float().transpose(0, 1)  # [out, groups, 2]
        scale = sz[..., 0].repeat_interleave(self.group_size, 1)[:, : q.shape[1]]
        zero = sz[..., 1].repeat_interleave(self.group_size, 1)[:, : q.shape[1]]
        return ((q - 8) * scale + zero)[:, : self.in_features].to(dtype)

    def forward(self, x):
        shape = x.shape[:-1]
        if self.cpu_kernel:
            if x.device.type != "cpu":
                raise MimoError("this int4 layer was packed for the CPU kernel; quantize on the device it runs on")
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                           self.weight_int4, self.group_size, self.scales_zeros)
            y = y.to(x.dtype).view(*shape, self.out_features)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


QUANTIZED_LINEAR = {"int8": Int8Linear, "int4": Int4Linear}


def _check_method(method: str):
    if method not in QUANTIZED_LINEAR:
        raise MimoError(f"unknown quantization {method!r} (choose from {', '.join(QUANTIZED_LINEAR)})")


@torch.no_grad()
def _swap_linears(module: nn.Module, method: str) -> nn.Module:
    """Replace every nn.Linear in module (or module itself) by QUANTIZED_LINEAR[method]."""
    cls = QUANTIZED_LINEAR[method]
    if isinstance(module, nn.Linear):
        return cls.from_linear(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, cls.from_linear(child))
    return module


def quantize_linears(model: MiMoForCausalLM, method: str) -> MiMoForCausalLM:
    """Swap every nn.Linear of the model for QUANTIZED_LINEAR[method], in place; returns the model (for
    inference only)."""
    _check_method(method)
    if model.model.embed_tokens.weight.dtype != torch.float32:
        model.float()  # the kernels' bf16 activations are converted from and back to fp32
    return _swap_linears(model, method).eval()


def quantized_copy(module: nn.Module, method: str) -> nn.Module:
    """A copy of module (an nn.Linear or a module holding some) whose linears are quantized; every other
    parameter and buffer is shared with the original, not copied. The engine drafts with such copies of the
    MTP layers and the LM head (--draft-quantize)."""
    _check_method(method)
    if not any(isinstance(m, nn.Linear) for m in module.modules()):
        return module  # already quantized
    shared = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return _swap_linears(copy.deepcopy(module, shared), method).eval()


def quantize_int8(model: MiMoForCausalLM) -> MiMoForCausalLM:
    return quantize_linears(model, "int8")


def quantize_model(model: MiMoForCausalLM, method: str | None) -> MiMoForCausalLM:
    """quantize_model(model, "int8" | "int4"); None or "none" leaves the model as it is."""
    if method in (None, "none"):
        return model
    return quantize_linears(model, method)


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
