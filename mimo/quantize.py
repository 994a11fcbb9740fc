"""Weight-only quantization in llama.cpp's GGML block formats (Q8_0 for "int8", Q4_0 for "int4"), the CPU kernels
that multiply with them (and with bf16 weights), and a perplexity helper to check what quantization costs.

quantize_model(model, "int8" | "int4") swaps every nn.Linear (main layers, MTP layers, LM head; not the
embedding) for a quantized module; activations stay in the model's float dtype (fp32, bf16, fp16). Decoding reads
every weight once per token, so reading 34/128 (Q8_0) or 18/128 (Q4_0) of the fp32 bytes is most of the speed-up.

Formats (ggml-common.h), in blocks of 32 weights along the input dimension:
- Q8_0 (Int8Linear): fp16 scale d, then 32 int8 q; w = d * q (34 bytes a block).
- Q4_0 (Int4Linear): fp16 scale d, then 16 bytes qs; element j < 16 is the low nibble of qs[j], element j + 16 its
  high nibble; w = d * (q - 8) (18 bytes a block).
The modules keep exactly ggml's bytes in the uint8 buffer `blocks` [out_features, in_features / 32, 34 or 18]
(rows one after another: a GGUF tensor's data), quantized as ggml's quantize_row_q{8,4}_0_ref does, byte for byte
(gguf.quants gives the same bytes), so GGUF files import and export by copying. in_features must be a multiple of
32 (quantize_linears leaves other linears in float). Where the kernels have AVX-512 tiles, an Int4Linear of a
multiple of 8 rows keeps the same bytes tiled by 8 rows instead (fmt "q4_0x8", kernels.tile_q4_0: the 8 rows' scales
and nibbles of a block side by side, so a tile reads them in two loads each instead of gathering them from 8 rows:
1.8x the row layout's products from cache on a Zen 4 core), and gives them back in rows wherever they leave the
module (state_dict, dequantized(), a move to another device).

Products (mimo/kernels/gemv.c, built on first use; mimo/kernels/__init__.py), the llama.cpp way: each activation
row is quantized to int8 blocks of 32 with an fp32 scale, every block is an integer dot product (AVX2), scaled and
summed in fp32; every weight block is read from memory once for all rows (GEMV tiles for few rows, GEMM tiles for
many: prefill). bf16 weights (bf16_linear) get their own GEMV up to GEMV_MAX_ROWS rows; more rows dequantize the
weight in row chunks to fp32 and multiply with torch's GEMM. The kernels run on their own small thread pool, kernels.threads() threads a call, whose idle
threads spin briefly and then sleep, and whose caller never waits for a thread that has not started (a busy
machine slows a product down to the threads that run, instead of stalling it). Without the kernels (no C
compiler, or MIMO_NO_KERNELS=1) a torch path computes the same products (activations rounded the same way),
slowly. Each product is a torch custom op (mimo::q8_0_linear, mimo::q4_0_linear, mimo::bf16_linear), so
torch.compile traces through it without a graph break.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mimo import kernels
from mimo.errors import MimoError
from mimo.model import MiMoForCausalLM, cross_entropy

QK = 32  # weights per block
BLOCK_BYTES = {"q8_0": 2 + QK, "q4_0": 2 + QK // 2, "q4_0x8": 2 + QK // 2}
# input rows up to which products run through the kernels; more rows dequantize the weight in chunks and use torch's
# fp32 GEMM. Q4_0 / Q8_0 have a GEMM tile for many rows (prefill) that beats dequantize + MKL's sgemm per core (106
# and 69 GFLOP/s against 71 and 64 on a 512 x 4096 x 4096 product) and keeps its speed when another process takes
# a core (MKL's OpenMP threads then lose half of theirs): always the kernels. bf16 up to 64 rows (MKL wins beyond).
# Kernels built without AVX2 (the portable scalar code) stop at PORTABLE_MAX_ROWS. bench/gemv_bandwidth.py --rows.
GEMV_MAX_ROWS = {"q8_0": 1 << 62, "q4_0": 1 << 62, "q4_0x8": 1 << 62, "bf16": 64}
# On a CPU with native bf16 products (kernels.native_bf16), bf16 activations of at least this many rows (prefill) go
# to oneDNN's bf16 GEMM, a quantized weight dequantized in chunks to bf16. 2-core Zen 4, 11008 x 4096: bf16 8 rows 5.2
# against 5.5 ms in the kernel, 32 rows 10.1 against 19.0, 512 rows 110 against 250 ms (fp32 chunks + MKL), a decode
# step's 1-4 rows stay in the kernel (3.0 against 4.7 ms at one row); 512 rows Q8_0 165 against 486 ms and Q4_0 131
# against 176 ms in the kernels' GEMM tile, which wins below (Q8_0 64 rows 52 against 62 ms, Q4_0 128 rows 54
# against 51 ms).
BF16_GEMM_MIN_ROWS = {"bf16": 8, "q8_0": 64, "q4_0": 256, "q4_0x8": 256}
PORTABLE_MAX_ROWS = 8
CHUNK_ELEMS = 1 << 22  # weights per chunk when quantizing or dequantizing (16 MiB of fp32 at a time)


# ---- the formats: ggml's reference quantization, byte for byte ------------------------------------------------

def _check_in_features(in_features: int):
    if in_features % QK:
        raise MimoError(f"GGML block quantization needs in_features divisible by {QK}, got {in_features}")


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """d [..., 1] float32 -> [..., 2] uint8: the fp16 value's little-endian bytes."""
    return d.to(torch.float16).view(torch.uint8)


def _quantize_torch(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w [rows, k] float32 -> blocks [rows, k / 32, bytes]: ggml's quantize_row_q{8,4}_0_ref in torch ops."""
    rows, k = w.shape
    b = w.reshape(rows, k // QK, QK)
    if fmt == "q8_0":
        d = b.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))
        v = b * inv
        a = v.abs()
        fl = a.floor()
        q = (torch.sign(v) * (fl + (2 * (a - fl)).floor())).to(torch.int8)  # roundf: half away from zero
        return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], -1)
    amax_at = b.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes, as ggml's strict "<"
    d = b.gather(-1, amax_at) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))
    q = torch.trunc(b * inv + 8.5).clamp(0, 15).to(torch.uint8)
    qs = q[..., : QK // 2] | (q[..., QK // 2:] << 4)
    return torch.cat([_fp16_bytes(d), qs], -1)


def quantize_blocks(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """weight [out, in] (any float dtype) -> uint8 blocks [out, in / 32, BLOCK_BYTES[fmt]], as ggml quantizes.
    Rows go in chunks of about CHUNK_ELEMS weights, so only a chunk is ever held in fp32."""
    if weight.dim() != 2:
        raise MimoError(f"expected a 2-d weight, got shape {tuple(weight.shape)}")
    rows, k = weight.shape
    _check_in_features(k)
    out = torch.empty(rows, k // QK, BLOCK_BYTES[fmt], dtype=torch.uint8, device=weight.device)
    use_kernel = weight.device.type == "cpu" and kernels.available()
    step = max(1, CHUNK_ELEMS // k)
    with torch.no_grad():
        for r0 in range(0, rows, step):
            w = weight[r0: r0 + step].detach().to(torch.float32).contiguous()
            if use_kernel:
                kernels.quantize(fmt, w, out[r0: r0 + step])
            else:
                out[r0: r0 + step] = _quantize_torch(w, fmt)
    return out


def _dequantize_torch(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """blocks [rows, nb, bytes] -> float32 [rows, nb * 32]."""
    rows, nb, _ = blocks.shape
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # [rows, nb, 1]
    if fmt == "q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
    else:
        qs = blocks[..., 2:]
        q = torch.cat([qs & 15, qs >> 4], -1).float() - 8
    return (d * q).view(rows, nb * QK)


def dequantize_blocks(blocks: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 blocks [out, in / 32, bytes] -> the weight [out, in] they stand for."""
    rows, nb, _ = blocks.shape
    if blocks.device.type == "cpu" and kernels.available():
        w = kernels.dequantize(fmt, blocks, 0, rows, nb * QK, torch.empty(rows, nb * QK))
    else:
        w = _dequantize_torch(blocks, fmt)
    return w.to(dtype)


# ---- the products ------------------------------------------------------------------------------------------------

def _round_activations(x: torch.Tensor) -> torch.Tensor:
    """x [m, k] float32 -> the values the kernel multiplies with: each block of 32 quantized to int8 with the scale
    amax / 127 (round half to even), as gemv.c's quantize_act_row."""
    m, k = x.shape
    b = x.reshape(m, k // QK, QK)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax == 0, torch.zeros_like(amax), torch.div(torch.full_like(amax, 127.0), amax))
    return (torch.round(b * inv) * (amax / 127)).view(m, k)


def _weight_rows(fmt: str, weight: torch.Tensor, r0: int, r1: int, k: int, buf: torch.Tensor | None) -> torch.Tensor:
    """Rows [r0, r1) of the weight in float32 (blocks or a bf16 [n, k] weight)."""
    if buf is not None:
        return kernels.dequantize(fmt, weight, r0, r1, k, buf[: r1 - r0])
    if fmt == "q4_0x8":
        raise MimoError("Q4_0 weights tiled by 8 rows need mimo's kernels")
    if fmt == "bf16":
        return weight[r0:r1].float()
    return _dequantize_torch(weight[r0:r1], fmt)


def _chunked_linear(fmt: str, x: torch.Tensor, weight: torch.Tensor, n: int, k: int, use_kernel: bool) -> torch.Tensor:
    """x [m, k] @ W.T in x's dtype (float32, or bfloat16: native bf16 GEMM), W dequantized CHUNK_ELEMS weights at a
    time (never all of a big one)."""
    step = max(1, CHUNK_ELEMS // k)
    buf = torch.empty(min(step, n), k) if use_kernel else None
    if n <= step:
        return torch.mm(x, _weight_rows(fmt, weight, 0, n, k, buf).to(x.dtype).t())
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        torch.mm(x, _weight_rows(fmt, weight, r0, r1, k, buf).to(x.dtype).t(), out=y[:, r0:r1])
    return y


_FMT = kernels.FORMATS
_KERNEL_DTYPES = kernels.DTYPES  # activation dtypes the kernels take (fp32, bf16, fp16) -> their codes


def _linear(fmt: str, x: torch.Tensor, weight: torch.Tensor, in_features: int, bias: torch.Tensor | None):
    """y = x @ W.T + bias for W in format fmt ("q8_0" / "q4_0" blocks [n, k / 32, bytes], or "bf16" [n, k]);
    x [..., k] (fp32, bf16 or fp16: the kernels take each; other dtypes go through fp32); y in x's dtype."""
    n, k = weight.shape[0], in_features
    lib = kernels.library()
    if (x.dtype == torch.bfloat16 and x.is_cpu and weight.is_cpu and x.numel() >= BF16_GEMM_MIN_ROWS[fmt] * k
            and kernels.native_bf16()):  # prefill of a bf16 model on a CPU with bf16 products
        if fmt == "bf16":
            return F.linear(x, weight, bias)
        y = _chunked_linear(fmt, x.reshape(-1, k), weight, n, k, lib is not None)
        if bias is not None:
            y += bias.to(y.dtype)
        return y.view(*x.shape[:-1], n)
    if lib is not None and x.is_cpu and weight.is_cpu:
        m = x.numel() // k
        xdt = _KERNEL_DTYPES.get(x.dtype)
        if m <= (GEMV_MAX_ROWS[fmt] if kernels.SIMD else PORTABLE_MAX_ROWS) and xdt is not None and m:  # fast path
            if not x.is_contiguous():
                x = x.contiguous()
            out = x.new_empty((*x.shape[:-1], n))
            bdt = -1 if bias is None else _KERNEL_DTYPES.get(bias.dtype, -1)
            rc = lib.mimo_gemv(_FMT[fmt], weight.data_ptr(), n, k, x.data_ptr(), xdt, m, out.data_ptr(), xdt,
                               None if bdt < 0 else bias.data_ptr(), bdt, kernels.threads())
            if rc:
                raise RuntimeError(f"mimo_gemv failed ({rc})")
            if bias is not None and bdt < 0:
                out += bias.to(x.dtype)
            return out
    elif fmt == "bf16":
        return F.linear(x, weight, bias)
    use_kernel = lib is not None and x.is_cpu and weight.is_cpu
    shape = x.shape[:-1]
    xf = x.reshape(-1, k).float()
    if xf.shape[0] <= (GEMV_MAX_ROWS[fmt] if lib is None or kernels.SIMD else PORTABLE_MAX_ROWS) and fmt != "bf16":
        xf = _round_activations(xf)  # what the kernel computes
    y = _chunked_linear(fmt, xf, weight, n, k, use_kernel)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*shape, n)


@torch.library.custom_op("mimo::q8_0_linear", mutates_args=())
def q8_0_linear(x: torch.Tensor, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear("q8_0", x, blocks, in_features, bias)


@torch.library.custom_op("mimo::q4_0_linear", mutates_args=())
def q4_0_linear(x: torch.Tensor, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear("q4_0", x, blocks, in_features, bias)


@torch.library.custom_op("mimo::q4_0x8_linear", mutates_args=())
def q4_0x8_linear(x: torch.Tensor, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear("q4_0x8", x, blocks, in_features, bias)


@torch.library.custom_op("mimo::bf16_linear", mutates_args=())
def _bf16_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear("bf16", x, weight, weight.shape[1], bias)


def _fake(x, blocks, in_features, bias):
    return x.new_empty(*x.shape[:-1], blocks.shape[0])


q8_0_linear.register_fake(_fake)
q4_0_linear.register_fake(_fake)
q4_0x8_linear.register_fake(_fake)
_bf16_linear_op.register_fake(lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))

_OPS = {"q8_0": q8_0_linear, "q4_0": q4_0_linear, "q4_0x8": q4_0x8_linear}


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a bf16 weight [n, k] on the CPU: few rows through the bf16 GEMV kernel (fp32
    accumulation; x fp32 or bf16, y in x's dtype), many through fp32 GEMM on chunks converted to fp32 (oneDNN's bf16
    GEMM is slow without AVX-512 BF16), or, bf16 rows on a CPU with it, oneDNN's (BF16_GEMM_MIN_ROWS). Anything
    else is F.linear."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _bf16_linear_op(x, weight, bias)
    return _linear("bf16", x, weight, weight.shape[1], bias)


class _FrozenBlockLinear(torch.autograd.Function):
    """y = x @ W.T + bias with W in blocks, differentiable w.r.t. x only (the weights stay frozen: LoRA on top of a
    quantized base, QLoRA): grad_x = grad_y @ W, W dequantized CHUNK_ELEMS weights at a time."""

    @staticmethod
    def forward(ctx, x, blocks, fmt: str, in_features: int, bias):
        ctx.save_for_backward(blocks)
        ctx.fmt, ctx.in_features = fmt, in_features
        return _linear(fmt, x, blocks, in_features, bias)

    @staticmethod
    def backward(ctx, grad_y):
        (blocks,) = ctx.saved_tensors
        n, k = blocks.shape[0], ctx.in_features
        g = grad_y.reshape(-1, n).float()  # [m, n]
        grad_x = torch.zeros(g.shape[0], k, device=g.device)
        use_kernel = blocks.is_cpu and kernels.available()
        step = max(1, CHUNK_ELEMS // k)
        buf = torch.empty(min(step, n), k) if use_kernel else None
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            grad_x.addmm_(g[:, r0:r1], _weight_rows(ctx.fmt, blocks, r0, r1, k, buf))  # [m, rows] @ [rows, k]
        return grad_x.to(grad_y.dtype).view(*grad_y.shape[:-1], k), None, None, None, None


# ---- the modules -------------------------------------------------------------------------------------------------

class _BlockLinear(nn.Module):
    """y = x @ W.T + bias with W in GGML blocks: buffer `blocks` uint8 [out_features, in_features / 32, bytes], in
    rows (fmt == FORMAT), or an Int4Linear's tiled by 8 rows on CPUs with the AVX-512 tiles (fmt "q4_0x8")."""

    FORMAT = ""

    def __init__(self, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        _check_in_features(in_features)
        nb, nbytes = in_features // QK, BLOCK_BYTES[self.FORMAT]
        if blocks.dtype != torch.uint8 or blocks.numel() % (nb * nbytes):
            raise MimoError(f"{self.FORMAT} blocks for in_features={in_features} must be uint8 with a multiple of "
                            f"{nb * nbytes} bytes, got {blocks.dtype} {tuple(blocks.shape)}")
        blocks = blocks.reshape(-1, nb, nbytes).contiguous()
        self.out_features, self.in_features = blocks.shape[0], in_features
        if bias is not None and bias.shape != (self.out_features,):
            raise MimoError(f"bias of shape {tuple(bias.shape)} for {self.out_features} outputs")
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.fmt = self.FORMAT
        self._tile()

    def _tile(self):
        """Rows -> tiles of 8 rows, where the kernels run them (see the module docstring)."""
        if (self.fmt == "q4_0" and self.blocks.is_cpu and self.out_features % 8 == 0 and self.out_features
                and kernels.tiles_q4_0()):
            self.blocks, self.fmt = kernels.tile_q4_0(self.blocks), "q4_0x8"

    def _untile(self):
        if self.fmt == "q4_0x8":
            self.blocks, self.fmt = kernels.tile_q4_0(self.blocks, untile=True), self.FORMAT

    def row_blocks(self) -> torch.Tensor:
        """The blocks in GGML's layout (rows one after another), whatever the layout kept."""
        return kernels.tile_q4_0(self.blocks, untile=True) if self.fmt == "q4_0x8" else self.blocks

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.fmt != self.FORMAT:
            destination[prefix + "blocks"] = self.row_blocks()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        given = state_dict.get(prefix + "blocks")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if given is not None and given.shape == self.blocks.shape:  # GGML's rows, copied or assigned
            self.fmt = self.FORMAT
            self._tile()

    def _apply(self, fn, recurse=True):
        if self.fmt != self.FORMAT and fn(self.blocks[:0]).device.type != "cpu":  # where fn sends it (no copy)
            self._untile()  # the tiles run on mimo's CPU kernels only
        return super()._apply(fn, recurse)

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None = None):
        """The module for GGML bytes as they are (e.g. a GGUF tensor's data: any shape, rows one after another)."""
        return cls(torch.as_tensor(blocks), in_features, bias)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """Quantize a weight [out, in] in any float dtype (e.g. bf16 as stored), a chunk of rows at a time."""
        return cls(quantize_blocks(weight, cls.FORMAT), weight.shape[1],
                   None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        return cls.from_weight(linear.weight, linear.bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] the blocks stand for."""
        return dequantize_blocks(self.blocks, self.fmt, dtype)

    def forward(self, x):
        blocks = self._buffers["blocks"]
        if torch.compiler.is_compiling():
            return _OPS[self.fmt](x, blocks, self.in_features, self.bias)
        if x.requires_grad and torch.is_grad_enabled():  # a gradient through the frozen weights (QLoRA)
            return _FrozenBlockLinear.apply(x, blocks, self.fmt, self.in_features, self.bias)
        return _linear(self.fmt, x, blocks, self.in_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, "
                f"bias={self.bias is not None}")


class Int8Linear(_BlockLinear):
    """GGML Q8_0: blocks of 32 weights, an fp16 scale d and 32 int8 q (34 bytes); w = d * q."""

    FORMAT = "q8_0"


class Int4Linear(_BlockLinear):
    """GGML Q4_0: blocks of 32 weights, an fp16 scale d and 16 bytes of nibbles (18 bytes); w = d * (q - 8)."""

    FORMAT = "q4_0"


QUANTIZED_LINEAR = {"int8": Int8Linear, "int4": Int4Linear}


def check_method(method: str):
    if method not in QUANTIZED_LINEAR:
        raise MimoError(f"unknown quantization {method!r} (choose from {', '.join(QUANTIZED_LINEAR)})")


def quantized_bytes(shape, method: str) -> int:
    """Bytes of an [out, in] weight quantized by method (in a multiple of the block size)."""
    return shape[0] * (shape[1] // QK) * BLOCK_BYTES[QUANTIZED_LINEAR[method].FORMAT]


@torch.no_grad()
def _swap_linears(module: nn.Module, method: str) -> nn.Module:
    """Replace every nn.Linear in module (or module itself) whose in_features is a multiple of 32 by
    QUANTIZED_LINEAR[method]; others stay as they are (with a warning)."""
    cls = QUANTIZED_LINEAR[method]

    def swap(linear):
        if linear.in_features % QK:
            warnings.warn(f"a linear with in_features={linear.in_features} (not a multiple of {QK}) stays unquantized",
                          stacklevel=4)
            return linear
        return cls.from_linear(linear)

    if isinstance(module, nn.Linear):
        return swap(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, swap(child))
    return module


def quantize_linears(model: MiMoForCausalLM, method: str) -> MiMoForCausalLM:
    """Swap every nn.Linear of the model for QUANTIZED_LINEAR[method], in place; returns the model (for inference
    only). Everything else keeps its dtype (a bf16 model stays bf16: the kernels take bf16 activations)."""
    check_method(method)
    return _swap_linears(model, method).eval()


def quantized_copy(module: nn.Module, method: str) -> nn.Module:
    """A copy of module (an nn.Linear or a module holding some) whose linears are quantized; every other
    parameter and buffer is shared with the original, not copied. The engine drafts with such copies of the
    MTP layers and the LM head (--draft-quantize)."""
    check_method(method)
    if not any(isinstance(m, nn.Linear) for m in module.modules()):
        return module  # already quantized
    shared = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return _swap_linears(copy.deepcopy(module, shared), method).eval()


def first_rows(linear: nn.Module, n: int) -> nn.Module:
    """A module computing outputs [0, n) of linear (an nn.Linear or a block-quantized one) alone, its weight a view
    of the first n rows of linear's (no copy; n a multiple of 8, whole tiles of a q4_0x8 layout). MTP drafts
    pick among the first ids of the vocabulary through such a head (Engine's draft_vocab)."""
    if n % 8 or not 0 < n <= linear.out_features:
        raise MimoError(f"the first {n} rows of a linear with {linear.out_features} outputs: need a multiple of 8")
    bias = None if linear.bias is None else linear.bias[:n]
    if isinstance(linear, _BlockLinear):  # in rows, or tiled by 8 rows: either way the first n rows lead
        part = copy.copy(linear)
        part._parameters, part._buffers = dict(linear._parameters), dict(linear._buffers)
        part._buffers["blocks"] = linear.blocks[:n]
        part.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        part.out_features = n
        return part
    if not isinstance(linear, nn.Linear):
        raise MimoError(f"cannot take rows of a {type(linear).__name__}")
    part = nn.Linear(linear.in_features, n, bias=bias is not None, device="meta")
    part.weight = nn.Parameter(linear.weight[:n], requires_grad=False)
    if bias is not None:
        part.bias = nn.Parameter(bias, requires_grad=False)
    return part.eval()


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
