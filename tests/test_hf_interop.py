"""Model directories written by mimo open in transformers' Auto classes (trust_remote_code=True, as Xiaomi's MiMo
checkpoints do), with the same main-model and MTP logits, greedy text, chat prompts and special tokens; what
transformers saves back, and a directory laid out as Xiaomi publishes theirs, load in mimo."""

import json

import pytest
import torch
from helpers import tiny_model

from mimo.checkpoint import load_model, load_model_and_tokenizer, save_model
from mimo.config import MiMoConfig
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.tokenizer import SPECIAL_TOKENS, Tokenizer

CORPUS = {"seed": 0, "tokens": 8_000, "tokenizer": {"vocab_size": 512},
          "sources": {"reasoning": {"type": "reasoning", "problems": 120}},
          "stages": [{"name": "broad", "fraction": 1.0, "mix": {"reasoning": 1.0}}]}
TOL = 1e-4
CHAT = [{"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "<think>12 + 7 = 19</think>19"},
        {"role": "user", "content": "And 19 * 2?\nShow the steps."}]
LOAD_NOISE = ("UNEXPECTED", "MISSING", "MISMATCH", "newly initialized", "not used", "not initialized")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """The final directory of a real (two-step) `mimo pretrain --preset nano` run."""
    from mimo.cli import main
    from mimo.data.corpus import build_corpus

    root = tmp_path_factory.mktemp("pretrain")
    build_corpus(CORPUS, root / "data", show_progress=False)
    assert main(["pretrain", "--preset", "nano", "--data", str(root / "data"), "--out", str(root / "run"),
                 "--max-steps", "2"]) == 0
    return root / "run" / "final"


@pytest.fixture()
def two_mtp_dir(tmp_path, tokenizer):
    """A tiny model with two MTP layers (the second chains on the first), saved as pretrain saves it."""
    model = tiny_model(vocab_size=tokenizer.vocab_size, num_mtp=2)
    return save_model(model, tmp_path / "m2", tokenizer=tokenizer, state_dict=model.state_dict())


def open_hf(model_dir, capfd):
    transformers = pytest.importorskip("transformers")
    capfd.readouterr()
    cfg = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                                 output_loading_info=True)
    err = capfd.readouterr().err
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not [w for w in LOAD_NOISE if w in err], err
    return cfg, hf.eval()


def mimo_logits(model, x):
    targets = x.roll(-1, 1)
    targets[:, -1] = -100
    with torch.no_grad():
        out = model(x, targets=targets, return_mtp_logits=True)
    return out.logits, out.mtp_logits


def max_diffs(hf, model, x):
    ours, ours_mtp = mimo_logits(model, x)
    with torch.no_grad():
        theirs, theirs_mtp = hf(x).logits, hf.mtp_logits(x)
    assert len(theirs_mtp) == len(ours_mtp) == model.config.num_nextn_predict_layers
    return ((theirs - ours).abs().max().item(),
            [(a.shape == b.shape and (a - b).abs().max().item()) for a, b in zip(theirs_mtp, ours_mtp)])


def test_pretrain_directory_is_a_hugging_face_mimo_repository(pretrained_dir):
    cfg = json.loads((pretrained_dir / "config.json").read_text())
    assert cfg["model_type"] == "mimo" and cfg["architectures"] == ["MiMoForCausalLM"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_mimo.MiMoConfig",
                               "AutoModel": "modeling_mimo.MiMoModel",
                               "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM"}
    for f in ("configuration_mimo.py", "modeling_mimo.py"):
        text = (pretrained_dir / f).read_text()
        assert "import mimo" not in text and "from mimo" not in text  # runs inside transformers alone
    assert MiMoConfig.load(pretrained_dir / "config.json").num_nextn_predict_layers == 1
    gen = json.loads((pretrained_dir / "generation_config.json").read_text())
    tok = Tokenizer.load(pretrained_dir)
    assert gen["do_sample"] is True and gen["temperature"] == 0.6 and gen["top_p"] == 0.95
    assert gen["eos_token_id"][0] == tok.eos_token_id and set(gen["eos_token_id"]) == set(tok.stop_token_ids)
    assert gen["pad_token_id"] == tok.token_to_id(tok.pad_token)


def test_transformers_opens_a_pretrain_directory_with_mimos_logits(pretrained_dir, capfd):
    cfg, hf = open_hf(pretrained_dir, capfd)
    assert type(cfg).__name__ == "MiMoConfig" and cfg.model_type == "mimo" and cfg.num_nextn_predict_layers == 1
    assert type(hf).__name__ == "MiMoForCausalLM" and len(hf.model.mtp_layers) == 1
    model, tok = load_model_and_tokenizer(pretrained_dir, dtype="float32")
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    main, mtp = max_diffs(hf, model, x)
    print(f"pretrain nano: main logits max |diff| {main:.2e}, MTP layer 0 {mtp[0]:.2e}")
    assert main <= TOL and mtp[0] is not False and mtp[0] <= TOL
    # a padded batch: the unpadded rows' logits do not change
    mask = torch.ones_like(x)
    mask[1, 30:] = 0
    with torch.no_grad():
        padded = hf(x, attention_mask=mask).logits
        padded_mtp = hf.mtp_logits(x, attention_mask=mask)
    ours, ours_mtp = mimo_logits(model, x)
    assert (padded[0] - ours[0]).abs().max() <= TOL and (padded[1, :30] - ours[1, :30]).abs().max() <= TOL
    assert (padded_mtp[0][1, :29] - ours_mtp[0][1, :29]).abs().max() <= TOL


def test_two_mtp_layers_chain_as_in_mimo(two_mtp_dir, capfd):
    _, hf = open_hf(two_mtp_dir, capfd)
    model = load_model(two_mtp_dir)
    x = torch.randint(0, model.config.vocab_size, (3, 25), generator=torch.Generator().manual_seed(1))
    main, mtp = max_diffs(hf, model, x)
    print(f"two MTP layers: main {main:.2e}, MTP {mtp}")
    assert main <= TOL and all(d is not False and d <= TOL for d in mtp)
    # the MTP attention mask suits the eager attention as well as SDPA (transformers' default)
    transformers = pytest.importorskip("transformers")
    eager = transformers.AutoModelForCausalLM.from_pretrained(two_mtp_dir, trust_remote_code=True,
                                                              attn_implementation="eager").eval()
    main, mtp = max_diffs(eager, model, x)
    assert main <= TOL and all(d is not False and d <= TOL for d in mtp)


def test_auto_model_is_the_base_model_with_mtp_layers(pretrained_dir, capfd):
    transformers = pytest.importorskip("transformers")
    capfd.readouterr()
    base, info = transformers.AutoModel.from_pretrained(pretrained_dir, trust_remote_code=True,
                                                        output_loading_info=True)
    err = capfd.readouterr().err
    assert type(base).__name__ == "MiMoModel" and len(base.mtp_layers) == 1
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not [w for w in LOAD_NOISE if w in err], err


def test_greedy_generation_is_the_same(pretrained_dir, capfd):
    transformers = pytest.importorskip("transformers")
    _, hf = open_hf(pretrained_dir, capfd)
    hf_tok = transformers.AutoTokenizer.from_pretrained(pretrained_dir, trust_remote_code=True)
    model, tok = load_model_and_tokenizer(pretrained_dir, dtype="float32")
    engine = Engine(model, tok)
    for prompt in ("Question: What is 12 + 7?\nSolution:", tok.apply_chat_template(CHAT[:2])):
        ids = tok.encode(prompt)
        assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == ids
        # a fixed length (no stop tokens) ...
        ours = engine.generate([ids], SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True))[0].tokens
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                 temperature=None, top_p=None)[0, len(ids):].tolist()
        assert theirs == ours
        # ... and with the stop tokens of generation_config.json, which are mimo's
        done = engine.generate([ids], SamplingParams(max_new_tokens=24, temperature=0.0))[0]
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, temperature=None,
                                 top_p=None)[0, len(ids):].tolist()
        if done.finish_reason == "stop":
            assert theirs[:-1] == done.tokens and theirs[-1] in tok.stop_token_ids
        else:
            assert theirs == done.tokens
        # mimo's own MTP speculative decoding gives the same greedy text
        assert engine.generate([ids], SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True),
                               mtp=True)[0].tokens == ours


def test_auto_tokenizer_has_mimos_special_tokens_and_chat_prompts(pretrained_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(pretrained_dir, trust_remote_code=True)
    tok = Tokenizer.load(pretrained_dir)
    assert hf.eos_token == tok.eos_token and hf.eos_token_id == tok.eos_token_id
    assert hf.pad_token == tok.pad_token and hf.bos_token is None
    for t in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(t) == tok.token_to_id(t) and t in hf.all_special_tokens, t
    for msgs in (CHAT, CHAT[:3], CHAT[1:], [{"role": "user", "content": "hi"}]):
        for gen in (True, False):
            theirs = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert theirs.encode() == tok.apply_chat_template(msgs, add_generation_prompt=gen).encode()
            assert hf(theirs, add_special_tokens=False)["input_ids"] == tok.encode(theirs)
    ids = tok.encode(tok.apply_chat_template(CHAT))
    assert hf.decode(ids) == tok.decode(ids)
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


def test_saved_back_by_transformers_loads_in_mimo(two_mtp_dir, tmp_path, capfd):
    transformers = pytest.importorskip("transformers")
    _, hf = open_hf(two_mtp_dir, capfd)
    hf_tok = transformers.AutoTokenizer.from_pretrained(two_mtp_dir, trust_remote_code=True)
    out = tmp_path / "saved_back"
    hf.save_pretrained(out)
    hf_tok.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "mimo"
    model, tok = load_model_and_tokenizer(out, dtype="float32")
    assert model.config.num_nextn_predict_layers == 2
    original = load_model(two_mtp_dir)
    x = torch.randint(0, tok.vocab_size, (2, 23), generator=torch.Generator().manual_seed(2))
    a, a_mtp = mimo_logits(model, x)
    b, b_mtp = mimo_logits(original, x)
    assert (a - b).abs().max() <= TOL and all((p - q).abs().max() <= TOL for p, q in zip(a_mtp, b_mtp))
    assert tok.apply_chat_template(CHAT) == Tokenizer.load(two_mtp_dir).apply_chat_template(CHAT)
    assert tok.eos_token_id == hf_tok.eos_token_id
    # and saved again by mimo, it opens in transformers once more (transformers 4 too: no class only 5 knows)
    again_dir = save_model(model, tmp_path / "again", tokenizer=tok)
    tok_cfg = json.loads((again_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not isinstance(tok_cfg.get("extra_special_tokens"), list)  # 5's list: a dict of named tokens in 4
    _, again = open_hf(again_dir, capfd)
    main, mtp = max_diffs(again, original, x)
    assert main <= TOL and all(d <= TOL for d in mtp)


# ---- the published layout: Xiaomi's config.json and remote code, loaded by mimo unchanged ----------------------

XIAOMI_STYLE_CONFIGURATION = '''\
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


class MiMoConfig(Qwen2Config):
    model_type = "mimo"

    def __init__(self, *args, num_nextn_predict_layers=0, **kwargs):
        self.num_nextn_predict_layers = num_nextn_predict_layers
        super().__init__(*args, **kwargs)
'''

# a stand-in in the form of Xiaomi's modeling_mimo.py: Qwen2 classes plus MTP modules that forward never uses
XIAOMI_STYLE_MODELING = '''\
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import (Qwen2Attention, Qwen2ForCausalLM, Qwen2MLP, Qwen2Model,
                                                      Qwen2RMSNorm)

from .configuration_mimo import MiMoConfig


class MiMoMTPLayers(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.token_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(config.hidden_size * 2, config.hidden_size, bias=False)
        self.final_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, layer_idx=0)
        self.mlp = Qwen2MLP(config)


class MiMoModel(Qwen2Model):
    config_class = MiMoConfig

    def __init__(self, config):
        super().__init__(config)
        self.mtp_layers = nn.ModuleList([MiMoMTPLayers(config) for _ in range(config.num_nextn_predict_layers)])


class MiMoForCausalLM(Qwen2ForCausalLM):
    config_class = MiMoConfig

    def __init__(self, config):
        super(Qwen2ForCausalLM, self).__init__(config)
        self.model = MiMoModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
'''


def xiaomi_style_dir(path, tokenizer, model):
    """A directory as Xiaomi's MiMo-7B repositories lay it out: their config.json keys (auto_map,
    sliding_window 32768 with use_sliding_window false, max_window_layers, transformers_version 4.40.1, no
    architectures other than MiMoForCausalLM) and their two remote-code files, tokenizer_class Qwen2Tokenizer."""
    save_model(model, path, tokenizer=tokenizer)
    c = model.config
    config = {
        "architectures": ["MiMoForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_mimo.MiMoConfig", "AutoModel": "modeling_mimo.MiMoModel",
                     "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM"},
        "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "head_dim": c.head_dim, "hidden_act": "silu",
        "hidden_size": c.hidden_size, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings, "max_window_layers": c.num_hidden_layers,
        "model_type": "mimo", "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads, "num_nextn_predict_layers": c.num_nextn_predict_layers,
        "rms_norm_eps": c.rms_norm_eps, "rope_scaling": None, "rope_theta": c.rope_theta, "sliding_window": 32768,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.40.1", "use_cache": True,
        "use_mrope": False, "use_sliding_window": False, "vocab_size": c.vocab_size}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "configuration_mimo.py").write_text(XIAOMI_STYLE_CONFIGURATION)
    (path / "modeling_mimo.py").write_text(XIAOMI_STYLE_MODELING)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "tokenizer_class": "Qwen2Tokenizer"}))
    return path


def test_a_directory_laid_out_as_xiaomis_loads_in_mimo_unchanged(tmp_path, tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, num_mtp=1)
    d = xiaomi_style_dir(tmp_path / "xiaomi", tokenizer, model)
    loaded, tok = load_model_and_tokenizer(d)
    assert loaded.config.num_nextn_predict_layers == 1 and loaded.config.rope_theta == model.config.rope_theta
    x = torch.randint(0, tokenizer.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    a, a_mtp = mimo_logits(loaded, x)
    b, b_mtp = mimo_logits(model, x)
    assert torch.equal(a, b) and torch.equal(a_mtp[0], b_mtp[0])
    assert tok.apply_chat_template(CHAT) == tokenizer.apply_chat_template(CHAT)
    # saved again by mimo: mimo's own remote code replaces the stand-in, MTP included
    out = save_model(loaded, tmp_path / "resaved", tokenizer=tok)
    assert "def mtp_logits" in (out / "modeling_mimo.py").read_text()


def test_a_directory_laid_out_as_xiaomis_opens_in_transformers_too(tmp_path, tokenizer, capfd):
    """The stand-in is faithful: transformers opens it as it opens Xiaomi's, with the same main-model logits."""
    model = tiny_model(vocab_size=tokenizer.vocab_size, num_mtp=1)
    d = xiaomi_style_dir(tmp_path / "xiaomi", tokenizer, model)
    _, hf = open_hf(d, capfd)
    x = torch.randint(0, tokenizer.vocab_size, (1, 15), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max() <= TOL


def test_core_mimo_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, mimo.checkpoint, mimo.cli, mimo.hf, mimo.model, mimo.tokenizer; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

