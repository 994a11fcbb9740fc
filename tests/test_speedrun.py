"""`mimo speedrun` (its stages in order, each the `mimo` command it lists, a finished stage skipped and an
interrupted one rerun, the report card's figures read from the files the stages wrote), `mimo data build` and
`mimo bench train` through the CLI. The stages themselves are tested in their own files (test_data, test_pretrain,
test_sft, test_rl, test_evaluate); here every command is answered by a stand-in that checks its inputs exist and
writes the files the real one writes, so the orchestration runs in a second."""

import json
import math
import shlex
from pathlib import Path

import pytest
import torch
from helpers import Killed

from mimo.cli import main

CORPUS = {"seed": 0, "tokens": 6000, "val_min_tokens": 200, "tokenizer": {"vocab_size": 300},
          "sources": {"reasoning": {"type": "reasoning", "problems": 200}},
          "stages": [{"name": "broad", "fraction": 1.0, "mix": {"reasoning": 1.0}}]}


def flag(argv, name):
    return argv[argv.index(name) + 1]


def model_dir(path: Path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights of " + str(path).encode())


def fake_mimo(argv):
    """What each `mimo` command writes (with made-up figures the report card must show as they are)."""
    cmd = argv[0]
    if cmd == "data":
        out = Path(flag(argv, "--out"))
        out.mkdir(parents=True)
        (out / "manifest.json").write_text(json.dumps({"splits": {
            "train": {"tokens": 123456, "shards": [], "stages": [{"name": "broad", "tokens": 100000, "documents": 77},
                                                                 {"name": "long", "tokens": 23456, "documents": 5}]},
            "val": {"tokens": 4321}}, "filters": {"dedup": 12, "density": {"trace": 3, "prose": 4}}}))
    elif cmd in ("pretrain", "sft", "rl"):
        if cmd == "pretrain":
            assert (Path(flag(argv, "--data")) / "manifest.json").exists()  # built by the data stage
        else:
            assert (Path(flag(argv, "--from")) / "config.json").exists()  # the previous stage's model
        out = Path(flag(argv, "--out"))
        out.mkdir(parents=True)
        if cmd == "rl":
            rows = [{"step": 1, "reward_mean": 0.125, "pass_rate": 0.25, "response_length": 40.0,
                     "mtp_acceptance": 0.5}, {"step": 4, "reward_mean": 0.375, "pass_rate": 0.5,
                                              "response_length": 30.0, "mtp_acceptance": 0.625}]
        else:
            loss = 3.5 if cmd == "pretrain" else 1.25
            rows = [{"step": 10, "tokens": 20480, "loss": loss + 1, "ntp_loss": loss + 0.5, "mtp_loss": loss + 0.75},
                    {"step": 150, "tokens": 307200, "loss": loss, "ntp_loss": loss - 0.25, "mtp_loss": loss + 0.5,
                     "val_loss": loss + 0.125, "val_mtp_top1": 0.375}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / ("rl.png" if cmd == "rl" else "loss.png")).write_bytes(b"png")
        if cmd == "rl":
            verdicts = {"a": "kept", "b": "kept", "c": "never_solved", "d": "always_solved", "e": "contaminated:gsm8k"}
            (out / "curation.json").write_text(json.dumps({"settings": {"filter_samples": 16}, "seconds": 12.0,
                                                           "verdicts": verdicts}))
        model_dir(out / "final")
    elif cmd == "eval":
        assert (Path(argv[1]) / "config.json").exists()
        out = Path(flag(argv, "--out"))
        out.mkdir(parents=True)
        value = {"base": 0.0625, "sft": 0.25, "rl": 0.375}[out.name.split("-")[0]]
        limits = {"settings": {"max_new_tokens": int(flag(argv, "--max-new-tokens")), "context": 512,
                               "effective_max_new_tokens": int(flag(argv, "--max-new-tokens"))}}
        if out.name.endswith("reasoning"):
            summary = {"problems": 48, "samples": 48, "truncated": 5, **limits,
                       "metrics": {"pass@1": {"value": value, "ci_low": value / 2, "ci_high": value * 1.5}},
                       "breakdown": {"task": {"gcd": {"value": 0.5, "ci_low": 0.25, "ci_high": 0.75}}}}
        else:
            summary = {"problems": 10, "samples": 10, "truncated": 2, **limits,
                       "metrics": {"accuracy": {"value": 0.1, "ci_low": 0.0, "ci_high": 0.3}}}
        (out / "summary.json").write_text(json.dumps(summary))
    elif cmd == "bench":
        assert argv[1] == "decode" and (Path(argv[2]) / "config.json").exists() and "--json" in argv
        mtp = "--mtp" in argv
        print("a progress line")
        tps = 300.0 if mtp else 200.0
        print(json.dumps({"decode_tokens_per_s": tps, "decode_tokens_per_s_min": tps - 10,
                          "decode_tokens_per_s_max": tps + 5, "repeats": 3,
                          "acceptance_rate": 0.75 if mtp else None,
                          "mean_accepted_length": 2.5 if mtp else None, "compile": "--compile" in argv,
                          "num_draft": int(flag(argv, "--num-draft")) if mtp else None,
                          "draft_quantize": flag(argv, "--draft-quantize") if mtp else None,
                          "load": {"before": 2.0, "after": 3.5, "threads": 2, "cores": 2, "busy": True},
                          "flags": ["the machine was busy (load average 3.5 on 2 cores)"] if mtp else []}))
    else:
        raise AssertionError(f"unexpected command {argv}")


class Stages:
    """The `mimo` commands the speedrun ran (argv lists); kill_at: a command that dies as it starts."""

    def __init__(self):
        self.seen, self.kill_at = [], None


@pytest.fixture
def stages(monkeypatch):
    """Every `mimo` command the speedrun runs, answered by fake_mimo."""
    from mimo import speedrun

    record = Stages()

    def fake_command(argv):
        record.seen.append(list(argv))
        if argv[0] == record.kill_at:
            raise Killed
        fake_mimo(argv)

    monkeypatch.setattr(speedrun, "run_stage_command", fake_command)
    return record


def test_speedrun_runs_each_stage_once_resumes_and_writes_the_report_card(tmp_path, stages, capfd):
    out = tmp_path / "run"
    stages.kill_at = "sft"
    with pytest.raises(Killed):
        main(["speedrun", "--out", str(out)])
    state = json.loads((out / "speedrun.json").read_text())
    assert list(state["stages"]) == ["data", "pretrain"] and all(s["done"] for s in state["stages"].values())
    assert [a[0] for a in stages.seen] == ["data", "pretrain", "sft"]

    stages.seen.clear()
    stages.kill_at = None
    capfd.readouterr()
    assert main(["speedrun", "--out", str(out)]) == 0  # resumes: data and pretrain are not run again
    err = capfd.readouterr().err
    assert "[speedrun] data: done earlier" in err and "[speedrun] pretrain: done earlier" in err
    ran = stages.seen
    assert [a[0] for a in ran] == ["sft", "rl", "eval", "eval", "eval", "eval", "eval", "bench", "bench"]
    state = json.loads((out / "speedrun.json").read_text())
    assert list(state["stages"]) == ["data", "pretrain", "sft", "rl", "eval", "report"]
    # each stage records exactly the commands it ran, as `mimo ...` command lines
    assert [shlex.split(c)[1:] for c in state["stages"]["eval"]["commands"]] == ran[2:]
    assert state["stages"]["sft"]["commands"] == ["mimo " + " ".join(ran[0])]
    evals = {flag(a, "--out").rsplit("/", 1)[1]: a for a in ran if a[0] == "eval"}
    assert set(evals) == {"base-reasoning", "sft-reasoning", "rl-reasoning", "rl-math500", "rl-gsm8k"}
    assert flag(evals["base-reasoning"], "--prompt-format") == "raw" and evals["sft-reasoning"][1].endswith("sft/final")
    assert json.loads((out / "eval" / "decode-mtp.json").read_text().splitlines()[-1])["decode_tokens_per_s"] == 300
    assert (out / "final" / "model.safetensors").read_bytes() == (out / "rl" / "final" / "model.safetensors"
                                                                   ).read_bytes()

    report = (out / "report.md").read_text()
    for figure in (
            "# mimo speedrun report card: nano",
            "123,456 training tokens, 4,321 validation tokens", "| broad | 100,000 | 77 |", "| long | 23,456 | 5 |",
            "Documents dropped by each filter: dedup 12, density 7.",
            "![pretraining](base/loss.png)", "![RL](rl/rl.png)",
            ("Final training loss 3.500 (next-token 3.250, MTP 4.000) after 150 steps / 307,200 tokens; "
             "validation loss 3.625, MTP top-1 accuracy on token t+2 37.5%."),
            "Final training loss 1.250 (next-token 1.000, MTP 1.750)",
            ("RL: reward_mean 0.125 -> 0.375, pass_rate 0.250 -> 0.500, response_length 40.000 -> 30.000, "
             "mtp_acceptance 0.500 -> 0.625 over 4 steps."),
            ("RL problems (curation.json, 12 s): 2 of 5 kept; dropped 1 solved in all 16, 1 overlapping a "
             "benchmark, 1 never solved in 16 samples."),
            "| without MTP | 200.0 (190.0-205.0) | |", "| with MTP | 300.0 (290.0-305.0) | 0.75 |",
            "- with MTP: the machine was busy (load average 3.5 on 2 cores)",
            ("Speed-up 1.50x, 2.50 tokens per verify step (`mimo bench decode MODEL --compile --num-draft 2 "
             "--draft-quantize int4 --mtp`"),
            "| base | 48 | 6.2 [3.1, 9.4] | 5 of 48 at 96 tokens |", "| sft | 48 | 25.0 [12.5, 37.5] |",
            "| rl | 48 | 37.5 [18.8, 56.2] |", "| gcd | 50.0 [25.0, 75.0] |",
            "| math500 | 10 | 10.0 [0.0, 30.0] | 2 of 10 at 96 tokens |", "| gsm8k | 10 | 10.0 [0.0, 30.0] |",
            f"`mimo chat {out / 'final'}`"):
        assert figure in report, figure
    seconds = {name: s["seconds"] for name, s in state["stages"].items()}
    assert f"| total | {sum(seconds.values()):.0f} | | |" in report
    assert all(set(s["load"]) == {"before", "after", "threads", "cores", "busy"} for s in state["stages"].values())

    stages.seen.clear()
    assert main(["speedrun", "--out", str(out)]) == 0 and stages.seen == []  # finished: nothing runs again
    assert main(["speedrun", "--preset", "tiny", "--out", str(out)]) == 2  # not another preset's directory
    assert "holds a nano speedrun" in capfd.readouterr().err


def test_data_build_cli_writes_a_corpus_the_trainer_reads(tmp_path, capfd):
    from mimo.data.loader import PackedTokens
    from mimo.tokenizer import Tokenizer

    config = tmp_path / "corpus.json"
    config.write_text(json.dumps(CORPUS))
    out = tmp_path / "data"
    assert main(["data", "build", "--config", str(config), "--seed", "7", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    train = PackedTokens(out, "train")
    assert manifest["seed"] == 7 and manifest["config"]["seed"] == 7  # --seed overrides the config's
    assert len(train) == manifest["splits"]["train"]["tokens"] >= CORPUS["tokens"] and len(PackedTokens(out, "val"))
    assert f"{len(train):,} training tokens" in capfd.readouterr().err
    tok = Tokenizer.load(out / "tokenizer")
    assert tok.vocab_size <= 300 and "Answer" in tok.decode(train.slice(0, 2000).tolist())
    assert main(["data", "build", "--config", str(tmp_path / "missing.json"), "--out", str(out)]) == 2


def test_report_card_flags_a_speedup_the_tokens_per_step_rule_out():
    """A nano speedrun next to another job printed 'without MTP 9.4 tokens/s, with MTP 354.5, speed-up 37.60x' at
    2.41 tokens per verify step: impossible (a verify step costs at least a plain one), so it is flagged."""
    from mimo.eval.report_card import _mtp_section

    def bench(tps, per_step=None):
        return {"decode_tokens_per_s": tps, "decode_tokens_per_s_min": tps, "decode_tokens_per_s_max": tps,
                "repeats": 3, "mean_accepted_length": per_step, "acceptance_rate": 0.7 if per_step else None,
                "num_draft": 2, "flags": []}

    text = "\n".join(_mtp_section(bench(354.5, 2.41), bench(9.4)))
    assert "**Flagged, not a result:** the measured speed-up 37.71x exceeds the 2.41 tokens" in text
    assert "Speed-up 37" not in text
    text = "\n".join(_mtp_section(bench(20.0, 2.41), bench(9.4)))
    assert "Speed-up 2.13x, 2.41 tokens per verify step" in text and "Flagged" not in text


def test_timings_median_spread_and_load():
    from mimo.timing import Load, Spread

    s = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.low, s.high, s.n) == (2.5, 1.0, 10.0, 4) and s.cell() == "2.5 (1.0-10.0)"
    assert Spread.of([4.0]).cell() == "4.0" and Spread.of([4.0]).relative == 0
    assert not Load(1.2, 2.4, threads=2, cores=2).busy  # our own two threads
    assert Load(2.0, 3.1, threads=2, cores=2).busy and "busy: load average 3.1 on 2 cores, 2 threads" in Load(
        2.0, 3.1, 2, 2).describe()
    assert not Load(None, None, 2, 2).busy and Load(None, None, 2, 2).describe() == "load average unknown"


def test_bench_train_measures_steps_of_the_model(capsys):
    """Tokens/s is batch x seq over the measured step time, model FLOP/s is that times 6N + attention per token
    (N without the embedding lookup), MFU is that over the measured matmul peak."""
    from mimo.bench import train_flops_per_token
    from mimo.config import preset_config
    from mimo.model import MiMoForCausalLM

    assert main(["bench", "train", "nano", "--batch", "2", "--seq", "32", "--steps", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = preset_config("nano")
    with torch.device("meta"):
        model = MiMoForCausalLM(cfg)
    n = model.num_params()["total"]
    assert (r["model"], r["batch"], r["seq"], r["steps"], r["parameters"]) == ("nano", 2, 32, 2, n)
    assert r["step_s"] > 0 and r["train_tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"])
    assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"] and isinstance(r["flags"], list)
    assert r["load"]["threads"] == torch.get_num_threads() and isinstance(r["load"]["busy"], bool)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    per_token = 6 * (n - cfg.vocab_size * cfg.hidden_size) + 6 * layers * cfg.num_attention_heads * cfg.head_dim * 32
    assert train_flops_per_token(model, 32) == pytest.approx(per_token)
    assert r["model_flops_per_s"] == pytest.approx(r["train_tokens_per_s"] * per_token)
    assert r["mfu"] == pytest.approx(r["model_flops_per_s"] / r["matmul_peak_flops_per_s"]) and 0 < r["mfu"] < 1
    assert main(["bench", "train", "nano", "--batch", "2", "--seq", "32", "--steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "nano fp32:" in text and "tokens/s" in text and "matmul peak" in text
    assert math.isfinite(r["threads"])
