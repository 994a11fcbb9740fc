"""Reading a built corpus: packed token shards (numpy memmap) -> deterministic (input, target) batches.

The train split is one flat token stream (documents separated by end-of-text) holding the data stages in order;
the manifest records where each stage starts and the corpus config its fraction. A run of S steps gives stage k
the steps [S * f_1..k-1, S * f_1..k) (cumulative fractions, rounded), so any run length sees every stage in order,
each for its share of the run's tokens (MiMo's stages are shares of the token budget). Within a stage, window w
is tokens [start + w*T, start + w*T + T + 1); the stage's i-th step consumes its windows [i*G, (i+1)*G) (G
sequences per global batch), wrapping around inside the stage when the run asks for more than it holds. A step's
windows are split by rank and accumulation micro-step, so the data order is the same whatever the number of
processes, and the data position of a run is a function of its step and planned length (exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mimo.errors import MimoError
from mimo.jsonl import read_json


def read_manifest(data_dir) -> dict:
    return read_json(Path(data_dir) / "manifest.json", missing="not found (build a corpus with `mimo data build`)")


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

    def windows(self, indices, seq_len: int, start: int = 0, length: int | None = None) -> torch.Tensor:
        """[len(indices), seq_len + 1] int64 tokens: windows of the region [start, start + length) (default: the
        whole split), wrapping around at its end."""
        length = len(self) - start if length is None else length
        n = (length - 1) // seq_len
        if n <= 0:
            raise MimoError(f"the corpus has {length} tokens, fewer than one sequence of {seq_len + 1}")
        rows = [self.slice(start + (int(i) % n) * seq_len, seq_len + 1).astype(np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows))


@dataclass
class Stage:
    name: str
    start: int  # first token of the stage in the train stream
    tokens: int
    first_step: int  # the run's steps [first_step, end_step) read this stage
    end_step: int


def plan_stages(tokens: PackedTokens, total_steps: int) -> list[Stage]:
    """The train split's stages (from the manifest: `mimo data build` writes where each starts, its config the
    fractions) and the steps of a `total_steps` run each one gets; a corpus without stages is one stage."""
    rows = tokens.manifest["splits"]["train"].get("stages") or [{"name": "all", "start": 0, "tokens": len(tokens)}]
    fractions = {s["name"]: s["fraction"] for s in tokens.manifest.get("config", {}).get("stages", [])}
    shares = [fractions.get(r["name"], r["tokens"] / max(1, len(tokens))) for r in rows]
    stages, done = [], 0.0
    for r, share in zip(rows, shares):
        first = round(total_steps * done / sum(shares))
        done += share
        stages.append(Stage(r["name"], r["start"], r["tokens"], first, round(total_steps * done / sum(shares))))
    return stages


def document_positions(x: torch.Tensor, eos: int) -> torch.Tensor:
    """x [B, T] -> positions [B, T] restarting at 0 after every eos token (and at each row's start), so that each
    document of a window of the token stream attends within itself (mimo.model.document_mask)."""
    T = x.shape[1]
    start = torch.zeros_like(x, dtype=torch.bool)
    start[:, 0] = True
    start[:, 1:] = x[:, :-1] == eos
    idx = torch.arange(T, device=x.device).expand_as(x)
    return idx - torch.where(start, idx, 0).cummax(1).values


class PretrainBatches:
    """Deterministic micro-batches for an optimizer step, for one rank, from the stage the step belongs to in a
    run of `total_steps` steps. eos: windows of the stream run across documents; with the end-of-text id each batch
    also carries document positions (document_positions: no token attends to another document), else none."""

    def __init__(self, tokens: PackedTokens, seq_len: int, global_seqs: int, micro_batch: int, total_steps: int,
                 rank: int = 0, world_size: int = 1, device="cpu", eos: int | None = None):
        if global_seqs % (micro_batch * world_size):
            raise MimoError(f"global batch of {global_seqs} sequences is not a multiple of micro batch "
                            f"{micro_batch} x {world_size} processes")
        self.tokens, self.seq_len, self.global_seqs, self.micro = tokens, seq_len, global_seqs, micro_batch
        self.rank, self.world, self.device, self.eos = rank, world_size, device, eos
        self.accum = global_seqs // (micro_batch * world_size)
        self.stages = plan_stages(tokens, total_steps)
        for st in self.stages:
            if st.end_step > st.first_step and st.tokens <= seq_len:
                raise MimoError(f"data stage {st.name!r} holds {st.tokens} tokens, fewer than one sequence of "
                                f"{seq_len + 1}")

    def stage(self, step: int) -> Stage:
        return next((st for st in self.stages if step < st.end_step), self.stages[-1])

    def micro_batches(self, step: int):
        """Yields (inputs [micro, T], targets [micro, T]) accum times, with positions [micro, T] when self.eos is
        set."""
        st = self.stage(step)
        base = (step - st.first_step) * self.global_seqs
        for m in range(self.accum):
            first = base + (m * self.world + self.rank) * self.micro
            w = self.tokens.windows(range(first, first + self.micro), self.seq_len, st.start, st.tokens)
            w = w.to(self.device)
            yield _batch(w, self.eos)


def _batch(w: torch.Tensor, eos: int | None) -> tuple:
    """windows [B, T + 1] -> (inputs, targets) or (inputs, targets, document positions)."""
    x, y = w[:, :-1], w[:, 1:]
    return (x, y) if eos is None else (x, y, document_positions(x, eos))


def eval_batches(tokens: PackedTokens, seq_len: int, batch: int, max_batches: int, device="cpu",
                 eos: int | None = None):
    """The first max_batches fixed batches of a validation split (with document positions as PretrainBatches)."""
    n = min(max_batches, max(1, tokens.num_windows(seq_len) // batch))
    for b in range(n):
        yield _batch(tokens.windows(range(b * batch, (b + 1) * batch), seq_len).to(device), eos)
