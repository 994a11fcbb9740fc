"""Shared fixtures (built on tests/helpers.py) and the summary line for skipped sandbox tests."""

import os

# Before torch loads, as `import mimo` does for every mimo command: OpenMP threads that spin-wait for a peer make
# torch collapse when another program holds a core (a tiny model's training step 30x slower on a busy 2-core box).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from helpers import SAMPLE_TEXT, SANDBOX_SKIP, tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer():
    from mimo.tokenizer import Tokenizer

    return Tokenizer.train([], vocab_size=400, min_frequency=1, show_progress=False, texts=SAMPLE_TEXT)


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    """A saved tiny mimo model directory with its tokenizer."""
    from mimo.checkpoint import save_model

    model = tiny_model(vocab_size=tokenizer.vocab_size)
    return save_model(model, tmp_path / "tiny", tokenizer=tokenizer)


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
