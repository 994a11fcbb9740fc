import json
from dataclasses import replace

import pytest
import torch
from helpers import run_killed_at_checkpoint, tiny_model

from mimo.benchmarks import load_benchmark
from mimo.checkpoint import save_model
from mimo.cli import main
from mimo.model import IGNORE_INDEX
from mimo.train.sft import decontaminate, pack, pack_positions, procedural_examples, tokenize_example


@pytest.fixture()
def base_dir(tmp_path, tokenizer):
    return save_model(tiny_model(vocab_size=tokenizer.vocab_size), tmp_path / "base", tokenizer=tokenizer)


def test_loss_only_on_assistant_tokens(tokenizer):
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n"
                                                                                        "\\boxed{5}"}]
    ids, labels = tokenize_example(tokenizer, msgs)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(msgs[:1]))
    assert ids[: len(prompt)] == prompt
    assert all(lab == IGNORE_INDEX for lab in labels[: len(prompt)])
    learned = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(learned) == msgs[1]["content"] + "<|im_end|>"
    seq = 2 * len(ids) + 5
    x, y = pack([(ids, labels), (ids, labels), (ids, labels)], seq, tokenizer.eos_token_id)
    positions = pack_positions([(ids, labels)] * 3, seq)
    assert x.shape == (2, seq) and (y != IGNORE_INDEX).sum() == 3 * len(learned)  # two fit in a row, one spills
    # positions restart at each example (and at the padding after the last), so examples never see each other
    n = len(ids)
    assert positions[0].tolist() == [*range(n), *range(n), *range(seq - 2 * n)]
    assert positions[1].tolist() == [*range(n), *range(seq - n)]


def test_decontamination_drops_benchmark_and_eval_questions():
    from mimo.data import reasoning

    clean = procedural_examples(20, seed=0)
    leaked_math = [{"role": "user", "content": load_benchmark("math500")[3]["problem"]},
                   {"role": "assistant", "content": "\\boxed{1}"}]
    eval_q = next(iter(p.question for p in reasoning.eval_problems(1)))
    leaked_eval = [{"role": "user", "content": eval_q}, {"role": "assistant", "content": "\\boxed{1}"}]
    kept, stats = decontaminate(clean + [leaked_math, leaked_eval], n=16)
    assert len(kept) == 20 and stats["dropped_benchmark_overlap"] == 1 and stats["dropped_eval_question"] == 1


@pytest.fixture()
def small_batches(monkeypatch):
    """SFT's schedule with a smaller batch (8 rows a step, in micro-batches of 4), a 2-step warm-up and a metrics
    row every step: the same loop, a few seconds a run."""
    from mimo.train import sft

    monkeypatch.setattr(sft, "SFT_DEFAULTS", replace(sft.SFT_DEFAULTS, global_batch_seqs=8, micro_batch=4,
                                                     warmup_steps=2, log_every=1))


def rows_of(run_dir):
    """metrics.jsonl without the wall-clock throughput."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_learns_then_killed_and_resumed_equals_uninterrupted(base_dir, tmp_path, small_batches, monkeypatch,
                                                                capfd):
    from safetensors.torch import load_file

    from mimo.train import loop

    def sft(out):
        return main(["sft", "--from", str(base_dir), "--out", str(out), "--problems", "200", "--max-steps", "6",
                     "--eval-every", "1", "--save-every", "3", "--lr", "3e-3"])

    ref = tmp_path / "ref"
    assert sft(ref) == 0
    stats = json.loads((ref / "sft_data.json").read_text())
    assert stats["examples"] == 200 and 150 <= stats["kept"] - stats["dropped_too_long"] <= 200
    rows = rows_of(ref)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(r["mtp_loss"] is not None for r in rows)
    # it learns: training (next-token and MTP) and validation loss fall clearly over 6 steps (measured: next-token
    # 6.00 -> 4.98, validation 5.84 -> 4.94)
    assert rows[-1]["ntp_loss"] < rows[0]["ntp_loss"] - 0.5 and rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    assert rows[-1]["mtp_loss"] < rows[0]["mtp_loss"] - 0.2
    assert (ref / "final" / "model.safetensors").exists()

    # killed in step 6 (rows 4-6 written, the checkpoint of step 3 the newest), rerun: it resumes from step 3 and
    # ends exactly where the uninterrupted run did
    out = tmp_path / "killed"
    run_killed_at_checkpoint(monkeypatch, loop, 6, lambda: sft(out))
    assert len(rows_of(out)) == 6 and not (out / "final").exists()
    capfd.readouterr()
    assert sft(out) == 0
    assert "resuming from step 3" in capfd.readouterr().err
    assert rows_of(out) == rows
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sft_from_jsonl_and_frozen_mtp(base_dir, tmp_path, small_batches):
    from mimo.checkpoint import load_model

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and {i}.", "response": f"\\boxed{{{2 * i}}}"}) + "\n"
                            for i in range(64)))
    out = tmp_path / "sft"
    assert main(["sft", "--from", str(base_dir), "--out", str(out), "--data", str(data), "--max-steps", "2",
                 "--mtp-weight", "0"]) == 0
    before, after = load_model(base_dir), load_model(out / "final")
    for (name, a), b in zip(before.model.mtp_layers.named_parameters(), after.model.mtp_layers.parameters()):
        assert (a == b).all(), name
    assert not (before.model.layers[0].mlp.up_proj.weight == after.model.layers[0].mlp.up_proj.weight).all()
