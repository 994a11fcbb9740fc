import json
import subprocess
import sys

import pytest

from mimo.cli import build_parser, main
from mimo.config import preset_config


def subcommand_paths(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from subcommand_paths(sub, prefix + (name,))


def test_help_on_every_subcommand(capsys):
    paths = list(subcommand_paths(build_parser()))
    assert ("info",) in paths and ("generate",) in paths and ("tokenizer", "train") in paths
    for path in [()] + paths:
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
        assert "usage: mimo" in capsys.readouterr().out


def test_console_script_exists():
    out = subprocess.run([sys.executable, "-m", "mimo.cli", "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "generate" in out.stdout


def test_info_preset_json(capsys):
    assert main(["info", "mimo-7b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == {"main": 7_622_619_136, "mtp_per_layer": 210_790_400, "total": 7_833_409_536}
    assert info["weight_bytes"]["bf16"] == 2 * 7_833_409_536


def test_info_on_model_dir(capsys, model_dir):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 layers" in out and "MTP" in out and "int8" in out


def test_generate_greedy_stdout_only_text(capsys, model_dir):
    args = ["generate", str(model_dir), "Question: What is 12 + 7?", "--max-new-tokens", "12"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert main(args + ["--no-mtp"]) == 0
    second = capsys.readouterr()
    assert first.out == second.out and len(first.out.strip()) > 0
    stats = json.loads(first.err.strip().splitlines()[-1])
    assert stats["completion_tokens"] <= 12
    assert main(args + ["--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["text"] + "\n" == first.out and "decode_tokens_per_s" in obj


def test_generate_matches_manual_greedy(capsys, model_dir):
    import torch

    from mimo.checkpoint import load_model
    from mimo.tokenizer import Tokenizer

    tok, model = Tokenizer.load(model_dir), load_model(model_dir)
    ids = tok.encode("The quick brown")
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq).logits[0, -1].argmax()
            if int(nxt) in tok.stop_token_ids:
                break
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
    assert main(["generate", str(model_dir), "The quick brown", "--max-new-tokens", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == tok.decode(seq[0, len(ids):].tolist())


def test_generate_seeded_sampling_is_reproducible(capsys, model_dir):
    args = ["generate", str(model_dir), "hello", "--temperature", "1.0", "--seed", "7", "--max-new-tokens", "16",
            "--json"]
    main(args)
    a = json.loads(capsys.readouterr().out)["text"]
    main(args)
    assert json.loads(capsys.readouterr().out)["text"] == a


def test_generate_rejects_bad_values(capsys, model_dir):
    assert main(["generate", str(model_dir), "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_generate_json_reports_mtp_and_quantize(capsys, model_dir):
    args = ["generate", str(model_dir), "The quick brown", "--max-new-tokens", "8", "--json"]
    assert main(args + ["--num-draft", "2"]) == 0
    mtp = json.loads(capsys.readouterr().out)
    assert mtp["mtp"] and mtp["num_draft"] == 2 and 0.0 <= mtp["acceptance_rate"] <= 1.0
    assert mtp["time_to_first_token_s"] > 0 and "decode_tokens_per_s" in mtp
    assert main(args + ["--no-mtp"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["acceptance_rate"] is None and plain["text"] == mtp["text"]
    for method in ("int8", "int4"):
        assert main(args + ["--quantize", method]) == 0
        assert json.loads(capsys.readouterr().out)["quantize"] == method
    assert main(args + ["--draft-quantize", "int4", "--num-draft", "2"]) == 0
    drafted = json.loads(capsys.readouterr().out)
    assert drafted["draft_quantize"] == "int4" and drafted["text"] == mtp["text"]  # lossless
    assert main(args + ["--draft-vocab", "64", "--num-draft", "2"]) == 0  # drafts among the first 64 ids
    assert json.loads(capsys.readouterr().out)["text"] == mtp["text"]
    assert main(args + ["--draft-vocab", "-1"]) == 2
    assert "--draft-vocab must be 0" in capsys.readouterr().err


def test_bench_decode_json(capsys):
    assert main(["bench", "decode", "nano", "--new-tokens", "4", "--prompt-tokens", "3", "--mtp",
                 "--num-draft", "2", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    assert r["decode_tokens_per_s"] > 0 and r["acceptance_rate"] is not None and r["mtp"]
    assert r["weight_bytes_per_step"] > 0 and 0 < r["bandwidth_fraction"]
    assert "tokens/s (median of 3: " in out[0] and "load average" in out[0]
    assert r["repeats"] == 3 and r["decode_tokens_per_s_min"] <= r["decode_tokens_per_s"] <= r["decode_tokens_per_s_max"]
    assert isinstance(r["load"]["busy"], bool) and isinstance(r["flags"], list)
    assert main(["bench", "decode", "nano", "--new-tokens", "4", "--prompt-tokens", "3", "--no-mtp", "--mtp-cost",
                 "--repeats", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["mtp_step_cost_min"] <= r["mtp_step_cost"] <= r["mtp_step_cost_max"] and r["mtp_step_s"] > 0
    assert r["draft_vocab"] == preset_config("nano").vocab_size  # below --draft-vocab's default: all of it
    assert main(["bench", "decode", "nano", "--repeats", "0"]) == 2
