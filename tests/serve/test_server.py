"""`mimo serve`: the OpenAI API end to end through the official `openai` client, against a live uvicorn server.

The chat model is a tiny model overfitted (in the fixture, a few seconds) on one reply with a <think> part, so
the reasoning/answer split is checked on real generated text; a random tiny model serves the concurrency tests.
"""

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
import torch
from helpers import ANSWER, QUESTION, THOUGHT, overfit_chat_model, serve, tiny_model

from mimo.inference.engine import Engine
from mimo.serve.engine_loop import EngineLoop


def endless_model(tokenizer):
    """A random tiny model that never ends a greedy reply: the stop tokens' logits are always 0."""
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        model.lm_head.weight[sorted(tokenizer.stop_token_ids)] = 0.0
    return model


@pytest.fixture(scope="module")
def chat_server(tokenizer):
    torch.manual_seed(0)
    with serve(overfit_chat_model(tokenizer), tokenizer, max_batch=4, max_queue=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)


def ask(client, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                          temperature=0, **kw)


def test_chat_completion_splits_thinking_from_answer(client):
    r = ask(client, max_tokens=60)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == ANSWER
    assert choice.message.reasoning_content == THOUGHT
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_matches_the_whole_reply_and_reports_usage(client):
    stream = ask(client, max_tokens=60, stream=True, stream_options={"include_usage": True})
    reasoning, content, reasons, usage = "", "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            reasons.append(c.finish_reason)
    whole = ask(client, max_tokens=60)
    assert (reasoning, content) == (THOUGHT, ANSWER)
    assert reasons[-1] == "stop" and reasons.count("stop") == 1
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_is_server_sent_events_ending_in_done(chat_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", chat_server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_interval_sends_the_same_text_in_fewer_chunks(tokenizer):
    model = endless_model(tokenizer)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 21, "stream": True,
            "temperature": 0}

    def stream(url):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
        pieces = [c["choices"][0]["delta"] for c in chunks]
        return ["".join(d.get(k) or "" for k in ("reasoning_content", "content")) for d in pieces[1:-1]]

    with serve(model, tokenizer, max_batch=2) as s:
        every_token = stream(s.url)
    with serve(model, tokenizer, max_batch=2, stream_interval=4) as s:
        every_fourth = stream(s.url)
    assert "".join(every_fourth) == "".join(every_token) != ""
    # the first token at once, then 4 tokens a chunk: 1 + 4 * 5 = 21 (a few tokens may decode to no text)
    assert len(every_fourth) <= 6 < len(every_token)


def test_max_tokens_stop_n_and_seed(client):
    assert ask(client, max_tokens=3).usage.completion_tokens == 3
    assert ask(client, max_tokens=3).choices[0].finish_reason == "length"
    assert ask(client, max_completion_tokens=4, max_tokens=50).usage.completion_tokens == 4
    ended = ask(client, max_tokens=60)  # the model ends its turn after ~20 tokens
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 60
    through = ask(client, max_tokens=60, extra_body={"ignore_eos": True})  # vLLM's extension
    assert through.choices[0].finish_reason == "length" and through.usage.completion_tokens == 60
    stopped = ask(client, max_tokens=60, stop=["5"])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == "The answer is "
    a = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3,
                                       temperature=1.5, seed=7, max_tokens=12)
    b = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3,
                                       temperature=1.5, seed=7, max_tokens=12)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [(c.message.reasoning_content, c.message.content) for c in a.choices]
    assert texts == [(c.message.reasoning_content, c.message.content) for c in b.choices]
    assert len(set(texts)) > 1  # the choices draw different numbers
    huge = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3,
                                          temperature=1.5, seed=7, max_tokens=12, extra_body={"top_k": 2**70})
    assert [(c.message.reasoning_content, c.message.content) for c in huge.choices] == texts  # top-k off


def test_text_completions_plain_and_streamed(client, tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text.endswith(ANSWER)
    assert r.choices[0].text.startswith("<think>") and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=60, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    two = client.completions.create(model="tiny", prompt=[prompt, "Hello"], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 8
    assert client.completions.create(model="tiny", prompt=prompt, max_tokens=2).usage.completion_tokens == 2


def chatml(*turns, generation_prompt=True):
    """The ChatML text of (role, content) turns, written out by hand."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def test_requests_become_the_prompts_and_sampling_the_engine_receives(tokenizer):
    """What the engine loop is handed for each request: developer -> system, content given as text parts, a
    multi-turn history with assistant turns (their reasoning_content not sent back), text, batched and token-id
    completion prompts, echo, and integral floats (5.0 is 5) for counts, seeds and token ids."""
    from mimo.inference.sampling import row_seed

    with serve(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_batch=4) as s:
        service = s.server.config.app.state.service
        got = []
        submit = service.submit
        service.submit = lambda seqs, stream, *adapter: (got.append(seqs), submit(seqs, stream, *adapter))[1]
        http = httpx.Client(base_url=s.url + "/v1", timeout=60)

        def post(path, **body):
            got.clear()
            r = http.post(path, json={"max_tokens": 2, "temperature": 0, **body})
            assert r.status_code == 200, r.text
            (seqs,) = got
            return r.json(), [p for p, _ in seqs], [sp for _, sp in seqs]

        _, prompts, _ = post("/chat/completions", messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]}])
        assert prompts == [tokenizer.encode(chatml(("system", "Be brief."), ("user", "What is 2 + 3?")))]

        _, prompts, _ = post("/chat/completions", messages=[
            {"role": "system", "content": "You add."}, {"role": "user", "content": "1 + 1?"},
            {"role": "assistant", "content": "2", "reasoning_content": "one and one"},
            {"role": "user", "content": "And 2 + 2?"},
            {"role": "assistant", "content": [{"type": "text", "text": "4"}]}, {"role": "user", "content": "3 + 3?"}])
        assert prompts == [tokenizer.encode(chatml(("system", "You add."), ("user", "1 + 1?"), ("assistant", "2"),
                                                   ("user", "And 2 + 2?"), ("assistant", "4"), ("user", "3 + 3?")))]

        # integral floats are integers; n choices share the prompt, each with its own seed
        reply, prompts, params = post("/chat/completions", messages=[{"role": "user", "content": "Hi"}],
                                      n=2.0, max_tokens=3.0, seed=7.0, top_k=5.0)
        assert prompts == [tokenizer.encode(chatml(("user", "Hi")))] * 2 and len(reply["choices"]) == 2
        assert [(p.max_new_tokens, p.top_k, p.seed) for p in params] == [(3, 5, row_seed(7, 0)), (3, 5, row_seed(7, 1))]
        assert all(type(p.max_new_tokens) is int and type(p.top_k) is int for p in params)
        _, _, params = post("/chat/completions", messages=[{"role": "user", "content": "Hi"}], max_tokens=None,
                            max_completion_tokens=4.0)
        assert params[0].max_new_tokens == 4

        text = "The quick brown fox"
        reply, prompts, _ = post("/completions", prompt=text, echo=True)
        assert prompts == [tokenizer.encode(text)]
        assert reply["choices"][0]["text"].startswith(text) and len(reply["choices"][0]["text"]) > len(text)
        reply, prompts, _ = post("/completions", prompt=text)
        assert not reply["choices"][0]["text"].startswith(text)

        reply, prompts, params = post("/completions", prompt=["12 + 7", "gcd"], n=2, seed=1)
        assert prompts == [tokenizer.encode("12 + 7")] * 2 + [tokenizer.encode("gcd")] * 2
        assert [p.seed for p in params] == [row_seed(1, 0), row_seed(1, 1)] * 2
        assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]

        ids = tokenizer.encode(text)
        reply, prompts, _ = post("/completions", prompt=[float(i) for i in ids], echo=True)
        assert prompts == [ids] and all(type(i) is int for i in prompts[0])
        assert reply["choices"][0]["text"].startswith(tokenizer.decode(ids))
        assert reply["usage"]["prompt_tokens"] == len(ids)
        for bad in ({"prompt": [ids[0] + 0.5]}, {"prompt": text, "max_tokens": 2.5}):
            assert http.post("/completions", json=bad).status_code == 400


def test_models_health_and_metrics(client, chat_server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert httpx.get(chat_server.url + "/health").json()["status"] == "ok"
    ask(client, max_tokens=4)
    text = httpx.get(chat_server.url + "/metrics").text
    for name in ("mimo_requests_total", "mimo_generation_tokens_total", "mimo_request_latency_seconds_bucket",
                 "mimo_time_to_first_token_seconds_count", "mimo_batch_occupancy_bucket", "mimo_running_requests",
                 "mimo_mtp_acceptance_rate", "mimo_mtp_drafted_tokens_total"):
        assert name in text, name
    assert 'mimo_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user"}]}, None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": None, "top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"seed": 1.5}, "seed"),
    ({"max_tokens": 100000}, "max_tokens"),
]


@pytest.mark.parametrize("change,param", BAD_CHAT)
def test_invalid_chat_requests_get_400_with_an_openai_error(chat_server, change, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    r = httpx.post(chat_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"].split(".")[0] == param


def test_malformed_json_long_prompts_unknown_models_and_paths(chat_server, client):
    url = chat_server.url
    for raw in (b"{not json", b"[1, 2]", b"", b"null", b'{"model": "tiny", "messages": [{"role": "user", "content'):
        r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), raw
    long = {"model": "tiny", "messages": [{"role": "user", "content": "1 2 3 " * 400}]}
    r = httpx.post(url + "/v1/chat/completions", json=long)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [10**9]})
    assert r.status_code == 400
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": ""})
    assert r.status_code == 400
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    big = json.dumps({"model": "tiny", "prompt": "x" * (9 * 2**20)}).encode()
    r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(url + "/v1/completions", content=iter([big[i:i + 2**20] for i in range(0, len(big), 2**20)]),
                         headers={"content-type": "application/json"})  # no Content-Length
    assert chunked.status_code == 413 and "error" in chunked.json()
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert ask(client, max_tokens=60).choices[0].message.content == ANSWER  # nothing broke


def test_full_queue_gets_429_and_the_service_recovers(tokenizer):
    with serve(endless_model(tokenizer), tokenizer, max_batch=1, max_queue=0, context=4096) as s:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # (kept: dropping the iterator closes the connection)
            next(lines)
            r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False})
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).completions.create(
                    model="tiny", prompt="Hi", max_tokens=2)
        deadline = time.time() + 20
        while httpx.get(s.url + "/health").json()["running_or_queued"]:
            assert time.time() < deadline
            time.sleep(0.05)
        assert httpx.post(s.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}).status_code == 200


def test_a_client_that_disconnects_stops_its_generation(tokenizer):
    with serve(endless_model(tokenizer), tokenizer, max_batch=2, context=4096) as s:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            next(lines)
        idle(s.url)
        # a non-streamed request whose client gives up is stopped too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
        idle(s.url)
        # stopped, not run to the end (whatever the machine's speed): aborted, fewer tokens than asked for
        metrics = httpx.get(s.url + "/metrics").text
        assert "mimo_aborted_requests_total 2.0" in metrics
        generated = float(next(line.split()[-1] for line in metrics.splitlines()
                               if line.startswith("mimo_generation_tokens_total")))
        assert generated < 2 * 4000


def idle(url):
    """Wait until the server has nothing running or queued (a hang fails after a generous minute)."""
    deadline = time.time() + 60
    while httpx.get(url + "/health").json()["running_or_queued"]:
        assert time.time() < deadline, "generation went on after the client left"
        time.sleep(0.05)


def test_api_key_guards_the_api_not_the_health_check(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    with serve(model, tokenizer, api_key="s3cret") as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(s.url + "/metrics").status_code == 401
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_sixteen_concurrent_clients_get_the_same_text_as_sequential_requests(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, seed=3)
    prompts = [f"Question {i}: what is {i} + {2 * i}?" for i in range(16)]
    with serve(model, tokenizer, max_batch=16) as s:
        client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)

        async def one(i, stream):
            kw = {"model": "tiny", "messages": [{"role": "user", "content": prompts[i]}], "temperature": 0,
                  "max_tokens": 24 + i}
            if not stream:
                r = await client.chat.completions.create(**kw)
                return (r.choices[0].message.content, getattr(r.choices[0].message, "reasoning_content", None))
            content, reasoning = "", None
            async for chunk in await client.chat.completions.create(**kw, stream=True):
                for c in chunk.choices:
                    content += c.delta.content or ""
                    piece = getattr(c.delta, "reasoning_content", None)
                    reasoning = (reasoning or "") + piece if piece else reasoning
            return content, reasoning

        async def run():
            sequential = [await one(i, False) for i in range(16)]
            concurrent = await asyncio.gather(*(one(i, i % 2 == 0) for i in range(16)))
            return sequential, list(concurrent)

        sequential, concurrent = asyncio.run(run())
        loop = s.server.config.app.state.service.loop
        assert loop.session.requests == {} and loop.pending == 0  # a long-lived session keeps no finished request
    assert concurrent == sequential
    assert len(set(sequential)) > 4  # different prompts, different texts


@pytest.mark.slow
def test_warm_up_steps_every_compiled_batch_size_and_leaves_the_session_empty():
    engine = Engine(tiny_model(vocab_size=64), None, max_seq_len=64, compile=True)
    loop = EngineLoop(engine, max_batch=6, max_queue=4, mtp=True, num_draft=1)
    seen = []
    step = loop.session.step
    loop.session.step = lambda: (seen.append(len(loop.session.running())), step())[1]
    loop.warm_up()
    assert {1, 2} <= set(seen) and max(seen) == 2  # compiled_rows: 1, 2; bigger batches run eagerly
    assert loop.session.requests == {} and not loop.session.has_work()


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors_and_responses_match_the_spec(tokenizer, tmp_path):
    """Property-based requests from the server's own OpenAPI spec (schemathesis' CLI): never a 5xx, and every
    status code, content type and response body is the one the spec documents."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    st = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    with serve(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_batch=4) as s:
        checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
        run = subprocess.run([st, "run", s.url + "/openapi.json", "-c", checks, "-n", "15", "--seed", "1",
                              "--request-timeout", "60", "--no-color"], check=False, capture_output=True, text=True,
                             timeout=600, cwd=tmp_path)  # (its cache folder goes there)
        assert run.returncode == 0, run.stdout[-3000:]
        assert "passed" in run.stdout
        assert httpx.get(s.url + "/health").json()["status"] == "ok"


@pytest.mark.slow
def test_mimo_eval_runs_against_mimo_serve(tokenizer, tmp_path):
    """`mimo eval --endpoint` (the evaluation's OpenAI backend) against our own server, end to end."""
    from mimo.cli import main

    with serve(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_batch=4, context=1024) as s:
        out = tmp_path / "ev"
        assert main(["eval", "--endpoint", s.url + "/v1", "--model", "tiny", "--task", "gsm8k", "--limit", "3",
                     "--samples", "2", "--max-new-tokens", "8", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["tokens"] > 0 for r in rows)
    assert json.loads((out / "summary.json").read_text())["settings"]["backend"] == "endpoint"


@pytest.mark.slow
def test_mimo_serve_command_with_int8_and_the_api_key_from_the_environment(model_dir):
    import os
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MIMO_API_KEY": "from-env", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mimo.cli", "serve", str(model_dir), "--port", str(port),
                             "--quantize", "int8", "--no-mtp", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None and time.time() < deadline, "mimo serve did not start"
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0)
        assert client.models.list().data[0].id == model_dir.name
        r = client.completions.create(model=model_dir.name, prompt="Hello", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        assert "mimo_mtp_drafted_tokens_total 0.0" in httpx.get(url + "/metrics", headers={
            "Authorization": "Bearer from-env"}).text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "127.0.0.1" in out and "MTP off" in out and "API key required" in out


def test_an_engine_failure_fails_only_the_running_requests(tokenizer):
    with serve(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer) as s:
        loop = s.server.config.app.state.service.loop
        session = loop.session
        real_step, calls = session.step, []

        def failing_once():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("simulated bug")
            return real_step()

        session.step = failing_once
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
        assert loop.session is not session  # a fresh batch after the failure
        assert httpx.post(s.url + "/v1/completions", json=body, timeout=30).status_code == 200
        assert httpx.get(s.url + "/health").json()["running_or_queued"] == 0
