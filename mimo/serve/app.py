"""`mimo serve`: a mimo model as a local OpenAI-compatible service, with a web chat at `/`.

    mimo serve runs/nano/final                       # http://127.0.0.1:8000, web chat at /
    mimo serve MODEL_DIR --api-key KEY --max-batch 16 --quantize int8

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both streamed as server-sent
events when asked), GET /health, GET /metrics (Prometheus). Every request is served by one engine loop with
continuous batching (mimo/serve/engine_loop.py). The reply's <think> part comes back as `reasoning_content`, apart
from `content`. Errors come back as OpenAI-style {"error": {...}} bodies: 400 for invalid requests, 401 without
the API key, 404 for an unknown model or path, 429 when every batch slot and queue place is taken.

Over 500 lines on purpose: the routes, the request guard and the OpenAPI schema describe one HTTP surface and
are read together; the protocol's request models are in openai_protocol.py, the batching in engine_loop.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mimo.errors import MimoError
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams, row_seed
from mimo.serve.engine_loop import EngineLoop, Handle, QueueFull
from mimo.serve.openai_protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from mimo.serve.thinking import ThinkSplitter, split_thinking
from mimo.tokenizer import Tokenizer

log = logging.getLogger("mimo.serve")
API_KEY_ENV = "MIMO_API_KEY"
DISCONNECT_POLL_S = 0.25
MAX_BODY_BYTES = 8 * 2**20  # larger request bodies get 413 before they are read


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def error_response(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


@dataclass
class ServeConfig:
    model_name: str
    max_batch: int = 8
    max_queue: int = 64  # sequences waiting for a batch slot before new requests get 429
    mtp: bool = True
    num_draft: int = 1
    api_key: str | None = None
    default_temperature: float = 1.0  # for requests that leave them out (the model's generation_config)
    default_top_p: float = 1.0
    stream_interval: int = 1  # tokens per streamed chunk (after the first token, which goes out at once)
    engine_in_background: bool = True  # False: the caller runs service.loop.run() itself (`mimo serve` does)


class ClientGone(Exception):
    pass


class Service:
    """The state behind the routes: the engine loop, the tokenizer and the settings."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.loop = EngineLoop(engine, cfg.max_batch, cfg.max_queue, cfg.mtp and engine.cfg.num_nextn_predict_layers
                               > 0, cfg.num_draft)
        self.context = self.loop.max_seq_len
        self.created = int(time.time())

    # ---- requests -> engine sequences ---------------------------------------------------------------

    def models(self) -> dict[str, int | None]:
        """Served model ids -> the engine's adapter index (None: the base model)."""
        adapters = self.loop.engine.adapters
        names = adapters.names if adapters is not None else []
        return {self.cfg.model_name: adapters.base_index if adapters is not None else None,
                **{name: i for i, name in enumerate(names)}}

    def check_model(self, req: SamplingRequest) -> tuple[str, int | None]:
        """(the model id answered with, the adapter index its sequences use): the request's `model` picks the base
        model or one of the --adapter names (absent: the base model)."""
        models = self.models()
        if req.model is None:
            return self.cfg.model_name, models[self.cfg.model_name]
        if req.model not in models:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves "
                           f"{', '.join(f'`{m}`' for m in models)}.", code="model_not_found", param="model")
        return req.model, models[req.model]

    def sampling(self, req: SamplingRequest, prompt_len: int, max_tokens: int | None, choice: int) -> SamplingParams:
        if prompt_len >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                           f"{prompt_len}.", code="context_length_exceeded", param="messages")
        room = self.context - prompt_len
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens: the prompt has "
                           f"{prompt_len} and {max_tokens} were requested for the completion (at most {room}).",
                           code="context_length_exceeded", param="max_tokens")
        seed = None if req.seed is None else row_seed(req.seed, choice)
        return SamplingParams(
            max_new_tokens=max_tokens if max_tokens is not None else room,
            temperature=self.cfg.default_temperature if req.temperature is None else req.temperature,
            top_p=self.cfg.default_top_p if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0), stop=req.stop_list(), seed=seed, ignore_eos=req.ignore_eos)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        return ids

    def submit(self, requests: list[tuple[list[int], SamplingParams]], stream: bool, adapter: int | None = None):
        """Start the sequences (with the adapter of that index; None: the engine's default); a reply that is not
        streamed gets only their finished events."""
        try:
            return self.loop.submit(requests, self.cfg.stream_interval if stream else 0, adapter)
        except QueueFull as e:
            raise APIError(429, str(e), type="server_busy", code="rate_limit_exceeded") from None

    async def events(self, handles: list[Handle], queue: asyncio.Queue, request: Request) -> AsyncIterator:
        """(choice index, Event) until every sequence has finished; aborts them all if the client leaves."""
        index = {id(h): i for i, h in enumerate(handles)}
        remaining = len(handles)
        last_check = time.perf_counter()
        try:
            while remaining:
                try:
                    h, ev = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    h = ev = None
                if time.perf_counter() - last_check >= DISCONNECT_POLL_S:  # also while tokens keep coming
                    last_check = time.perf_counter()
                    if await request.is_disconnected():
                        raise ClientGone()
                if h is None:
                    continue
                if ev is None:
                    if h.internal_error:
                        raise APIError(500, h.error or "internal error", type="internal_error")
                    raise APIError(400, h.error or "the request failed")
                if ev.finished:
                    remaining -= 1
                yield index[id(h)], ev
        finally:
            if remaining:
                self.loop.abort(handles)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


# ---- the routes ------------------------------------------------------------------------------------

def build_app(engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine loop."""
    service = Service(engine, tokenizer, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if cfg.engine_in_background:
            service.loop.start()
        yield
        if cfg.engine_in_background:
            service.loop.stop()

    app = FastAPI(title="mimo", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for a local mimo model")
    app.state.service = service
    metrics = service.loop.metrics

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return error_response(e.status, e.message, e.type, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: "
                            f"{err.get('msg', 'invalid')}" for err in errors[:5])
        return error_response(400, f"Invalid request: {message}", param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), type=kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request, e: Exception):  # a bug: say so without taking the service down
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(e).__name__}", type="internal_error")

    app.add_middleware(RequestGuard, api_key=cfg.api_key, metrics=metrics)
    app.openapi = lambda: _openapi(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name, "running_or_queued": service.loop.pending}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(service, m) for m in service.models()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in service.models():
            raise APIError(404, f"The model `{model_id}` does not exist.", code="model_not_found")
        return _model_card(service, model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model_id, adapter = service.check_model(body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = service.encode(tokenizer.apply_chat_template(messages))
        except MimoError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        seqs = [(prompt, service.sampling(body, len(prompt), max_tokens, i)) for i in range(body.n)]
        handles, queue = service.submit(seqs, body.stream, adapter)
        t0, rid = time.perf_counter(), f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": model_id}
        if body.stream:
            gen = _sse_stream(service, "chat", {**head, "object": "chat.completion.chunk"}, body, len(prompt), t0,
                              _chat_choices(service, handles, queue, request))
            return StreamingResponse(gen, media_type="text/event-stream")
        completions = await _collect(service, handles, queue, request)
        metrics.latency.labels("chat").observe(time.perf_counter() - t0)
        choices = []
        for i, c in enumerate(completions):
            reasoning, content = split_thinking(c.text)
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            choices.append({"index": i, "message": message, "logprobs": None,
                            "finish_reason": finish_reason(c.finish_reason)})
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": usage(len(prompt), sum(len(c.tokens) for c in completions))}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model_id, adapter = service.check_model(body)
        if isinstance(body.prompt, str):
            prompts = [service.encode(body.prompt)]
        elif isinstance(body.prompt[0], str):
            prompts = [service.encode(p) for p in body.prompt]
        else:
            if max(body.prompt) >= tokenizer.vocab_size:
                raise APIError(400, f"prompt token ids must be below {tokenizer.vocab_size}", param="prompt")
            prompts = [list(body.prompt)]
        if len(prompts) * body.n > service.loop.capacity:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceeds the {service.loop.capacity} "
                           "sequences this server takes at once", param="n")
        seqs = [(p, service.sampling(body, len(p), body.max_tokens, i)) for p in prompts for i in range(body.n)]
        echoes = [tokenizer.decode(p) if body.echo else "" for p in prompts for _ in range(body.n)]
        handles, queue = service.submit(seqs, body.stream, adapter)
        t0, rid = time.perf_counter(), f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": model_id}
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            gen = _sse_stream(service, "completions", {**head, "object": "text_completion"}, body, prompt_tokens,
                              t0, _completion_choices(service, handles, queue, request, echoes))
            return StreamingResponse(gen, media_type="text/event-stream")
        done = await _collect(service, handles, queue, request)
        metrics.latency.labels("completions").observe(time.perf_counter() - t0)
        choices = [{"index": i, "text": echoes[i] + c.text, "logprobs": None,
                    "finish_reason": finish_reason(c.finish_reason)} for i, c in enumerate(done)]
        return {**head, "object": "text_completion", "choices": choices,
                "usage": usage(prompt_tokens, sum(len(c.tokens) for c in done))}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def web_chat():
        return HTMLResponse(resources.files("mimo.serve").joinpath("web/index.html").read_text(encoding="utf-8"))

    return app


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ERRORS = {"400": "Invalid request", "401": "Missing or invalid API key", "404": "Unknown model or path",
          "413": "Request body over 8 MiB", "429": "Every batch slot and queue place is taken"}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's spec with the responses the API really gives: errors are 400 (not 422) with OpenAI's error
    body, completions may be server-sent events, /metrics is Prometheus text."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, ops in spec["paths"].items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/"):
                for code, what in ERRORS.items():
                    responses[code] = {"description": what,
                                       "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            if path.endswith("completions"):
                responses["200"]["content"]["text/event-stream"] = {"schema": {}}  # JSON chunks, then [DONE]
                responses["499"] = {"description": "The client closed the request"}
    spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    spec["paths"]["/metrics"]["get"]["responses"]["401"] = {
        "description": ERRORS["401"], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    spec.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    spec.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    app.openapi_schema = spec
    return spec


ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/metrics")


class BodyTooLarge(StarletteHTTPException):
    def __init__(self):
        super().__init__(413, f"The request body is over {MAX_BODY_BYTES // 2**20} MiB.")


class RequestGuard:
    """ASGI middleware on /v1/* and /metrics: the API key, the body size (by Content-Length, and by counting
    the bytes of a chunked body as it is read) and the request counter by endpoint and status. (A plain ASGI
    wrapper: Starlette's BaseHTTPMiddleware would end streamed responses early.)"""

    def __init__(self, app, api_key: str | None, metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        guarded = scope["type"] == "http" and (path.startswith("/v1/") or path == "/metrics")
        if not guarded:
            return await self.app(scope, receive, send)
        endpoint = path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        headers = dict(scope.get("headers", []))
        refusal = None
        if self.api_key and not self._authorized(headers.get(b"authorization", b"").decode("latin-1")):
            refusal = error_response(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                                     code="invalid_api_key")
        elif (length := headers.get(b"content-length", b"0")).isdigit() and int(length) > MAX_BODY_BYTES:
            refusal = error_response(413, BodyTooLarge().detail, code="request_too_large")
        if refusal is not None:
            self.metrics.requests.labels(endpoint, str(refusal.status_code)).inc()
            return await refusal(scope, receive, send)
        status = 500

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def receive_counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise BodyTooLarge()
            return message

        try:
            await self.app(scope, receive_counted, send_and_note_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())


def _model_card(service: Service, model_id: str) -> dict:
    """A served model; an adapter's card names its base as `parent` (as vLLM lists LoRA adapters)."""
    card = {"id": model_id, "object": "model", "created": service.created, "owned_by": "mimo",
            "max_model_len": service.context}
    if model_id != service.cfg.model_name:
        card["parent"] = service.cfg.model_name
    return card


async def _collect(service: Service, handles, queue, request: Request) -> list:
    out = [None] * len(handles)
    try:
        async for i, ev in service.events(handles, queue, request):
            if ev.finished:
                out[i] = ev.completion
    except ClientGone:
        raise APIError(499, "client closed the request") from None
    return out


async def _sse_stream(service, endpoint: str, chunk: dict, body, prompt_tokens: int, t0: float, choices):
    """A streamed reply: each (choice, tokens) that `choices` yields becomes one chunk (choice None: none) and
    counts `tokens` as generated; then the usage chunk when asked for, and `data: [DONE]`. An error after the
    response has started goes out as an error event; a client that left gets nothing more."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    generated = 0
    try:
        async with contextlib.aclosing(choices):
            async for choice, tokens in choices:
                generated += tokens
                if choice is not None:
                    yield sse({**chunk, "choices": [choice], **extra})
        service.loop.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, generated)})
        yield "data: [DONE]\n\n"
    except ClientGone:
        return
    except APIError as e:
        yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        yield "data: [DONE]\n\n"


async def _chat_choices(service, handles, queue, request):
    """Chat deltas: the role first, then reasoning_content / content pieces, then the finish reason."""
    def delta(i, d, reason=None):
        return {"index": i, "delta": d, "logprobs": None, "finish_reason": reason}

    splitters = [ThinkSplitter() for _ in handles]
    for i in range(len(handles)):
        yield delta(i, {"role": "assistant", "content": ""}), 0
    async for i, ev in service.events(handles, queue, request):
        pieces = splitters[i].feed(ev.text) + (splitters[i].close() if ev.finished else [])
        for in_thought, text in pieces:
            if text:
                yield delta(i, {"reasoning_content" if in_thought else "content": text}), 0
        if ev.finished:
            yield delta(i, {}, finish_reason(ev.completion.finish_reason)), len(ev.completion.tokens)


async def _completion_choices(service, handles, queue, request, echoes):
    """Text pieces: the echoed prompts first, then the new text, then the finish reason."""
    def piece(i, text, reason=None):
        return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

    for i, echo in enumerate(echoes):
        if echo:
            yield piece(i, echo), 0
    async for i, ev in service.events(handles, queue, request):
        if ev.text:
            yield piece(i, ev.text), 0
        if ev.finished:
            yield piece(i, "", finish_reason(ev.completion.finish_reason)), len(ev.completion.tokens)


# ---- the command -----------------------------------------------------------------------------------

def generation_defaults(model_dir: Path) -> tuple[float, float]:
    """(temperature, top_p) from the model's generation_config.json, else OpenAI's defaults (1, 1)."""
    try:
        if model_dir.is_file() and model_dir.suffix == ".gguf":
            from mimo.gguf import generation_config

            gen = generation_config(model_dir)  # general.sampling.* (as convert_hf_to_gguf writes them)
        else:
            gen = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError, MimoError):
        return 1.0, 1.0
    if not isinstance(gen, dict):
        return 1.0, 1.0
    t, p = gen.get("temperature", 1.0), gen.get("top_p", 1.0)
    t = float(t) if isinstance(t, int | float) and 0 <= t <= 2 else 1.0
    p = float(p) if isinstance(p, int | float) and 0 < p <= 1 else 1.0
    return (t, p) if gen.get("do_sample", True) else (0.0, 1.0)


def make_app(args, engine_in_background: bool = True) -> FastAPI:
    from mimo.inference.engine_args import load_engine

    if args.max_batch < 1 or args.max_queue < 0 or args.stream_interval < 1:
        raise MimoError("--max-batch and --stream-interval must be >= 1 and --max-queue >= 0")
    engine, tokenizer = load_engine(args, n_slots=args.max_batch, many_adapters=True)
    temperature, top_p = generation_defaults(Path(args.model))
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    name = args.served_model_name or Path(args.model).resolve().name
    if engine.adapters is not None and name in engine.adapters.names:
        raise MimoError(f"an adapter is named {name!r}, as the base model: name it NAME=DIR")
    cfg = ServeConfig(name, args.max_batch, args.max_queue, args.mtp, args.num_draft, api_key, temperature, top_p,
                      args.stream_interval, engine_in_background)
    return build_app(engine, tokenizer, cfg)


def run(args):
    """HTTP in a background thread (uvicorn), the engine loop in the main thread (where torch is fastest)."""
    import threading

    import uvicorn

    app = make_app(args, engine_in_background=False)
    s = app.state.service
    if args.compile:
        print("mimo serve: compiling the decode steps for every batch size (once; ~15 s each)", flush=True)
        s.loop.warm_up()
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    http = threading.Thread(target=server.run, name="mimo-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise MimoError(f"could not serve on {args.host}:{args.port} (see the message above)")
        time.sleep(0.05)
    auth = "API key required" if s.cfg.api_key else "no API key"
    print(f"mimo serve: {s.cfg.model_name} on http://{args.host}:{args.port} (web chat at /, OpenAI API at /v1; "
          f"batch {s.cfg.max_batch}, context {s.context}, MTP {'on' if s.loop.session.spec else 'off'}, {auth}); "
          "Ctrl-C stops", flush=True)
    watchdog = threading.Thread(target=lambda: (http.join(), s.loop.stop()), daemon=True)
    watchdog.start()  # the HTTP side ending (SIGTERM) ends the engine loop too
    try:
        s.loop.run()
    finally:
        server.should_exit = True
        http.join(timeout=30)


def add_arguments(p):
    from mimo.inference.engine_args import add_engine_arguments

    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a slot before 429")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed chunk after the first (as SGLang's): larger values cost the server "
                        "and its clients less per token, at the price of a less smooth stream")
    add_engine_arguments(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
