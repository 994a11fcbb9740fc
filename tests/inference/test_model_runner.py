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


@pytest.mark.parametrize("method,dtype,heads", [("int8", torch.float32, 4), ("int4", torch.float32, 4),
                                                ("int4", torch.bfloat16, 4), (None, torch.bfloat16, 4),
                                                ("int8", torch.float32, 8), ("int8", torch.float32, 2),
                                                ("int8", torch.float32, 1)])
def test_the_block_kernel_computes_what_the_torch_blocks_do(method, dtype, heads):
    """Small passes of a model whose products are mimo's kernels run their blocks in block.c; the same passes
    through ModelRunner._block give the same logits: a prompt, decode steps, two rows of three tokens in other
    slots (a verify pass) and an MTP step. Head sizes 16, 8, 32 and (one head of a hidden size of 128) MiMo's 128:
    attention's vector paths and their remainders."""
    from mimo import kernels
    from mimo.quantize import quantize_model

    if not kernels.available():
        pytest.skip("no C compiler")
    model = tiny_model(vocab_size=64, num_mtp=1, num_attention_heads=heads, num_key_value_heads=min(2, heads),
                       hidden_size=128 if heads == 1 else 64).to(dtype)
    if method:
        model = quantize_model(model, method)
    fused, plain = ModelRunner(model, n_slots=20, capacity=32), ModelRunner(model, n_slots=20, capacity=32)
    assert fused.block_kernel is not None
    plain.block_kernel = None
    ids = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8]])
    outs = []
    with torch.no_grad():
        for r in (fused, plain):
            h = r.hidden(ids[:, :5], r.context(torch.arange(5)[None], torch.tensor([1]), 5))
            got = [r.logits(h)[0]]
            got += [r.decode(ids[:, t:t + 1], torch.tensor([[t]]), t + 1) for t in range(5, 8)]
            ctx = r.context(torch.tensor([[5, 6, 7], [2, 3, 4]]), torch.tensor([1, 2]), 8)
            got.append(r.logits(r.hidden(torch.tensor([[1, 2, 3], [4, 5, 6]]), ctx)))
            got.append(r.decode(torch.tensor([[4], [6]]), torch.tensor([[5], [8]]), 9, torch.tensor([2, 1])))
            z = r.mtp(0, h[:, :4], ids[:, 1:5], r.context(torch.arange(4)[None], torch.tensor([1]), 4))
            got.append(r.mtp_logits(0, z))
            wide = (torch.arange(40) * 7 + 3) % 64  # the small model's wide passes: 20 fresh rows of 2 tokens,
            at = torch.arange(2).expand(20, 2)  # each in its own slot, and two prompts of 20 tokens
            got.append(r.logits(r.hidden(wide.view(20, 2), r.context(at, torch.arange(20), 2))))
            at = torch.arange(20).expand(2, 20)
            got.append(r.logits(r.hidden(wide.view(2, 20), r.context(at, torch.tensor([5, 6]), 20))))
            outs.append(got)
    tol = 1e-5 if dtype == torch.float32 else 1 / 64  # bf16: a rounding of the activations apart at most
    for i, (a, b) in enumerate(zip(*outs)):  # the wide passes (last two): 40 rows, summed in another order
        torch.testing.assert_close(a.float(), b.float(), atol=tol * (10 if i >= len(outs[0]) - 2 else 1), rtol=0)


def test_the_block_kernel_is_left_out_where_it_cannot_compute_the_blocks():
    from mimo import kernels
    from mimo.quantize import quantize_model

    if not kernels.available():
        pytest.skip("no C compiler")
    assert ModelRunner(tiny_model(vocab_size=64), n_slots=1, capacity=16).block_kernel is None  # fp32 weights
    runner = ModelRunner(quantize_model(tiny_model(vocab_size=64), "int8"), n_slots=1, capacity=16)
    assert runner.block_kernel.takes(1, 1) and runner.block_kernel.takes(4, 2)
    if kernels.SIMD:  # (the portable build's scalar products stop at PORTABLE_MAX_ROWS)
        assert runner.block_kernel.takes(512, 1) and runner.block_kernel.takes(2, 64)  # a small model's wide
        # decode and prefill passes: block.c, no per-op dispatch
    runner.block_kernel.small_pass_rows, runner.block_kernel.max_rows = 0, 64  # a large model's: its format's caps
    assert runner.block_kernel.takes(64, 1) and not runner.block_kernel.takes(65, 1)
    assert not runner.block_kernel.takes(1, 64)  # a prompt: the torch blocks
