"""Model configuration: the MiMo / Qwen2 hyperparameters, size presets set by one dial, and config.json I/O.

A config.json written by mimo loads in transformers (as MiMo through the remote code save_model writes beside it,
or as Qwen2), vLLM and SGLang (as MiMo); a config.json written by transformers (Qwen2, or MiMo saved back) or by
Xiaomi (MiMo) loads here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mimo.errors import MimoError
from mimo.jsonl import read_json
from mimo.presets import PRESETS

SUPPORTED_MODEL_TYPES = ("mimo", "qwen2")


@dataclass
class MiMoConfig:
    vocab_size: int = 151680
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    num_nextn_predict_layers: int = 1  # MTP layers (0 allowed)
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 640000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # bias on q/k/v (never on o)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    def validate(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MimoError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MimoError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise MimoError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            raise MimoError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise MimoError(f"rope_theta must be a positive number, got {self.rope_theta!r}")

    # ---- Hugging Face config.json ------------------------------------------------------------------

    def to_hf_dict(self) -> dict:
        """The config.json of a published MiMo checkpoint (Qwen2 keys + num_nextn_predict_layers; save_model adds
        the auto_map)."""
        d = {
            "architectures": ["MiMoForCausalLM"],
            "model_type": "mimo",
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "use_mrope": False,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> MiMoConfig:
        """Read a MiMo or Qwen2 config dict (as written by Xiaomi, transformers 4.x/5.x or mimo)."""
        if not isinstance(d, dict):
            raise MimoError(f"{source}: expected a JSON object")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise MimoError(f"{source}: model_type {model_type!r} is not supported "
                            f"(expected one of {', '.join(SUPPORTED_MODEL_TYPES)})")
        if d.get("hidden_act", "silu") != "silu":
            raise MimoError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (expected silu)")
        rope_scaling = d.get("rope_scaling") or {}
        rope_params = d.get("rope_parameters") or {}  # transformers 5 moves rope_theta here
        rope_type = rope_params.get("rope_type") or rope_scaling.get("rope_type") or rope_scaling.get("type")
        if rope_type not in (None, "default"):
            raise MimoError(f"{source}: rope scaling {rope_type!r} is not supported")
        if d.get("use_sliding_window"):
            raise MimoError(f"{source}: sliding-window attention is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise MimoError(f"{source}: missing key(s) {', '.join(missing)}")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        kw = {
            "vocab_size": d["vocab_size"],
            "hidden_size": d["hidden_size"],
            "intermediate_size": d["intermediate_size"],
            "num_hidden_layers": d["num_hidden_layers"],
            "num_attention_heads": d["num_attention_heads"],
            "num_key_value_heads": d.get("num_key_value_heads") or d["num_attention_heads"],
            "head_dim": d.get("head_dim") or 0,
            "num_nextn_predict_layers": d.get("num_nextn_predict_layers", 0) if model_type == "mimo" else 0,
            "max_position_embeddings": d.get("max_position_embeddings", 32768),
            "rms_norm_eps": d.get("rms_norm_eps", 1e-6),
            "rope_theta": d.get("rope_theta", rope_params.get("rope_theta", 10000.0)),
            "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
            "attention_bias": bool(d.get("attention_bias", True)),
            "initializer_range": d.get("initializer_range", 0.02),
            "bos_token_id": d.get("bos_token_id"),
            "eos_token_id": eos,
            "torch_dtype": str(d.get("torch_dtype") or d.get("dtype") or "float32"),
        }
        try:
            return cls(**kw)
        except MimoError as e:
            raise MimoError(f"{source}: {e}") from None
        except TypeError as e:
            raise MimoError(f"{source}: invalid value ({e})") from None

    def save(self, path: Path):
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> MiMoConfig:
        return cls.from_hf_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MiMoConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- presets: one dial (depth) sets the width, heads and FFN ---------------------------------------

def config_for_depth(depth: int, vocab_size: int, num_mtp: int = 1, max_seq_len: int = 2048,
                     rope_theta: float = 10000.0) -> MiMoConfig:
    """Qwen2-shaped model from one dial: hidden = 64*depth, head_dim 64, 3 query heads per KV head,
    SwiGLU FFN = 8/3 * hidden rounded up to a multiple of 128."""
    hidden = 64 * depth
    heads = depth
    return MiMoConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=128 * math.ceil(hidden * 8 / 3 / 128),
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 3),
        num_nextn_predict_layers=num_mtp,
        max_position_embeddings=max_seq_len,
        rope_theta=rope_theta,
        torch_dtype="float32",
    )


def mimo_7b_config() -> MiMoConfig:
    """Exactly the published MiMo-7B (XiaomiMiMo/MiMo-7B-Base / -RL config.json)."""
    return MiMoConfig(
        vocab_size=151680, hidden_size=4096, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, num_nextn_predict_layers=1,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=640000.0,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
    )


QUANTIZATIONS = ("int8", "int4")  # weight-only, mimo/quantize.py


def preset_config(name: str) -> MiMoConfig:
    """The model of a preset (mimo/presets.py)."""
    if name not in PRESETS:
        raise MimoError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    if PRESETS[name].model is None:
        return mimo_7b_config()
    depth, vocab, seq = PRESETS[name].model
    return config_for_depth(depth, vocab, max_seq_len=seq)
