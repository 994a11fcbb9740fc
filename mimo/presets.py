"""The size presets in one registry (as torchtitan's): each name says its model's shape, its corpus, its
pretraining and its speedrun plan. mimo-7b is a model shape only: the published MiMo-7B (config.mimo_7b_config).

`mimo info PRESET`, `mimo bench ... PRESET`, `mimo data build --preset`, `mimo pretrain --preset` and
`mimo speedrun --preset` all read this table; a command refuses a preset that lacks its part.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    # model: (depth, vocab_size, max_seq_len) of config.config_for_depth's one-dial shape; None: mimo-7b's own
    model: tuple[int, int, int] | None
    # corpus (data/corpus_config.default_config): (tokens, tokenizer vocab, problems, hard problems, tokenizer
    # sample documents)
    corpus: tuple[int, int, int, int, int] | None = None
    # pretraining: TrainConfig fields (train/loop.py); global batch = global_batch_seqs x seq_len tokens,
    # micro_batch per process and forward pass
    pretrain: dict | None = None
    # speedrun: each stage's extra flags (pretraining itself follows `pretrain` above); the evals pass their own
    # short length limits (MiMo's protocol, 32,768 new tokens, is for reasoning models)
    speedrun: dict | None = None


PRESETS = {
    "nano": Preset(
        model=(2, 512, 512),
        corpus=(1_000_000, 512, 8_000, 2_000, 10_000),
        pretrain={"max_steps": 300, "seq_len": 256, "global_batch_seqs": 8, "micro_batch": 8, "lr": 3e-3,
                  "warmup_steps": 20, "log_every": 10, "eval_every": 100, "eval_batches": 4,
                  "save_every": 100},
        speedrun={"pretrain": ["--max-steps", "150"], "sft": ["--max-steps", "60", "--problems", "3000"],
                  "rl": ["--max-steps", "4", "--batch-prompts", "8", "--group-size", "4", "--max-new-tokens", "96",
                         "--num-problems", "400"],
                  "reasoning_eval": ["--limit", "48", "--samples", "1", "--max-new-tokens", "96"],
                  "bench_eval": ["--limit", "10", "--max-new-tokens", "96"], "decode_tokens": "64"}),
    "tiny": Preset(
        model=(6, 2048, 512),
        corpus=(4_000_000, 2048, 45_000, 9_000, 20_000),
        pretrain={"max_steps": 480, "seq_len": 256, "global_batch_seqs": 32, "micro_batch": 16, "lr": 2e-3,
                  "warmup_steps": 30, "log_every": 10, "eval_every": 60, "eval_batches": 8,
                  "save_every": 60},
        speedrun={"pretrain": [], "sft": [], "rl": [],
                  "reasoning_eval": ["--limit", "200", "--samples", "4", "--max-new-tokens", "256"],
                  "bench_eval": ["--limit", "50", "--max-new-tokens", "256"], "decode_tokens": "128"}),
    "small": Preset(
        model=(12, 32000, 2048),
        corpus=(200_000_000, 32000, 1_200_000, 300_000, 200_000),
        pretrain={"max_steps": 5000, "seq_len": 1024, "global_batch_seqs": 256, "micro_batch": 8, "lr": 6e-4,
                  "warmup_steps": 200, "log_every": 10, "eval_every": 250, "eval_batches": 16,
                  "save_every": 250},
        speedrun={"pretrain": [], "sft": [], "rl": ["--max-steps", "100"],
                  "reasoning_eval": ["--limit", "200", "--samples", "4", "--max-new-tokens", "256"],
                  "bench_eval": ["--limit", "100", "--max-new-tokens", "512"], "decode_tokens": "256"}),
    "mimo-7b": Preset(model=None),
}


def presets_with(part: str) -> list[str]:
    """The names of the presets that have `part` (model, corpus, pretrain, speedrun), in the table's order."""
    return [name for name, preset in PRESETS.items() if part == "model" or getattr(preset, part) is not None]
