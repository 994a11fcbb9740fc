"""`mimo info`: a model's or a preset's architecture, parameter counts and weight memory, read from its config
alone (the model is built on the meta device, so even mimo-7b costs no memory)."""

from __future__ import annotations

import json
from pathlib import Path

from mimo.errors import MimoError


def add_arguments(p):
    p.add_argument("model", metavar="MODEL_DIR_OR_PRESET")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args):
    import torch

    from mimo.config import MiMoConfig, preset_config
    from mimo.model import MiMoForCausalLM

    path = Path(args.model)
    if path.is_file() and path.suffix == ".gguf":
        from mimo.gguf import gguf_config

        cfg = gguf_config(path)
    elif path.exists():
        cfg = MiMoConfig.load(path / "config.json") if path.is_dir() else MiMoConfig.load(path)
    elif "/" in args.model or args.model.startswith("."):
        raise MimoError(f"{args.model}: no such file or directory")
    else:
        cfg = preset_config(args.model)
    with torch.device("meta"):
        counts = MiMoForCausalLM(cfg).num_params()
    info = {
        "model": args.model,
        "architecture": {k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_nextn_predict_layers", "max_position_embeddings",
            "rope_theta", "rms_norm_eps", "tie_word_embeddings", "attention_bias")},
        "parameters": counts,
        "weight_bytes": {name: counts["total"] * nbytes for name, nbytes in
                         (("fp32", 4), ("bf16", 2), ("int8", 1))},
    }
    if args.json:
        print(json.dumps(info))
        return
    a = info["architecture"]
    print(f"{args.model}: MiMo decoder, {a['num_hidden_layers']} layers, hidden {a['hidden_size']}, "
          f"FFN {a['intermediate_size']}, {a['num_attention_heads']} query / {a['num_key_value_heads']} KV heads "
          f"(head_dim {a['head_dim']}), vocab {a['vocab_size']}, rope_theta {a['rope_theta']:g}, "
          f"{a['num_nextn_predict_layers']} MTP layer(s)")
    print(f"parameters: main {counts['main']:,}  per MTP layer {counts['mtp_per_layer']:,}  "
          f"total {counts['total']:,}")
    print("weights: " + "  ".join(f"{k} {_human_bytes(v)}" for k, v in info["weight_bytes"].items()))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
