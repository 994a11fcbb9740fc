"""GGUF export and load: llama.cpp's names and metadata, each type's weights, the tokenizer, the MTP companion,
and one-line errors. llama.cpp itself is checked by bench/gguf_llama_cpp_check.py (the bench env)."""

import copy
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from helpers import SAMPLE_TEXT, tiny_model

from mimo.checkpoint import save_model
from mimo.cli import main
from mimo.config import MiMoConfig
from mimo.errors import MimoError
from mimo.gguf import companion_path, export_gguf, generation_config, gguf_config, load_gguf
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.quantize import QUANTIZED_LINEAR, Int4Linear, Int8Linear

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]
PAD = 20  # embedding rows past the tokenizer's: "[PAD{i}]" tokens in the file
TEXTS = [*SAMPLE_TEXT[:5], "<|im_start|>user\nhi<|im_end|>\n<think>x</think>", "  spaces\n\n\ttabs 12345 ok"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    """(model, its directory) for a tiny model whose embedding is padded past the tokenizer."""
    model = tiny_model(vocab_size=tokenizer.vocab_size + PAD, seed=1)
    with torch.no_grad():  # norms and biases away from their init, so that a mix-up would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model, save_model(model, tmp_path_factory.mktemp("src") / "tiny", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {kind: export_gguf(source[1], out / f"tiny-{kind}.gguf", kind)[0] for kind in TYPES}


def ids_for(tokenizer):
    return torch.tensor([tokenizer.encode(SAMPLE_TEXT[0])[:24]])


def mtp_logits(model, ids):
    return model(ids, targets=ids.roll(-1, 1), return_mtp_logits=True).mtp_logits[0]


def read(path):
    return gguf.GGUFReader(path)


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def ggml_round_trip(w: torch.Tensor, qt: QT) -> torch.Tensor:
    """What ggml's blocks of type qt stand for (gguf-py is ggml's reference code)."""
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.float().numpy(), qt), qt))


# ---- weights ----------------------------------------------------------------------------------------

def test_f32_is_exact_with_mtp(source, exported, tokenizer):
    model, model_dir = source
    loaded, _ = load_gguf(exported["f32"])
    assert loaded.config == MiMoConfig.load(model_dir / "config.json")
    ids = ids_for(tokenizer)
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() <= 1e-5
        assert (mtp_logits(loaded, ids) - mtp_logits(model, ids)).abs().max() <= 1e-5
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


@pytest.mark.parametrize("kind,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_types_hold_the_rounded_weights(source, exported, tokenizer, kind, dtype):
    model, _ = source
    loaded, _ = load_gguf(exported[kind])
    stored = torch.float32 if dtype == torch.float16 else dtype  # fp16 runs in fp32 on a CPU, as load_model_and_tokenizer
    assert loaded.lm_head.weight.dtype == stored
    for name, t in model.state_dict().items():
        # 2-D weights in the file's type; norms and biases F32 in the file, as stored in the model's dtype
        expect = t.to(dtype).to(stored) if t.dim() == 2 else t.to(stored)
        assert torch.equal(loaded.state_dict()[name], expect), name
    ids = ids_for(tokenizer)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits.float(), model(ids).logits, atol=0.05)
    assert load_gguf(exported[kind], dtype="float32")[0].lm_head.weight.dtype == torch.float32


def check_quantized(loaded, model, ids, qtype_of):
    """loaded holds ggml's blocks for every 2-D weight of model (qtype_of(name) gives the type): as mimo's
    quantized linears holding the file's bytes (their weights exactly ggml's), or dequantized (exactly)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2:
                p.copy_(ggml_round_trip(p, qtype_of(name)))
    blocks = {n: m for n, m in loaded.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    for n, m in blocks.items():
        assert torch.equal(m.dequantized(torch.float32), ref.get_submodule(n).weight), n
    assert torch.equal(loaded.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    with torch.no_grad():
        got, want = loaded(ids).logits, ref(ids).logits
        # dequantized: the same float product; mimo's kernels: int8 activations, as llama.cpp's
        atol = 1e-5 if not blocks else 0.02 * want.abs().max().item()
        assert (got - want).abs().max() <= atol
        if model.config.num_nextn_predict_layers:
            assert (mtp_logits(loaded, ids) - mtp_logits(ref, ids)).abs().max() <= atol
    return blocks


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_types_compute_with_ggmls_blocks(source, exported, tokenizer, kind):
    """The loaded model equals the source model with every weight replaced by what its ggml blocks decode to."""
    model, _ = source
    reader = read(exported[kind])
    types = {t.name: t.tensor_type for t in reader.tensors}
    q = QT.Q8_0 if kind == "q8_0" else QT.Q4_0
    assert types["token_embd.weight"] == q and types["blk.0.ffn_down.weight"] == q
    assert types["output.weight"] == QT.Q8_0  # q4_0 too: llama-quantize's Q6_K is not among mimo's kernels
    assert types["blk.0.attn_norm.weight"] == QT.F32 and types["blk.0.attn_q.bias"] == QT.F32
    loaded, _ = load_gguf(exported[kind])
    blocks = check_quantized(loaded, model, ids_for(tokenizer), lambda n: QT.Q8_0 if n == "lm_head.weight" else q)
    if hasattr(Int8Linear, "from_blocks"):  # the file's bytes as they are, MTP input_proj's halves swapped back
        assert len(blocks) == 7 * 3 + 2 and "model.mtp_layers.0.input_proj" in blocks  # + input_proj, lm_head


def test_quantize_while_loading_a_float_file(source, exported, tokenizer):
    model, _ = source
    loaded, _ = load_gguf(exported["f32"], quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.modules())
    assert isinstance(loaded.lm_head, QUANTIZED_LINEAR["int8"])
    ids = ids_for(tokenizer)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=0.05)
    with pytest.raises(MimoError, match="unknown quantization"):
        load_gguf(exported["f32"], quantize="int3")


@pytest.mark.parametrize("kind", ["f32", "q4_0"])
def test_tied_embeddings(tmp_path, tokenizer, kind):
    model = tiny_model(vocab_size=tokenizer.vocab_size, tie=True, num_mtp=0)
    path = export_gguf(save_model(model, tmp_path / "tied", tokenizer=tokenizer), tmp_path / "t.gguf", kind)
    assert path == [tmp_path / "t.gguf"] and not companion_path(path[0]).exists()
    types = {t.name: t.tensor_type for t in read(path[0]).tensors}
    assert "output.weight" not in types  # llama.cpp's qwen2 then uses token_embd as the output
    assert types["token_embd.weight"] == (QT.F32 if kind == "f32" else QT.Q8_0)  # the output matrix's type
    loaded, _ = load_gguf(path[0])
    assert loaded.config.tie_word_embeddings and loaded.config.num_nextn_predict_layers == 0
    ids = ids_for(tokenizer)
    if kind == "q4_0":
        check_quantized(loaded, model, ids, lambda n: QT.Q8_0 if n.startswith(("lm_head", "model.embed")) else QT.Q4_0)
        return
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() <= 1e-5


def test_bf16_source_exports_bf16_by_default(tmp_path, tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    d = save_model(model, tmp_path / "bf", tokenizer=tokenizer, dtype="bfloat16")
    reader = read(export_gguf(d, tmp_path / "bf.gguf")[0])
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    loaded, _ = load_gguf(tmp_path / "bf.gguf")
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t.to(torch.bfloat16)), name


# ---- what llama.cpp reads ---------------------------------------------------------------------------

def test_metadata_and_tensor_names_are_llama_cpps(source, exported, tokenizer):
    model, _ = source
    cfg = model.config
    for kind, ftype in zip(TYPES, (0, 1, 32, 7, 2)):  # llama_ftype: ALL_F32, MOSTLY_F16, _BF16, _Q8_0, _Q4_0
        assert field(read(exported[kind]), "general.file_type") == ftype
    r = read(exported["f32"])
    expect = {"general.architecture": "qwen2", "general.type": "model", "general.quantization_version": 2,
              "qwen2.block_count": cfg.num_hidden_layers, "qwen2.context_length": cfg.max_position_embeddings,
              "qwen2.embedding_length": cfg.hidden_size, "qwen2.feed_forward_length": cfg.intermediate_size,
              "qwen2.attention.head_count": cfg.num_attention_heads,
              "qwen2.attention.head_count_kv": cfg.num_key_value_heads, "qwen2.rope.freq_base": cfg.rope_theta,
              "qwen2.attention.key_length": cfg.head_dim, "qwen2.attention.value_length": cfg.head_dim,
              "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.add_bos_token": False,
              "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
              "tokenizer.ggml.padding_token_id": tokenizer.token_to_id("<|endoftext|>"),
              "tokenizer.chat_template": tokenizer.chat_template}
    for k, v in expect.items():
        assert field(r, k) == v, k
    assert np.float32(field(r, "qwen2.attention.layer_norm_rms_epsilon")) == np.float32(cfg.rms_norm_eps)
    # generation_config.json's sampling, as convert_hf_to_gguf.py writes it
    assert np.float32(field(r, "general.sampling.temp")) == np.float32(0.6)
    assert np.float32(field(r, "general.sampling.top_p")) == np.float32(0.95)
    assert field(r, "qwen2.rope.scaling.type") is None and field(r, "qwen2.nextn_predict_layers") is None
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    n = tokenizer.vocab_size
    assert len(tokens) == len(types) == cfg.vocab_size == n + PAD
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + PAD)] and set(types[n:]) == {gguf.TokenType.UNUSED}
    assert all(types[tokenizer.token_to_id(t)] == gguf.TokenType.CONTROL
               for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    vocab = tokenizer.tk.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items()) and types[vocab["Ġt"]] == gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.tk.to_str())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    names = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    H, F, V, KV = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_key_value_heads * cfg.head_dim
    want = {"token_embd.weight": (H, V), "output_norm.weight": (H,), "output.weight": (H, V)}  # ggml's order
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        want |= {b + "attn_norm.weight": (H,), b + "ffn_norm.weight": (H,), b + "attn_q.weight": (H, H),
                 b + "attn_q.bias": (H,), b + "attn_k.weight": (H, KV), b + "attn_k.bias": (KV,),
                 b + "attn_v.weight": (H, KV), b + "attn_v.bias": (KV,), b + "attn_output.weight": (H, H),
                 b + "ffn_gate.weight": (H, F), b + "ffn_up.weight": (H, F), b + "ffn_down.weight": (F, H)}
    assert names == want  # nothing llama.cpp's qwen2 would refuse
    mtp = {t.name: tuple(int(d) for d in t.shape) for t in read(companion_path(exported["f32"])).tensors}
    b = f"blk.{cfg.num_hidden_layers}."
    assert mtp[b + "nextn.eh_proj.weight"] == (2 * H, H) and mtp[b + "attn_q.weight"] == (H, H)
    assert {k.removeprefix(b) for k in mtp} >= {"nextn.enorm.weight", "nextn.hnorm.weight",
                                                "nextn.shared_head_norm.weight", "ffn_down.weight"}


def test_config_and_sampling_without_loading(source, exported):
    model, _ = source
    assert gguf_config(exported["q4_0"]).num_nextn_predict_layers == 1
    assert gguf_config(exported["q4_0"]).hidden_size == model.config.hidden_size
    assert generation_config(exported["q4_0"]) == {"temperature": 0.6, "top_p": 0.95}


def test_mtp_companion_in_llama_cpps_nextn_order(source, exported):
    """eh_proj reads [embedding, hidden] (llama.cpp's NextN concat); mimo's input_proj reads [hidden, embedding]."""
    model, _ = source
    c = read(companion_path(exported["f32"]))
    assert field(c, "qwen2.nextn_predict_layers") == 1 and field(c, "qwen2.block_count") == 3
    eh = next(t for t in c.tensors if t.name.endswith("nextn.eh_proj.weight")).data
    w = model.model.mtp_layers[0].input_proj.weight.detach().numpy()
    H = model.config.hidden_size
    assert np.array_equal(eh[:, :H], w[:, H:]) and np.array_equal(eh[:, H:], w[:, :H])


# ---- tokenizer ----------------------------------------------------------------------------------------

def test_tokenizer_round_trip(exported, tokenizer):
    _, tok = load_gguf(exported["q4_0"])
    for text in TEXTS:
        assert tok.encode(text) == tokenizer.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == tokenizer.vocab_size
    assert (tok.eos_token, tok.eos_token_id, tok.stop_token_ids) == \
        (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.stop_token_ids)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 12 + 7?"}]
    assert tok.chat_template == tokenizer.chat_template
    assert tok.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert tok.decode(tok.encode("<|im_end|>x"), skip_special_tokens=True) == "x"


def test_generation_with_mtp_matches_the_source(source, exported, tokenizer):
    model, _ = source
    loaded, tok = load_gguf(exported["f32"])
    prompt = [tokenizer.encode(SAMPLE_TEXT[1])[:12]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    want = Engine(model, tokenizer).generate(prompt, params)[0].tokens
    got = Engine(loaded, tok).generate(prompt, params, mtp=True, num_draft=2)[0]
    assert got.tokens == want and got.spec is not None


# ---- the MTP companion ------------------------------------------------------------------------------

def test_companion_rules(source, exported, tmp_path, capsys):
    _, model_dir = source
    lone = tmp_path / "lone.gguf"
    shutil.copy(exported["f32"], lone)  # without its companion: the main model, with a note
    model, _ = load_gguf(lone)
    assert model.config.num_nextn_predict_layers == 0 and "loading without the MTP layers" in capsys.readouterr().err
    assert load_gguf(exported["f32"], mtp=False)[0].config.num_nextn_predict_layers == 0
    with pytest.raises(MimoError, match="MTP companion of tiny-f32.gguf; load that file"):
        load_gguf(companion_path(exported["f32"]))
    shutil.copy(companion_path(exported["f16"]), companion_path(lone))  # another export's companion
    with pytest.raises(MimoError, match="does not belong to lone.gguf"):
        load_gguf(lone)
    export_gguf(model_dir, lone, "f32", mtp=False)  # --no-mtp removes the stale companion
    assert not companion_path(lone).exists()
    assert load_gguf(lone)[0].config.num_nextn_predict_layers == 0


# ---- errors: one line each ----------------------------------------------------------------------------

def rewrite(src, dst, arch=None, drop=(), retype=None):
    """A copy of a GGUF file with another architecture, tensors dropped or one tensor's type replaced."""
    r = gguf.GGUFReader(src)
    arch = arch or field(r, "general.architecture")
    w = gguf.GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        key = name.replace("qwen2.", f"{arch}.", 1)
        w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        if t.name in drop:
            continue
        if retype and t.name == retype[0]:
            shape = [int(d) for d in reversed(t.shape)]
            nbytes = int(np.prod(shape)) // gguf.GGML_QUANT_SIZES[retype[1]][0] * gguf.GGML_QUANT_SIZES[retype[1]][1]
            w.add_tensor(t.name, np.zeros((shape[0], nbytes // shape[0]), np.uint8), raw_dtype=retype[1])
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def one_line_error(path, match, **kw):
    with pytest.raises(MimoError, match=match) as e:
        load_gguf(path, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_errors(exported, tmp_path):
    src = exported["q8_0"]
    (tmp_path / "text.gguf").write_text("not a gguf file at all\n")
    one_line_error(tmp_path / "text.gguf", "text.gguf: not a GGUF file")
    one_line_error(tmp_path / "absent.gguf", "absent.gguf: no such file")
    msg = one_line_error(rewrite(src, tmp_path / "llama.gguf", arch="llama"), "architecture llama is not supported")
    assert msg.endswith("(mimo loads qwen2 exported by mimo export gguf)")
    one_line_error(rewrite(src, tmp_path / "q41.gguf", retype=("blk.1.ffn_up.weight", QT.Q4_1)),
                   r"tensor blk.1.ffn_up.weight has type Q4_1, which mimo does not load \(supported: F32, F16")
    one_line_error(rewrite(src, tmp_path / "drop.gguf", drop=("blk.1.attn_k.weight",)),
                   "missing tensor.s. blk.1.attn_k.weight")
    data = src.read_bytes()
    for cut in (len(data) - 100, 200):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        one_line_error(tmp_path / "cut.gguf", "truncated")


def test_export_errors(source, tmp_path):
    _, model_dir = source
    with pytest.raises(MimoError, match="unknown GGUF type 'q3'"):
        export_gguf(model_dir, tmp_path / "x.gguf", "q3")
    with pytest.raises(MimoError, match="must end in .gguf"):
        export_gguf(model_dir, tmp_path / "x.bin", "f32")
    with pytest.raises(MimoError, match="no such model directory"):
        export_gguf(tmp_path / "nope", tmp_path / "x.gguf", "f32")


def test_cli_export(source, tmp_path, capsys):
    _, model_dir = source
    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", str(model_dir), "--out", str(out), "--type", "q4_0"]) == 0
    assert "wrote" in capsys.readouterr().err and out.exists() and companion_path(out).exists()
    assert field(read(out), "general.file_type") == 2
    assert main(["export", "gguf", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "mimo: error:" in capsys.readouterr().err


def test_qwen2_style_tokenizer_round_trip(tmp_path):
    """Added tokens after the BPE vocabulary (as Qwen2's), one of them not special, and an NFC normalizer."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from mimo.tokenizer import QWEN2_SPLIT, Tokenizer

    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(SAMPLE_TEXT, trainers.BpeTrainer(vocab_size=350, min_frequency=1, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    tokenizer = Tokenizer(hf, {"eos_token": "<|im_end|>"})
    model = tiny_model(vocab_size=tokenizer.vocab_size + 3, num_mtp=0)
    path = export_gguf(save_model(model, tmp_path / "q", tokenizer=tokenizer), tmp_path / "q.gguf", "q8_0")[0]
    types = field(read(path), "tokenizer.ggml.token_type")
    assert types[hf.token_to_id("<think>")] == gguf.TokenType.USER_DEFINED
    assert types[hf.token_to_id("<|im_end|>")] == gguf.TokenType.CONTROL
    assert field(read(path), "tokenizer.ggml.eos_token_id") == hf.token_to_id("<|im_end|>")
    _, tok = load_gguf(path)
    for text in [*TEXTS, "cafe\u0301 <think>"]:  # a decomposed é: NFC as in the source
        assert tok.encode(text) == tokenizer.encode(text), text
    assert tok.eos_token == "<|im_end|>" and tok.vocab_size == tokenizer.vocab_size
    assert tok.decode(tok.encode("a<think>b<|im_end|>"), skip_special_tokens=True) == "a<think>b"
