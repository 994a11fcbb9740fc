"""The server's engine loop on its own (no HTTP): requests join the running batch from an event loop, their
events come back in order, and a full queue, an abort and a refused prompt each end as they should."""

import asyncio

import pytest
from helpers import tiny_model

from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.serve.engine_loop import EngineLoop, QueueFull

PROMPTS = [[1, 2, 3, 4], [9, 8, 7], [5]]


@pytest.fixture()
def engine_loop(tokenizer):
    """An EngineLoop over a tiny model, its thread running."""
    engine = Engine(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_seq_len=64)
    loop = EngineLoop(engine, max_batch=2, max_queue=2, mtp=False, num_draft=1)
    loop.start()
    yield loop
    loop.stop()


async def collect(loop: EngineLoop, requests, stream_interval=1):
    """Submit the requests together; -> every (handle, event) they produced, in the order they arrived."""
    handles, events = loop.submit(requests, stream_interval)
    seen, open_handles = [], set(map(id, handles))
    while open_handles:
        h, ev = await asyncio.wait_for(events.get(), timeout=120)
        seen.append((h, ev))
        if ev is None or ev.finished:
            open_handles.discard(id(h))
    return handles, seen


def test_every_request_gets_the_tokens_of_engine_generate_and_one_finished_event_last(engine_loop):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = [c.tokens for c in engine_loop.engine.generate(PROMPTS, params)]
    handles, seen = asyncio.run(collect(engine_loop, [(p, params) for p in PROMPTS]))  # 3 rows, 2 slots
    for h, tokens in zip(handles, want):
        mine = [ev for owner, ev in seen if owner is h]
        assert [ev.finished for ev in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].completion.tokens == tokens and h.done and h.error is None
    assert engine_loop.pending == 0
    assert engine_loop.metrics.prompt_tokens._value.get() == sum(map(len, PROMPTS))


def test_a_reply_that_is_not_streamed_gets_its_finished_event_only(engine_loop):
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    _, seen = asyncio.run(collect(engine_loop, [(PROMPTS[0], params)], stream_interval=0))
    assert [ev.finished for _, ev in seen] == [True] and len(seen[0][1].completion.tokens) == 5


def test_stream_interval_groups_tokens_after_the_first(engine_loop):
    params = SamplingParams(max_new_tokens=7, ignore_eos=True)
    _, seen = asyncio.run(collect(engine_loop, [(PROMPTS[0], params)], stream_interval=3))
    # events at the first token, at the fourth, and the finished one at the seventh (their Completion is shared
    # and keeps growing, so the count of events is what tells)
    assert [ev.finished for _, ev in seen] == [False, False, True]


def test_a_full_queue_refuses_the_whole_request_and_admits_nothing(engine_loop):
    params = SamplingParams(max_new_tokens=2)

    async def submit_too_many():
        with pytest.raises(QueueFull):
            engine_loop.submit([(PROMPTS[0], params)] * 5)  # room for 2 running + 2 waiting

    asyncio.run(submit_too_many())
    assert engine_loop.pending == 0


def test_an_aborted_request_ends_with_no_event_and_frees_its_place(engine_loop):
    async def submit_and_abort():
        handles, events = engine_loop.submit([(PROMPTS[0], SamplingParams(max_new_tokens=50, ignore_eos=True))])
        h, ev = await asyncio.wait_for(events.get(), timeout=120)  # its first token: it is running
        engine_loop.abort(handles)
        while ev is not None and not ev.finished:
            h, ev = await asyncio.wait_for(events.get(), timeout=120)
        return h, ev

    h, ev = asyncio.run(submit_and_abort())
    assert (ev is None and h.error == "aborted") or ev.finished  # it may finish first on a fast machine
    assert engine_loop.pending == 0


def test_a_prompt_the_engine_refuses_ends_with_its_error(engine_loop):
    _, seen = asyncio.run(collect(engine_loop, [([1] * 200, SamplingParams(max_new_tokens=2))]))
    (h, ev), = seen
    assert ev is None and h.done and "context" in h.error and not h.internal_error
    assert engine_loop.pending == 0
