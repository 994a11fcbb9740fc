"""Where completions come from during evaluation: mimo's own engine, or any OpenAI-compatible server
(vLLM, SGLang, llama.cpp's server, `mimo serve`) with concurrency, timeouts and retries with backoff."""

from __future__ import annotations

import hashlib
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mimo.errors import MimoError


@dataclass
class Request:
    prompt: str  # a user message (chat) or the text to continue (raw)
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]


@dataclass
class Result:
    text: str
    completion_tokens: int
    latency_s: float
    finish_reason: str | None
    reasoning: str | None = None  # a server's separate reasoning_content, if any


def model_sha256(model_dir: Path) -> str:
    """sha256 over config.json and every weight file, in name order."""
    h = hashlib.sha256()
    files = [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


class EngineBackend:
    """mimo's engine, batched; MTP speculative decoding on by default (lossless, so results are unchanged).
    context: the model's (config.max_position_embeddings); a completion ends where prompt + completion fill it,
    and no KV cache is larger than it."""

    def __init__(self, model_dir, chat: bool = True, mtp: bool = True, quantize: str | None = None,
                 batch_size: int = 16, dtype: str = "auto"):
        from mimo.checkpoint import load_model_and_tokenizer
        from mimo.inference.engine import Engine

        self.model_dir = Path(model_dir)
        model, self.tokenizer = load_model_and_tokenizer(self.model_dir, dtype)
        if quantize:
            from mimo.quantize import quantize_model

            model = quantize_model(model, quantize)
        self.engine = Engine(model, self.tokenizer)
        self.context = self.engine.max_seq_len
        self.chat, self.mtp, self.batch_size = chat, mtp, batch_size
        self.name = str(self.model_dir)
        self.describe = {"backend": "engine", "model": self.name, "model_sha256": model_sha256(self.model_dir),
                         "mtp": mtp, "quantize": quantize, "batch_size": batch_size, "chat_template": chat}

    def _encode(self, prompt: str) -> list[int]:
        if self.chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def complete(self, requests: list[Request]) -> list[Result]:
        """Batches of batch_size; a prompt that does not fit the model's context is not run and comes back
        empty with finish_reason "prompt_too_long" (graded as wrong, and visible in samples.jsonl)."""
        from mimo.inference.sampling import SamplingParams

        encoded = [self._encode(r.prompt) for r in requests]
        fits = [i for i, ids in enumerate(encoded) if len(ids) < self.engine.max_seq_len]
        results = [Result("", 0, 0.0, "prompt_too_long") for _ in requests]
        for start in range(0, len(fits), self.batch_size):
            chunk = fits[start: start + self.batch_size]
            r0 = requests[chunk[0]]
            params = SamplingParams(max_new_tokens=r0.max_new_tokens, temperature=r0.temperature, top_p=r0.top_p,
                                    stop=r0.stop, seed=r0.seed)
            t0 = time.perf_counter()
            outs = self.engine.generate([encoded[i] for i in chunk], params, mtp=self.mtp)
            elapsed = time.perf_counter() - t0
            for i, o in zip(chunk, outs):
                results[i] = Result(o.text, len(o.tokens), elapsed, o.finish_reason)
        return results


class EndpointBackend:
    """An OpenAI-compatible HTTP server: /v1/chat/completions (chat) or /v1/completions (raw).

    context: the served model's max_model_len from /v1/models (vLLM, SGLang and `mimo serve` list it; None where
    a server does not). Servers refuse a request whose prompt + max_tokens exceed it, so a request that cannot
    have its max_new_tokens (known from the context, or refused as too long) goes without max_tokens, which they
    take as the rest of the context: the completion gets all the room there is, never more than asked."""

    def __init__(self, url: str, model: str, api_key: str | None = None, chat: bool = True, concurrency: int = 8,
                 timeout_s: float = 600.0, retries: int = 5):
        import httpx

        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.model, self.chat, self.concurrency, self.retries = model, chat, concurrency, retries
        self.retry_base_s = 1.0  # first backoff; doubles each retry, capped at 30 s
        key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout_s)
        self.name = f"{model} @ {self.base}"
        self.context = self._served_context()
        self.describe = {"backend": "endpoint", "url": self.base, "model": model, "concurrency": concurrency,
                         "chat_template": chat}

    def _served_context(self) -> int | None:
        """The model's max_model_len as /v1/models lists it; None when the server does not say."""
        import httpx

        try:
            resp = self.client.get(self.base + "/models")
            cards = (resp.json().get("data") or []) if resp.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):  # no server yet, not JSON, not an object
            return None
        card = next((c for c in cards if isinstance(c, dict) and c.get("id") == self.model),
                    cards[0] if len(cards) == 1 and isinstance(cards[0], dict) else {})
        context = card.get("max_model_len")
        return context if isinstance(context, int) and context > 0 else None

    def _body(self, r: Request, cap: bool = True) -> dict:
        """cap False: no max_tokens (the server's default, the rest of the context)."""
        body = {"model": self.model, "temperature": r.temperature, "top_p": r.top_p, "seed": r.seed}
        if cap and not (self.context and r.max_new_tokens >= self.context):
            body["max_tokens"] = r.max_new_tokens
        if r.stop:
            body["stop"] = r.stop[:4]  # the OpenAI API takes at most 4
        if self.chat:
            body["messages"] = [{"role": "user", "content": r.prompt}]
        else:
            body["prompt"] = r.prompt
        return body

    def _post(self, path: str, r: Request):
        """One request; a 400 for prompt + max_tokens past the context is sent again without max_tokens."""
        resp = self.client.post(self.base + path, json=self._body(r))
        if resp.status_code == 400 and "context length" in resp.text.lower():
            resp = self.client.post(self.base + path, json=self._body(r, cap=False))
        return resp

    def _one(self, r: Request) -> Result:
        import httpx

        path = "/chat/completions" if self.chat else "/completions"
        delay, last_error = self.retry_base_s, "no attempt"
        for attempt in range(self.retries + 1):
            t0 = time.perf_counter()
            try:
                resp = self._post(path, r)
            except httpx.HTTPError as e:  # connection refused, reset, timeout
                last_error = f"{e.__class__.__name__}: {e}"
            else:
                if resp.status_code == 200:
                    return self._parse(resp.json(), time.perf_counter() - t0)
                last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in (408, 409, 429) and resp.status_code < 500:
                    raise MimoError(f"{self.base}{path}: {last_error}")
            if attempt < self.retries:
                time.sleep(delay * (1 + random.random() * 0.25))
                delay = min(delay * 2, 30.0)
        raise MimoError(f"{self.base}{path}: gave up after {self.retries + 1} attempts ({last_error})")

    def _parse(self, data: dict, latency: float) -> Result:
        try:
            choice = data["choices"][0]
            if self.chat:
                msg = choice["message"]
                text, reasoning = msg.get("content") or "", msg.get("reasoning_content")
            else:
                text, reasoning = choice.get("text") or "", None
            tokens = (data.get("usage") or {}).get("completion_tokens") or 0
            return Result(text, tokens, latency, choice.get("finish_reason"), reasoning)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise MimoError(f"{self.base}: malformed response ({e.__class__.__name__}: {e})") from None

    def complete(self, requests: list[Request]) -> list[Result]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, requests))
