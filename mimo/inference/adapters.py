"""LoRA adapters on disk in PEFT's format, which PEFT, vLLM and mimo all read:

    ADAPTER_DIR/adapter_config.json        peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, lora_dropout,
                                           target_modules, layers_to_transform + layers_pattern "layers" (the main
                                           model's layers, not the MTP layers'), bias "none", base_model_name_or_path
    ADAPTER_DIR/adapter_model.safetensors  base_model.model.{module}.lora_A.weight [r, in] and .lora_B.weight
                                           [out, r], module as in the base's checkpoint (model.layers.0.self_attn.
                                           q_proj); metadata mimo_base: a fingerprint of the base (config + a few
                                           embedding rows), checked when mimo loads the adapter; with a head of its
                                           own (tune --train-head) also base_model.model.lm_head.weight [vocab,
                                           hidden] and modules_to_save ["lm_head"], as PEFT writes them

`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_DIR, trust_remote_code=True),
ADAPTER_DIR)` opens what mimo writes with mimo's logits. mimo reads PEFT's own adapters for MiMo / Qwen2 bases too:
per-module ranks (rank_pattern, or simply the tensors' shapes), alpha_pattern, rsLoRA; tensors of MTP layers are
left out (they only draft). Refused, each with one line: DoRA, trained biases, modules_to_save other than the LM
head, another peft_type,
a tensor for a module the base does not have or of another shape, a base that is not the adapter's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mimo.errors import MimoError
from mimo.inference.lora import Adapter, LoRAConfig, lora_modules
from mimo.model import MiMoForCausalLM

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the transformers model)
TENSOR_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")  # PEFT drops the adapter name


def _fingerprint(c, embedding: torch.Tensor) -> str:
    arch = [c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim]
    rows = embedding[:8].detach().to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return hashlib.sha256(json.dumps(arch).encode() + rows.tobytes()).hexdigest()[:16]


def base_fingerprint(model: MiMoForCausalLM) -> str:
    """A short hash of the base's architecture and its first embedding rows in bf16 (the same whether the base is
    loaded in fp32, bf16 or quantized: the embedding is never quantized)."""
    return _fingerprint(model.config, model.model.embed_tokens.weight)


def dir_fingerprint(model_dir: Path) -> str:
    """base_fingerprint of a model directory, read from its config and memory-mapped weights (nothing loaded)."""
    from mimo.config import MiMoConfig
    from mimo.weights import MappedSafetensors, weight_files

    name = "model.embed_tokens.weight"
    return _fingerprint(MiMoConfig.load(model_dir / "config.json"),
                        MappedSafetensors(weight_files(model_dir)[name]).tensor(name))


def _write_atomic(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


HEAD = "lm_head"  # the one module an adapter may carry whole (PEFT's modules_to_save)


def adapter_config(cfg: LoRAConfig, num_layers: int, base: str, head: bool = False) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (the fields PEFT and vLLM read); head: the adapter
    carries its own LM head."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": cfg.r,
            "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.target_modules),
            "layers_to_transform": list(range(num_layers)), "layers_pattern": "layers", "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": [HEAD] if head else None,
            "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "revision": None}


def save_adapter(model: MiMoForCausalLM, out_dir, cfg: LoRAConfig, base: str) -> Path:
    """Write the model's LoRA updates (one adapter, as add_lora made them) as a PEFT adapter directory; each
    file is written beside and renamed into place. base: the base model's directory (base_model_name_or_path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in lora_modules(model).items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    if not tensors:
        raise MimoError("the model has no LoRA update to save")
    head = getattr(model.lm_head, "weight", None)
    trained_head = isinstance(head, nn.Parameter) and head.requires_grad  # tune --train-head
    if trained_head:
        tensors[f"{PREFIX}{HEAD}.weight"] = head.detach().float().cpu().contiguous()
    meta = {"format": "pt", "mimo_base": base_fingerprint(model)}
    _write_atomic(out_dir / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata=meta))
    config = adapter_config(cfg, model.config.num_hidden_layers, base, head=trained_head)
    _write_atomic(out_dir / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_base(path: Path, config: dict, metadata: dict, model: MiMoForCausalLM, model_dir: str):
    ours = base_fingerprint(model)
    theirs = metadata.get("mimo_base")
    base = str(config.get("base_model_name_or_path") or "")
    if theirs is not None:
        if theirs != ours:
            raise MimoError(f"{path}: an adapter for another base ({base or 'unnamed'}), not {model_dir}")
        return
    if not base:
        return
    if (Path(base) / "config.json").is_file():  # a local model directory: compare its fingerprint
        if dir_fingerprint(Path(base)) != ours:
            raise MimoError(f"{path}: an adapter for another base ({base}), not {model_dir}")
        return
    if Path(base.rstrip("/")).name.lower() != Path(str(model_dir).rstrip("/")).name.lower():
        raise MimoError(f"{path}: an adapter for {base}, not {model_dir} (if that is the same model under another "
                        f"name, set base_model_name_or_path in {path / CONFIG_FILE})")


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise MimoError(f"{path}: no such adapter directory")
    if not (path / CONFIG_FILE).is_file():
        raise MimoError(f"{path}: not an adapter directory (no {CONFIG_FILE})")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MimoError(f"{path / CONFIG_FILE}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise MimoError(f"{path / CONFIG_FILE}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise MimoError(f"{path}: a {config['peft_type']} adapter; mimo loads LoRA adapters")
    for key, bad, what in (("use_dora", True, "DoRA"), ("fan_in_fan_out", True, "fan_in_fan_out weights")):
        if config.get(key) == bad:
            raise MimoError(f"{path}: {what} adapters are not supported")
    if config.get("bias", "none") != "none":
        raise MimoError(f"{path}: adapters that train biases (bias={config['bias']!r}) are not supported")
    if set(config.get("modules_to_save") or ()) - {HEAD}:
        raise MimoError(f"{path}: adapters with modules_to_save {config['modules_to_save']} are not supported "
                        f"(only {HEAD!r}, a head of the adapter's own)")
    return config


def load_adapter(path, model: MiMoForCausalLM, model_dir: str, name: str | None = None) -> Adapter:
    """Read a PEFT LoRA adapter directory for this base model (checked: names, shapes, base)."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        found = "adapter_model.bin (pickle: convert it to safetensors)" if (path / "adapter_model.bin").exists() \
            else "nothing"
        raise MimoError(f"{path}: no {WEIGHTS_FILE} ({found})")
    try:
        tensors = load_file(str(weights))
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise MimoError(f"{weights}: not a readable safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head = tensors.pop(f"{PREFIX}{HEAD}.weight", None) if HEAD in (config.get("modules_to_save") or ()) else None
    if head is not None and (head.dim() != 2 or head.shape != (model.lm_head.out_features, model.lm_head.in_features)):
        raise MimoError(f"{weights}: {HEAD} is {list(head.shape)}; {model_dir} needs [{model.lm_head.out_features}, "
                        f"{model.lm_head.in_features}] (an adapter for another base?)")
    for key, t in tensors.items():
        m = TENSOR_RE.match(key.removeprefix(PREFIX))
        if not key.startswith(PREFIX) or m is None:
            raise MimoError(f"{weights}: tensor {key} is not a PEFT LoRA weight ({PREFIX}<module>.lora_A.weight)")
        pairs.setdefault(m["module"], {})[m["part"]] = t
    updates = {}
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    for module, ab in sorted(pairs.items()):
        if module.startswith("model.mtp_layers."):
            continue  # MTP layers only draft: verification by the adapted main model keeps speculation lossless
        if set(ab) != {"A", "B"}:
            raise MimoError(f"{weights}: {module} has lora_{next(iter(ab))} without lora_{'AB'[next(iter(ab)) == 'A']}")
        try:
            base = model.get_submodule(module)
        except AttributeError:
            base = None
        if base is None or not hasattr(base, "in_features") or isinstance(base, nn.Embedding):
            raise MimoError(f"{weights}: {module} is not a linear layer of {model_dir} (an adapter for another base?)")
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != base.in_features or B.shape != (base.out_features, r):
            raise MimoError(f"{weights}: {module} has lora_A {list(A.shape)} and lora_B {list(B.shape)}; {model_dir} "
                            f"needs [r, {base.in_features}] and [{base.out_features}, r] (an adapter for another base?)")
        a = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        updates[module] = (A, B, a / (r ** 0.5 if rslora else r))
    if not updates and head is None:
        raise MimoError(f"{weights}: no LoRA update for the main model")
    _check_base(path, config, metadata, model, model_dir)
    return Adapter(name or path.resolve().name, str(path), updates, head)


def add_arguments(p):
    """`mimo merge`: fold a LoRA adapter into its base, a standalone model directory."""
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="a PEFT LoRA adapter for MODEL_DIR")
    p.add_argument("--out", required=True, metavar="OUT_DIR")


def run(args):
    from mimo.checkpoint import load_model_and_tokenizer, save_model
    from mimo.inference.lora import merge_adapter

    model, tokenizer = load_model_and_tokenizer(args.model, "auto")
    adapter = load_adapter(args.adapter, model, args.model)
    merge_adapter(model, adapter)
    save_model(model, args.out, tokenizer=tokenizer)
    print(f"wrote {args.out}: {args.model} with {args.adapter} merged into {len(adapter.updates)} linears"
          + (" and its own LM head" if adapter.head is not None else ""),
          file=sys.stderr)
