"""mimo's C kernels (gemv.c: products and the thread pool; lora.c: many LoRA adapters in one batch; block.c: decoder
blocks for a few new tokens, everything between the products included): built on
first use with the system C compiler, loaded through ctypes.

library() builds them into ~/.cache/mimo/kernels/<hash>.so (the hash covers the sources, the compiler and its
flags, and the CPU's feature flags, so a changed source or another machine gets its own build; written to a
temporary name and renamed into place, so concurrent first uses are safe) and returns the loaded library, or
None where there is no compiler, the build failed or MIMO_NO_KERNELS=1 is set: callers then take their torch
path (correct, slower), and a warning says so once.

Threads: gemv.c's own small pool (see its header), as many threads as torch.get_num_threads() at each call
(inside torch_ops_single_threaded(): the count torch had before it); ctypes drops the GIL for the duration of each call. MIMO_KERNEL_SPIN_US (default 100) is how long an idle
worker spins before it sleeps; MIMO_KERNEL_OPENMP=1 builds the OpenMP variant instead (runs on torch's libgomp
team: same soname, so no second runtime), for comparisons; MIMO_KERNEL_FLAGS replaces the optimization flags
(e.g. "-O2" builds the portable scalar code, without AVX2, for tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import mmap
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(f) for f in ("gemv.c", "lora.c", "block.c")]
ABI = 4  # gemv.c's MIMO_ABI
FORMATS = {"q8_0": 0, "q4_0": 1, "bf16": 2, "q4_0x8": 3}  # q4_0x8: Q4_0 tiled by 8 rows (tile_q4_0)
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
SIMD = False  # whether the loaded kernels have the AVX2 paths (set when they load)
_lib: ctypes.CDLL | None = None
_tried = False
_reason: str | None = None


def disabled() -> bool:
    return "MIMO_NO_KERNELS" in os.environ and os.environ["MIMO_NO_KERNELS"] not in ("", "0")


def cache_dir() -> Path:
    root = os.environ.get("MIMO_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mimo" / "kernels"


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX): oneDNN's bf16 GEMM is then fast."""
    return bool(set(_cpu_flags().split()) & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine() + " " + platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


# tried in order: the first that builds wins (-march=native may be unknown to a compiler)
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])
COMMON_FLAGS = ["-shared", "-fPIC", "-ffp-contract=off", "-std=gnu11"]


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) found")
    source = b"\0".join(p.read_bytes() for p in SOURCES)
    version = _compiler_version(cc)
    out_dir = cache_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise OSError(f"{out_dir} is not writable")
    except OSError:  # e.g. a read-only home: a private temporary directory instead
        out_dir = Path(tempfile.gettempdir()) / f"mimo-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    errors = []
    threading_flags = ["-DMIMO_OPENMP", "-fopenmp"] if os.environ.get("MIMO_KERNEL_OPENMP") == "1" else ["-pthread"]
    flag_sets = [os.environ["MIMO_KERNEL_FLAGS"].split()] if os.environ.get("MIMO_KERNEL_FLAGS") else FLAG_SETS
    for flags in flag_sets:
        flags = flags + threading_flags
        key = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), " ".join(flags + COMMON_FLAGS).encode(),
                                         _cpu_flags().encode()])).hexdigest()[:24]
        path = out_dir / f"gemv-{key}.so"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            try:
                r = subprocess.run([cc, *flags, *COMMON_FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], check=False,
                                   capture_output=True, text=True, timeout=300)
                if r.returncode != 0:
                    errors.append(f"{' '.join(flags)}: {r.stderr.strip()[-500:]}")
                    continue
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            errors.append(f"{' '.join(flags)}: {e}")
            continue
        if lib.mimo_abi_version() != ABI:
            errors.append(f"{path}: ABI {lib.mimo_abi_version()} != {ABI}")
            continue
        _declare(lib)
        spin = os.environ.get("MIMO_KERNEL_SPIN_US")
        if spin:
            lib.mimo_set_spin_us(int(spin))
        return lib
    raise RuntimeError("building mimo/kernels/*.c failed: " + " | ".join(errors))


def _declare(lib: ctypes.CDLL):
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.mimo_gemv.argtypes = [i32, vp, i64, i64, vp, i32, i64, vp, i32, vp, i32, i32]
    lib.mimo_gemv.restype = i32
    lib.mimo_quantize.argtypes = [i32, vp, vp, i64, i64, i32]
    lib.mimo_quantize.restype = None
    lib.mimo_dequantize.argtypes = [i32, vp, vp, i64, i64, i64, i32]
    lib.mimo_dequantize.restype = None
    lib.mimo_lora_add.argtypes = [vp, i64, i64, vp, vp, i64, vp, vp, i64, vp, i32]
    lib.mimo_lora_add.restype = i32
    lib.mimo_blocks_step.argtypes = [vp, i64, ctypes.POINTER(StepArgs), vp]
    lib.mimo_blocks_step.restype = i32
    lib.mimo_tile_q4_0.argtypes = [vp, vp, i64, i64, i32, i32]
    lib.mimo_tile_q4_0.restype = None
    lib.mimo_set_spin_us.argtypes = [i32]
    lib.mimo_set_spin_us.restype = None
    for name in ("mimo_simd", "mimo_openmp", "mimo_abi_version", "mimo_pool_workers"):
        getattr(lib, name).restype = i32


class LinearArgs(ctypes.Structure):
    """block.c's mimo_linear: a product's weight (FORMATS) and bias (DTYPES; bias_dt -1: none)."""
    _fields_ = [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("fmt", ctypes.c_int32), ("bias_dt", ctypes.c_int32)]


class BlockArgs(ctypes.Structure):
    """block.c's mimo_block: a decoder block's products, norm weights and KV cache."""
    _fields_ = [(name, LinearArgs) for name in ("q", "k", "v", "o", "gate", "up", "down")] + [
        (name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "k_cache", "v_cache")]


class StepArgs(ctypes.Structure):
    """block.c's mimo_step: what every block of one pass shares."""
    _fields_ = [(name, ctypes.c_void_p) for name in ("positions", "slots", "cos", "sin")] + [
        (name, ctypes.c_int64) for name in ("rows", "tokens", "hidden", "heads", "kv_heads", "head_dim",
                                            "capacity", "ffn")] + [
        ("eps", ctypes.c_float), ("dt", ctypes.c_int32), ("nth", ctypes.c_int32)]


def library() -> ctypes.CDLL | None:
    """The kernels, built and loaded on first call; None when unavailable (see the module docstring)."""
    global _lib, _tried, _reason, SIMD
    if disabled():
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _build()
                SIMD = bool(_lib.mimo_simd())
            except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                _lib, _reason = None, str(e)
                warnings.warn(f"mimo's C kernels are unavailable ({e}); quantized and bf16 linears use a slower "
                              "torch path", stacklevel=3)
            _tried = True
    return _lib


def available() -> bool:
    return library() is not None


_kernel_threads: int | None = None  # set while torch_ops_single_threaded() holds torch's ops to one thread


def threads() -> int:
    """How many threads a kernel call runs on."""
    return _kernel_threads or torch.get_num_threads()


@contextlib.contextmanager
def torch_ops_single_threaded():
    """Torch's own ops on one thread, mimo's kernels on the threads torch had. For decode steps whose products
    are mimo's: the rest (norms, RoPE, attention over the cache, sampling) are tens of microseconds each, less
    than it takes to wake OpenMP's sleeping workers (OMP_WAIT_POLICY=PASSIVE) and gather them again."""
    global _kernel_threads
    n = torch.get_num_threads()
    if n == 1 or _kernel_threads is not None:
        yield
        return
    _kernel_threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _kernel_threads = None


# ---- thin wrappers (contiguous CPU tensors; the caller checks) -----------------------------------------------

def gemv(fmt: str, weight: torch.Tensor, n: int, k: int, x: torch.Tensor, out: torch.Tensor,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """out [m, n] = x [m, k] @ W.T (+ bias); weight: blocks (q8_0 / q4_0) or bf16 [n, k]."""
    lib = _lib if _tried else library()
    rc = lib.mimo_gemv(FORMATS[fmt], weight.data_ptr(), n, k, x.data_ptr(), DTYPES[x.dtype], x.shape[0],
                       out.data_ptr(), DTYPES[out.dtype], None if bias is None else bias.data_ptr(),
                       0 if bias is None else DTYPES[bias.dtype], threads())
    if rc != 0:
        raise RuntimeError(f"mimo_gemv failed ({rc})")
    return out


def quantize(fmt: str, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [rows, k / 32, bytes] = ggml's reference quantization of w [rows, k] fp32 (contiguous)."""
    library().mimo_quantize(FORMATS[fmt], w.data_ptr(), out.data_ptr(), w.shape[0], w.shape[1], threads())
    return out


def tiles_q4_0() -> bool:
    """Whether Q4_0 weights run tiled by 8 rows here: where the AVX-512 tiles are built, unless MIMO_Q4_0_TILES=0
    (for comparisons)."""
    lib = library()
    return lib is not None and lib.mimo_simd() == 2 and os.environ.get("MIMO_Q4_0_TILES", "1") != "0"


def tile_q4_0(blocks: torch.Tensor, untile: bool = False) -> torch.Tensor:
    """Q4_0 blocks [n, k / 32, 18] in rows (GGML's layout; n a multiple of 8) -> a new tensor of the same shape
    tiled by 8 rows (the kernels' "q4_0x8": each block's 8 scales, then the 8 rows' nibbles), or back (untile)."""
    n, nb, _ = blocks.shape
    src = blocks.contiguous()
    out = torch.empty_like(src)
    if not untile:
        advise_huge_pages(out)
    library().mimo_tile_q4_0(src.data_ptr(), out.data_ptr(), n, nb * 32, int(untile), threads())
    return out


def advise_huge_pages(t: torch.Tensor):
    """Ask Linux for transparent huge pages under a large tensor not yet written (the whole 2 MiB pages inside it),
    where THP is left to madvise: weights read once a token cost fewer TLB misses on 2 MiB pages."""
    if t.nbytes >= 1 << 22:
        from mimo.memory import advise

        advise(t.data_ptr(), t.nbytes, getattr(mmap, "MADV_HUGEPAGE", None), 1 << 21)


def dequantize(fmt: str, weight: torch.Tensor, r0: int, r1: int, k: int, out: torch.Tensor) -> torch.Tensor:
    """out [r1 - r0, k] fp32 = rows [r0, r1) of the weight (blocks or bf16)."""
    library().mimo_dequantize(FORMATS[fmt], weight.data_ptr(), out.data_ptr(), r0, r1, k, threads())
    return out


def blocks_step(blocks: ctypes.Array, first: int, count: int, step: StepArgs, x: torch.Tensor) -> torch.Tensor:
    """x [b, T, H] (contiguous, updated in place) through blocks[first : first + count] (block.c)."""
    lib = _lib if _tried else library()
    rc = lib.mimo_blocks_step(ctypes.byref(blocks, first * ctypes.sizeof(BlockArgs)), count, ctypes.byref(step),
                              x.data_ptr())
    if rc != 0:
        raise RuntimeError(f"mimo_blocks_step failed ({rc})")
    return x


def lora_add(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
    """y [n, out] += each row's own adapter's update of x [n, in] (lora.c; fp32, contiguous): A [R, in] and
    Bt [R, out] the stacked adapters, offsets / ranks [e] int32 the rank slots of n / e consecutive rows each."""
    lib = _lib if _tried else library()
    n, e = x.shape[0], offsets.shape[0]
    rc = lib.mimo_lora_add(x.data_ptr(), n, x.shape[1], a.data_ptr(), bt.data_ptr(), y.shape[1], offsets.data_ptr(),
                           ranks.data_ptr(), n // e, y.data_ptr(), threads())
    if rc != 0:
        raise RuntimeError(f"mimo_lora_add failed ({rc})")
    return y
