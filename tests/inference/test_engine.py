import pytest
import torch
from helpers import greedy_reference, tiny_model

from mimo.inference.engine import Engine, IncrementalDetokenizer
from mimo.inference.model_runner import ModelRunner
from mimo.inference.sampling import SamplingParams, filtered_probs


def test_ragged_batch_equals_one_by_one(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.encode(t) for t in ("Question: What is", "Sort", "The quick brown fox jumps over")]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=10))
    for p, o in zip(prompts, outs):
        assert o.tokens == greedy_reference(model, p, 10, tokenizer.stop_token_ids)
        assert o.finish_reason in ("stop", "length")
        assert o.text == tokenizer.decode(o.tokens)


def test_generate_with_fewer_rows_than_prompts_gives_the_same_completions():
    """max_batch: rows decode a few at a time, a finished row's slot going to the next prompt; every completion
    is what it is with all rows at once (greedy, and sampled with each row's seed)."""
    engine = Engine(tiny_model(vocab_size=64), None)
    prompts = [[1 + i, 2 * i % 64, 5] for i in range(7)]
    for params in (SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)):
        want = [c.tokens for c in engine.generate(prompts, params)]
        assert [c.tokens for c in engine.generate(prompts, params, max_batch=2)] == want


def test_rows_with_the_same_prompt_share_one_prefill():
    """Duplicate prompts are prefilled once and their keys/values copied: every row still decodes as if alone
    (greedy, sampled with its own seed, with and without MTP), and the main model runs on the distinct prompts."""
    from mimo.inference.sampling import row_seed

    model = tiny_model(vocab_size=64)
    a, b = [5, 9, 2, 7, 1], [3, 3, 8]
    prompts = [a, b, a, a, b, [4]]
    engine = Engine(model, None)
    calls = []
    runner = engine.acquire_runner(6, 64)  # the runner every session below reuses
    engine.release_runner(runner)
    hidden = runner.hidden
    runner.hidden = lambda ids, ctx: (calls.append(ids.shape[0]), hidden(ids, ctx))[1]
    for mtp in (False, True):
        calls.clear()
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=10), mtp=mtp)
        assert calls[0] == 3  # the prefill: a, b and [4]
        for p, o in zip(prompts, outs):
            assert o.tokens == greedy_reference(model, p, 10, [])
        sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
        outs = engine.generate(prompts, sampled, mtp=mtp)
        for i, (p, o) in enumerate(zip(prompts, outs)):
            session = Engine(model, None).session(1, mtp=mtp)  # the row alone, with the seed generate gave it
            rid = session.add(p, SamplingParams(max_new_tokens=10, temperature=1.0, seed=row_seed(7, i)))
            while session.has_work():
                session.step()
            assert o.tokens == session.completion(rid).tokens
        assert len({tuple(outs[i].tokens) for i in (0, 2, 3)}) > 1  # same prompt, own seeds


def test_a_prompt_a_running_row_holds_is_not_computed_again():
    """Samples of one prompt admitted as slots free (a GRPO group in a full batch) copy a running row's keys and
    values and reuse its last hidden state: the main model sees the prompt once while a row holds it, and every
    row decodes what it would alone (its own seed). Once no row holds it, it is computed afresh."""
    model = tiny_model(vocab_size=64)
    engine = Engine(model, None)
    a, b = [5, 9, 2, 7, 1], [3, 3, 8]
    prompts, budgets = [a, b, a, a, b, a], [20, 2, 2, 3, 2, 2]  # the first a runs throughout
    session = engine.session(max_batch=2)
    prefills, hidden = [], session.runner.hidden
    session.runner.hidden = lambda ids, ctx: (ids.shape[1] > 1 and prefills.append(ids.tolist()),
                                              hidden(ids, ctx))[1]
    rids = [session.add(p, SamplingParams(max_new_tokens=n, temperature=1.0, seed=i))
            for i, (p, n) in enumerate(zip(prompts, budgets))]
    while session.has_work():
        session.step()
    assert prefills == [[a, b + [0, 0]], [b]]  # a once; b again: no running row held it by then
    assert session.held == {}
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        alone = engine.session(max_batch=1)
        rid = alone.add(p, SamplingParams(max_new_tokens=n, temperature=1.0, seed=i))
        while alone.has_work():
            alone.step()
        assert session.completion(rids[i]).tokens == alone.completion(rid).tokens
    again = engine.session(max_batch=2)
    again.runner.hidden = session.runner.hidden
    again.add(a, SamplingParams(max_new_tokens=2))
    again.step()
    assert prefills[-1] == [a]


def test_logprobs_are_the_models(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    out = Engine(model, tokenizer).generate([tokenizer.encode("hello")], SamplingParams(max_new_tokens=5,
                                                                                         temperature=1.0, seed=3))[0]
    seq = torch.tensor([out.prompt_tokens + out.tokens])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq).logits[0].float(), -1)
    n = len(out.prompt_tokens)
    ref = [lp[n - 1 + j, t].item() for j, t in enumerate(out.tokens)]
    assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(ref), atol=1e-4)


def test_stop_strings_truncate(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.encode("Numbers like")]
    full = engine.generate(prompt, SamplingParams(max_new_tokens=20))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = engine.generate(prompt, SamplingParams(max_new_tokens=20, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


def test_streaming_never_splits_utf8(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    text = "naïve 数学 🙂 done"
    ids = tokenizer.encode(text)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streamed_text_equals_final_text(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    got = {0: "", 1: ""}
    outs = Engine(model, tokenizer).generate(
        [tokenizer.encode("café"), tokenizer.encode("数")], SamplingParams(max_new_tokens=15, temperature=1.0, seed=0),
        on_text=lambda row, t: got.__setitem__(row, got[row] + t))
    assert got[0] == outs[0].text and got[1] == outs[1].text


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert (p[0, :3] > 0).all() and p[0, 3] == 0


def test_runner_matches_the_model():
    """The engine's lean forward pass (prefill into arbitrary slots, decode through views) is the model's."""
    model = tiny_model(vocab_size=64, num_mtp=1)
    runner = ModelRunner(model, n_slots=3, capacity=16)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        want = model(ids, targets=ids.roll(-1, 1), return_mtp_logits=True)
        h = runner.hidden(ids[:, :6], runner.context(pos[:, :6], torch.tensor([2, 0]), 6))
        assert torch.allclose(runner.logits(h), want.logits[:, :6], atol=1e-5)
        z = runner.mtp(0, h[:, :5], ids[:, 1:6], runner.context(pos[:, :5], torch.tensor([2, 0]), 5))
        assert torch.allclose(runner.mtp_logits(0, z), want.mtp_logits[0][:, :5], atol=1e-5)
        # one more token for the row in slot 0 through the view path, attending to its cache
        last = runner.decode(ids[1:, 6:], pos[1:, 6:], 7)
        assert torch.allclose(last, want.logits[1:, 6], atol=1e-5)


def test_session_rows_join_and_leave():
    """Continuous batching: requests arrive while others run, slots are reused, each result is what it would be
    alone, and events stream each request's text exactly once."""
    model = tiny_model(vocab_size=64)
    engine = Engine(model, None)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11], [12]]
    budgets = [3, 9, 5, 7, 4]
    params = [SamplingParams(max_new_tokens=n, temperature=1.0 if i % 2 else 0.0, seed=i)
              for i, n in enumerate(budgets)]
    alone = [engine.session(max_batch=1) for _ in prompts]
    for s, p, sp in zip(alone, prompts, params):
        s.add(p, sp)
        while s.has_work():
            s.step()
    session = engine.session(max_batch=2)
    rids = [session.add(prompts[0], params[0]), session.add(prompts[1], params[1])]
    finished, steps = [], 0
    while session.has_work():
        for ev in session.step():
            if ev.finished:
                finished.append(ev.request_id)
                assert len(ev.completion.tokens) == budgets[ev.request_id]
        steps += 1
        if steps == 2:
            rids += [session.add(p, sp) for p, sp in zip(prompts[2:], params[2:])]
        assert len(session.running()) <= 2
    assert sorted(finished) == rids
    for rid, s in zip(rids, alone):
        assert session.completion(rid).tokens == s.completion(0).tokens
    session.abort(rids[0])  # forgetting a finished request is allowed


@pytest.mark.parametrize("method", [None, "int8"])
def test_a_draining_batch_decodes_only_its_live_rows(method):
    """Rows leave in any order: once a low slot is free, a step runs the live slots alone (the torch blocks, and
    block.c for int8), each row decoding what it would alone (greedy) or with its own seed (sampled)."""
    from mimo import kernels
    from mimo.quantize import quantize_model

    if method and not kernels.available():
        pytest.skip("no C compiler")
    model = tiny_model(vocab_size=64)
    if method:
        model = quantize_model(model, method)
    engine = Engine(model, None)
    prompts, budgets = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]], [2, 9, 4, 7]
    alone = []
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        session = engine.session(max_batch=1)
        session.add(p, SamplingParams(max_new_tokens=n, temperature=1.0 if i % 2 else 0.0, seed=i))
        while session.has_work():
            session.step()
        alone.append(session.completion(0).tokens)
    session = engine.session(max_batch=4)
    rows, decode = [], session.runner.decode
    session.runner.decode = lambda ids, *a: (rows.append((ids.shape[0], len(session.running()))), decode(ids, *a))[1]
    rids = [session.add(p, SamplingParams(max_new_tokens=n, temperature=1.0 if i % 2 else 0.0, seed=i))
            for i, (p, n) in enumerate(zip(prompts, budgets))]
    while session.has_work():
        session.step()
    assert [session.completion(r).tokens for r in rids] == alone
    assert (4, 4) in rows and (3, 3) in rows and (1, 1) in rows  # slot 0 left first: slots 1-3, then 1 alone
    assert all(b == live for b, live in rows)


def test_session_abort_and_runner_reuse():
    engine = Engine(tiny_model(vocab_size=64), None)
    session = engine.session(max_batch=2)
    a = session.add([1, 2], SamplingParams(max_new_tokens=50))
    b = session.add([3], SamplingParams(max_new_tokens=3))
    session.step()
    session.abort(a)
    assert session.completion(b).finish_reason is None
    while session.has_work():
        session.step()
    assert session.completion(b).finish_reason == "length" and len(session.completion(b).tokens) == 3
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
    runner = engine._idle_runner
    engine.generate([[4, 5]], SamplingParams(max_new_tokens=2))
    assert engine._idle_runner is runner  # the KV cache is reused, not reallocated


def test_seeded_sampling_ignores_batch_composition():
    engine = Engine(tiny_model(vocab_size=64), None)
    p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    session = engine.session(max_batch=1)
    session.add([3, 4, 5], p)
    while session.has_work():
        session.step()
    crowded = engine.session(max_batch=4)
    for prompt in ([9], [3, 4, 5], [1, 1, 1, 1]):
        crowded.add(prompt, SamplingParams(max_new_tokens=10, temperature=1.0, seed=7))
    while crowded.has_work():
        crowded.step()
    assert crowded.completion(1).tokens == session.completion(0).tokens


def test_no_tokenizer_and_zero_budget():
    engine = Engine(tiny_model(vocab_size=64), None)
    outs = engine.generate([[1, 2], [3]], SamplingParams(max_new_tokens=0))
    assert all(o.tokens == [] and o.finish_reason == "length" for o in outs)
    out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=5))[0]
    assert len(out.tokens) == 5 and out.text == ""


def test_warm_up_leaves_the_runner_the_real_call_reuses():
    """Engine.warm_up runs a few tokens through a session of generate()'s size: the later call reuses its runner
    (with compile=True, its compiled steps) instead of making another."""
    engine = Engine(tiny_model(vocab_size=64), None)
    prompts, params = [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=40)
    engine.warm_up(prompts, params, mtp=True)
    runner = engine._idle_runner
    assert runner is not None and runner.n_slots == 2
    outs = engine.generate(prompts, params, mtp=True)
    assert engine._idle_runner is runner and all(len(o.tokens) == 40 for o in outs)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL's packed GEMM (x86 CPU builds)")
def test_packed_weights_decode_like_plain_ones():
    """Engine(pack_weights=True): a session of 8 rows keeps MKL-packed weights for 8 rows (and 16, MTP's verify
    pass of 2 tokens a row), runs 7 live rows as a full batch of 8, and decodes what the plain engine does, with
    and without MTP, greedy and sampled; rows join and leave on the way."""
    model = tiny_model(vocab_size=64)
    packed, plain = Engine(model, None, pack_weights=True), Engine(model, None)
    assert packed.pack_rows(8) == (8,) and packed.pack_rows(8, num_draft=1) == (8, 16)
    assert packed.pack_rows(4) == () and plain.pack_rows(8) == ()  # small batches, or not asked for
    prompts = [[i + 1, 2 * i + 3, 5][: 1 + i % 3] for i in range(11)]
    params = [SamplingParams(max_new_tokens=4 + 3 * (i % 4), temperature=0.0 if i % 3 else 0.8, seed=i)
              for i in range(11)]
    for mtp in (False, True):
        outs = {}
        for name, engine in (("packed", packed), ("plain", plain)):
            session = engine.session(max_batch=8, mtp=mtp)
            assert session.runner.rows_to_run(7) == (8 if name == "packed" else 7)
            assert session.runner.rows_to_run(6) == 6
            rids = [session.add(p, sp) for p, sp in zip(prompts, params)]  # 3 wait for a free slot
            while session.has_work():
                session.step()
            outs[name] = [session.completion(r).tokens for r in rids]
            session.close()
        assert outs["packed"] == outs["plain"]
    runner = packed._idle_runner
    assert runner.pack_rows == (8, 16)
    assert packed.acquire_runner(8, 32, (8,)) is not runner  # packed for other sizes: not reused


@pytest.mark.parametrize("T", [1, 2, 3])
def test_half_precision_decode_attention_in_fp32_matches_sdpa(T):
    """A bf16 model's decode-step attention on the CPU (ModelRunner._attention: fp32 matmuls, grouped query heads,
    an additive causal mask for the draft-verify step's tokens) equals fp32 SDPA to bf16 rounding, and the
    engine's greedy tokens for a bf16 model are the same with it as with torch's bf16 SDPA."""
    import torch.nn.functional as F

    runner = ModelRunner.__new__(ModelRunner)
    runner.gqa = True
    g = torch.Generator().manual_seed(T)
    S = 37
    q, k, v = (torch.randn(2, heads, n, 16, generator=g).bfloat16() for heads, n in ((8, T), (2, S), (2, S)))
    pos = torch.tensor([[S - T + i for i in range(T)], [S - T - 5 + i for i in range(T)]])  # [b, T]
    mask = torch.zeros(2, T, S).masked_fill_(torch.arange(S) > pos[..., None], float("-inf"))[:, None]
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    got = runner._attention(q, k, v, mask.bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.float() - want).abs().max() < 0.02


def test_bf16_model_mtp_stays_lossless_with_fp32_decode_attention():
    """The draft-verify step (2 queries, masked) and the plain step (1 query) compute a bf16 model's attention the
    same way, so greedy MTP decoding gives the plain greedy tokens."""
    model = tiny_model(vocab_size=300).bfloat16()
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    params = SamplingParams(max_new_tokens=16)
    plain = Engine(model, None).generate(prompts, params)
    spec = Engine(model, None).generate(prompts, params, mtp=True)
    assert [o.tokens for o in spec] == [o.tokens for o in plain]
