"""Model directories in the Hugging Face layout: save and load, never through pickle.

A model directory holds config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards with
model.safetensors.index.json), tokenizer.json, tokenizer_config.json and generation_config.json. Loading
builds the model on the meta device and assigns tensors read one at a time from the memory-mapped files,
so peak memory is about one copy of the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mimo.config import PRESETS, MiMoConfig, preset_config
from mimo.errors import MimoError
from mimo.model import MiMoForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# tensors some checkpoints carry that are derived, not learned
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise MimoError(f"unknown dtype {name!r} (choose from float32, bfloat16, float16)")
    return DTYPES[name]


def replace_dir(tmp: Path, target: Path):
    """Move a fully written directory into place; a crash at any point leaves the old one or the new one."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def weights_state_dict(model: MiMoForCausalLM, sd: dict | None = None) -> dict[str, torch.Tensor]:
    """state_dict under the published names; a tied lm_head is stored once (as model.embed_tokens)."""
    sd = dict(model.state_dict() if sd is None else sd)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_model(model: MiMoForCausalLM, out_dir, tokenizer=None, dtype=None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, generation: dict | None = None,
               state_dict: dict | None = None):
    """Write a complete model directory atomically (written beside, then renamed into place).
    state_dict: the weights to write when they are not the model's own (gathered from FSDP shards)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        dtype = parse_dtype(dtype)
        sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
              for k, v in weights_state_dict(model, state_dict).items()}
        cfg = MiMoConfig.from_dict(model.config.to_dict())
        cfg.torch_dtype = DTYPE_NAMES[next(iter(sd.values())).dtype]
        if tokenizer is not None:
            cfg.eos_token_id = tokenizer.eos_token_id
            cfg.bos_token_id = None
            tokenizer.save(tmp)
        cfg.save(tmp / "config.json")
        gen = {"eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id, "do_sample": True,
               "temperature": 0.6, "top_p": 0.95, **(generation or {})}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_weights(sd, tmp, max_shard_bytes)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_weights(sd: dict, out_dir: Path, max_shard_bytes: int):
    shards, current, size = [], {}, 0
    for name in sorted(sd):
        nbytes = sd[name].numel() * sd[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = sd[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ---- loading ---------------------------------------------------------------------------------------

def weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> file, from the index (sharded) or the single safetensors file."""
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, AssertionError, TypeError) as e:
            raise MimoError(f"{index_path}: malformed index ({e.__class__.__name__}: {e})") from None
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise MimoError(f"{f}: shard named in {INDEX_FILE} is missing")
        return files
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise MimoError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
    try:
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    except (SafetensorError, OSError, ValueError) as e:
        raise MimoError(f"{single}: not a readable safetensors file ({e})") from None


def _summarise(names, n=4):
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_model(model_dir, dtype=None, device="cpu") -> MiMoForCausalLM:
    """Load a MiMo or Qwen2 model directory (mimo, transformers or Xiaomi). dtype None: as stored."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise MimoError(f"{model_dir}: no such file or directory")
    if not model_dir.is_dir():
        raise MimoError(f"{model_dir}: not a model directory")
    cfg = MiMoConfig.load(model_dir / "config.json")
    dtype = parse_dtype(dtype)
    files = weight_files(model_dir)
    with torch.device("meta"):
        model = MiMoForCausalLM(cfg)
    expected = {k: v.shape for k, v in weights_state_dict(model).items()}
    present = {n for n in files if not n.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")
    some_file = next(iter(set(files.values())), model_dir)
    if missing := set(expected) - present:
        raise MimoError(f"{some_file}: missing tensor(s) {_summarise(missing)}")
    if extra := present - set(expected):
        raise MimoError(f"{some_file}: unexpected tensor(s) {_summarise(extra)} for this config.json")
    state = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    t = f.get_tensor(name)
                    if tuple(t.shape) != tuple(expected[name]):
                        raise MimoError(f"{path}: tensor {name} has shape {list(t.shape)}, "
                                        f"expected {list(expected[name])}")
                    if not t.is_floating_point():
                        raise MimoError(f"{path}: tensor {name} has dtype {t.dtype}, expected a float type")
                    target = dtype or t.dtype
                    state[name] = t.to(device=device, dtype=target)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise MimoError(f"{path}: not a readable safetensors file ({e})") from None
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def build_model(spec: str, *, meta: bool = False, seed: int = 0, dtype=None, device="cpu") -> MiMoForCausalLM:
    """A model from a directory or a preset name (presets get random weights; meta=True allocates nothing)."""
    path = Path(spec)
    if path.exists():
        return load_model(path, dtype=dtype, device=device)
    if spec not in PRESETS:
        raise MimoError(f"{spec}: not a model directory or preset (presets: {', '.join(PRESETS)})")
    cfg = preset_config(spec)
    if meta:
        with torch.device("meta"):
            return MiMoForCausalLM(cfg)
    model = MiMoForCausalLM(cfg).init_weights(seed)
    return model.to(device=device, dtype=parse_dtype(dtype) or torch.float32)


def load_model_and_tokenizer(model_dir, dtype: str | None = "auto"):
    """A model directory -> (model, tokenizer), checking that the tokenizer fits the embedding.
    dtype 'auto': as stored, except fp16 becomes fp32 on the CPU (fp16 matmuls are slow there)."""
    from mimo.tokenizer import Tokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise MimoError(f"{model_dir}: no such model directory")
    tokenizer = Tokenizer.load(path)
    model = load_model(path, dtype=None if dtype in (None, "auto") else dtype)
    if dtype == "auto" and model.lm_head.weight.dtype == torch.float16 and not torch.cuda.is_available():
        model = model.float()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise MimoError(f"{path / 'tokenizer.json'}: {tokenizer.vocab_size} tokens do not fit the model's "
                        f"embedding of {model.config.vocab_size}")
    return model, tokenizer
