"""Distributed training through PyTorch's own engines: torchrun environment, DDP, FSDP2.

Nothing here is home-made cluster code: `torchrun --nproc-per-node N mimo pretrain ...` sets RANK/WORLD_SIZE,
we join the process group (gloo on CPU, NCCL on GPU) and wrap the model. The model module never sees any of it.
Rank-0 helpers (print0, is_main) keep distributed noise out of call sites.
"""

from __future__ import annotations

import datetime
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_INFO = DistInfo()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; otherwise a single process."""
    global _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            # a long timeout: under `mimo speedrun`, other ranks wait while rank 0 evaluates
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(hours=12))
        _INFO = DistInfo(rank, world, local, dev)
    else:
        _INFO = DistInfo(device=dev)
    return _INFO


def dist_info() -> DistInfo:
    return _INFO


def is_main() -> bool:
    return _INFO.is_main


def print0(*args, **kwargs):
    if _INFO.is_main:
        kwargs.setdefault("file", sys.stderr)
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: torch.nn.Module, info: DistInfo, fsdp: bool = False) -> torch.nn.Module:
    """DDP by default; FSDP2 (fully_shard per decoder layer, then the root) behind a flag."""
    if not info.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in [*model.model.layers, *model.model.mtp_layers]:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def no_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP), a no-op otherwise."""
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    if not sync and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(True)
    return nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
