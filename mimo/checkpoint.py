"""Model directories in the Hugging Face layout: save and load, never through pickle.

A model directory holds config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards with
model.safetensors.index.json), tokenizer.json, tokenizer_config.json and generation_config.json, and the Hugging
Face remote code (configuration_mimo.py, modeling_mimo.py from mimo/hf/) that config.json's auto_map names, so
that transformers' Auto classes, vLLM and SGLang open it as they open Xiaomi's MiMo checkpoints. Loading
builds the model on the meta device and assigns tensors read one at a time from the memory-mapped files,
so peak memory is about one copy of the weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from mimo.config import MiMoConfig, preset_config
from mimo.errors import MimoError
from mimo.model import MiMoForCausalLM
from mimo.presets import PRESETS
from mimo.weights import (
    DTYPE_NAMES,
    IGNORED_SUFFIXES,
    INDEX_FILE,
    SINGLE_FILE,
    MappedSafetensors,
    parse_dtype,
    weight_files,
    weights_state_dict,
)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def replace_dir(tmp: Path, target: Path):
    """Move a fully written directory into place; a crash at any point leaves the old one or the new one."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


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
        _write_hf_config(cfg, tmp)
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg, tokenizer, generation),
                                                               indent=2) + "\n")
        _write_weights(sd, tmp, max_shard_bytes)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_hf_config(cfg: MiMoConfig, out_dir: Path):
    """config.json as Xiaomi's (model_type mimo, MiMoForCausalLM) with an auto_map naming the configuration and
    modeling code copied beside it (mimo/hf/), as a Hugging Face repository with remote code has them."""
    from mimo.hf import AUTO_MAP, CODE_DIR, CODE_FILES

    d = {**cfg.to_hf_dict(), "auto_map": dict(AUTO_MAP)}
    (out_dir / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(CODE_DIR / name, out_dir / name)


def generation_config(cfg: MiMoConfig, tokenizer=None, overrides: dict | None = None) -> dict:
    """generation_config.json: MiMo's sampling (temperature 0.6, top-p 0.95) and the tokens that end a reply.
    With a tokenizer, eos_token_id lists every token mimo stops at (end of text first, then end of turn), which
    transformers' generate and vLLM both stop at; pad_token_id is the tokenizer's pad token."""
    eos = cfg.eos_token_id
    pad = None
    if tokenizer is not None:
        stops = [tokenizer.eos_token_id] + [i for i in tokenizer.stop_token_ids if i != tokenizer.eos_token_id]
        eos = stops if len(stops) > 1 else stops[0]
        pad = tokenizer.token_to_id(tokenizer.pad_token)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "do_sample": True, "temperature": 0.6,
           "top_p": 0.95}
    if pad is not None:
        gen["pad_token_id"] = pad
    return {**gen, **(overrides or {})}


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

def _summarise(names, n=4):
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _linear_names(model: MiMoForCausalLM) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def weights_bytes(cfg: MiMoConfig, dtype: torch.dtype, quantize: str | None = None) -> int:
    """Memory the model's weights take once loaded: dtype for all, or linears quantized (embedding in dtype)."""
    from mimo.quantize import quantized_bytes

    with torch.device("meta"):
        model = MiMoForCausalLM(cfg)
    linears = _linear_names(model) if quantize else set()
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, t in weights_state_dict(model).items():
        prefix = name.rsplit(".", 1)[0]
        total += quantized_bytes(t.shape, quantize) if prefix in linears and name.endswith(".weight") \
            else t.numel() * item
    if quantize and cfg.tie_word_embeddings:
        total += quantized_bytes(model.lm_head.weight.shape, quantize)
    return total


def check_fits(path, cfg: MiMoConfig, dtype: torch.dtype, quantize: str | None, free: int | None):
    """A MimoError, before anything is allocated, when the weights cannot fit in the memory available."""
    from mimo.memory import RUNTIME_RESERVE_BYTES, human

    need = weights_bytes(cfg, dtype, quantize)
    if free is None or need + RUNTIME_RESERVE_BYTES <= free:
        return need
    what = f"{quantize} ({str(dtype).removeprefix('torch.')} embedding)" if quantize else \
        str(dtype).removeprefix("torch.")
    others = {q: weights_bytes(cfg, torch.bfloat16, q) for q in ("int8", "int4") if q != quantize}
    smaller = [f"--quantize {q} needs about {human(n)}" for q, n in others.items() if n < need]
    raise MimoError(f"{path}: the weights need about {human(need)} in {what} and {human(free)} of memory is "
                    f"available" + (f" ({'; '.join(smaller)})" if smaller else ""))


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model directory's embedding is stored in."""
    path = weight_files(model_dir).get("model.embed_tokens.weight")
    if path is None:
        raise MimoError(f"{model_dir}: missing tensor(s) model.embed_tokens.weight")
    return MappedSafetensors(path).entries["model.embed_tokens.weight"][0]


def load_model(model_dir, dtype=None, device="cpu", quantize: str | None = None,
               progress: bool = False) -> MiMoForCausalLM:
    """Load a MiMo or Qwen2 model directory (mimo, transformers or Xiaomi). dtype None: as stored.

    Tensors are read from memory-mapped shards one at a time: kept as views of the file where dtype and device
    match what is stored (no copy), converted otherwise, and with quantize ("int8" | "int4") every linear weight
    is quantized as it is read (mimo/quantize.py), so no more than one tensor is ever held in float. Checks that
    the weights fit in the memory available first. progress: a tqdm bar on stderr."""
    from mimo.memory import available_bytes, trim_heap

    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise MimoError(f"{model_dir}: no such file or directory")
    if not model_dir.is_dir():
        raise MimoError(f"{model_dir}: not a model directory")
    cfg = MiMoConfig.load(model_dir / "config.json")
    dtype = parse_dtype(dtype)
    files = weight_files(model_dir)
    mapped = {path: MappedSafetensors(path) for path in sorted(set(files.values()))}
    with torch.device("meta"):
        model = MiMoForCausalLM(cfg)
    expected = {k: v.shape for k, v in weights_state_dict(model).items()}
    present = {n for n in files if not n.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")
    some_file = next(iter(mapped), model_dir)
    if missing := set(expected) - present:
        raise MimoError(f"{some_file}: missing tensor(s) {_summarise(missing)}")
    if extra := present - set(expected):
        raise MimoError(f"{some_file}: unexpected tensor(s) {_summarise(extra)} for this config.json")
    for name, want in expected.items():
        stored, shape, _, _ = mapped[files[name]].entries[name]
        if tuple(shape) != tuple(want):
            raise MimoError(f"{files[name]}: tensor {name} has shape {shape}, expected {list(want)}")
        if not stored.is_floating_point:
            raise MimoError(f"{files[name]}: tensor {name} has dtype {stored}, expected a float type")
    embed_dtype = mapped[files["model.embed_tokens.weight"]].entries["model.embed_tokens.weight"][0]
    if torch.device(device).type == "cpu":
        check_fits(model_dir, cfg, dtype or embed_dtype, quantize, available_bytes())
    linears = _linear_names(model) if quantize else set()
    if quantize:
        from mimo.quantize import QUANTIZED_LINEAR, check_method

        check_method(quantize)
    # largest first: a big tensor's pages and its quantization's scratch come while little else is held
    order = sorted(expected, key=lambda n: (-math.prod(expected[n]), str(files[n]), mapped[files[n]].entries[n][2]))
    total = sum(math.prod(expected[n]) for n in order)
    bar = tqdm(total=total, unit="param", unit_scale=True, desc=f"loading {model_dir.name}", file=sys.stderr,
               disable=not progress, mininterval=1.0)
    state, quantized = {}, {}
    with bar:
        for name in order:
            f = mapped[files[name]]
            t = f.tensor(name)
            prefix, leaf = name.rsplit(".", 1)
            if prefix in linears and leaf == "weight":
                bias_name = prefix + ".bias"
                bias = None
                if bias_name in expected:
                    bias = mapped[files[bias_name]].tensor(bias_name).to(device=device, dtype=dtype or t.dtype)
                quantized[prefix] = QUANTIZED_LINEAR[quantize].from_weight(t.to(device), bias)
                f.release(name)
                trim_heap()
            elif prefix in linears and leaf == "bias":
                pass  # read with its weight
            else:
                target = dtype or t.dtype
                if t.dtype != target or torch.device(device).type != "cpu" or quantize:
                    state[name] = t.to(device=device, dtype=target, copy=True)
                    f.release(name)
                else:
                    state[name] = t  # a view of the mapped file
                    if name != "model.embed_tokens.weight" or cfg.tie_word_embeddings:
                        f.prefault(name)  # (the embedding is read a row per token: its pages come as used)
            bar.update(t.numel())
        if quantize and cfg.tie_word_embeddings:
            quantized["lm_head"] = QUANTIZED_LINEAR[quantize].from_weight(state["model.embed_tokens.weight"], None)
    for prefix, module in quantized.items():  # quantized linears replace the meta ones
        model.set_submodule(prefix, module)
    if cfg.tie_word_embeddings and not quantize:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in quantized]
    if missing or unexpected:
        raise MimoError(f"{model_dir}: could not place tensor(s) {_summarise(missing + unexpected)}")
    if cfg.tie_word_embeddings and not quantize:
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


def load_model_and_tokenizer(model_dir, dtype: str | None = "auto", quantize: str | None = None,
                             progress: bool = False):
    """A model directory or GGUF file -> (model, tokenizer), checking that the tokenizer fits the embedding.
    dtype 'auto': as stored, except fp16 becomes fp32 on the CPU (fp16 matmuls are slow there).
    quantize, progress: as load_model's."""
    from mimo.tokenizer import Tokenizer

    path = Path(model_dir)
    if path.is_file() and path.suffix == ".gguf":
        from mimo.gguf import load_gguf

        return load_gguf(path, dtype, quantize, progress=progress)
    if not path.is_dir():
        raise MimoError(f"{model_dir}: no such model directory or GGUF file")
    tokenizer = Tokenizer.load(path)
    dtype = None if dtype in (None, "auto") else parse_dtype(dtype)
    if dtype is None and not torch.cuda.is_available() and stored_dtype(path) == torch.float16:
        dtype = torch.float32
    model = load_model(path, dtype=dtype, quantize=quantize, progress=progress)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise MimoError(f"{path / 'tokenizer.json'}: {tokenizer.vocab_size} tokens do not fit the model's "
                        f"embedding of {model.config.vocab_size}")
    return model, tokenizer
