"""Memory on the user's device: what is available, what a model and its KV cache will take, the peak so far.

Loading checks that a model fits before it allocates anything (one clear error with the figures, never an
out-of-memory kill), and the engine sizes its KV cache from what is left, as llama.cpp's n_ctx and vLLM's
memory fraction do: the context is the model's own when it fits, else the largest power of two that does.
KV caches on the CPU live in anonymous memory maps, so a position costs memory only once it is written.
"""

from __future__ import annotations

import mmap
import os
import resource
import sys

import torch

from mimo.config import MiMoConfig

GB = 1e9
RUNTIME_RESERVE_BYTES = int(0.6 * GB)  # the interpreter, torch and the activations of a decode step
KV_SHARE = 0.5  # at most this share of the memory left after the weights goes to KV caches by default
MIN_CONTEXT = 512


def available_bytes() -> int | None:
    """Memory the kernel can give this process without swapping (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # macOS and other Unixes: free pages only (an underestimate)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


_LIBC = None


def _libc():
    """The C library (malloc_trim, madvise declared), or False where it cannot be loaded."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def trim_heap():
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere). Loading frees a
    scratch buffer per tensor between blocks it keeps, and glibc keeps such holes: a 7B int4 load otherwise peaks
    2 GB above its weights."""
    if libc := _libc():
        libc.malloc_trim(0)


def advise(address: int, nbytes: int, advice: int | None, unit: int = mmap.PAGESIZE):
    """madvise(advice) over the whole `unit`-aligned stretches inside [address, address + nbytes) (unit: the page
    size, or 2 MiB for huge pages); nothing off Linux, where the advice is None (not in this Python's mmap) or
    where no whole unit fits."""
    start, end = -(-address // unit) * unit, (address + nbytes) // unit * unit
    if advice is None or end <= start or not sys.platform.startswith("linux") or not (libc := _libc()):
        return
    libc.madvise(start, end - start, advice)


def peak_resident_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def human(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each tensor once (a tied LM head is the embedding)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_bytes_per_token(cfg: MiMoConfig, dtype: torch.dtype) -> int:
    """Keys and values of one position in every layer (main and MTP)."""
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return 2 * layers * cfg.num_key_value_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A zero tensor whose memory is taken only where it is written: an anonymous map on the CPU (the kernel
    hands out zero pages on first touch), torch.zeros elsewhere."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = 1
    for n in shape:
        count *= n
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes < 1 << 20:  # small: not worth a map of its own
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=count).view(shape)


def choose_context(cfg: MiMoConfig, dtype: torch.dtype, n_slots: int, free_bytes: int | None,
                   requested: int | None = None) -> tuple[int, str]:
    """(context length per slot, a line saying why) for n_slots KV-cache slots.

    requested: the user's --max-model-len, taken as it is (capped at the model's context). Otherwise the model's
    context when n_slots of it fit in KV_SHARE of free_bytes (memory left after the weights), else the largest
    power of two that does; a MimoError when not even MIN_CONTEXT fits."""
    from mimo.errors import MimoError

    per_token = kv_bytes_per_token(cfg, dtype)
    model_ctx = cfg.max_position_embeddings
    if requested is not None:
        ctx = min(requested, model_ctx)
        return ctx, (f"context {ctx} x {n_slots} slot(s) (--max-model-len), KV cache up to "
                     f"{human(per_token * ctx * n_slots)} ({str(dtype).removeprefix('torch.')})")
    if free_bytes is None:
        ctx = min(model_ctx, 4096)
        return ctx, f"context {ctx} x {n_slots} slot(s) (free memory unknown; --max-model-len sets it)"
    budget = KV_SHARE * free_bytes
    ctx = model_ctx
    while ctx > MIN_CONTEXT and per_token * ctx * n_slots > budget:
        ctx = 1 << ((ctx - 1).bit_length() - 1)  # the power of two below
    if per_token * ctx * n_slots > budget:
        raise MimoError(f"not enough memory for a KV cache: {n_slots} slot(s) of {ctx} positions need "
                        f"{human(per_token * ctx * n_slots)}, and {human(free_bytes)} is left after the weights "
                        "(fewer slots (--max-batch), --max-model-len, or --quantize int4 leave more)")
    return ctx, (f"context {ctx} x {n_slots} slot(s), KV cache up to {human(per_token * ctx * n_slots)} "
                 f"({str(dtype).removeprefix('torch.')}; {human(free_bytes)} free after the weights; "
                 "--max-model-len sets it)")
