"""The model's forward pass for inference: a static KV cache with one slot per row, RoPE tables, decoder blocks
in few tensor ops per token (or, for small passes of a model whose products are mimo's kernels, in one C call:
block_kernel.py), optional torch.compile of small-batch steps and MKL-packed weights for full batches. mimo/inference/engine.py's sessions and mimo/inference/speculative.py's draft-verify steps run on a ModelRunner.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mimo.inference.block_kernel import BlockKernel
from mimo.inference.lora import AdapterSelection, LoRALinear
from mimo.inference.sampling import SamplingFlags
from mimo.model import KVCache, MiMoForCausalLM, mtp_embeds


@dataclass
class RunContext:
    """What every layer of one forward pass shares."""
    cos: torch.Tensor  # [b, 1, T, D]
    sin: torch.Tensor  # [b, 1, T, D], rotate_half's sign folded in
    positions: torch.Tensor  # [b, T]
    rows: torch.Tensor  # [b * Hkv * T] rows of the cache of slots 0..b-1 seen as [b * Hkv * capacity, D] that
    # the keys/values of the pass go to (slots None)
    slots: torch.Tensor | None  # [b] cache slots; None: slots 0..b-1 (used through views, no copies)
    kv_len: int  # attend over cache positions [0, kv_len)
    mask: torch.Tensor | None  # [b, 1, T, kv_len] additive float mask (None: nothing to mask)


class InferenceCompiled:
    """fn through torch.compile for decoding with weights that no longer change: inductor freezes the weights
    into the graph (constant folding, prepacked layouts) and autotunes every matmul, on CPU also against its C++
    GEMM templates (int8 weight-only decoding of a 125M model runs ~1.8x faster than on aten's kernel). Frozen
    graphs guard on the weights' identity, so another model recompiles, but in-place updates of the same
    weights are not seen: RL's engine stays eager.

    Dynamo reads inductor's freezing flag while it traces, before torch.compile's per-call options apply, so
    the settings are patched in around the calls that may trace: the first call of each argument signature
    (a few: batch sizes, sessions); later calls of a signature run the cached graph without the ~20 us patch.
    Inductor's FX graph cache stays off for these graphs: a cache hit restores the weights the C++ GEMM
    templates prepacked from the first model compiled with those shapes (the constants added during lowering
    are stored by value, pytorch/pytorch#143808), i.e. another model's weights; tests catch it."""

    def __init__(self, fn, device: torch.device):
        self.fn = torch.compile(fn, dynamic=False)
        self.options = {"freezing": True, "max_autotune": True, "fx_graph_cache": False,
                        "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # quiet stderr
        if device.type == "cpu":
            self.options["max_autotune_gemm_backends"] = "CPP,ATEN"
        self.signatures: set[tuple] = set()

    def __call__(self, *args):
        signature = tuple((a.dtype, *a.shape) if isinstance(a, torch.Tensor) else
                          a if isinstance(a, (int, float, str, bool, SamplingFlags)) else id(a) for a in args)
        if signature in self.signatures:
            return self.fn(*args)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(self.options):
            out = self.fn(*args)
        self.signatures.add(signature)
        return out


def mkl_packing_available(weight: torch.Tensor) -> bool:
    """Whether MKL's packed GEMM can run products with this weight (fp32 on a CPU build with MKL: x86)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()


def _fast(linear, pack_rows: tuple[int, ...] = ()):
    """module(x) without nn.Module.__call__'s overhead (several microseconds, on every linear of every token);
    bf16 weights on the CPU go through quantize.bf16_linear (mimo's kernels).

    pack_rows: input sizes (rows = batch x tokens) to keep an MKL-packed copy of an nn.Linear's weight for
    (mkl_packing_available): an input of exactly that many rows runs through MKL's packed GEMM, which picks its
    kernel for that size: at 16 rows 1.2-2.7x faster than F.linear on the tiny model's shapes and 1.45-1.9x on
    a 7B model's, less at 32-48 rows (bench/packed_linear.py). Same math; the copy does not see later in-place
    weight updates."""
    if isinstance(linear, LoRALinear):
        return _fast_lora(linear, pack_rows)
    if type(linear) is not torch.nn.Linear:
        return linear.forward  # e.g. quantize.Int8Linear
    w, b = linear.weight, linear.bias
    if w.dtype == torch.bfloat16 and w.device.type == "cpu":
        from mimo.quantize import bf16_linear  # mimo's GEMV; oneDNN's bf16 products are slow on most CPUs

        return functools.partial(bf16_linear, weight=w, bias=b)
    if not pack_rows:
        return functools.partial(F.linear, weight=w, bias=b)
    packed = {n: torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), n) for n in pack_rows}

    def packed_linear(x):
        n = x.numel() // x.shape[-1]
        p = packed.get(n)
        return F.linear(x, w, b) if p is None else torch.ops.mkl._mkl_linear(x, p, w, b, n)
    return packed_linear


def _fast_lora(lora: LoRALinear, pack_rows: tuple[int, ...]):
    """A LoRALinear's product: the base product as any other linear's, plus the update. Rows that pick among
    several stacked adapters (an AdapterSelection with a mask) in fp32 on the CPU take mimo's kernel
    (kernels.lora_add): each row adds only its own adapter's update, where the masked torch path
    (LoRALinear.add_update) pays for every stacked adapter on every row."""
    from mimo import kernels

    base, selection = _fast(lora.base, pack_rows), lora.selection
    a = lora.lora_A.detach()
    if not (selection is not None and a.dtype == torch.float32 and a.device.type == "cpu" and kernels.available()):
        return lambda x: lora.add_update(x, base(x))
    a = (a * lora.scaling if lora.scaling != 1.0 else a).contiguous()  # [R, in]
    bt = lora.lora_B.detach().t().contiguous()  # [R, out]

    def per_row_lora(x):
        y = base(x)
        if selection.mask is None or x.dtype != torch.float32:
            return lora.add_update(x, y)
        n = x.numel() // x.shape[-1]
        kernels.lora_add(x.reshape(n, -1).contiguous(), a, bt, selection.offsets, selection.ranks, y.view(n, -1))
        return y
    return per_row_lora


@dataclass
class _Block:
    """A decoder block's weights as ready-to-call pieces."""
    cache_index: int
    input_norm: torch.nn.Module
    q: Callable
    k: Callable
    v: Callable
    o: Callable
    post_norm: torch.nn.Module
    gate: Callable
    up: Callable
    down: Callable

    @classmethod
    def of(cls, layer, cache_index: int, pack_rows: tuple[int, ...] = ()) -> _Block:
        a, m = layer.self_attn, layer.mlp
        q, k, v, o, gate, up, down = (_fast(lin, pack_rows) for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                                                        m.gate_proj, m.up_proj, m.down_proj))
        return cls(cache_index, layer.input_layernorm, q, k, v, o, layer.post_attention_layernorm, gate, up, down)


def products_in_kernels(model: torch.nn.Module) -> bool:
    """Whether mimo's C kernels compute every linear product of the model's steps (quantized weights, or bf16
    weights on the CPU: _fast)."""
    from mimo import kernels
    from mimo.quantize import Int4Linear, Int8Linear

    if not kernels.available():
        return False
    return all(m.weight.dtype == torch.bfloat16 and m.weight.is_cpu for m in model.modules()
               if isinstance(m, torch.nn.Linear) and not isinstance(m, (Int8Linear, Int4Linear)))


class ModelRunner:
    """The model's forward pass for inference over a KV cache with one slot per row, in few tensor ops per token.

    The math is MiMoForCausalLM's (hidden_states, logits, mtp_step; tests check them against each other) on the
    model's own weights and modules, so a quantized model runs unchanged and in-place weight updates (RL) are
    seen by the eager steps. RoPE tables are precomputed for every position, norms are single ops, linears skip
    the module call, rows 0..b-1 use the cache through views. compile=True runs the plain decode step (and
    MTP's greedy draft-verify step, speculative.py) through torch.compile for small batches (compiled_rows:
    static shapes, attention over the whole cache, weights frozen in: InferenceCompiled). drafter: the MTP
    layers and LM head that draft (Engine.drafter). pack_rows: the input sizes to keep MKL-packed weights for
    (_fast; Engine.pack_rows). adapters: the LoRA adapters stacked on the model (mimo/inference/lora.py); slot_adapter [n_slots]
    says which one each slot's row uses, and every main-model pass selects its rows' adapters from it.
    """

    def __init__(self, model: MiMoForCausalLM, n_slots: int, capacity: int, compile: bool = False,
                 drafter: tuple[list[torch.nn.Module], torch.nn.Module] | None = None,
                 pack_rows: tuple[int, ...] = (), adapters: AdapterSelection | None = None):
        cfg = model.config
        self.model, self.cfg, self.capacity, self.n_slots = model, cfg, capacity, n_slots
        self.pack_rows = pack_rows
        self.adapters = adapters
        self.slot_adapter = torch.full((n_slots,), adapters.base_index if adapters else 0, dtype=torch.long,
                                       device=model.model.embed_tokens.weight.device)
        self.embed = model.model.embed_tokens.weight
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.cache = KVCache(cfg, n_slots, capacity, self.dtype, self.device)
        D = cfg.head_dim
        idx = torch.arange(0, D, 2, dtype=torch.int64, device=self.device).float()
        inv_freq = 1.0 / (cfg.rope_theta ** (idx / D))  # exactly model.rope_cos_sin's
        freqs = torch.arange(capacity, device=self.device)[:, None].float() * inv_freq  # [cap, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos = angles.cos().to(self.dtype)  # [cap, D]
        sin = angles.sin().to(self.dtype)
        self.sin = torch.cat((-sin[:, : D // 2], sin[:, D // 2:]), dim=-1)  # x*cos + roll(x)*sin = apply_rope
        self.key_positions = torch.arange(capacity, device=self.device)
        self.gqa = cfg.num_attention_heads != cfg.num_key_value_heads
        L = cfg.num_hidden_layers
        self.blocks = [_Block.of(layer, i, pack_rows) for i, layer in enumerate(model.model.layers)]
        self.lm_head = _fast(model.lm_head, pack_rows)
        self.mtp_layers, draft_head = drafter or (list(model.model.mtp_layers), model.lm_head)
        self.mtp_blocks = [_Block.of(layer, L + k, pack_rows) for k, layer in enumerate(self.mtp_layers)]
        self.draft_head = self.lm_head if draft_head is model.lm_head else _fast(draft_head, pack_rows)
        self.compiled_decode = InferenceCompiled(self._decode_all, self.device) if compile else None
        self.kernel_products = self.device.type == "cpu" and products_in_kernels(model)
        self.block_kernel = BlockKernel.of(self) if self.kernel_products else None  # small passes' blocks in C

    # A step runs torch's own ops on one thread (kernels.torch_ops_single_threaded) when mimo's kernels compute
    # every product and the step is small: up to this many cached positions (beyond, attention over the cache is
    # worth the second thread) and this many new tokens (a short prompt's prefill; a long one's activations are).
    SINGLE_THREAD_MAX_KV = 1024
    SINGLE_THREAD_MAX_TOKENS = 64

    def step_threads(self, kv_len: int, tokens: int = 1):
        """The threads a step of `tokens` new tokens over kv_len cached positions runs with (see above; at 7B, 2
        threads, int4: 166 against 254 ms a decode step, docs/benchmarks.md)."""
        from mimo import kernels

        if self.kernel_products and kv_len <= self.SINGLE_THREAD_MAX_KV and tokens <= self.SINGLE_THREAD_MAX_TOKENS:
            return kernels.torch_ops_single_threaded()
        return contextlib.nullcontext()

    def context(self, positions, slots=None, kv_len: int | None = None, mask: bool = True) -> RunContext:
        """positions [b, T] (absolute); kv_len: any bound >= max(positions) + 1 (a host int: no sync).
        mask=False: every row attends to all of [0, kv_len) (one query per row, at position kv_len - 1)."""
        b = positions.shape[0]
        kv_len = self.capacity if kv_len is None else min(kv_len, self.capacity)
        additive = None
        if mask:
            visible = self.key_positions[:kv_len] <= positions[..., None]  # [b, T, kv_len]
            additive = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~visible, float("-inf"))[:, None]
        rows = None
        if slots is None:
            Hkv = self.cfg.num_key_value_heads
            head = torch.arange(b * Hkv, device=self.device).view(b, Hkv, 1)  # slot * Hkv + head
            rows = (head * self.capacity + positions[:, None, :]).view(-1)  # [b * Hkv * T]
        return RunContext(self.cos[positions][:, None], self.sin[positions][:, None], positions, rows, slots,
                          kv_len, additive)

    def _norm(self, x, norm):
        if x.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
        return norm(x)  # bf16: normalise in fp32, scale in bf16, as the model does

    def _kv(self, i: int, k, v, ctx: RunContext):
        """Write k, v [b, Hkv, T, D] at ctx.positions of layer i's cache; return the keys/values to attend over."""
        kc, vc = self.cache.k[i], self.cache.v[i]
        if ctx.slots is None:  # an index_copy_ of rows: 5-1000x faster than scatter_ (bf16 worst), same result
            b, D = k.shape[0], k.shape[-1]
            kc, vc = kc[:b], vc[:b]
            kc.view(-1, D).index_copy_(0, ctx.rows, k.reshape(-1, D))
            vc.view(-1, D).index_copy_(0, ctx.rows, v.reshape(-1, D))
            return kc[:, :, : ctx.kv_len], vc[:, :, : ctx.kv_len]
        rows = ctx.slots[:, None]
        kc[rows, :, ctx.positions] = k.transpose(1, 2)  # advanced index -> [b, T, Hkv, D]
        vc[rows, :, ctx.positions] = v.transpose(1, 2)
        return kc[:, :, : ctx.kv_len].index_select(0, ctx.slots), vc[:, :, : ctx.kv_len].index_select(0, ctx.slots)

    # Decode steps of at most this many tokens compute a bf16/fp16 model's attention in fp32 on the CPU.
    FP32_ATTENTION_MAX_TOKENS = 8

    def _attention(self, q, keys, values, mask):
        """Attention of q [b, Hq, T, D] over keys/values [b, Hkv, S, D] (mask [b, 1, T, S] additive or None) ->
        [b, Hq, T, D]. A few queries of a bf16/fp16 model on the CPU are computed in fp32 with two matmuls: torch's
        half-precision CPU attention is slow without bf16 instructions (a 7B layer, one query on 2 threads of
        this Zen 3: 240 against 81 us over 32 cached positions, 17.7 against 1.8 ms over 2,048)."""
        b, Hq, T, D = q.shape
        if q.dtype == torch.float32 or q.device.type != "cpu" or T > self.FP32_ATTENTION_MAX_TOKENS:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.gqa)
        Hkv, S = keys.shape[1], keys.shape[2]
        G = Hq // Hkv  # query heads per key/value head: head h reads kv head h // G (enable_gqa's grouping)
        scores = q.float().reshape(b, Hkv, G * T, D) @ keys.float().transpose(-1, -2)  # [b, Hkv, G*T, S]
        scores = scores.mul_(D ** -0.5).view(b, Hkv, G, T, S)
        if mask is not None:
            scores += mask[:, :, None]  # [b, 1, 1, T, S]
        probs = scores.softmax(-1).view(b, Hkv, G * T, S)
        return (probs @ values.float()).to(q.dtype).view(b, Hq, T, D)

    def _block(self, blk: _Block, x, ctx: RunContext):
        """One decoder block (DecoderLayer.forward). x [b, T, H] -> [b, T, H]."""
        b, T, _ = x.shape
        D = self.cfg.head_dim
        h = self._norm(x, blk.input_norm)
        q = blk.q(h).view(b, T, -1, D).transpose(1, 2)  # [b, Hq, T, D]
        k = blk.k(h).view(b, T, -1, D).transpose(1, 2)  # [b, Hkv, T, D]
        v = blk.v(h).view(b, T, -1, D).transpose(1, 2)
        q = torch.addcmul(q * ctx.cos, q.roll(D // 2, -1), ctx.sin)
        k = torch.addcmul(k * ctx.cos, k.roll(D // 2, -1), ctx.sin)
        keys, values = self._kv(blk.cache_index, k, v, ctx)
        y = self._attention(q, keys, values, ctx.mask)
        x = x + blk.o(y.transpose(1, 2).reshape(b, T, -1))
        h = self._norm(x, blk.post_norm)
        return x + blk.down(F.silu(blk.gate(h)) * blk.up(h))

    def _blocks(self, blocks: list[_Block], x, ctx: RunContext):
        """x [b, T, H] (a fresh tensor) through consecutive blocks: in one C call where block_kernel takes the
        pass, else block by block."""
        if self.block_kernel is not None and self.block_kernel.takes(x.shape[0], x.shape[1]):
            return self.block_kernel.run(x, ctx, blocks[0].cache_index, len(blocks))
        for blk in blocks:
            x = self._block(blk, x, ctx)
        return x

    def copy_prefix(self, src, dst, length: int):
        """Copy the main layers' cached keys/values at positions [0, length) from slots src [n] to slots dst [n]."""
        for i in range(self.cfg.num_hidden_layers):
            for c in (self.cache.k[i], self.cache.v[i]):
                c[dst, :, :length] = c[src, :, :length]

    def hidden(self, ids, ctx: RunContext):
        """ids [b, T] -> the main model's final hidden state before model.norm [b, T, H]."""
        if self.adapters is not None:
            self.adapters.select(self.slot_adapter[: ids.shape[0]] if ctx.slots is None else
                                 self.slot_adapter[ctx.slots])
        return self._blocks(self.blocks, F.embedding(ids, self.embed), ctx)

    def logits(self, hidden):
        """hidden [..., H] (before model.norm) -> logits [..., V]."""
        return self.lm_head(self._norm(hidden, self.model.model.norm))

    def mtp(self, k: int, hidden_prev, next_ids, ctx: RunContext):
        """MTP layer k on h_prev [b, T, H] and tokens x[t+k+1] [b, T] at positions t -> z [b, T, H]."""
        layer = self.mtp_layers[k]
        e = mtp_embeds(F.embedding(next_ids, self.embed), ctx.positions)
        z = layer.input_proj(torch.cat([self._norm(hidden_prev, layer.hidden_layernorm),
                                        self._norm(e, layer.token_layernorm)], dim=-1))
        return self._blocks([self.mtp_blocks[k]], z, ctx)

    def mtp_logits(self, k: int, z):
        """A draft's logits: z [..., H] of MTP layer k -> [..., V] (through the drafter's LM head)."""
        return self.draft_head(self._norm(z, self.mtp_layers[k].final_layernorm))

    # Compiled steps beat eager ones at 1-2 rows and lose from 4 on (tiny model, 2 cores: 542 vs 489 tokens/s
    # at batch 1, 1,235 vs 1,376 at 4, 1,224 vs 2,062 at 8), so bigger batches run eagerly.
    COMPILED_MAX_ROWS = 2

    def compiled_rows(self, m: int) -> int:
        """How many rows a compiled step runs for rows 0..m-1: the next power of two (a graph per size), at most
        every slot; the extra rows are free slots computing garbage nobody reads. 0: run eagerly."""
        if self.compiled_decode is None or m > self.COMPILED_MAX_ROWS:
            return 0
        return min(self.n_slots, 1 << (m - 1).bit_length())

    def rows_to_run(self, m: int) -> int:
        """How many rows a step runs when rows 0..m-1 hold the live ones: every slot when the weights are packed
        for a full batch and m is within a quarter of it (the free slots compute garbage nobody reads, at the
        packed products' speed), else m."""
        return self.n_slots if self.n_slots in self.pack_rows and 4 * m > 3 * self.n_slots else m

    def _decode_all(self, ids, positions):
        """One token for rows 0..b-1: ids, positions [b, 1] -> logits [b, V] (static shapes: the whole cache)."""
        return self.logits(self.hidden(ids, self.context(positions))[:, 0])

    def decode(self, ids, positions, kv_len: int, slots=None):
        """One token for rows 0..b-1 (or for cache slots `slots` [b]): ids, positions [b, 1] -> logits [b, V]."""
        b = ids.shape[0]
        n = self.compiled_rows(b) if slots is None else 0
        if n:
            if b < n:  # free slots fill the compiled batch (attending to position 0 only)
                pad = ids.new_zeros(n - b, 1)
                ids, positions = torch.cat([ids, pad]), torch.cat([positions, pad])
            return self.compiled_decode(ids, positions)[:b]
        ctx = self.context(positions, slots, kv_len, mask=b > 1)
        return self.logits(self.hidden(ids, ctx)[:, 0])
