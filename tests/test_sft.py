import json

import pytest
from conftest import tiny_model

from mimo.benchmarks import load_benchmark
from mimo.checkpoint import save_model
from mimo.cli import main
from mimo.model import IGNORE_INDEX
from mimo.sft import decontaminate, pack, procedural_examples, tokenize_example


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
    assert x.shape == (2, seq) and (y != IGNORE_INDEX).sum() == 3 * len(learned)  # two fit in a row, one spills


def test_decontamination_drops_benchmark_and_eval_questions():
    from mimo import reasoning

    clean = procedural_examples(20, seed=0)
    leaked_math = [{"role": "user", "content": load_benchmark("math500")[3]["problem"]},
                   {"role": "assistant", "content": "\\boxed{1}"}]
    eval_q = next(iter(p.question for p in reasoning.eval_problems(1)))
    leaked_eval = [{"role": "user", "content": eval_q}, {"role": "assistant", "content": "\\boxed{1}"}]
    kept, stats = decontaminate(clean + [leaked_math, leaked_eval], n=16)
    assert len(kept) == 20 and stats["dropped_benchmark_overlap"] == 1 and stats["dropped_eval_question"] == 1


def test_sft_run_end_to_end(base_dir, tmp_path):
    out = tmp_path / "sft"
    assert main(["sft", "--from", str(base_dir), "--out", str(out), "--problems", "400", "--max-steps", "4",
                 "--eval-every", "2", "--save-every", "2"]) == 0
    stats = json.loads((out / "sft_data.json").read_text())
    assert stats["kept"] <= 400 and stats["examples"] == 400
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["mtp_loss"] is not None and "val_loss" in rows[-1]
    assert (out / "final" / "model.safetensors").exists()


def test_sft_from_jsonl_and_frozen_mtp(base_dir, tmp_path):
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
