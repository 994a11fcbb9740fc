"""`mimo rl`'s settings: one RLConfig per run (stored in run_config.json and every checkpoint), checked before
the run starts. The recipe behind the defaults is in mimo/train/rl.py's docstring."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mimo.errors import MimoError
from mimo.train import rewards

EARLY_TERMINATION = ("fifo", "first-finished")


def flag(help: str, **argparse_settings) -> dict:
    """A field's command-line flag, in the field's metadata: its help and the argparse settings that its default
    does not imply (choices, nargs, metavar). add_flags reads them back."""
    return {"help": help, **argparse_settings}


@dataclass
class RLConfig:
    """Every field with a `flag` is a `mimo rl` flag (--name-with-dashes, its default the field's); the rest are
    fixed settings of the recipe."""
    max_steps: int = field(default=40, metadata=flag("rollout batches"))  # ~10 minutes for the tiny model on 2 cores
    max_minutes: float = field(default=0.0, metadata=flag(  # this process's budget: stop after the step past it
        "wall-clock budget for this process's training steps (0: none); stops after the step that passes it, with "
        "a checkpoint and final/"))
    save_every: int = field(default=10, metadata=flag("checkpoint every N steps"))
    keep_checkpoints: int = 2
    group_size: int = field(default=8, metadata=flag("samples per problem"))
    batch_prompts: int = field(default=16, metadata=flag("valid groups per step"))
    mini_batch: int = field(default=32, metadata=flag("sequences per optimizer step"))
    micro_batch: int = field(default=16, metadata=flag("sequences per forward pass"))
    epochs: int = field(default=1, metadata=flag("passes over each rollout batch"))
    lr: float = field(default=2e-5, metadata=flag("AdamW learning rate (constant)"))
    weight_decay: float = field(default=0.01, metadata=flag("AdamW weight decay"))
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = field(default=1.0, metadata=flag("gradient norm clip"))
    eps_low: float = field(default=0.2, metadata=flag("ratio clipped below at 1 - eps_low"))
    eps_high: float = field(default=0.28, metadata=flag("clip-higher: clipped above at 1 + eps_high"))
    adv_std: bool = field(default=True, metadata=flag("divide advantages by the group std",
                                                      negative_help="advantage = r - group mean"))
    adv_eps: float = 1e-6
    loss_norm: str = field(default="token", metadata=flag(
        "token: sum over all tokens / token count; sequence: mean of per-sequence means",
        choices=["token", "sequence"]))
    kl_coef: float = field(default=0.0, metadata=flag("KL penalty to the starting model (0: none)"))
    temperature: float = field(default=1.0, metadata=flag("sampling temperature"))
    max_new_tokens: int = field(default=256, metadata=flag("response length limit"))
    max_resample_rounds: int = field(default=2, metadata=flag(
        "dynamic sampling: extra batches' worth of problems drawn at most"))
    easy_prob: float = field(default=0.1, metadata=flag("chance a problem comes from the easy pool"))
    filter_samples: int = field(default=16, metadata=flag(
        "pass-rate filter before training: sample each problem N times with the starting model and drop those it "
        "solves N/N or 0/N (MiMo: 16; 0: off). --math/--code problems are always decontaminated against the "
        "benchmarks"))
    naive_rollout: bool = field(default=False, metadata=flag("generate whole rounds, then grade (baseline)"))
    early_termination: str = field(default="fifo", metadata=flag(
        "fifo: accept the first valid groups in start order once all before them finished (MiMo); first-finished: "
        "the first valid groups to finish (biased to short responses)", choices=list(EARLY_TERMINATION)))
    rollout_slots: int = field(default=0, metadata=flag("rows decoding at once (0: batch prompts x group size)"))
    code_reward: str = field(default="soft", metadata=flag("test-difficulty-driven code reward",
                                                           choices=list(rewards.CODE_MODES)))
    level_thresholds: tuple[float, float] = field(default=(2 / 3, 1 / 3), metadata=flag(
        "a test is easy above pass rate EASY, medium above MEDIUM, else hard", nargs=2, metavar=("EASY", "MEDIUM")))
    level_scores: tuple[float, float, float] = field(default=(0.2, 0.3, 0.5), metadata=flag(
        "code reward per difficulty level (ours: MiMo does not publish them)", nargs=3,
        metavar=("EASY", "MEDIUM", "HARD")))
    reward_workers: int = field(default=4, metadata=flag("reward threads (sandboxes at once)"))
    tasks: str | None = field(default=None, metadata=flag(
        "comma-separated mimo.data.reasoning tasks (None: all; 'none': none)"))
    num_problems: int = field(default=2000, metadata=flag("procedural train problems"))
    math: str | None = field(default=None, metadata=flag('math problems, lines {"problem", "answer"}', metavar="JSONL"))
    code: str | None = field(default=None, metadata=flag(
        'code problems, lines {"prompt", "tests": [...], "entry_point"}', metavar="JSONL"))
    precision: str = field(default="auto", metadata=flag("autocast of the update (see --rollout-precision)",
                                                         choices=["auto", "fp32", "bf16"]))
    rollout_precision: str = field(default="auto", metadata=flag(
        "weights rollouts decode with: bf16, a copy refreshed after every update (as vLLM's rollouts beside an "
        "fp32 trainer; the update recomputes log-probs with the training weights), or the fp32 policy itself; "
        "auto: bf16 where the device multiplies bf16 natively", choices=["auto", "fp32", "bf16"]))
    seed: int = field(default=0, metadata=flag("problems, sampling and easy-pool draws"))

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


# `mimo rl --help`'s groups: the flags of RLConfig's fields, in this order
FLAG_GROUPS = {
    "problems": ("tasks", "num_problems", "math", "code", "filter_samples"),
    "GRPO": ("group_size", "batch_prompts", "mini_batch", "micro_batch", "epochs", "eps_low", "eps_high", "adv_std",
             "loss_norm", "kl_coef", "max_resample_rounds", "easy_prob"),
    "rollout": ("temperature", "max_new_tokens", "naive_rollout", "early_termination", "rollout_slots",
                "rollout_precision", "reward_workers", "code_reward", "level_thresholds", "level_scores"),
    "optimisation": ("max_steps", "max_minutes", "save_every", "lr", "weight_decay", "grad_clip", "precision", "seed"),
}


def add_flags(group, names):
    """The flags of RLConfig's fields `names` on an argparse group: --name-with-dashes, the field's default,
    its type from the default (a bool: a switch; adv_std also --no-adv-std), the metadata's help and settings."""
    by_name = {f.name: f for f in fields(RLConfig)}
    for name in names:
        f = by_name[name]
        settings = dict(f.metadata)
        negative_help = settings.pop("negative_help", None)
        option = "--" + name.replace("_", "-")
        if isinstance(f.default, bool):
            group.add_argument(option, action="store_true", default=f.default, **settings)
            if negative_help is not None:
                group.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                   help=negative_help)
            continue
        value = f.default[0] if isinstance(f.default, tuple) else f.default
        kind = None if value is None or isinstance(value, str) or "choices" in settings else type(value)
        group.add_argument(option, default=f.default, **({"type": kind} if kind else {}), **settings)
