"""`mimo sft`: chain-of-thought supervised fine-tuning in the chat format.

    mimo sft --from runs/tiny/final --out runs/tiny-sft [--data FILE_OR_DIR]

Each example is a user turn (question + "put your final answer within \\boxed{}") and an assistant turn that
thinks inside <think>...</think> and then answers with \\boxed{}. The loss covers assistant tokens only (the
closing <|im_end|> included, so the model learns to stop); MTP layers train too (weight --mtp-weight).
Examples are packed into fixed-length rows, each attending only to itself (positions restart at 0 at each
example: mimo.model.document_mask), as MiMo's independent SFT samples would. Every example with a 16-gram overlap with a shipped benchmark, or
containing a held-out procedural evaluation question, is dropped (the count is reported). Without --data the
set is procedural: reasoning-gym problems with verified step-by-step traces. Checkpoints, resume, metrics and
torchrun behave as in pretraining (mimo.train.loop).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mimo.checkpoint import load_model_and_tokenizer
from mimo.errors import MimoError
from mimo.eval.tasks import BOXED_INSTRUCTION
from mimo.jsonl import read_jsonl
from mimo.model import IGNORE_INDEX
from mimo.parallel import init_distributed, is_main, print0
from mimo.train.loop import TrainConfig, train

# 600 steps of 8,192 tokens over 40,000 procedural examples (most of one pass over them): about 20 minutes for
# the tiny model on 2 cores. Half of that (300 steps, 20,000 examples) left its validation loss still falling
# fast and its held-out accuracy at 11.9 avg@4 against 19.1 (docs/benchmarks.md, post-training).
SFT_DEFAULTS = TrainConfig(max_steps=600, seq_len=256, global_batch_seqs=32, micro_batch=16, lr=1e-3,
                           min_lr_ratio=0.1, warmup_steps=20, decay_fraction=0.5, mtp_weight=0.1,
                           mtp_weight_late=0.1, log_every=10, eval_every=50, eval_batches=4, save_every=50)


def procedural_examples(n: int, seed: int, tasks=None) -> list[list[dict]]:
    """Verified reasoning-gym problems as chat conversations with <think> traces."""
    from mimo.data import reasoning

    problems = reasoning.generate(tasks, n=n, split="train", seed=seed)
    return [[{"role": "user", "content": f"{p.question}\n{BOXED_INSTRUCTION}"},
             {"role": "assistant", "content": f"<think>\n{reasoning.think_trace(p)}\n</think>\n"
                                              f"{reasoning.final_answer(p)}"}] for p in problems]


def read_examples(path: Path) -> list[list[dict]]:
    """JSONL lines with {"messages": [...]} or {"prompt", "response"}; a directory: every *.jsonl in it."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise MimoError(f"{path}: no JSONL data found")
    out = []
    for f in files:
        for n, row in read_jsonl(f):
            if isinstance(row, dict) and isinstance(row.get("messages"), list):
                msgs = row["messages"]
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
                msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
            else:
                raise MimoError(f"{f}:{n}: expected 'messages' or 'prompt' and 'response'")
            if not msgs or msgs[-1].get("role") != "assistant" or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                raise MimoError(f"{f}:{n}: the conversation must end with an assistant message of text")
            out.append(msgs)
    return out


def decontaminate(examples: list[list[dict]], n: int = 16) -> tuple[list[list[dict]], dict]:
    """Drop conversations sharing an n-gram with a shipped benchmark (or containing one of its problems too
    short to have an n-gram) or containing a held-out procedural evaluation question."""
    from mimo.eval.contamination import benchmark_matches

    hits = benchmark_matches(["\n".join(m["content"] for m in ex) for ex in examples], n)
    keep = [ex for ex, hit in zip(examples, hits) if hit is None]
    stats = {"examples": len(examples), "dropped_benchmark_overlap": sum(h not in (None, "eval_split") for h in hits),
             "dropped_eval_question": hits.count("eval_split"), "kept": len(keep), "ngram": n}
    return keep, stats


def tokenize_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, labels): labels are IGNORE_INDEX except on assistant tokens (and the <|im_end|> that ends them)."""
    ids, labels = [], []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prefix = tokenizer.encode(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
                                      )[len(ids):]
            ids += prefix
            labels += [IGNORE_INDEX] * len(prefix)
            reply = tokenizer.encode(m["content"] + "<|im_end|>")
            ids += reply
            labels += reply
    return ids, labels


def _greedy_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Greedy packing: the example indices of each row of at most seq_len + 1 tokens, in order."""
    rows, used = [[]], 0
    for i, n in enumerate(lengths):
        if used + n > seq_len + 1 and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows if rows[-1] else []


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
    """Greedy packing into rows of seq_len + 1 tokens -> (inputs, targets) [rows, seq_len]."""
    rows = _greedy_rows([len(ids) for ids, _ in examples], seq_len)
    ids_t = torch.full((len(rows), seq_len + 1), pad_id, dtype=torch.long)
    lab_t = torch.full((len(rows), seq_len + 1), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        ids = [t for i in row for t in examples[i][0]]
        ids_t[r, : len(ids)] = torch.tensor(ids)
        lab_t[r, : len(ids)] = torch.tensor([t for i in row for t in examples[i][1]])
    return ids_t[:, :-1], lab_t[:, 1:]


def pack_positions(examples: list[tuple[list[int], list[int]]], seq_len: int) -> torch.Tensor:
    """The positions of pack's inputs [rows, seq_len]: counting from 0 within each example (the padding after the
    last is a document of its own), so that each example attends only to itself (mimo.model.document_mask)."""
    rows = _greedy_rows([len(ids) for ids, _ in examples], seq_len)
    pos = torch.arange(seq_len + 1).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        counts = [p for i in row for p in range(len(examples[i][0]))]
        pos[r, : len(counts)] = torch.tensor(counts)
        pos[r, len(counts):] -= len(counts)
    return pos[:, :-1]


class SFTBatches:
    """Packed rows, reshuffled every epoch with the seed; step s takes global rows [s*G, (s+1)*G). Yields (inputs,
    targets, positions) [micro, T] (pack's), or (inputs, targets) without positions (rows attend across examples)."""

    def __init__(self, inputs, targets, global_seqs, micro, rank, world, seed, device, positions=None):
        self._layout(global_seqs, micro, rank, world, seed, device)
        self.packed = (inputs, targets) if positions is None else (inputs, targets, positions)

    def _layout(self, global_seqs, micro, rank, world, seed, device):
        """Which global rows each process takes, shared with batch sources that hold their rows otherwise."""
        if global_seqs % (micro * world):
            raise MimoError(f"global batch {global_seqs} is not a multiple of micro batch {micro} x {world}")
        self.G, self.micro = global_seqs, micro
        self.rank, self.world, self.seed, self.device = rank, world, seed, device
        self.accum = global_seqs // (micro * world)

    def _row(self, i: int) -> int:
        n = len(self.packed[0])
        epoch, j = divmod(i, n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))[j].item()

    def take(self, rows: range) -> tuple:
        """Global rows -> (inputs, targets[, positions]) [len(rows), T]."""
        idx = [self._row(i) for i in rows]
        return tuple(t[idx] for t in self.packed)

    def micro_batches(self, step: int):
        base = step * self.G
        for m in range(self.accum):
            first = base + (m * self.world + self.rank) * self.micro
            yield tuple(t.to(self.device) for t in self.take(range(first, first + self.micro)))


def run(args):
    info = init_distributed(args.device)
    model, tokenizer = load_model_and_tokenizer(args.from_dir, "float32")
    if args.mtp_weight == 0:  # frozen, not merely unweighted (weight decay would still move them)
        model.model.mtp_layers.requires_grad_(False)
    cfg = replace(SFT_DEFAULTS, seed=args.seed, precision=args.precision, compile=args.compile, fsdp=args.fsdp,
                  mtp_weight=args.mtp_weight, mtp_weight_late=args.mtp_weight)
    cfg = cfg.with_overrides(args, info.world_size)
    examples = read_examples(Path(args.data)) if args.data else procedural_examples(args.problems, args.seed)
    examples, stats = decontaminate(examples)
    random.Random(args.seed).shuffle(examples)
    tokenized = [tokenize_example(tokenizer, ex) for ex in examples]
    too_long = sum(len(ids) > cfg.seq_len + 1 for ids, _ in tokenized)
    tokenized = [t for t in tokenized if len(t[0]) <= cfg.seq_len + 1]
    stats["dropped_too_long"] = too_long
    if len(tokenized) < 10:
        raise MimoError(f"only {len(tokenized)} SFT examples left after filtering")
    n_val = max(1, len(tokenized) // 50)
    inputs, targets = pack(tokenized[n_val:], cfg.seq_len, tokenizer.eos_token_id)
    positions = pack_positions(tokenized[n_val:], cfg.seq_len)
    val_packed = (*pack(tokenized[:n_val], cfg.seq_len, tokenizer.eos_token_id),
                  pack_positions(tokenized[:n_val], cfg.seq_len))
    print0(f"SFT data: {stats['examples']} examples, dropped {stats['dropped_benchmark_overlap']} for benchmark "
           f"16-gram overlap and {stats['dropped_eval_question']} for held-out questions, {too_long} too long; "
           f"{len(inputs)} packed rows of {cfg.seq_len} tokens")
    run_dir = Path(args.out)
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "sft_data.json").write_text(json.dumps(stats, indent=2) + "\n")
        (run_dir / "run_config.json").write_text(json.dumps(
            {"command": "sft", "from": str(args.from_dir), "data": args.data, "train": asdict(cfg)}, indent=2))
    batches = SFTBatches(inputs, targets, cfg.global_batch_seqs, cfg.micro_batch, info.rank, info.world_size,
                         args.seed, info.device, positions)

    def val():
        for i in range(0, min(len(val_packed[0]), cfg.micro_batch * cfg.eval_batches), cfg.micro_batch):
            yield tuple(t[i: i + cfg.micro_batch].to(info.device) for t in val_packed)

    return train(model, tokenizer, batches, cfg, run_dir, info, val_batches=val, title="sft",
                 extra_state={"from": str(args.from_dir)})


def add_arguments(p):
    p.add_argument("--from", dest="from_dir", required=True, metavar="MODEL_DIR", help="a pretrained model directory")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--data", metavar="FILE_OR_DIR", help="JSONL conversations (default: procedural <think> traces)")
    p.add_argument("--problems", type=int, default=40000, help="procedural examples to generate (without --data)")
    p.add_argument("--mtp-weight", type=float, default=0.1, help="weight of the MTP loss (0 = MTP layers frozen)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--device", default="auto")
