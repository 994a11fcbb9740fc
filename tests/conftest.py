"""Shared fixtures: tiny models and tokenizers built in the test, fixed seeds, no network."""

import os

# Before torch loads, as `import mimo` does for every mimo command: OpenMP threads that spin-wait for a peer make
# torch collapse when another program holds a core (a tiny model's training step 30x slower on a busy 2-core box).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SAMPLE_TEXT = [
    "Question: What is 12 + 7?\nSolution:\n12 + 7 = 19\nAnswer: 19",
    "Question: Sort 5, 3, 9 ascending.\nSolution:\nsmallest 3, then 5, then 9\nAnswer: 3, 5, 9",
    "The quick brown fox jumps over the lazy dog. Numbers like 1234 and 5678 split into digits.",
    "Reasoning step by step: first compute the gcd of 12 and 18, which is 6; then the lcm is 36.",
    "Unicode survives too: café, naïve, 数学, emoji 🙂.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    from mimo.tokenizer import Tokenizer

    return Tokenizer.train([], vocab_size=400, min_frequency=1, show_progress=False, texts=SAMPLE_TEXT)


def tiny_config(vocab_size=400, num_mtp=1, tie=False, **kw):
    from mimo.config import MiMoConfig

    base = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_nextn_predict_layers": num_mtp,
                "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": tie, "torch_dtype": "float32"}
    base.update(kw)
    return MiMoConfig(**base)


def tiny_model(seed=0, **kw):
    from mimo.model import MiMoForCausalLM

    torch.manual_seed(seed)
    return MiMoForCausalLM(tiny_config(**kw)).init_weights(seed).eval()


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    """A saved tiny mimo model directory with its tokenizer."""
    from mimo.checkpoint import save_model

    model = tiny_model(vocab_size=tokenizer.vocab_size)
    return save_model(model, tmp_path / "tiny", tokenizer=tokenizer)


SANDBOX_SKIP = "SANDBOX ISOLATION NOT TESTED"  # tests/test_sandbox.py's skip reason starts with it


def pytest_terminal_summary(terminalreporter):
    """A skipped sandbox isolation test must not pass unnoticed (a passing run would say nothing else)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and SANDBOX_SKIP in str(r.longrepr[-1])]
    if skipped:
        terminalreporter.write_sep("!", f"{SANDBOX_SKIP}: {len(skipped)} sandbox tests that need namespaces skipped", red=True,
                                   bold=True)
        terminalreporter.write_line(str(skipped[0].longrepr[-1]).removeprefix("Skipped: "), red=True)
        terminalreporter.write_line("Run as root or where unprivileged user namespaces are allowed; CI fails here "
                                    "unless MIMO_ALLOW_WEAK_SANDBOX=1.", red=True)
