import json

import pytest
import torch
from helpers import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mimo.checkpoint import load_model, save_model
from mimo.cli import main
from mimo.tokenizer import Tokenizer


def run_cli(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_roundtrip_in_each_dtype(tmp_path, tokenizer, dtype):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    out = save_model(model, tmp_path / "m", tokenizer=tokenizer, dtype=dtype)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "configuration_mimo.py", "generation_config.json", "model.safetensors",
                     "modeling_mimo.py", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mimo" and cfg["architectures"] == ["MiMoForCausalLM"]
    assert cfg["num_nextn_predict_layers"] == 1 and "rope_theta" in cfg and cfg["torch_dtype"] == dtype
    assert cfg["eos_token_id"] == tokenizer.eos_token_id
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_cfg and tok_cfg["eos_token"] == "<|endoftext|>"
    loaded = load_model(out)
    assert loaded.lm_head.weight.dtype == getattr(torch, dtype)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].float(), t.to(getattr(torch, dtype)).float()), name
    assert load_model(out, dtype="float32").lm_head.weight.dtype == torch.float32


def test_tensor_names_are_the_published_ones(tmp_path):
    save_model(tiny_model(num_mtp=1), tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        for n in ("q", "k", "v"):
            expected |= {f"model.layers.{i}.self_attn.{n}_proj.weight", f"model.layers.{i}.self_attn.{n}_proj.bias"}
        expected |= {f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.input_layernorm.weight",
                     f"model.layers.{i}.post_attention_layernorm.weight"}
        expected |= {f"model.layers.{i}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    p = "model.mtp_layers.0."
    expected |= {p + n + ".weight" for n in ("token_layernorm", "hidden_layernorm", "input_layernorm",
                                            "post_attention_layernorm", "final_layernorm", "input_proj")}
    expected |= {p + f"self_attn.{n}_proj.{w}" for n in "qkv" for w in ("weight", "bias")}
    expected |= {p + "self_attn.o_proj.weight"} | {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    assert names == expected


def test_sharded_checkpoint_with_index(tmp_path):
    model = tiny_model()
    out = save_model(model, tmp_path / "m", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    loaded = load_model(out)
    x = torch.randint(0, 400, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_save_replaces_atomically(tmp_path):
    out = save_model(tiny_model(seed=0), tmp_path / "m")
    save_model(tiny_model(seed=1), tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or old directories left
    assert torch.equal(load_model(out).lm_head.weight, tiny_model(seed=1).lm_head.weight)


# ---- bad input: one clear line naming the file, non-zero exit, no traceback ----------------------------

def assert_clean_error(capsys, argv, *fragments):
    code, _out, err = run_cli(capsys, *argv)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mimo: error:"), err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def test_missing_config(capsys, model_dir):
    (model_dir / "config.json").unlink()
    assert_clean_error(capsys, ["generate", str(model_dir), "hi"], "config.json", "not found")


def test_malformed_config(capsys, model_dir):
    (model_dir / "config.json").write_text("{ not json")
    assert_clean_error(capsys, ["generate", str(model_dir), "hi"], "config.json", "malformed JSON")


def test_config_with_wrong_types(capsys, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(capsys, ["generate", str(model_dir), "hi"], "config.json", "num_hidden_layers")


def test_unknown_model_type(capsys, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(capsys, ["generate", str(model_dir), "hi"], "config.json", "'llama'")


def rewrite_weights(model_dir, edit):
    path = model_dir / "model.safetensors"
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def test_missing_tensor(capsys, model_dir):
    rewrite_weights(model_dir, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    assert_clean_error(capsys, ["generate", str(model_dir), "hi"], "model.safetensors", "missing tensor",
                       "model.layers.1.mlp.up_proj.weight")


def test_extra_tensor(capsys, model_dir):
    rewrite_weights(model_dir, lambda sd: sd.__setitem__("model.layers.7.mlp.up_proj.weight", torch.zeros(2)))
    assert_clean_error(capsys, ["generate", str(model_dir), "hi"], "model.safetensors", "unexpected tensor",
                       "model.layers.7.mlp.up_proj.weight")


def test_misshaped_tensor(capsys, model_dir):
    rewrite_weights(model_dir, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(65)))
    assert_clean_error(capsys, ["generate", str(model_dir), "hi"], "model.safetensors", "model.norm.weight",
                       "shape [65]", "expected [64]")


def test_truncated_safetensors(capsys, model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_clean_error(capsys, ["generate", str(model_dir), "hi"], "model.safetensors")


def test_tokenizer_too_big_for_embedding(capsys, tmp_path, tokenizer):
    save_model(tiny_model(vocab_size=300), tmp_path / "m", tokenizer=tokenizer)  # tokenizer has 400
    assert_clean_error(capsys, ["generate", str(tmp_path / "m"), "hi"], "tokenizer", "400", "300")


def test_unknown_preset_and_missing_path(capsys, tmp_path):
    assert_clean_error(capsys, ["info", "gigantic"], "gigantic", "preset")
    assert_clean_error(capsys, ["info", str(tmp_path / "nope")], "nope", "no such file")
    assert_clean_error(capsys, ["generate", str(tmp_path / "nope"), "hi"], "nope")


def test_broken_tokenizer_file(capsys, model_dir):
    (model_dir / "tokenizer.json").write_text("{}")
    assert_clean_error(capsys, ["generate", str(model_dir), "hi"], "tokenizer.json")


def test_tokenizer_loads_from_dir_or_file(model_dir):
    a = Tokenizer.load(model_dir)
    b = Tokenizer.load(model_dir / "tokenizer.json")
    assert a.encode("12 + 7") == b.encode("12 + 7")
