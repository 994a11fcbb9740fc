"""Pretraining end to end on a corpus built in the test: it learns, writes metrics, checkpoints and a model
directory; a run SIGKILLed while writing a checkpoint resumes to exactly the uninterrupted run; two processes
(DDP, and FSDP killed and resumed) with gradient accumulation end on the one-process run's weights."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimo.cli import main

CORPUS = {"seed": 0, "tokens": 60_000, "tokenizer": {"vocab_size": 512},
          "sources": {"reasoning": {"type": "reasoning", "problems": 1500, "formats": {"trace": 3, "answer_only": 1}}},
          "stages": [{"name": "broad", "fraction": 0.25, "mix": {"reasoning/answer_only": 1.0}},
                     {"name": "reasoning", "fraction": 0.5, "mix": {"reasoning": 1.0}},
                     {"name": "long", "fraction": 0.25, "mix": {"reasoning/trace": 1.0}}]}

# every run: nano, 16 steps of 8 sequences in micro-batches of 2 (4 accumulation steps in one process, 2 in each
# of two), checkpoints every 4 steps, metrics at steps 10 and 16 (with validation), fp32 so runs compare closely;
# the data stages get steps 0-3, 4-11 and 12-15 (a run killed in step 12 resumes from step 8, inside stage 2)
STEPS = 16
RUN = ["pretrain", "--preset", "nano", "--max-steps", str(STEPS), "--save-every", "4", "--eval-every", "10",
       "--micro-batch", "2", "--precision", "fp32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # a free port

# `mimo` that SIGKILLs itself (rank 0 under torchrun: the only writer) while it writes the checkpoint of step
# MIMO_TEST_KILL_AT, after the model files and before the optimizer's: a crash at a point that does not depend on
# how fast the machine is, inside the write that must stay atomic
KILLER = '''
import os, signal, sys
from mimo.train import loop
from mimo.cli import main

kill_at = int(os.environ["MIMO_TEST_KILL_AT"])
save_checkpoint, save_file = loop.save_checkpoint, loop.save_file

def dying_save_file(tensors, path, *a, **kw):
    if os.path.basename(str(path)) == "optimizer.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)
    return save_file(tensors, path, *a, **kw)

def checkpoint(run_dir, step, *a, **kw):
    if step == kill_at:
        loop.save_file = dying_save_file
    return save_checkpoint(run_dir, step, *a, **kw)

loop.save_checkpoint = checkpoint
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mimo.data.corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus") / "data"
    build_corpus(CORPUS, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted one-process run every other run is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run([sys.executable, "-m", "mimo.cli", *RUN, "--data", str(corpus), "--out", str(out)], env=ENV,
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def killer(tmp_path_factory):
    path = tmp_path_factory.mktemp("killer") / "mimo_killed.py"
    path.write_text(KILLER)
    return path


def run(cmd, **env):
    return subprocess.run(cmd, env={**ENV, **env}, capture_output=True, text=True, check=False)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def same_rows(run_dir):
    """metrics.jsonl without the wall-clock throughput."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(run_dir)]


def weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


@pytest.mark.slow
def test_nano_pretrain_learns_and_writes_everything(corpus, reference, capfd):
    rows = metrics(reference)
    assert [r["step"] for r in rows] == [10, STEPS]
    for key in ("step", "tokens", "loss", "ntp_loss", "mtp_loss", "lr", "tokens_per_s", "val_loss", "val_mtp_top1"):
        assert all(key in r for r in rows), key
    assert rows[-1]["tokens"] == STEPS * 8 * 256
    assert [r["stage"] for r in rows] == ["reasoning", "long"]
    stages = json.loads((reference / "run_config.json").read_text())["stages"]
    assert [(s["name"], s["first_step"], s["end_step"]) for s in stages] == [
        ("broad", 0, 4), ("reasoning", 4, 12), ("long", 12, 16)]
    # it learns: an untrained model scores about ln(512) = 6.24 nats; over 16 steps training and validation loss
    # fall clearly (measured: next-token 5.10 -> 3.97, validation 4.80 -> 3.82, MTP 5.09 -> 4.06)
    first, last = rows
    assert first["ntp_loss"] < math.log(512) - 0.5 and first["val_loss"] < math.log(512) - 0.5
    assert last["ntp_loss"] < first["ntp_loss"] - 0.5 and last["val_loss"] < first["val_loss"] - 0.4
    assert last["mtp_loss"] < first["mtp_loss"] - 0.5 and last["val_mtp_top1"] > first["val_mtp_top1"]
    assert (reference / "loss.png").stat().st_size > 0
    final = reference / "final"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (final / f).exists(), f
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step_000012", "step_000016"]
    # rerunning a finished run does nothing more
    capfd.readouterr()
    assert main([*RUN, "--data", str(corpus), "--out", str(reference)]) == 0
    assert "already trained to step 16" in capfd.readouterr().err and len(metrics(reference)) == 2


@pytest.mark.slow
def test_sigkill_while_checkpointing_then_resume_ends_exactly_where_the_uninterrupted_run_does(
        corpus, reference, killer, tmp_path):
    out = tmp_path / "killed"
    cmd = [*RUN, "--data", str(corpus), "--out", str(out)]
    proc = run([sys.executable, str(killer), *cmd], MIMO_TEST_KILL_AT="12")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "final").exists() and [r["step"] for r in metrics(out)] == [10]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000004", "step_000008"]
    assert [p.name.startswith(".tmp-") for p in ckpts.iterdir() if not p.name.startswith("step_")] == [True]
    rerun = run([sys.executable, "-m", "mimo.cli", *cmd])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from step 8" in rerun.stderr
    assert same_rows(out) == same_rows(reference)  # row 10 was redone, not kept twice
    a, b = weights(reference), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close_weights(run_dir, reference):
    """Final weights equal the one-process run's up to fp32 rounding (accumulating the micro-batches' gradients
    in another order; measured: DDP at most 7e-7 apart, FSDP 1.1e-5 in the embedding and below 1e-6 elsewhere:
    Adam divides a rounding-level gradient difference of a rarely seen token's row by its tiny second moment)."""
    a, b = weights(reference), weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=3e-5 if k == "model.embed_tokens.weight" else 1e-5,
                                   msg=k)
    for x, y in zip(metrics(reference), metrics(run_dir)):
        assert x["step"] == y["step"] and x["tokens"] == y["tokens"]
        for key in ("loss", "ntp_loss", "mtp_loss", "val_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), key


@pytest.mark.slow
def test_ddp_with_gradient_accumulation_matches_one_process(corpus, reference, tmp_path):
    out = tmp_path / "ddp"
    res = run([*TORCHRUN, "-m", "mimo.cli", *RUN, "--data", str(corpus), "--out", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(2 accumulation step(s) x 2 process(es))" in res.stderr
    close_weights(out, reference)


@pytest.mark.slow
def test_fsdp_killed_then_resumed_matches_one_process(corpus, reference, killer, tmp_path):
    out = tmp_path / "fsdp"
    cmd = [*RUN, "--data", str(corpus), "--out", str(out), "--fsdp"]
    res = run([*TORCHRUN, str(killer), *cmd], MIMO_TEST_KILL_AT="12")
    assert res.returncode != 0 and not (out / "final").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000004", "step_000008"]
    res = run([*TORCHRUN, "-m", "mimo.cli", *cmd])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from step 8" in res.stderr
    close_weights(out, reference)


class FakeBatches:
    """3 micro-batches a step of random tokens (the same for every step)."""

    def micro_batches(self, step):
        g = torch.Generator().manual_seed(step)
        for _ in range(3):
            x = torch.randint(0, 64, (2, 17), generator=g)
            yield x[:, :-1], x[:, 1:]


def test_gradients_sync_only_on_each_steps_last_micro_batch(tmp_path, monkeypatch):
    """Accumulation skips the gradient all-reduce (DDP no_sync, FSDP2 set_requires_gradient_sync(False)) on every
    micro-batch but a step's last; that is what no_sync turns off and on in both."""
    import torch.distributed as dist
    from helpers import tiny_model
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from mimo import parallel
    from mimo.train import loop

    flags = []
    real = loop.no_sync

    def spy(model, sync):
        flags.append(sync)
        return real(model, sync)

    monkeypatch.setattr(loop, "no_sync", spy)
    cfg = loop.TrainConfig(max_steps=2, lr=1e-3, warmup_steps=1, log_every=1, save_every=2, precision="fp32")
    (tmp_path / "run").mkdir()
    loop.train(tiny_model(vocab_size=64), None, FakeBatches(), cfg, tmp_path / "run", parallel.DistInfo())
    assert flags == [False, False, True] * 2

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(tiny_model(vocab_size=64))
        with real(ddp, sync=False):
            assert not ddp.require_backward_grad_sync
        with real(ddp, sync=True):
            assert ddp.require_backward_grad_sync
        model = tiny_model(vocab_size=64)
        fully_shard(model)
        calls = []
        monkeypatch.setattr(model, "set_requires_gradient_sync", lambda on, **kw: calls.append(on))
        for sync in (False, False, True):
            with real(model, sync=sync):
                pass
        assert calls == [False, False, True]
    finally:
        dist.destroy_process_group()


def test_depth_dial_overrides_the_preset_shape():
    from mimo.train.pretrain import model_for

    model = model_for("nano", 500, num_mtp=0, seed=0, depth=3)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (192, 3, 3, 1)
    assert cfg.vocab_size == 512 and cfg.num_nextn_predict_layers == 0
    assert model_for("nano", 500, num_mtp=None, seed=0).config.hidden_size == 128
