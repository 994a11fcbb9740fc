"""The model runner on its own: its KV-cache forward pass gives the model's logits and hidden states, whatever
the slots, the prompt split or the batch; copied cache prefixes and MTP steps match the model's."""

import pytest
import torch
from helpers import tiny_model

from mimo.inference.model_runner import ModelRunner

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=64, num_mtp=1)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's own forward pass, no cache: [T, V]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def prefill(runner: ModelRunner, ids: list[int], slot: int, start: int = 0) -> torch.Tensor:
    """ids at positions start.. into `slot`'s cache -> logits [T, V]."""
    positions = torch.arange(start, start + len(ids))[None]
    ctx = runner.context(positions, torch.tensor([slot]), start + len(ids))
    with torch.no_grad():
        return runner.logits(runner.hidden(torch.tensor([ids]), ctx))[0]


def test_prefill_then_decode_gives_the_models_logits_at_every_position(model):
    ids = [3, 14, 15, 9, 26, 5, 35, 8]
    want = full_logits(model, ids)
    runner = ModelRunner(model, n_slots=1, capacity=32)
    torch.testing.assert_close(prefill(runner, ids[:4], slot=0), want[:4], atol=ATOL, rtol=0)
    with torch.no_grad():
        for t in range(4, len(ids)):
            got = runner.decode(torch.tensor([[ids[t]]]), torch.tensor([[t]]), kv_len=t + 1)
            torch.testing.assert_close(got[0], want[t], atol=ATOL, rtol=0)


def test_a_prompt_split_in_chunks_fills_the_same_cache(model):
    ids = list(range(1, 13))
    runner = ModelRunner(model, n_slots=1, capacity=32)
    prefill(runner, ids[:5], slot=0)
    torch.testing.assert_close(prefill(runner, ids[5:], slot=0, start=5), full_logits(model, ids)[5:], atol=ATOL,
                               rtol=0)


def test_ragged_rows_in_one_decode_step_match_each_alone(model):
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    runner = ModelRunner(model, n_slots=2, capacity=32)
    for slot, p in enumerate(prompts):
        prefill(runner, p[:-1], slot)
    ids = torch.tensor([[p[-1]] for p in prompts])
    positions = torch.tensor([[len(p) - 1] for p in prompts])
    with torch.no_grad():
        got = runner.decode(ids, positions, kv_len=max(map(len, prompts)))
    for row, p in enumerate(prompts):
        torch.testing.assert_close(got[row], full_logits(model, p)[-1], atol=ATOL, rtol=0)


def test_a_copied_prefix_continues_as_the_original(model):
    ids = [5, 6, 7, 8, 9]
    runner = ModelRunner(model, n_slots=2, capacity=32)
    prefill(runner, ids[:4], slot=0)
    runner.copy_prefix(torch.tensor([0]), torch.tensor([1]), 4)
    torch.testing.assert_close(prefill(runner, ids[4:], slot=1, start=4), full_logits(model, ids)[4:], atol=ATOL,
                               rtol=0)


def test_the_mtp_step_matches_the_models(model):
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        out = model(ids)
        want_z, want_logits = model.mtp_step(0, out.hidden[:, :-1], ids[:, 1:], None)
        runner = ModelRunner(model, n_slots=1, capacity=32)
        T = ids.shape[1]
        hidden = runner.hidden(ids, runner.context(torch.arange(T)[None], None, T))
        torch.testing.assert_close(runner.logits(hidden), out.logits, atol=ATOL, rtol=0)
        # MTP layer 0 reads h[t] and token t+1: positions 0..T-2
        ctx = runner.context(torch.arange(T - 1)[None], None, T - 1)
        z = runner.mtp(0, hidden[:, :-1], ids[:, 1:], ctx)
        torch.testing.assert_close(z, want_z, atol=ATOL, rtol=0)
        torch.testing.assert_close(runner.mtp_logits(0, z), want_logits, atol=ATOL, rtol=0)


def test_compiled_and_packed_row_counts():
    runner = ModelRunner(tiny_model(vocab_size=64), n_slots=8, capacity=16)
    assert runner.compiled_rows(1) == 0  # eager without compile
    assert runner.rows_to_run(7) == 7  # no packed weights: only the live rows
    runner.compiled_decode, runner.pack_rows = object(), (8,)
    assert [runner.compiled_rows(m) for m in (1, 2, 3)] == [1, 2, 0]  # powers of two, up to COMPILED_MAX_ROWS
    assert runner.rows_to_run(7) == 8 and runner.rows_to_run(6) == 6  # the full packed batch within a quarter
