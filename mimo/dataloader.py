"""Reading a built corpus: packed token shards (numpy memmap) -> deterministic (input, target) batches.

The train split is one flat token stream (documents separated by end-of-text, stages in order). Window w is
tokens [w*T, w*T + T + 1). Optimizer step s consumes windows [s*G, (s+1)*G) of the stream (G sequences per
global batch), split by rank and accumulation micro-step, so the data order is the same whatever the number of
processes, and the data position of a run is just its step (wrapping around into a new epoch at the end).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mimo.errors import MimoError


def read_manifest(data_dir) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise MimoError(f"{path}: not found (build a corpus with `mimo data build`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MimoError(f"{path}: malformed JSON ({e})") from None


class PackedTokens:
    """One split of a corpus as a flat, memory-mapped token array."""

    def __init__(self, data_dir, split: str = "train"):
        data_dir = Path(data_dir)
        manifest = read_manifest(data_dir)
        if split not in manifest.get("splits", {}):
            raise MimoError(f"{data_dir / 'manifest.json'}: no {split!r} split")
        dtype = np.dtype(manifest["dtype"])
        self.shards = []
        for shard in manifest["splits"][split]["shards"]:
            path = data_dir / shard["file"]
            if not path.is_file():
                raise MimoError(f"{path}: shard listed in the manifest is missing")
            arr = np.memmap(path, dtype=dtype, mode="r")
            if len(arr) != shard["tokens"]:
                raise MimoError(f"{path}: {len(arr)} tokens, the manifest says {shard['tokens']}")
            self.shards.append(arr)
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.manifest = manifest

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, n: int) -> np.ndarray:
        out, pos = [], start
        while n > 0:
            i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            local = pos - int(self.offsets[i])
            piece = self.shards[i][local: local + n]
            out.append(piece)
            pos, n = pos + len(piece), n - len(piece)
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])

    def num_windows(self, seq_len: int) -> int:
        return (len(self) - 1) // seq_len

    def windows(self, indices, seq_len: int) -> torch.Tensor:
        """[len(indices), seq_len + 1] int64 tokens."""
        n = self.num_windows(seq_len)
        if n == 0:
            raise MimoError(f"the corpus has {len(self)} tokens, fewer than one sequence of {seq_len + 1}")
        rows = [self.slice((int(i) % n) * seq_len, seq_len + 1).astype(np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows))


class PretrainBatches:
    """Deterministic micro-batches for an optimizer step, for one rank."""

    def __init__(self, tokens: PackedTokens, seq_len: int, global_seqs: int, micro_batch: int,
                 rank: int = 0, world_size: int = 1, device="cpu"):
        if global_seqs % (micro_batch * world_size):
            raise MimoError(f"global batch of {global_seqs} sequences is not a multiple of micro batch "
                            f"{micro_batch} x {world_size} processes")
        self.tokens, self.seq_len, self.global_seqs, self.micro = tokens, seq_len, global_seqs, micro_batch
        self.rank, self.world, self.device = rank, world_size, device
        self.accum = global_seqs // (micro_batch * world_size)

    def micro_batches(self, step: int):
        """Yields (inputs [micro, T], targets [micro, T]) accum times."""
        base = step * self.global_seqs
        for m in range(self.accum):
            first = base + (m * self.world + self.rank) * self.micro
            w = self.tokens.windows(range(first, first + self.micro), self.seq_len).to(self.device)
            yield w[:, :-1], w[:, 1:]

    def epoch(self, step: int) -> float:
        return step * self.global_seqs / max(1, self.tokens.num_windows(self.seq_len))


def eval_batches(tokens: PackedTokens, seq_len: int, batch: int, max_batches: int, device="cpu"):
    """The first max_batches fixed batches of a validation split."""
    n = min(max_batches, max(1, tokens.num_windows(seq_len) // batch))
    for b in range(n):
        w = tokens.windows(range(b * batch, (b + 1) * batch), seq_len).to(device)
        yield w[:, :-1], w[:, 1:]
