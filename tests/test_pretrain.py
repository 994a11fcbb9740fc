"""Pretraining end to end on a corpus built in the test: metrics, checkpoints, exact resume after SIGKILL,
data-parallel agreement under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimo.cli import main

CORPUS = {"seed": 0, "tokens": 60_000, "tokenizer": {"vocab_size": 512},
          "sources": {"reasoning": {"type": "reasoning", "problems": 1500}},
          "stages": [{"name": "broad", "fraction": 1.0, "mix": {"reasoning": 1.0}}]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mimo.data import build_corpus

    out = tmp_path_factory.mktemp("corpus") / "data"
    build_corpus(CORPUS, out, show_progress=False)
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def pretrain_cmd(corpus, out, steps=20, extra=()):
    return [sys.executable, "-m", "mimo.cli", "pretrain", "--preset", "nano", "--data", str(corpus), "--out", str(out),
            "--max-steps", str(steps), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_nano_pretrain_writes_everything(corpus, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    assert main(["pretrain", "--preset", "nano", "--data", str(corpus), "--out", str(out), "--max-steps", "20",
                 "--eval-every", "10", "--save-every", "10"]) == 0
    assert time.time() - t0 < 60
    rows = metrics(out)
    assert [r["step"] for r in rows] == [10, 20]
    for key in ("step", "tokens", "loss", "ntp_loss", "mtp_loss", "lr", "tokens_per_s", "val_loss", "val_mtp_top1"):
        assert key in rows[-1], key
    assert rows[-1]["loss"] < rows[0]["loss"] + 0.5 and rows[-1]["tokens"] == 20 * 8 * 256
    assert (out / "loss.png").exists()
    final = out / "final"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (final / f).exists(), f
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000010", "step_000020"]
    # rerunning a finished run does nothing more
    assert main(["pretrain", "--preset", "nano", "--data", str(corpus), "--out", str(out), "--max-steps", "20"]) == 0
    assert len(metrics(out)) == 2


def test_sigkill_then_resume_ends_on_the_same_loss(corpus, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(pretrain_cmd(corpus, ref, 24, ["--save-every", "8"]), env=ENV, check=True,
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(corpus, out, 24, ["--save-every", "8"]), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step_000008" / "trainer_state.json").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()
    rerun = subprocess.run(pretrain_cmd(corpus, out, 24, ["--save-every", "8"]), env=ENV, capture_output=True,
                           text=True, check=True)
    assert "resuming from step" in rerun.stderr
    a, b = metrics(ref), metrics(out)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(corpus, tmp_path, parallel):
    one = tmp_path / "one"
    subprocess.run(pretrain_cmd(corpus, one, 12, ["--precision", "fp32"]), env=ENV, check=True, capture_output=True)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(29517 + (parallel == "fsdp")),
           "-m", "mimo.cli", "pretrain", "--preset", "nano", "--data", str(corpus), "--out", str(two),
           "--max-steps", "12", "--precision", "fp32", *(["--fsdp"] if parallel == "fsdp" else [])]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    for a, b in zip(metrics(one), metrics(two)):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.01)
    assert metrics(two)[-1]["tokens"] == metrics(one)[-1]["tokens"]
    assert (two / "final" / "model.safetensors").exists()


def test_depth_dial_overrides_the_preset_shape():
    from mimo.pretrain import model_for

    model = model_for("nano", 500, num_mtp=0, seed=0, depth=3)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (192, 3, 3, 1)
    assert cfg.vocab_size == 512 and cfg.num_nextn_predict_layers == 0
    assert model_for("nano", 500, num_mtp=None, seed=0).config.hidden_size == 128
