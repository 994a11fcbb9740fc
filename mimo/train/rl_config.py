"""`mimo rl`'s settings: one RLConfig per run (stored in run_config.json and every checkpoint), checked before
the run starts. The recipe behind the defaults is in mimo/train/rl.py's docstring."""

from __future__ import annotations

from dataclasses import dataclass

from mimo.errors import MimoError
from mimo.train import rewards

EARLY_TERMINATION = ("fifo", "first-finished")


@dataclass
class RLConfig:
    max_steps: int = 40  # about 10 minutes for the tiny model on 2 cores (docs/benchmarks.md)
    max_minutes: float = 0.0  # this process's training-time budget (0: none): stop after the step that passes it
    save_every: int = 10
    keep_checkpoints: int = 2
    group_size: int = 8
    batch_prompts: int = 16  # valid groups per update
    mini_batch: int = 32  # sequences per optimizer step
    micro_batch: int = 16  # sequences per forward pass
    epochs: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    adv_std: bool = True  # divide advantages by the group's std
    adv_eps: float = 1e-6
    loss_norm: str = "token"  # token | sequence
    kl_coef: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int = 256
    max_resample_rounds: int = 2
    easy_prob: float = 0.1
    filter_samples: int = 16  # pass-rate filter before RL: drop problems solved N/N or 0/N (MiMo: 16); 0: off
    naive_rollout: bool = False
    early_termination: str = "fifo"  # fifo (MiMo) | first-finished (biased to short responses)
    rollout_slots: int = 0  # 0: batch_prompts x group_size
    code_reward: str = "soft"
    level_thresholds: tuple[float, float] = (2 / 3, 1 / 3)
    level_scores: tuple[float, float, float] = (0.2, 0.3, 0.5)
    reward_workers: int = 4
    tasks: str | None = None  # comma-separated mimo.data.reasoning tasks; None: all; "none": no procedural problems
    num_problems: int = 2000
    math: str | None = None
    code: str | None = None
    precision: str = "auto"
    seed: int = 0

    def validate(self):
        for name in ("max_steps", "save_every", "batch_prompts", "mini_batch", "micro_batch", "epochs",
                     "max_new_tokens", "reward_workers"):
            if getattr(self, name) < 1:
                raise MimoError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise MimoError(f"--group-size must be at least 2 (advantages compare samples), got {self.group_size}")
        if self.loss_norm not in ("token", "sequence"):
            raise MimoError(f"--loss-norm must be token or sequence, got {self.loss_norm!r}")
        if not 0 <= self.easy_prob <= 1 or self.eps_low < 0 or self.eps_high < 0 or self.max_resample_rounds < 0:
            raise MimoError("--easy-prob must be in [0, 1]; --eps-low, --eps-high, --max-resample-rounds >= 0")
        if self.filter_samples == 1 or self.filter_samples < 0:
            raise MimoError(f"--filter-samples must be 0 (off) or at least 2, got {self.filter_samples}")
        if self.max_minutes < 0:
            raise MimoError(f"--max-minutes must be >= 0 (0: no budget), got {self.max_minutes}")
        if self.rollout_slots < 0:
            raise MimoError(f"--rollout-slots must be >= 0 (0: batch prompts x group size), got {self.rollout_slots}")
        if self.early_termination not in EARLY_TERMINATION:
            raise MimoError(f"--early-termination must be one of {', '.join(EARLY_TERMINATION)}, "
                            f"got {self.early_termination!r}")
        self.code_config().validate()

    def code_config(self) -> rewards.CodeReward:
        return rewards.CodeReward(self.code_reward, *self.level_thresholds, tuple(self.level_scores))
