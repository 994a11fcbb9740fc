"""Weights on disk: dtypes by name, the state dict under the published names, and the safetensors files of a
model directory read through memory maps. The layer under both model formats, checkpoint.py (directories) and
gguf.py (GGUF files).
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import torch

from mimo.errors import MimoError
from mimo.model import MiMoForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# tensors some checkpoints carry that are derived, not learned
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise MimoError(f"unknown dtype {name!r} (choose from float32, bfloat16, float16)")
    return DTYPES[name]


def weights_state_dict(model: MiMoForCausalLM, sd: dict | None = None) -> dict[str, torch.Tensor]:
    """state_dict under the published names; a tied lm_head is stored once (as model.embed_tokens)."""
    sd = dict(model.state_dict() if sd is None else sd)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
PAGE = mmap.PAGESIZE


class MappedSafetensors:
    """One safetensors file, memory-mapped (copy-on-write) for reading: tensor(name) is a view of the file's pages,
    with no copy; release(name) hands a tensor's pages back once it has been copied or quantized.

    The format is read here (8-byte little-endian header length, JSON header, raw data) rather than through
    safetensors.safe_open, whose get_tensor copies each tensor out of a mapping that stays resident until the
    file closes: loading a 7B checkpoint that way peaks at the model plus a whole shard."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 2 <= n <= min(size - 8, 100 * 1024**2):
                    raise MimoError(f"{path}: not a safetensors file (or truncated: {size:,} bytes)")
                header = json.loads(f.read(n))
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise MimoError(f"{path}: not a readable safetensors file ({e})") from None
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        try:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self.entries[name] = (SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MimoError(f"{path}: malformed safetensors header ({e.__class__.__name__}: {e})") from None
        need = self.data_start + max((e[3] for e in self.entries.values()), default=0)
        if need > size:
            raise MimoError(f"{path}: truncated: {size:,} bytes, but its header describes {need:,} "
                            "(an interrupted download or copy?)")

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a view of the mapped file (copy-on-write: writing to it never reaches the file)."""
        dtype, shape, begin, end = self.entries[name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = (end - begin) // itemsize
        if count != math.prod(shape) or (end - begin) % itemsize:
            raise MimoError(f"{self.path}: tensor {name} has {end - begin} bytes for shape {shape}")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self.data_start + begin
        if offset % itemsize:  # unaligned (an unusual writer): a copy
            raw = torch.frombuffer(self.mm, dtype=torch.uint8, count=end - begin, offset=offset).clone()
            return raw.view(dtype).view(shape)
        return torch.frombuffer(self.mm, dtype=dtype, count=count, offset=offset).view(shape)

    def prefault(self, name: str):
        """Read a tensor's pages in now (one touch per page), so that the first request does not wait for the
        disk."""
        _, _, begin, end = self.entries[name]
        if end - begin >= PAGE:
            raw = torch.frombuffer(self.mm, dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)
            raw[::PAGE].sum()

    def release(self, name: str):
        """Drop the pages of a tensor that was copied out (they are read back from the file if touched again)."""
        _, _, begin, end = self.entries[name]
        lo = -(-(self.data_start + begin) // PAGE) * PAGE
        hi = (self.data_start + end) // PAGE * PAGE
        if hi > lo and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> file, from the index (sharded) or the single safetensors file."""
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, AssertionError, TypeError) as e:
            raise MimoError(f"{index_path}: malformed index ({e.__class__.__name__}: {e})") from None
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise MimoError(f"{f}: shard named in {INDEX_FILE} is missing")
        return files
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise MimoError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
    return dict.fromkeys(MappedSafetensors(single).entries, single)
