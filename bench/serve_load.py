"""Load on `mimo serve`: aggregate output tokens/s and time to first token at 1 and N concurrent clients.

Starts `mimo serve MODEL_DIR` in its own process, then streams chat completions of held-out reasoning
problems through the OpenAI API (one connection per client; by default through aiohttp, reading the SSE lines
as vLLM's serving benchmark does, --client openai through the official client): first one client alone,
then N clients at once taking prompts from one pool, each sending its next request when its previous one is
done (fixed concurrency, as vLLM's serving benchmark). Same prompts, settings and server in both phases;
output tokens are the server's own usage counts.

    .venv/bin/python bench/serve_load.py runs/speedrun-tiny/final --clients 16 --requests 8 --max-tokens 128

--engine-only runs the same workload without HTTP: the same chat-templated prompts go straight into one
EngineSession in this process (a finished request is replaced by the next at once), to separate what the
engine does with this workload from what the HTTP side and the clients cost.
"""

import argparse
import asyncio
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import openai

from mimo.eval.tasks import get_task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


@dataclass(frozen=True)
class Workload:
    """What every request of a run asks for."""
    max_tokens: int
    temperature: float
    ignore_eos: bool = False  # generate max_tokens tokens whatever the model does (fixed-length replies)

    def body(self, i: int) -> dict:
        """The request fields beyond model and messages (request i gets seed i)."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "seed": i,
                **({"ignore_eos": True} if self.ignore_eos else {})}


def drain(pool: asyncio.Queue):
    while not pool.empty():
        yield pool.get_nowait()


async def aiohttp_request(session, model, i, prompt, w: Workload, t0):
    """One streamed request through aiohttp, as vLLM's serving benchmark sends them: the SSE lines are read as
    bytes, with no per-chunk objects (a light load generator: the clients share the server's cores)
    -> (ttft_s or None, completion_tokens)."""
    ttft, tokens = None, 0
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **w.body(i), "stream": True,
            "stream_options": {"include_usage": True}}
    async with session.post("/v1/chat/completions", json=body) as r:
        async for line in r.content:
            if ttft is None and (b'"content": "' in line or b'"reasoning_content"' in line) and b'"content": ""' not in line:
                ttft = time.perf_counter() - t0
            if b'"usage": {' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return ttft, tokens


def openai_kwargs(w: Workload, i: int) -> dict:
    """The workload as the openai client's arguments (extensions such as ignore_eos go in extra_body)."""
    body = w.body(i)
    extra = {"ignore_eos": body.pop("ignore_eos")} if "ignore_eos" in body else None
    return {**body, "extra_body": extra}


async def openai_request(client, model, i, prompt, w: Workload, t0):
    """One streamed request through the openai client -> (ttft_s or None, completion_tokens)."""
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], **openai_kwargs(w, i), stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        if ttft is None and chunk.choices:
            d = chunk.choices[0].delta
            if d.content or getattr(d, "reasoning_content", None):
                ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens


async def openai_whole_request(client, model, i, prompt, w: Workload, t0):
    """One non-streamed request through the openai client -> (latency_s, completion_tokens): the whole reply
    arrives at once, so its "time to first token" is the request's latency."""
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], **openai_kwargs(w, i))
    return time.perf_counter() - t0, reply.usage.completion_tokens


async def client_run(request, client, model, pool, w: Workload):
    """One client: takes prompts from the shared pool one after another -> [(ttft_s, completion_tokens)]."""
    out = []
    for i, prompt in drain(pool):
        t0 = time.perf_counter()
        ttft, tokens = await request(client, model, i, prompt, w, t0)
        out.append((ttft if ttft is not None else time.perf_counter() - t0, tokens))
    return out


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of this process, or of process pid (Linux /proc)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def phase_result(n_clients, requests, tokens, wall, ttfts, steps, occupancy, cpu=None) -> dict:
    """One phase's figures, the same for the server and the in-process engine. cpu: CPU seconds by process."""
    return {"clients": n_clients, "requests": requests, "output_tokens": tokens, "wall_s": round(wall, 2),
            "output_tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(percentile(ttfts, 50), 4), "ttft_p99_s": round(percentile(ttfts, 99), 4),
            "ttft_mean_s": round(statistics.mean(ttfts), 4), "engine_steps_per_s": round(steps / wall, 1),
            "mean_batch_occupancy": round(occupancy, 3),
            **({"cpu_s": {k: round(v, 2) for k, v in cpu.items()}} if cpu else {})}


def engine_phase(engine, tokenizer, n_clients, prompts, w: Workload, mtp, max_batch) -> dict:
    """The phase's workload straight through an EngineSession of max_batch slots (as the server's): n_clients
    requests in flight, each replaced by the next prompt when it finishes."""
    from mimo.inference.sampling import SamplingParams

    session = engine.session(max_batch, mtp=mtp)
    pool = list(enumerate(prompts))
    added, ttfts, tokens, steps, busy = {}, [], 0, 0, 0
    t0 = time.perf_counter()

    def add():
        i, prompt = pool.pop(0)
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
        params = SamplingParams(w.max_tokens, w.temperature, seed=i, ignore_eos=w.ignore_eos)
        added[session.add(ids, params)] = time.perf_counter()

    for _ in range(min(n_clients, len(pool))):
        add()
    while session.has_work():
        events = session.step()
        steps, busy = steps + 1, busy + len(session.running())
        for ev in events:
            if ev.request_id in added and (ev.text or ev.finished):
                ttfts.append(time.perf_counter() - added.pop(ev.request_id))
            if ev.finished:
                tokens += len(ev.completion.tokens)
                session.abort(ev.request_id)
                if pool:
                    add()
    wall = time.perf_counter() - t0
    session.close()
    return phase_result(n_clients, len(prompts), tokens, wall, ttfts, steps, busy / steps / max_batch)


def engine_counters(url) -> dict:
    """Engine steps and the batch-occupancy sum so far, from /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for key in ("mimo_engine_steps_total", "mimo_batch_occupancy_sum", "mimo_batch_occupancy_count"):
            if line.startswith(key + " "):
                out[key] = float(line.split()[-1])
    return out


async def phase(url, model, n_clients, prompts, w: Workload, client="aiohttp", stream=True, server_pid=None):
    """n_clients clients take the prompts from one pool, each sending its next request when the previous one is
    done (a fixed concurrency, as vLLM's serving benchmark), until the pool is empty. Both processes' CPU time
    is measured: they share this machine's cores."""
    pool = asyncio.Queue()
    for item in enumerate(prompts):
        pool.put_nowait(item)
    if client == "aiohttp" and stream:
        clients = [aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(600)) for _ in range(n_clients)]
        request = aiohttp_request
    else:
        clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0,
                                      http_client=openai.DefaultAsyncHttpxClient(timeout=600))
                   for _ in range(n_clients)]
        request = openai_request if stream else openai_whole_request
    before = engine_counters(url)
    pids = {"clients": None, **({"server": server_pid} if server_pid else {})}  # None: this process
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    results = await asyncio.gather(*(client_run(request, c, model, pool, w) for c in clients))
    wall = time.perf_counter() - t0
    await asyncio.gather(*(c.close() for c in clients))
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    after = engine_counters(url)
    steps = after["mimo_engine_steps_total"] - before["mimo_engine_steps_total"]
    occupancy = ((after["mimo_batch_occupancy_sum"] - before["mimo_batch_occupancy_sum"])
                 / max(1.0, after["mimo_batch_occupancy_count"] - before["mimo_batch_occupancy_count"]))
    flat = [r for rs in results for r in rs]
    return phase_result(n_clients, len(flat), sum(n for _, n in flat), wall, [t for t, _ in flat], steps, occupancy,
                        cpu)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", metavar="MODEL_DIR")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8,
                    help="requests per client on average: the pool holds clients x requests prompts")
    ap.add_argument("--single-requests", type=int, default=16, help="requests of the single-client phase")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every reply runs to --max-tokens (vLLM's ignore_eos): fixed-length replies")
    ap.add_argument("--max-batch", type=int, default=None, help="server --max-batch (default: --clients)")
    ap.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--serve-args", default="", help="more `mimo serve` flags, e.g. '--quantize int8'")
    ap.add_argument("--client", choices=["aiohttp", "openai"], default="aiohttp",
                    help="aiohttp: a light load generator, as vLLM's serving benchmark; openai: the official client, "
                         "which parses every chunk into objects (several times the clients' CPU)")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                    help="stream replies (SSE); --no-stream: whole replies (openai client; TTFT = latency)")
    ap.add_argument("--engine-only", action="store_true", help="the same workload in-process, without HTTP")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    task = get_task("reasoning")
    rows = task.load()[: args.clients * args.requests]
    prompts = [task.chat_prompt(r) for r in rows]
    if args.engine_only:
        return engine_only(args, prompts)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).with_name("mimo")), "serve", args.model, "--port", str(port),
           "--max-batch", str(args.max_batch or args.clients), "--max-queue", str(args.clients * args.requests),
           "--mtp" if args.mtp else "--no-mtp", "--log-level", "warning", *args.serve_args.split()]
    server = subprocess.Popen(cmd)
    try:
        deadline = time.time() + 600  # --compile compiles every batch size before serving
        while True:
            try:
                model = httpx.get(url + "/health", timeout=2).json()["model"]
                break
            except httpx.HTTPError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        w = Workload(args.max_tokens, args.temperature, args.ignore_eos)
        asyncio.run(phase(url, model, 1, prompts[:2], Workload(8, args.temperature)))  # warm-up
        single = asyncio.run(phase(url, model, 1, prompts[: args.single_requests], w, args.client, args.stream,
                                   server.pid))
        many = asyncio.run(phase(url, model, args.clients, prompts, w, args.client, args.stream, server.pid))
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)
    acceptance = next((float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("mimo_mtp_acceptance_rate ")), None)
    client = args.client if args.stream else "openai, not streamed"
    report(args, client, single, many, acceptance)


def engine_only(args, prompts):
    from mimo.checkpoint import load_model_and_tokenizer
    from mimo.inference.engine import Engine

    model, tokenizer = load_model_and_tokenizer(args.model, "auto")
    engine = Engine(model, tokenizer, pack_weights=True)  # as `mimo serve` builds it
    run = functools.partial(engine_phase, engine, tokenizer, w=Workload(args.max_tokens, args.temperature,
                                                                       args.ignore_eos),
                            mtp=args.mtp, max_batch=args.max_batch or args.clients)
    run(1, prompts[:2])  # warm-up
    single, many = run(1, prompts[: args.single_requests]), run(args.clients, prompts)
    report(args, "none (in-process engine)", single, many, None)


def report(args, client, single, many, acceptance):
    result = {"model": args.model, "mtp": args.mtp, "client": client, "max_tokens": args.max_tokens,
              "ignore_eos": args.ignore_eos,
              "single": single, "concurrent": many,
              "speedup": round(many["output_tokens_per_s"] / single["output_tokens_per_s"], 2),
              "mtp_acceptance_rate": acceptance}
    if not args.json:
        for name, r in (("1 client", single), (f"{args.clients} clients", many)):
            print(f"{name:>11}: {r['output_tokens_per_s']:7.1f} output tokens/s ({r['output_tokens']} tokens in "
                  f"{r['wall_s']} s), TTFT p50 {r['ttft_p50_s'] * 1000:.0f} ms, p99 {r['ttft_p99_s'] * 1000:.0f} ms; "
                  f"{r['engine_steps_per_s']} engine steps/s, batch {100 * r['mean_batch_occupancy']:.0f}% full"
                  + "".join(f"; {k} CPU {v} s" for k, v in r.get("cpu_s", {}).items()))
        print(f"aggregate speed-up at {args.clients} clients: {result['speedup']}x; MTP acceptance {acceptance}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
