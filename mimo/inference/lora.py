"""LoRA (Hu et al. 2021) bolted onto a plain MiMoForCausalLM from outside, as quantization is: chosen linears of
the main model (nn.Linear, or quantize.Int8Linear / Int4Linear: QLoRA, the update on top of the quantized base)
become LoRALinear, which keeps the frozen base product and adds the low-rank update

    y = base(x) + (dropout(x) @ A.T) * scaling @ B.T          A [r, in], B [out, r], scaling = alpha / r

One LoRALinear holds one adapter (`mimo tune`, `--adapter DIR`) or several stacked along the rank dimension
(`mimo serve --adapter NAME=DIR ...`): adapter a owns rank slots [offset_a, offset_a + r_a) of A [R, in] and
B [out, R] in every layer, its scaling folded into its rows of A. An AdapterSelection, shared by all of a model's
LoRA linears, holds which adapter each row of the next forward pass uses, as a mask [b, 1, R] (1 on the row's
slots, 0 elsewhere; all 0 for the base model) and as each row's slots (offsets, ranks): the base product is shared
by every row, so requests for different adapters decode in one batch (vLLM's multi-LoRA). The model's own forward
adds the update as two thin GEMMs over all stacked adapters, masked; the engine (model_runner._fast_lora) has each
row add only its own adapter's update in mimo's kernel (kernels/lora.c, punica's BGMV idea), 8x less arithmetic
with 8 adapters. The MTP layers stay un-adapted: they only draft, and the adapted main model verifies every
draft, so speculation stays lossless.

An adapter may also carry a whole LM head of its own (`mimo tune --train-head`; PEFT's modules_to_save
["lm_head"]): the head replaces the base's where that adapter is the whole model (generate, chat, merge), not in a
stack of adapters, whose rows share one head.

Adapters on disk are PEFT's (mimo/inference/adapters.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from mimo.errors import MimoError
from mimo.model import MiMoForCausalLM

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass
class LoRAConfig:
    r: int = 16  # rank of each update
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the update's input while tuning (PEFT's default; 0.05 cost mimo tune a
    # quarter of its time on the tiny model, for fewer facts learnt: docs/benchmarks.md, "Personal models")
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # projections of every main-model layer that get an update

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def validate(self, model: MiMoForCausalLM):
        if self.r < 1:
            raise MimoError(f"--rank must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MimoError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise MimoError("--target-modules names no module")
        if unknown := [t for t in self.target_modules if t not in PARENT]:
            raise MimoError(f"unknown target module(s) {', '.join(unknown)} (choose from {', '.join(PARENT)})")
        smallest = min(min(target_shape(model, t)) for t in self.target_modules)
        if self.r > smallest:
            raise MimoError(f"--rank {self.r} exceeds the smallest targeted dimension ({smallest})")


def target_shape(model: MiMoForCausalLM, target: str) -> tuple[int, int]:
    """(out, in) of a main-model projection."""
    lin = model.model.layers[0].get_submodule(f"{PARENT[target]}.{target}")
    return lin.out_features, lin.in_features


def target_names(model: MiMoForCausalLM, targets) -> list[str]:
    """Module names (model.layers.{i}.self_attn.q_proj, ...) of the targets in every main-model layer."""
    return [f"model.layers.{i}.{PARENT[t]}.{t}" for i in range(len(model.model.layers)) for t in targets]


class AdapterSelection:
    """Which stacked adapter each row of the next forward pass uses. spans[a] = (offset, rank) of adapter a's
    rank slots, names[a] its name; mask is [b, 1, R] after select(), or None (every row uses every stacked
    adapter: one adapter)."""

    def __init__(self, names: list[str], spans: list[tuple[int, int]], dtype: torch.dtype, device):
        self.names, self.spans = names, spans
        rank = sum(r for _, r in spans)
        self.table = torch.zeros(len(spans) + 1, rank, dtype=dtype, device=device)  # the last row: the base model
        for a, (offset, r) in enumerate(spans):
            self.table[a, offset: offset + r] = 1.0
        self.span_offsets = torch.tensor([o for o, _ in spans] + [0], dtype=torch.int32)
        self.span_ranks = torch.tensor([r for _, r in spans] + [0], dtype=torch.int32)
        self.mask: torch.Tensor | None = None
        self.offsets = self.ranks = None  # [b] int32: each row's slots, for mimo's per-row kernel (kernels.lora_add)
        self.base_index = len(spans)

    def select(self, adapter_ids: torch.Tensor):
        """adapter_ids [b]: an adapter index per row (base_index: the base model)."""
        self.mask = self.table[adapter_ids][:, None, :]
        ids = adapter_ids.cpu()
        self.offsets, self.ranks = self.span_offsets[ids], self.span_ranks[ids]


class LoRALinear(nn.Module):
    """A frozen base linear plus a low-rank update (one adapter or several stacked; see the module doc)."""

    def __init__(self, base: nn.Module, rank: int, scaling: float = 1.0, dropout: float = 0.0,
                 selection: AdapterSelection | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(base.buffers(), next(base.parameters(), None)).device
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.scaling, self.dropout, self.selection = scaling, dropout, selection

    def reset_parameters(self, generator: torch.Generator | None = None):
        """PEFT's initialisation: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero (the update starts at 0)."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_ with a = sqrt(5)
        with torch.no_grad():
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
            self.lora_B.zero_()

    def forward(self, x):
        return self.add_update(x, self.base(x))

    def add_update(self, x, y):
        """y + the update of x: x [b, T, in], y [b, T, out] the base product (the model runner computes it)."""
        if self.training and self.dropout:
            x = F.dropout(x, self.dropout, training=True)
        xa = F.linear(x, self.lora_A)  # [b, T, R]
        if self.scaling != 1.0:
            xa = xa * self.scaling
        mask = self.selection.mask if self.selection is not None else None
        if mask is not None:
            xa = xa * mask  # [b, 1, R]: each row keeps its adapter's slots
        return y + F.linear(xa, self.lora_B)

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling:g}, dropout={self.dropout:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: MiMoForCausalLM, cfg: LoRAConfig, seed: int = 0) -> MiMoForCausalLM:
    """Freeze the model and give cfg.target_modules of every main-model layer a fresh trainable update (B = 0:
    the model computes what it did). In place; returns the model."""
    cfg.validate(model)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name in target_names(model, cfg.target_modules):
        lora = LoRALinear(model.get_submodule(name), cfg.r, cfg.scaling, cfg.dropout)
        lora.reset_parameters(gen)
        model.set_submodule(name, lora)
    return model


@dataclass
class Adapter:
    """One adapter's weights, as read from disk: module name -> (A [r, in], B [out, r], scaling), and the LM head
    [vocab, hidden] it replaces the base's with (None: it keeps the base's)."""
    name: str
    path: str
    updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    head: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.updates.values())


def attach_adapters(model: MiMoForCausalLM, adapters: list[Adapter], base_answers: bool = False) -> AdapterSelection:
    """Stack adapters onto the model for inference (frozen; each one's scaling folded into its A). Returns the
    selection the engine sets per forward pass; adapter a is index a, the base model is selection.base_index.
    base_answers: requests for the base model come too (mimo serve). An adapter with a head of its own is attached
    only where it is the whole model: alone, and no base requests."""
    if not adapters:
        raise MimoError("no adapter to attach")
    own = next((a for a in adapters if a.head is not None), None)
    if own is not None and (len(adapters) > 1 or base_answers):
        raise MimoError(f"adapter {own.name} replaces the LM head (modules_to_save), which the base model and other "
                        "adapters share: use it alone, or merge it (mimo merge) and serve the merged model")
    if adapters[0].head is not None:
        replace_head(model, adapters[0].head)
    dtype = model.model.embed_tokens.weight.dtype
    device = model.model.embed_tokens.weight.device
    spans, offset = [], 0
    for a in adapters:
        spans.append((offset, a.rank))
        offset += a.rank
    selection = AdapterSelection([a.name for a in adapters], spans, dtype, device)
    names = sorted({name for a in adapters for name in a.updates})
    with torch.no_grad():
        for name in names:
            lora = LoRALinear(model.get_submodule(name), offset, selection=selection, dtype=dtype)
            for a, (start, _) in zip(adapters, spans):
                if name in a.updates:
                    A, B, scaling = a.updates[name]
                    lora.lora_A[start: start + A.shape[0]] = (A.float() * scaling).to(dtype)
                    lora.lora_B[:, start: start + A.shape[0]] = B.to(dtype)
            lora.requires_grad_(False)
            model.set_submodule(name, lora)
    return selection


@torch.no_grad()
def merge_adapter(model: MiMoForCausalLM, adapter: Adapter) -> MiMoForCausalLM:
    """Fold an adapter into the base weights: W += B A scaling, computed in float32, stored in W's dtype. The base
    must be in float (not quantized). In place; returns the model."""
    if adapter.head is not None:
        replace_head(model, adapter.head)
    for name, (A, B, scaling) in adapter.updates.items():
        base = model.get_submodule(name)
        if type(base) is not nn.Linear:
            raise MimoError("merging needs the base weights in float (load the model without --quantize)")
        base.weight.copy_((base.weight.float() + (B.float() @ A.float()) * scaling).to(base.weight.dtype))
    return model


@torch.no_grad()
def replace_head(model: MiMoForCausalLM, weight: torch.Tensor):
    """The LM head's weight [vocab, hidden] replaced by an adapter's, in the head's dtype, quantized again where the
    head is quantized; a head tied to the embedding is untied first (the embedding stays the base's)."""
    head = model.lm_head
    if weight.shape != (head.out_features, head.in_features):
        raise MimoError(f"an LM head of {list(weight.shape)} for a model whose head is "
                        f"[{head.out_features}, {head.in_features}]")
    if type(head) is nn.Linear:
        if head.weight is model.model.embed_tokens.weight:
            model.config = replace(model.config, tie_word_embeddings=False)
        head.weight = nn.Parameter(weight.to(head.weight.device, head.weight.dtype, copy=True), requires_grad=False)
    else:  # quantize.Int8Linear / Int4Linear
        model.lm_head = type(head).from_weight(weight.float()).to(next(head.buffers()).device)
