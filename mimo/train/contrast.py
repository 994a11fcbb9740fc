"""The update confined to the directions in which the user's material stands out from the model's own reasoning
(`mimo tune --subspace contrast`).

A LoRA update B A changes a linear's output on every input x by B A x; tuned freely on a few hundred notes, a small
model's update moves its reasoning replies as much as its notes (docs/benchmarks.md, "Personal models"). Here
each adapted linear's A is fixed, not trained, to the r directions along which the inputs the user's material
produces have the most energy relative to the inputs the replayed reasoning produces: the top generalized
eigenvectors v of (C_user, C_keep), C = E[x x^T] at that linear's input over every token, which maximise
v^T C_user v / v^T C_keep v. Only B trains. The LM head, trained whole on a small base, keeps its update within the
span of such directions of its input after every step. On reasoning text A x is then small next to what it is on
the notes, at every layer, so the update that states the notes barely reaches the reasoning: contrastive PCA
(Abid et al. 2018) used as the null-space constraint of AlphaEdit (Fang et al. 2025) and CorDA's
knowledge-preserving adapters (Yang et al. 2024), with the base's own replies as the knowledge to keep.

The directions are computed once, from the base before any update, and kept in the run directory
(contrast.safetensors), so a resumed run confines its update exactly as the first one did. The covariances take
2 x 8 x in^2 bytes a linear (float64) while they are gathered: the tiny model's 7 x 6 take 0.1 GB, a 7B's would
take 80 GB, which is why --subspace auto confines only small models."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mimo.errors import MimoError
from mimo.inference.lora import lora_modules

FILE = "contrast.safetensors"
KEEP_TOKENS = 65_536  # the replayed replies' statistics from about this many tokens (the first replies that hold
# them): half of the tiny model's 1,024 replies, 25 s less on 2 cores, for a [1024, 1024] covariance at most
HEAD = "lm_head"


@torch.no_grad()
def input_covariances(model, examples, names: list[str], batch: int = 32) -> dict[str, torch.Tensor]:
    """E[x x^T] over every token of examples ((ids, labels) pairs) at the input of each named linear [in, in]
    (float64); examples run batch at a time, right-padded (causal attention: padding changes no real token)."""
    sums: dict[str, torch.Tensor] = {}
    count, valid = 0, None

    def hook(name):
        def add(module, args, out):
            x = args[0].detach()[valid].float()  # [tokens, in]
            sums[name] = sums.get(name, 0) + (x.T @ x).double()  # a batch's sum in float32, the total in float64
        return add

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        ordered = sorted((ids for ids, _ in examples), key=len)
        for i in range(0, len(ordered), batch):
            part = ordered[i: i + batch]
            x = torch.zeros(len(part), max(map(len, part)), dtype=torch.long, device=device)
            valid = torch.zeros(x.shape, dtype=torch.bool, device=device)
            for j, ids in enumerate(part):
                x[j, : len(ids)] = torch.tensor(ids, device=device)
                valid[j, : len(ids)] = True
            model(x)
            count += int(valid.sum())
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: s / max(count, 1) for n, s in sums.items()}


def contrast_directions(c_user: torch.Tensor, c_keep: torch.Tensor, k: int) -> torch.Tensor:
    """[in, k]: the k directions v with the largest v^T c_user v / v^T c_keep v, best first (c_keep whitened, its
    eigenvalues floored at 1e-6 of its largest so that directions reasoning never uses stay finite)."""
    ev, U = torch.linalg.eigh(c_keep)
    whiten = U / ev.clamp_min(ev.max() * 1e-6).sqrt()  # [in, in]
    _, Z = torch.linalg.eigh(whiten.T @ c_user @ whiten)  # ascending
    return (whiten @ Z[:, -k:].flip(1)).float()


def span_projector(V: torch.Tensor) -> torch.Tensor:
    """[in, in]: the orthogonal projector onto the span of V's columns."""
    V = V.double()
    return (V @ torch.linalg.solve(V.T @ V, V.T)).float()


def compute(model, user_examples, keep_examples, head_dims: int | None) -> dict[str, torch.Tensor]:
    """{module: A [r, in]} for every LoRA linear (unit rows over sqrt(3), the norm of PEFT's Kaiming rows, so that
    B's rate means what it does for a free A) and, with head_dims, {"lm_head": projector [hidden, hidden]}."""
    mods = lora_modules(model)
    names = list(mods) + ([HEAD] if head_dims else [])
    user = input_covariances(model, user_examples, names)
    ends = itertools.accumulate(len(ids) for ids, _ in keep_examples)
    keep = input_covariances(model, [x for x, end in zip(keep_examples, ends) if end - len(x[0]) < KEEP_TOKENS], names)
    out = {}
    for name, m in mods.items():
        A = contrast_directions(user[name], keep[name], m.lora_A.shape[0]).T  # [r, in]
        out[name] = A / A.norm(dim=1, keepdim=True) / math.sqrt(3.0)
    if head_dims:
        out[HEAD] = span_projector(contrast_directions(user[HEAD], keep[HEAD], head_dims))
    return out


def confine(model, run_dir: Path, user_examples, keep_examples, head_dims: int | None, write: bool):
    """Fix (and freeze) every LoRA A to its contrast directions and, with head_dims, return the after-step function
    that keeps the trained head's update within head_dims of them (None without). The directions are read from
    run_dir/contrast.safetensors where an earlier start of the run wrote them."""
    path = Path(run_dir) / FILE
    mods = lora_modules(model)
    saved = load_file(str(path)) if path.is_file() else None
    expected = {n: tuple(m.lora_A.shape) for n, m in mods.items()}
    if saved is not None and ({n: tuple(t.shape) for n, t in saved.items() if n != HEAD} != expected
                              or (HEAD in saved) != bool(head_dims)):
        raise MimoError(f"{path}: written for other tuning settings (rank, targets or --head-subspace); "
                        "remove it or tune into another directory")
    tensors = saved if saved is not None else compute(model, user_examples, keep_examples, head_dims)
    if saved is None and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    for name, m in mods.items():
        m.lora_A.data.copy_(tensors[name])
        m.lora_A.requires_grad_(False)
    if not head_dims:
        return None
    head = model.lm_head.weight  # [vocab, hidden]
    base, projector = head.detach().clone(), tensors[HEAD].to(head.device)

    @torch.no_grad()
    def keep_head_in_span():
        head.copy_(base + (head - base) @ projector)
    return keep_head_in_span
