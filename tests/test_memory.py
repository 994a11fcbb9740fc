"""Loading within memory: memory-mapped shards, quantization as tensors are read, the fit check, truncated
shards, the KV-cache context chosen from free memory, lazily-touched caches."""

import argparse

import pytest
import torch
from helpers import tiny_config, tiny_model

from mimo import memory
from mimo.checkpoint import load_model, save_model
from mimo.cli import main
from mimo.config import mimo_7b_config
from mimo.errors import MimoError
from mimo.quantize import quantize_model


def cli_error(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("mimo: error:"), err
    return err[0]


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_sharded_bf16_loads_as_stored_or_converted(tmp_path, dtype):
    model = tiny_model()
    save_model(model, tmp_path / "m", dtype="bfloat16", max_shard_bytes=20_000)
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 2
    loaded = load_model(tmp_path / "m", dtype=dtype)
    want = torch.bfloat16 if dtype is None else torch.float32
    assert all(p.dtype == want for p in loaded.parameters())
    ids = torch.randint(0, 400, (2, 12))
    ref = model.to(torch.bfloat16).to(want)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_as_read_equals_quantized_after(tmp_path, tokenizer, method):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    save_model(model, tmp_path / "m", tokenizer=tokenizer, max_shard_bytes=30_000)
    streamed = load_model(tmp_path / "m", quantize=method)
    after = quantize_model(load_model(tmp_path / "m"), method)
    assert not any(type(m) is torch.nn.Linear for m in streamed.modules())
    ids = torch.randint(0, tokenizer.vocab_size, (1, 10))
    with torch.no_grad():
        a, b = streamed(ids, targets=ids), after(ids, targets=ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loss, b.loss)  # the MTP layers too


def test_truncated_shard_is_one_line(capsys, tmp_path, tokenizer):
    save_model(tiny_model(vocab_size=tokenizer.vocab_size), tmp_path / "m", tokenizer=tokenizer,
               max_shard_bytes=30_000)
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    line = cli_error(capsys, "generate", str(tmp_path / "m"), "hi")
    assert shard.name in line and "truncated" in line


def test_model_that_cannot_fit_is_refused_before_allocating(capsys, monkeypatch, model_dir):
    monkeypatch.setattr(memory, "available_bytes", lambda: 200_000)
    line = cli_error(capsys, "generate", str(model_dir), "hi")
    assert "need about" in line and "available" in line and "--quantize int4" in line


def test_7b_weights_figures():
    from mimo.checkpoint import weights_bytes

    cfg = mimo_7b_config()
    bf16 = weights_bytes(cfg, torch.bfloat16)
    assert bf16 == 2 * (7_622_619_136 + 210_790_400)
    assert 0.53 * bf16 < weights_bytes(cfg, torch.bfloat16, "int8") < 0.6 * bf16  # bf16 embedding
    assert weights_bytes(cfg, torch.bfloat16, "int4") < 5.5e9


def test_context_follows_free_memory():
    cfg = mimo_7b_config()
    per_token = memory.kv_bytes_per_token(cfg, torch.bfloat16)
    assert per_token == 2 * 37 * 8 * 128 * 2
    ctx, why = memory.choose_context(cfg, torch.bfloat16, 1, free_bytes=100 * 10**9)
    assert ctx == 32768 and "32768" in why
    ctx, _ = memory.choose_context(cfg, torch.bfloat16, 1, free_bytes=7 * 10**9)  # bf16 7B on 24 GB
    assert ctx == 16384 and per_token * ctx <= 3.5e9
    ctx, _ = memory.choose_context(cfg, torch.bfloat16, 8, free_bytes=17 * 10**9)  # int4 7B serving 8
    assert ctx == 4096
    ctx, why = memory.choose_context(cfg, torch.bfloat16, 8, free_bytes=1, requested=1000)
    assert ctx == 1000 and "--max-model-len" in why
    with pytest.raises(MimoError, match="not enough memory for a KV cache"):
        memory.choose_context(cfg, torch.bfloat16, 64, free_bytes=2 * 10**9)


def test_engine_commands_say_the_context_they_chose(capsys, monkeypatch, tmp_path, tokenizer):
    model_dir = save_model(tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=2048),
                           tmp_path / "m", tokenizer=tokenizer)
    per_token = memory.kv_bytes_per_token(tiny_config(), torch.float32)
    free = 2 * 8 * 512 * per_token + 10**5  # room for 8 slots of 512 positions in half of it
    monkeypatch.setattr(memory, "available_bytes", lambda: free + 10**9)
    monkeypatch.setattr("mimo.memory.module_bytes", lambda model: 10**9)
    assert main(["generate", str(model_dir), "hi", "--max-new-tokens", "2", "--json"]) == 0
    err = capsys.readouterr().err
    assert "context 2048 x 1 slot(s)" in err and "peak memory" in err
    from mimo.inference.engine_args import add_engine_arguments, load_engine

    p = argparse.ArgumentParser()
    p.add_argument("model")
    add_engine_arguments(p)
    engine, _ = load_engine(p.parse_args([str(model_dir)]), n_slots=8)
    assert engine.max_seq_len == 512
    assert "context 512 x 8 slot(s)" in capsys.readouterr().err
    engine, _ = load_engine(p.parse_args([str(model_dir), "--max-model-len", "100"]), n_slots=8, quiet=True)
    assert engine.max_seq_len == 100
    with pytest.raises(MimoError, match="not enough memory for a KV cache"):
        load_engine(p.parse_args([str(model_dir)]), n_slots=64, quiet=True)


def test_kv_cache_memory_is_taken_only_where_written():
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = resident()
    t = memory.lazy_zeros((64, 1024, 1024), torch.float32)  # 256 MiB
    assert resident() - before < 32 * 2**20
    assert float(t[5].sum()) == 0.0 and t.shape == (64, 1024, 1024)
    t[3].fill_(1.0)
    assert 3 * 2**20 < resident() - before < 64 * 2**20
    assert float(t.sum()) == 1024 * 1024

