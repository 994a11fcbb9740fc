"""Many adapters served at once: aggregate decode tokens/s of 16 concurrent sequences spread over 8 LoRA adapters
on one base, against 16 sequences of the base model alone, in the engine `mimo serve` runs (one EngineSession,
fixed concurrency: a finished sequence is replaced at once, MTP speculation on, packed weights as serve has them),
and whether every adapted reply equals the reply the same adapter gives alone (greedy, one sequence at a time).

    python bench/serve_adapters.py MODEL_DIR_OR_PRESET [--adapters 8] [--clients 16] [--rank 16] [--requests 48]
        [--max-tokens 64] [--repeats 3]

The adapters are random (rank --rank on the attention and MLP projections, B drawn at random so that each one
changes the replies), written and read back in PEFT's format. A preset name builds that model with random weights
(speed does not depend on training). The two configurations alternate --repeats times; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# before torch loads, as every mimo command: spin-waiting OpenMP threads stall on a busy machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimo.checkpoint import build_model, load_model_and_tokenizer, save_model
from mimo.eval.tasks import get_task
from mimo.inference.adapters import load_adapter, save_adapter
from mimo.inference.engine import Engine
from mimo.inference.lora import LoRAConfig, add_lora, attach_adapters, lora_modules
from mimo.inference.sampling import SamplingParams
from mimo.tokenizer import Tokenizer


def write_random_adapter(model_dir: Path, out: Path, seed: int, rank: int):
    model, _ = load_model_and_tokenizer(model_dir)
    cfg = LoRAConfig(r=rank, alpha=2.0 * rank)
    add_lora(model, cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0.0, 0.02, generator=gen)
    save_adapter(model, out, cfg, str(model_dir))


def engine_for(model_dir: Path, adapter_dirs: list[Path]) -> Engine:
    model, tok = load_model_and_tokenizer(model_dir)
    selection = None
    if adapter_dirs:
        selection = attach_adapters(model, [load_adapter(d, model, str(model_dir)) for d in adapter_dirs])
    return Engine(model, tok, pack_weights=True, adapters=selection)


def run(engine: Engine, prompts, adapters: list[int | None], clients: int, max_tokens: int):
    """Fixed concurrency: `clients` sequences in one session until every prompt is done -> (tokens/s, replies)."""
    params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
    session = engine.session(max_batch=clients, mtp=True)
    todo = list(range(len(prompts)))
    rids: dict[int, int] = {}

    def add():
        i = todo.pop(0)
        rids[session.add(prompts[i], params, adapter=adapters[i])] = i

    for _ in range(min(clients, len(todo))):
        add()
    replies, tokens = {}, 0
    t0 = time.perf_counter()
    while session.has_work():
        for ev in session.step():
            if ev.finished:
                replies[rids[ev.request_id]] = ev.completion.tokens
                tokens += len(ev.completion.tokens)
                if todo:
                    add()
    wall = time.perf_counter() - t0
    session.close()
    return tokens / wall, [replies[i] for i in range(len(prompts))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", metavar="MODEL_DIR_OR_PRESET")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-adapters-"))
    model_dir = Path(args.model)
    task = get_task("reasoning")
    questions = [task.chat_prompt(r) for r in task.load()[: args.requests]]
    if not model_dir.exists():  # a preset: random weights and a tokenizer trained on the questions
        model = build_model(args.model, seed=0)
        tok = Tokenizer.train([], vocab_size=min(1024, model.config.vocab_size), min_frequency=1,
                              show_progress=False, texts=questions)
        model_dir = save_model(model, work / "base", tokenizer=tok)
    adapter_dirs = [work / f"adapter{a}" for a in range(args.adapters)]
    for a, d in enumerate(adapter_dirs):
        write_random_adapter(model_dir, d, seed=a + 1, rank=args.rank)
    base, many = engine_for(model_dir, []), engine_for(model_dir, adapter_dirs)
    tok = base.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    spread = [i % args.adapters for i in range(len(prompts))]
    rates = {"base": [], "adapters": []}
    for _ in range(args.repeats):
        rate, base_replies = run(base, prompts, [None] * len(prompts), args.clients, args.max_tokens)
        rates["base"].append(rate)
        rate, replies = run(many, prompts, spread, args.clients, args.max_tokens)
        rates["adapters"].append(rate)
    alone = [run(many, [p], [a], 1, args.max_tokens)[1][0] for p, a in zip(prompts, spread)]
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {"model": args.model, "adapters": args.adapters, "rank": args.rank, "clients": args.clients,
              "requests": len(prompts), "max_tokens": args.max_tokens, "threads": torch.get_num_threads(),
              "tokens_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
              "median_tokens_per_s": {k: round(v, 1) for k, v in med.items()},
              "adapters_vs_base": round(med["adapters"] / med["base"], 3),
              "replies_equal_alone": sum(r == a for r, a in zip(replies, alone)),
              "replies_differ_from_base": sum(r != b for r, b in zip(replies, base_replies))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
