"""GGUF files: export a model directory for llama.cpp and other on-device runtimes, and load one back.

`export_gguf` writes the main model as llama.cpp's architecture "qwen2" (MiMo's main model is exactly Qwen2),
with the metadata, tensor names and tokenizer keys llama.cpp's convert_hf_to_gguf.py writes for a Qwen2
checkpoint, so the file loads in llama.cpp as it is. Tensors stream from the safetensors shards one at a time
(quantized in row chunks), so a 7B model never sits in memory in float32.

- Types: f32, f16, bf16: every 2-D weight in that type; q8_0: as `convert_hf_to_gguf.py --outtype q8_0`
  (every 2-D weight Q8_0, token_embd and output included); q4_0: as `llama-quantize ... Q4_0` except for the
  output matrix (output.weight, or token_embd when tied), which llama-quantize makes Q6_K and mimo makes Q8_0
  (llama-quantize's own choice when Q6_K does not fit; mimo's kernels have no Q6_K). Norms and biases stay F32
  in every type, and a weight whose rows are not a multiple of 32 falls back to F16 (as the converter does).
- Tokenizer: tokenizer.ggml.model "gpt2" with the padded vocabulary ("[PAD{i}]" UNUSED tokens up to the
  embedding's rows), token types (special added tokens CONTROL, other added tokens USER_DEFINED), merges,
  tokenizer.ggml.pre "qwen2" (llama.cpp's regex for it is exactly mimo's QWEN2_SPLIT), bos/eos/padding ids,
  add_bos false and the chat template. The Hugging Face pipeline (normalizer, pre-tokenizer, decoder) is kept in
  mimo.tokenizer.huggingface so that mimo's loader rebuilds the identical tokenizer.
- MTP: llama.cpp refuses tensors its architecture does not use, so the MTP layers go to a companion file
  FILE.mtp.gguf, in llama.cpp's NextN convention (as its --mtp export: blocks after the main ones,
  blk.{L+k}.{attn_*,ffn_*} and blk.{L+k}.nextn.{eh_proj,enorm,hnorm,shared_head_norm}; eh_proj's input columns
  in llama.cpp's [embedding, hidden] order); the embedding and LM head are shared with the main file.
  `load_gguf` reads the companion when it sits beside the file, so MTP speculative decoding keeps working.

`load_gguf` reads such a file (or any qwen2 GGUF with these tensor types) through numpy memory maps: float
tensors stored in the requested dtype stay views of the file; Q8_0 / Q4_0 blocks go to mimo's quantized
linears when mimo.quantize provides `from_blocks` (otherwise they are dequantized).

One file of ~650 lines on purpose: the writer and the reader are the two halves of one mapping (tensor names,
type tables, metadata keys, the companion file), and a change to either must change the other.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import sys
import uuid
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from mimo.config import MiMoConfig
from mimo.errors import MimoError
from mimo.memory import advise

ARCH = "qwen2"
# llama.cpp's pre-tokenizer names whose regex is Qwen2's (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_QWEN2)
QWEN2_PRE_NAMES = ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2")
TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
         "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
WEIGHT_TYPE = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}
LOADABLE = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0)
QUANT_METHOD = {QT.Q8_0: "int8", QT.Q4_0: "int4"}  # mimo.quantize's names for ggml's blocks
QT_FORMAT = {QT.Q8_0: "q8_0", QT.Q4_0: "q4_0"}
KEY_CONFIG, KEY_EXPORT_ID, KEY_MTP, KEY_TOKENIZER = "mimo.config", "mimo.export_id", "mimo.mtp_layers", \
    "mimo.tokenizer.huggingface"
KEY_COMPANION = "mimo.mtp_companion_of"
PAD_TOKEN = re.compile(r"\[PAD\d+\]")
CHUNK_FLOATS = 1 << 24  # rows quantized at a time: about 64 MB of float32

GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight",
               **{f"self_attn.{p}_proj.{w}": f"attn_{p}.{w}" for p in "qkv" for w in ("weight", "bias")},
               **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")}}
MTP_NAMES = {**LAYER_NAMES, "token_layernorm.weight": "nextn.enorm.weight",
             "hidden_layernorm.weight": "nextn.hnorm.weight", "input_proj.weight": "nextn.eh_proj.weight",
             "final_layernorm.weight": "nextn.shared_head_norm.weight"}


def companion_path(path) -> Path:
    """FILE.gguf -> FILE.mtp.gguf, where the MTP layers go."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".gguf") + ".mtp.gguf")


def gguf_name(name: str, n_layers: int) -> str:
    """A mimo (Hugging Face) tensor name -> its GGUF name; MTP layer k becomes block n_layers + k."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = re.fullmatch(r"model\.(layers|mtp_layers)\.(\d+)\.(.+)", name)
    table = LAYER_NAMES if m and m[1] == "layers" else MTP_NAMES
    if not m or m[3] not in table:
        raise MimoError(f"tensor {name} has no GGUF name")
    return f"blk.{int(m[2]) + (n_layers if m[1] == 'mtp_layers' else 0)}.{table[m[3]]}"


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """input_proj [H, 2H] over [hidden, embedding] <-> eh_proj over [embedding, hidden] (an involution)."""
    h = w.shape[1] // 2
    return torch.cat([w[:, h:], w[:, :h]], dim=1)


def _tensor_type(name: str, shape, kind: str) -> QT:
    if len(shape) <= 1 or name.endswith("norm.weight"):
        return QT.F32
    qt = WEIGHT_TYPE[kind]
    if kind == "q4_0" and name == "output.weight":
        qt = QT.Q8_0
    if qt in (QT.Q8_0, QT.Q4_0) and shape[-1] % 32:
        qt = QT.F16  # convert_hf_to_gguf's fallback when a row does not split into blocks
    return qt


def _nbytes(shape, qt: QT) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qt]
    return int(np.prod(shape)) // block * size


def _encode(t: torch.Tensor, qt: QT) -> np.ndarray:
    """A tensor in the file's bytes for qt (quantized in row chunks: never the whole tensor in float32)."""
    if qt == QT.F32:
        return t.float().numpy()
    if qt == QT.F16:
        return t.to(torch.float16).numpy()
    if qt == QT.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    from mimo.quantize import quantize_blocks  # ggml's bytes (C kernels; chunked)

    return quantize_blocks(t, QT_FORMAT[qt]).view(t.shape[0], -1).numpy()


# ---- export ----------------------------------------------------------------------------------------

def _add_tokenizer(w: gguf.GGUFWriter, tokenizer, vocab_size: int, source):
    from mimo.tokenizer import QWEN2_SPLIT

    tk = tokenizer.tk
    data = json.loads(tk.to_str())
    if data["model"].get("type") != "BPE":
        raise MimoError(f"{source}: a {data['model'].get('type')} tokenizer cannot be exported (BPE only)")
    if json.dumps(QWEN2_SPLIT)[1:-1] not in json.dumps(data.get("pre_tokenizer")):
        raise MimoError(f"{source}: the tokenizer's pre-tokenizer is not Qwen2's, and llama.cpp has no pre-tokenizer "
                        f"name for it (mimo exports Qwen2-style byte-level BPE tokenizers)")
    reverse = {i: t for t, i in tk.get_vocab(with_added_tokens=True).items()}
    if max(reverse) >= vocab_size:
        raise MimoError(f"{source}: token id {max(reverse)} does not fit the embedding of {vocab_size} rows")
    added = tk.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        tokens.append(tok)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or (tok.startswith("<|") and tok.endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m)
              for m in data["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")  # llama.cpp's regex for it is QWEN2_SPLIT (case-insensitivity spelled out)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    # bos: Qwen2's config says <|endoftext|>; never added (add_bos false), but llama.cpp's default id is arbitrary
    bos = tokenizer.config.get("bos_token")
    bos_id = tk.token_to_id(bos.get("content") if isinstance(bos, dict) else bos) if bos else None
    bos_id = bos_id if bos_id is not None else tk.token_to_id("<|endoftext|>")
    if bos_id is not None:
        w.add_bos_token_id(bos_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    pad = tokenizer.config.get("pad_token") or "<|endoftext|>"
    pad_id = tk.token_to_id(pad.get("content") if isinstance(pad, dict) else pad)
    if pad_id is not None:
        w.add_pad_token_id(pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(tokenizer.chat_template)
    # what rebuilds the identical Hugging Face tokenizer (the vocabulary and merges are the keys above)
    w.add_string(KEY_TOKENIZER, json.dumps(_pipeline(data)))


def _add_hparams(w: gguf.GGUFWriter, cfg: MiMoConfig, n_blocks: int, kind: str, export_id: str, name: str):
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(n_blocks)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(TYPES[kind])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string(KEY_CONFIG, json.dumps(cfg.to_hf_dict()))
    w.add_string(KEY_EXPORT_ID, export_id)


def _write(out: Path, plan: list, read, add_metadata, progress: bool):
    """plan: [(gguf name, mimo name, shape, type)]; read(mimo name) -> tensor. Written beside, then renamed."""
    from tqdm import tqdm

    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        add_metadata(w)
        for gname, _, shape, qt in plan:
            w.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, qt), raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=sum(_nbytes(s, q) for _, _, s, q in plan), unit="B", unit_scale=True, file=sys.stderr,
                  desc=f"writing {out.name}", disable=not progress, mininterval=1.0) as bar:
            for _, name, shape, qt in plan:
                data = _encode(read(name), qt)
                w.write_tensor_data(data)
                bar.update(data.nbytes)
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)


def export_gguf(model_dir, out_path, type: str = "auto", *, mtp: bool = True, name: str | None = None,
                progress: bool = False) -> list[Path]:
    """Write MODEL_DIR as out_path (llama.cpp "qwen2") and its MTP layers as out_path's .mtp.gguf companion.
    type: f32 | f16 | bf16 | q8_0 | q4_0 | auto (the stored dtype). Returns the files written."""
    from mimo.model import MiMoForCausalLM
    from mimo.tokenizer import Tokenizer
    from mimo.weights import IGNORED_SUFFIXES, MappedSafetensors, weight_files, weights_state_dict

    model_dir, out = Path(model_dir), Path(out_path)
    if not model_dir.is_dir():
        raise MimoError(f"{model_dir}: no such model directory")
    if type != "auto" and type not in TYPES:
        raise MimoError(f"unknown GGUF type {type!r} (choose from {', '.join(TYPES)})")
    if out.suffix != ".gguf":
        raise MimoError(f"{out}: the output file must end in .gguf")
    cfg = MiMoConfig.load(model_dir / "config.json")
    tokenizer = Tokenizer.load(model_dir)
    files = weight_files(model_dir)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in weights_state_dict(MiMoForCausalLM(cfg)).items()}
    present = {n for n in files if not n.endswith(IGNORED_SUFFIXES)} - ({"lm_head.weight"} if cfg.tie_word_embeddings
                                                                        else set())
    if missing := sorted(set(expected) - present):
        raise MimoError(f"{model_dir}: missing tensor(s) {', '.join(missing[:4])}")
    if cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
        print(f"mimo: warning: {cfg.num_attention_heads} heads x head_dim {cfg.head_dim} != hidden "
              f"{cfg.hidden_size}: llama.cpp's qwen2 cannot load this file (mimo can)", file=sys.stderr)
    handles = {p: MappedSafetensors(p) for p in sorted(set(files.values()))}

    def read(hf: str) -> torch.Tensor:  # a copy, and the file's pages handed back: one tensor at a time
        t = handles[files[hf]].tensor(hf).clone()
        handles[files[hf]].release(hf)
        if tuple(t.shape) != expected[hf]:
            raise MimoError(f"{files[hf]}: tensor {hf} has shape {list(t.shape)}, expected {list(expected[hf])}")
        return _swap_halves(t) if hf.endswith("input_proj.weight") else t

    if type == "auto":
        stored = handles[files["model.embed_tokens.weight"]].entries["model.embed_tokens.weight"][0]
        type = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}.get(stored, "f16")
    L, K = cfg.num_hidden_layers, cfg.num_nextn_predict_layers if mtp else 0
    main = [n for n in expected if ".mtp_layers." not in n]
    tied = cfg.tie_word_embeddings

    def plan(names):
        rows = []
        for n in names:
            g = gguf_name(n, L)
            qt = _tensor_type("output.weight" if tied and g == "token_embd.weight" else g, expected[n], type)
            rows.append((g, n, expected[n], qt))
        return rows

    export_id = uuid.uuid4().hex
    title = name or model_dir.name
    n_params = sum(int(np.prod(s)) for n, s in expected.items() if ".mtp_layers." not in n)

    gen_file = model_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}

    def main_metadata(w):
        _add_hparams(w, cfg, L, type, export_id, title)
        w.add_size_label(gguf.size_label(n_params, 0, 0, 0))
        for key, hf, add in (("temp", "temperature", w.add_float32), ("top_p", "top_p", w.add_float32),
                             ("top_k", "top_k", w.add_int32), ("min_p", "min_p", w.add_float32)):
            if isinstance(gen.get(hf), (int, float)):  # as the converter: llama.cpp's sampling defaults
                add(f"general.sampling.{key}", gen[hf])
        w.add_uint32(KEY_MTP, K)
        _add_tokenizer(w, tokenizer, cfg.vocab_size, model_dir / "tokenizer.json")

    def mtp_metadata(w):
        _add_hparams(w, cfg, L + K, type, export_id, f"{title} MTP")
        w.add_uint32(f"{ARCH}.nextn_predict_layers", K)  # gguf.Keys.LLM.NEXTN_PREDICT_LAYERS
        w.add_string(KEY_COMPANION, out.name)

    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, plan(main), read, main_metadata, progress)
    written = [out]
    companion = companion_path(out)
    if K:
        _write(companion, plan([n for n in expected if ".mtp_layers." in n]), read, mtp_metadata, progress)
        written.append(companion)
    else:
        companion.unlink(missing_ok=True)  # a stale one would belong to another export
    return written


# ---- load ------------------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {QT.F32: np.float32, QT.F16: np.float16}


class _Tensor(NamedTuple):
    type: QT
    ne: tuple  # ggml's shape: the innermost dimension first
    data: np.ndarray | None  # over the memory map: float [*reversed(ne)], or uint8 [..., bytes per row]


class GGUFFile:
    """A qwen2 GGUF file's metadata and tensors over a copy-on-write memory map (tensor data is never copied).
    gguf.GGUFReader builds numpy views item by item (19 s for a 151k vocabulary and its merges); struct, 0.4 s."""

    def __init__(self, path):
        self.path = path = Path(path)
        if not path.is_file():
            raise MimoError(f"{path}: no such file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise MimoError(f"{path}: not a GGUF file")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for torch, nothing copied
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as e:
            raise MimoError(f"{path}: truncated or malformed GGUF file ({e})") from None
        if (arch := self.get("general.architecture")) != ARCH:
            raise MimoError(f"{path}: architecture {arch} is not supported (mimo loads {ARCH} exported by "
                            f"mimo export gguf)")

    def get(self, key: str, default=None, required: bool = False):
        if required and key not in self.fields:
            raise MimoError(f"{self.path}: missing metadata key {key}")
        return self.fields.get(key, default)

    def _take(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.mm, self.off)
        self.off += struct.calcsize(fmt)
        return v

    def _str(self) -> str:
        n = self._take("<Q")
        if self.off + n > len(self.mm):
            raise ValueError("a string runs past the end of the file")
        self.off += n
        return self.mm[self.off - n: self.off].decode("utf-8")

    def _value(self, vtype: int):
        if vtype == 8:
            return self._str()
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype])
        if vtype != 9:
            raise ValueError(f"unknown metadata type {vtype}")
        sub, n = self._take("<I"), self._take("<Q")
        if sub not in _SCALARS:  # strings (or nested arrays) one by one
            return [self._value(sub) for _ in range(n)]
        dt = np.dtype(_SCALARS[sub])
        if self.off + n * dt.itemsize > len(self.mm):
            raise ValueError("an array runs past the end of the file")
        self.off += n * dt.itemsize
        return np.frombuffer(self.mm, dt, n, self.off - n * dt.itemsize).tolist()

    def _parse(self):
        self.off = 4
        version, n_tensors, n_kv = self._take("<I"), self._take("<Q"), self._take("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (mimo reads 2 and 3)")
        self.fields = {}
        for _ in range(n_kv):
            key = self._str()
            self.fields[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            ne = tuple(self._take("<Q") for _ in range(self._take("<I")))
            infos.append((name, self._take("<I"), ne, self._take("<Q")))
        align = self.fields.get("general.alignment", 32)
        start = -(-self.off // align) * align
        self.tensors = {}
        for name, raw, ne, offset in infos:
            qt = QT(raw)
            n = int(np.prod(ne))
            nbytes = n // gguf.GGML_QUANT_SIZES[qt][0] * gguf.GGML_QUANT_SIZES[qt][1]
            if start + offset + nbytes > len(self.mm):
                raise MimoError(f"{self.path}: truncated (tensor {name} ends past the end of the file)")
            data = None
            if qt in _NUMPY:
                data = np.frombuffer(self.mm, _NUMPY[qt], n, start + offset).reshape(ne[::-1])
            elif qt in LOADABLE:  # BF16, Q8_0, Q4_0 as bytes: a row of the innermost dimension per row
                data = np.frombuffer(self.mm, np.uint8, nbytes, start + offset).reshape(*ne[:0:-1], -1)
            self.tensors[name] = _Tensor(qt, ne, data)


def _release(data: np.ndarray):
    """Hand back the memory-mapped pages under a tensor's bytes once a module holds a copy of them (tiled, swapped):
    they stop counting in this process's resident memory (the file stays in the page cache; a later read maps the
    pages again). Whole pages inside the tensor only; a no-op where madvise is unavailable."""
    advise(data.ctypes.data, data.nbytes, getattr(mmap, "MADV_DONTNEED", None))


def _config(f: GGUFFile, n_mtp: int) -> MiMoConfig:
    def key(k, default=None, required=False):
        v = f.get(f"{ARCH}.{k}", default, required)
        if isinstance(v, list) and len(set(v)) != 1:
            raise MimoError(f"{f.path}: per-layer {ARCH}.{k} is not supported")
        return v[0] if isinstance(v, list) else v

    if (scaling := key("rope.scaling.type", "none")) != "none":
        raise MimoError(f"{f.path}: rope scaling {scaling!r} is not supported")
    if "token_embd.weight" not in f.tensors:
        raise MimoError(f"{f.path}: missing tensor(s) token_embd.weight")
    mimo = json.loads(f.get(KEY_CONFIG, "{}"))  # what mimo wrote beside llama.cpp's keys

    def exact(k, v):  # llama.cpp's keys are float32: mimo's value when it is the same float32
        return mimo[k] if k in mimo and np.float32(mimo[k]) == np.float32(v) else float(v)

    heads = key("attention.head_count", required=True)
    try:
        return MiMoConfig(
            vocab_size=int(f.tensors["token_embd.weight"].ne[1]), hidden_size=key("embedding_length", required=True),
            intermediate_size=key("feed_forward_length", required=True),
            num_hidden_layers=key("block_count", required=True), num_attention_heads=heads,
            num_key_value_heads=key("attention.head_count_kv", heads), head_dim=key("attention.key_length", 0),
            num_nextn_predict_layers=n_mtp, max_position_embeddings=key("context_length", 32768),
            rms_norm_eps=exact("rms_norm_eps", key("attention.layer_norm_rms_epsilon", required=True)),
            rope_theta=exact("rope_theta", key("rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in f.tensors, attention_bias="blk.0.attn_q.bias" in f.tensors,
            **{k: mimo[k] for k in ("initializer_range", "bos_token_id", "eos_token_id", "torch_dtype") if k in mimo})
    except (MimoError, TypeError) as e:
        raise MimoError(f"{f.path}: {e}") from None


def read_gguf(path, mtp: bool = True) -> tuple[MiMoConfig, GGUFFile, dict, dict]:
    """(config, the main file, GGUF name -> tensor, GGUF name -> its file) for FILE.gguf and, when mtp and it
    is beside it, FILE.mtp.gguf."""
    f = GGUFFile(path)
    if (main := f.get(KEY_COMPANION)) is not None:
        raise MimoError(f"{f.path}: this is the MTP companion of {main}; load that file")
    tensors, sources = dict(f.tensors), dict.fromkeys(f.tensors, f.path)
    n_mtp, companion = 0, companion_path(f.path)
    if mtp and companion.is_file():
        c = GGUFFile(companion)
        if c.get(KEY_EXPORT_ID) != f.get(KEY_EXPORT_ID):
            raise MimoError(f"{companion}: does not belong to {f.path.name} (written by another export); "
                            f"remove it or export again")
        n_mtp = c.get(f"{ARCH}.nextn_predict_layers", 0)
        tensors |= c.tensors
        sources |= dict.fromkeys(c.tensors, companion)
    elif mtp and f.get(KEY_MTP, 0):
        print(f"mimo: {companion.name} is not beside {f.path.name}: loading without the MTP layers", file=sys.stderr)
    for name, t in tensors.items():
        if t.type not in LOADABLE:
            raise MimoError(f"{sources[name]}: tensor {name} has type {t.type.name}, which mimo does not load "
                            f"(supported: {', '.join(q.name for q in LOADABLE)})")
    return _config(f, n_mtp), f, tensors, sources


def gguf_config(path) -> MiMoConfig:
    """The model's config from FILE.gguf (and its companion's MTP layers), e.g. for `mimo info`."""
    return read_gguf(path)[0]


def generation_config(path) -> dict:
    """generation_config.json's sampling keys back from general.sampling.* (e.g. for mimo serve's defaults)."""
    fields = GGUFFile(path).fields
    keys = (("temp", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"))
    return {hf: round(fields[f"general.sampling.{k}"], 6) for k, hf in keys if f"general.sampling.{k}" in fields}


def _default_pipeline() -> dict:
    """mimo's tokenizer pipeline (Qwen2's split, byte-level), for qwen2 GGUF files mimo did not write."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from mimo.tokenizer import QWEN2_SPLIT

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return _pipeline(json.loads(tk.to_str()))


def _pipeline(data: dict) -> dict:
    pipeline = {k: data.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")}
    return pipeline | {"model": {k: v for k, v in data["model"].items() if k not in ("vocab", "merges")}}


def load_tokenizer(f: GGUFFile):
    """The tokenizer a GGUF file's metadata describes (tokens + merges -> a byte-level BPE), as mimo's Tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer

    from mimo.tokenizer import Tokenizer

    if (model := f.get("tokenizer.ggml.model", required=True)) != "gpt2":
        raise MimoError(f"{f.path}: tokenizer model {model!r} is not supported (mimo loads gpt2-style BPE)")
    tokens = f.get("tokenizer.ggml.tokens", required=True)
    types = f.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    if (pipeline := f.get(KEY_TOKENIZER)) is None and (pre := f.get("tokenizer.ggml.pre")) not in QWEN2_PRE_NAMES:
        raise MimoError(f"{f.path}: pre-tokenizer {pre!r} is not supported (mimo loads Qwen2's: "
                        f"{', '.join(QWEN2_PRE_NAMES)})")
    pipeline = json.loads(pipeline) if pipeline else _default_pipeline()
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types))
             if not (ty == gguf.TokenType.UNUSED and PAD_TOKEN.fullmatch(t))}
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": ty == gguf.TokenType.CONTROL}
             for i, ty in enumerate(types) if ty in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    cuts = [(m, m.find(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]  # split as llama.cpp does
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, **pipeline,
            "model": {**pipeline["model"], "type": "BPE", "vocab": vocab,
                      "merges": [[m[:c], m[c + 1:]] for m, c in cuts]}}
    try:
        tk = HFTokenizer.from_str(json.dumps(data))
    except Exception as e:  # noqa: BLE001 (the Rust library raises plain Exception subclasses)
        raise MimoError(f"{f.path}: the tokenizer in its metadata is invalid ({str(e).splitlines()[0]})") from None
    ids = {k: f.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "padding")}
    config = {f"{k[:3]}_token": tokens[i] for k, i in ids.items() if isinstance(i, int) and 0 <= i < len(tokens)}
    return Tokenizer(tk, config, f.get("tokenizer.chat_template"))


def _float(t: _Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float tensor from the file: a view of the memory map when dtype is what is stored."""
    if t.type in _NUMPY:
        x = torch.from_numpy(t.data)
    elif t.type == QT.BF16:
        x = torch.from_numpy(t.data.view(np.int16)).view(torch.bfloat16)
    elif t.type in QT_FORMAT:  # a quantized embedding: dequantized a chunk of rows at a time
        from mimo.quantize import dequantize_blocks

        ne = t.ne[::-1]
        blocks = torch.from_numpy(t.data).view(ne[0], ne[1] // 32, -1)
        x = torch.empty(ne, dtype=dtype)
        step = max(1, CHUNK_FLOATS // ne[1])
        for r in range(0, ne[0], step):
            x[r: r + step] = dequantize_blocks(blocks[r: r + step], QT_FORMAT[t.type], dtype)
        return x
    else:
        x = torch.from_numpy(gguf.quants.dequantize(t.data, t.type))
    return x if x.dtype == dtype else x.to(dtype)


def load_gguf(path, dtype: str | torch.dtype | None = "auto", quantize: str | None = None, mtp: bool = True,
              progress: bool = False):
    """A GGUF file (mimo export gguf, or any qwen2 GGUF in F32/F16/BF16/Q8_0/Q4_0) -> (model, tokenizer).

    dtype: auto / None as stored (fp16 becomes fp32 on a CPU; quantized files run in the dtype the
    model was saved in before export); quantize: int8 /
    int4 quantizes the float linears as they are read (a Q8_0 file's blocks are mimo's int8 as they are, a
    Q4_0 file's mimo's int4). FILE.mtp.gguf beside the file brings the MTP layers (mtp=False: ignored)."""
    from mimo.model import MiMoForCausalLM
    from mimo.quantize import QUANTIZED_LINEAR, check_method
    from mimo.weights import parse_dtype, weights_state_dict

    del progress  # memory maps: nothing to show
    cfg, f, tensors, sources = read_gguf(path, mtp)
    tokenizer = load_tokenizer(f)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise MimoError(f"{f.path}: {tokenizer.vocab_size} tokens do not fit the embedding of {cfg.vocab_size}")
    if quantize is not None:
        check_method(quantize)
    dtype = None if dtype in (None, "auto") else parse_dtype(dtype)
    if dtype is None:
        dtype = {QT.F16: torch.float16, QT.BF16: torch.bfloat16}.get(tensors["token_embd.weight"].type, torch.float32)
        if quantize or any(t.type in QUANT_METHOD for t in tensors.values()):
            # quantized: activations (and a quantized embedding, dequantized) in the dtype the model was saved
            # in before export, as loading that checkpoint with --quantize does: bf16 for MiMo-7B (its
            # embedding in fp32 would be 2.5 GB), fp32 for a model trained in fp32
            dtype = torch.bfloat16 if cfg.torch_dtype == "bfloat16" else torch.float32
        elif dtype == torch.float16 and not torch.cuda.is_available():
            dtype = torch.float32

    with torch.device("meta"):
        model = MiMoForCausalLM(cfg)
    expected = {k: tuple(v.shape) for k, v in weights_state_dict(model).items()}
    if cfg.tie_word_embeddings:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    names = {n: "token_embd.weight" if n == "lm_head.weight" and cfg.tie_word_embeddings
             else gguf_name(n, cfg.num_hidden_layers) for n in expected}
    if missing := sorted(g for g in names.values() if g not in tensors):
        raise MimoError(f"{f.path}: missing tensor(s) {', '.join(missing[:4])}"
                        + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""))
    if extra := sorted(set(tensors) - set(names.values())):
        raise MimoError(f"{sources[extra[0]]}: unexpected tensor(s) {', '.join(extra[:4])}")
    for name, shape in expected.items():
        if (ne := tensors[names[name]].ne)[::-1] != shape:
            raise MimoError(f"{sources[names[name]]}: tensor {names[name]} has shape {list(ne[::-1])}, "
                            f"expected {list(shape)}")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    state, modules = {}, {}
    for name, shape in expected.items():
        prefix, leaf = name.rsplit(".", 1)
        t = tensors[names[name]]
        if prefix not in linears or leaf != "weight":
            state.setdefault(name, _float(t, dtype))  # a linear's bias may come with its weight below
            continue
        bias = _float(tensors[names[prefix + ".bias"]], dtype) if prefix + ".bias" in expected else None
        swap = name.endswith("input_proj.weight")  # the file's [embedding, hidden] -> mimo's [hidden, embedding]
        cls = QUANTIZED_LINEAR.get(QUANT_METHOD.get(t.type))
        if cls and quantize in (None, QUANT_METHOD[t.type]) and hasattr(cls, "from_blocks") and \
                not (swap and shape[1] // 2 % 32):
            blocks = torch.from_numpy(t.data).view(shape[0], shape[1] // 32, -1)
            if swap:
                blocks = blocks.view(shape[0], 2, -1, blocks.shape[-1]).flip(1).reshape(blocks.shape)
            modules[prefix] = cls.from_blocks(blocks, shape[1], bias)
            if modules[prefix].blocks.data_ptr() != blocks.data_ptr():  # copied (tiled by 8 rows, swapped)
                _release(t.data)
            continue
        w = _swap_halves(_float(t, dtype)) if swap else _float(t, dtype)
        if quantize and hasattr(QUANTIZED_LINEAR[quantize], "from_weight") and shape[1] % 32 == 0:
            modules[prefix] = QUANTIZED_LINEAR[quantize].from_weight(w, bias)
            continue
        state[name] = w
        if bias is not None:
            state[prefix + ".bias"] = bias
    for prefix, module in modules.items():
        model.set_submodule(prefix, module)
    for prefix in modules:
        state.pop(prefix + ".bias", None)
    tie = cfg.tie_word_embeddings and "lm_head" not in modules
    if tie:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=False)
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    if meta := [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]:
        raise MimoError(f"{f.path}: could not place tensor(s) {', '.join(meta[:4])}")
    model.eval()
    if quantize and any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        from mimo.quantize import quantize_model
        model = quantize_model(model, quantize)
    return model, tokenizer


# ---- the command line: mimo export gguf ------------------------------------------------------------

def add_arguments(s):
    """`mimo export` -> its formats (gguf)."""
    sub = s.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    g = sub.add_parser("gguf", help="a GGUF file for llama.cpp and other on-device runtimes (mimo loads it too)")
    g.add_argument("model", metavar="MODEL_DIR")
    g.add_argument("--out", required=True, metavar="FILE.gguf",
                   help="the main model (llama.cpp qwen2); the MTP layers go to FILE.mtp.gguf beside it")
    g.add_argument("--type", default="auto", choices=["auto", *TYPES],
                   help="weights' type (auto: as stored); norms and biases stay f32")
    g.add_argument("--no-mtp", dest="mtp", action="store_false", help="write no MTP companion file")
    g.add_argument("--name", default=None, help="general.name (default: the directory's name)")


def run(args):
    import time

    t0 = time.perf_counter()
    written = export_gguf(args.model, args.out, args.type, mtp=args.mtp, name=args.name,
                          progress=sys.stderr.isatty())
    sizes = ", ".join(f"{p} ({p.stat().st_size / 2**20:.1f} MiB)" for p in written)
    print(f"wrote {sizes} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
