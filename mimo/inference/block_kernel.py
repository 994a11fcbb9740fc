"""ModelRunner's decoder blocks for a few new tokens a row in one C call (mimo/kernels/block.c): decode steps,
MTP's drafts and verify passes. Between its products (mimo's kernels, as before) a block does ~30 small torch ops
(norms, RoPE, cache writes, attention, SiLU, adds) that cost more to dispatch than to compute: at MiMo-7B's 36
blocks ~8 ms of a 135 ms int4 decode step on 2 cores; block.c does the same math in ~1.

Taken when mimo's kernels compute every product of every block (Q8_0 / Q4_0 modules, or bf16 weights on the
CPU), activations are fp32 or bf16, no LoRA adapters are stacked, and the pass is small (at most MAX_TOKENS new
tokens a row and MAX_ROWS rows in all, and below the row count where bf16 products go to oneDNN's GEMM);
otherwise ModelRunner._block, its torch twin, runs (tests check the two against each other).

Small models take larger passes: torch's ~30 ops a block cost about as much at any width (each op an OpenMP
wake-up, ~60 us on 2 threads), while the kernels' products lose to oneDNN's GEMM only as rows x weights grow. So a
pass (decode or prefill) goes to block.c while its rows x tokens x a block's weights stay within
SMALL_PASS_ROW_WEIGHTS, whatever the caps above:
the tiny speedrun model (1.6M weights a block) in bf16 decodes 128 rows at 5,068 against 3,234 tokens/s through
torch and oneDNN, 256 rows at 5,432 against 3,571; the small preset (6M) 128 rows at 999 against 726; MiMo-7B's
blocks (218M) keep the caps (docs/benchmarks.md, "RL against a peer").
"""

from __future__ import annotations

import ctypes

import torch

from mimo import kernels
from mimo.quantize import BF16_GEMM_MIN_ROWS, PORTABLE_MAX_ROWS, Int4Linear, Int8Linear


def _linear_args(linear, keep: list) -> tuple[kernels.LinearArgs, str] | None:
    """A product for block.c, with its weight's format; None where the kernels cannot compute it."""
    if isinstance(linear, (Int8Linear, Int4Linear)):
        w, fmt, n, k = linear.blocks, linear.fmt, linear.out_features, linear.in_features
    elif (type(linear) is torch.nn.Linear and linear.weight.dtype == torch.bfloat16
          and linear.weight.device.type == "cpu"):
        w, fmt, (n, k) = linear.weight.detach(), "bf16", linear.weight.shape
    else:
        return None
    bias = linear.bias
    if not w.is_contiguous() or (bias is not None and (bias.dtype not in kernels.DTYPES or not bias.is_contiguous())):
        return None
    keep.extend(t for t in (w, bias) if t is not None)
    return kernels.LinearArgs(w.data_ptr(), None if bias is None else bias.data_ptr(), n, k,
                              kernels.FORMATS[fmt], -1 if bias is None else kernels.DTYPES[bias.dtype]), fmt


class BlockKernel:
    MAX_TOKENS = 8  # new tokens a row (a decode step 1, MTP's verify pass drafts + 1)
    MAX_ROWS = 64  # rows x tokens of a pass
    SMALL_PASS_ROW_WEIGHTS = 1 << 29  # rows x tokens x a block's product weights of a pass taken whatever the caps

    def __init__(self, blocks: ctypes.Array, keep: list, max_rows: int, small_pass_rows: int, runner):
        self.blocks, self.keep, self.max_rows, self.small_pass_rows = blocks, keep, max_rows, small_pass_rows
        cfg = runner.cfg
        self.dt = kernels.DTYPES[runner.dtype]
        self.cos, self.sin = runner.cos, runner.sin
        self.shape = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                      runner.capacity, cfg.intermediate_size)
        self.eps = cfg.rms_norm_eps

    @classmethod
    def of(cls, runner) -> BlockKernel | None:
        """The runner's main and MTP blocks (cache indices 0..L+K-1) for block.c, or None where it cannot run
        them all (see the module docstring)."""
        if (runner.device.type != "cpu" or runner.dtype not in (torch.float32, torch.bfloat16)
                or runner.adapters is not None or not kernels.available()):
            return None
        layers = list(runner.model.model.layers) + list(runner.mtp_layers)
        keep, args, formats, block_weights = [runner.cos, runner.sin], [], set(), 1
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, layer.mlp
            linears = [_linear_args(lin, keep) for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj,
                                                           m.up_proj, m.down_proj)]
            norms = [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
            if any(lin is None for lin in linears) or any(w.dtype != runner.dtype or not w.is_contiguous()
                                                           for w in norms):
                return None
            formats.update(fmt for _, fmt in linears)
            block_weights = max(block_weights, sum(lin.n * lin.k for lin, _ in linears))
            kc, vc = runner.cache.k[i], runner.cache.v[i]
            keep.extend(norms)
            args.append(kernels.BlockArgs(*(lin for lin, _ in linears), norms[0].data_ptr(), norms[1].data_ptr(),
                                          kc.data_ptr(), vc.data_ptr()))
        max_rows = cls.MAX_ROWS if kernels.SIMD else PORTABLE_MAX_ROWS
        if runner.dtype == torch.bfloat16 and kernels.native_bf16():  # _linear hands these to oneDNN's GEMM
            max_rows = min([max_rows] + [BF16_GEMM_MIN_ROWS[f] - 1 for f in formats])
        small_pass_rows = cls.SMALL_PASS_ROW_WEIGHTS // block_weights if kernels.SIMD else 0
        return cls((kernels.BlockArgs * len(args))(*args), keep, max_rows, small_pass_rows, runner)

    def takes(self, rows: int, tokens: int) -> bool:
        n = rows * tokens
        return ((tokens <= self.MAX_TOKENS and n <= self.max_rows) or n <= self.small_pass_rows) \
            and not torch.compiler.is_compiling()

    def run(self, x: torch.Tensor, ctx, first: int, count: int) -> torch.Tensor:
        """x [b, T, H] (a fresh contiguous tensor: updated in place) through blocks first..first+count-1 at
        ctx.positions (ctx.slots' cache slots, or 0..b-1)."""
        b, T, _ = x.shape
        positions = ctx.positions.contiguous()
        slots = None if ctx.slots is None else ctx.slots.to(torch.int64).contiguous()
        step = kernels.StepArgs(positions.data_ptr(), None if slots is None else slots.data_ptr(),
                                self.cos.data_ptr(), self.sin.data_ptr(), b, T, *self.shape, self.eps, self.dt,
                                kernels.threads())
        return kernels.blocks_step(self.blocks, first, count, step, x)
