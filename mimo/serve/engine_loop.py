"""One engine loop for a server: a thread owns an EngineSession and serves every request from it.

asyncio handlers submit() requests from the event loop; the loop thread adds them to the running batch at its
next step (continuous batching: a row joins when a slot is free and leaves when it finishes), steps the batch,
and hands each request's events back to the event loop through an asyncio.Queue. Aborting a request (a client
that went away) frees its slot at the next step. Counters and histograms for /metrics live here too.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mimo.errors import MimoError
from mimo.inference.engine import Completion, Engine, Event
from mimo.inference.sampling import SamplingParams

log = logging.getLogger("mimo.serve")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class QueueFull(Exception):
    """More requests than running slots plus queue places."""


class ServerMetrics:
    """Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mimo_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mimo_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("mimo_generation_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("mimo_request_latency_seconds", "Time from request to its last token",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("mimo_time_to_first_token_seconds", "Time from request to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("mimo_running_requests", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("mimo_waiting_requests", "Sequences waiting for a batch slot", registry=r)
        self.batch_slots = Gauge("mimo_batch_slots", "Slots of the running batch (--max-batch)", registry=r)
        self.batch_slots.set(max_batch)
        self.occupancy = Histogram("mimo_batch_occupancy", "Share of the batch slots busy, per engine step",
                                   buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0), registry=r)
        self.steps = Counter("mimo_engine_steps", "Engine steps (decode or MTP draft-and-verify)", registry=r)
        self.aborted = Counter("mimo_aborted_requests", "Sequences stopped because their client left", registry=r)
        self.mtp_drafted = Counter("mimo_mtp_drafted_tokens", "Tokens drafted by the MTP layers", registry=r)
        self.mtp_accepted = Counter("mimo_mtp_accepted_tokens", "Drafted tokens the main model accepted",
                                    registry=r)
        self.mtp_acceptance = Gauge("mimo_mtp_acceptance_rate", "Accepted / drafted tokens since the start",
                                    registry=r)
        self._drafted = self._accepted = 0

    def finished(self, completion: Completion):
        self.generation_tokens.inc(len(completion.tokens))
        spec = completion.spec
        if spec is not None and spec.drafted:
            self.mtp_drafted.inc(spec.drafted)
            self.mtp_accepted.inc(spec.accepted)
            self._drafted += spec.drafted
            self._accepted += spec.accepted
            self.mtp_acceptance.set(self._accepted / self._drafted)


@dataclass(eq=False)
class Handle:
    """A submitted sequence, seen from the event loop. Its events go to the queue it shares with the other
    sequences of its HTTP request, as (handle, Event); the last is finished, or None when the engine refused
    the request (`error` says why) or it was aborted. stream_interval: the first token's event goes out at
    once, then one event per stream_interval tokens carrying their text (SGLang's --stream-interval); 0: the
    finished event only (a reply that is not streamed)."""
    prompt: list[int]
    params: SamplingParams
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    stream_interval: int = 1
    adapter: int | None = None  # the LoRA adapter's index in the engine (None: the engine's default)
    t_submit: float = field(default_factory=time.perf_counter)
    rid: int | None = None
    error: str | None = None
    internal_error: bool = False  # the error is a bug of ours, not the request's
    done: bool = False
    started: bool = False  # has produced its first token
    held_text: str = ""  # text generated since the last event delivered
    sent_tokens: int = 0  # tokens generated when the last event was delivered


def _put_all(items):
    for h, ev in items:
        h.events.put_nowait((h, ev))


class EngineLoop:
    def __init__(self, engine: Engine, max_batch: int, max_queue: int, mtp: bool, num_draft: int,
                 max_seq_len: int | None = None):
        self.engine = engine
        self._new_session = lambda: engine.session(max_batch, max_seq_len, mtp=mtp, num_draft=num_draft)
        self.session = self._new_session()
        self.max_seq_len = self.session.max_seq_len
        self.capacity = max_batch + max_queue  # sequences admitted at once: running + waiting
        self.metrics = ServerMetrics(max_batch)
        self.max_batch = max_batch
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # sequences submitted and not finished (guarded by _lock)
        self._lock = threading.Lock()
        self._handles: dict[int, Handle] = {}
        self._outbox: list[tuple[Handle, Event | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self):
        """Run the loop in a background thread. (Faster: call run() from the main thread, which is what
        `mimo serve` does; torch's CPU thread pool is much slower driven from a second thread once the main
        thread has used it: 2.6x on the tiny model, measured.)"""
        self._thread = threading.Thread(target=self.run, name="mimo-engine-loop", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop the loop (from any thread); the loop's thread closes the session when it leaves run()."""
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- called from the event loop -----------------------------------------------------------------

    def submit(self, requests: list[tuple[list[int], SamplingParams]], stream_interval: int = 1,
               adapter: int | None = None) -> tuple[list[Handle], asyncio.Queue]:
        """Queue sequences all at once or none (QueueFull); their events arrive on the returned queue, one per
        stream_interval tokens (0: only the finished ones; see Handle). adapter: the LoRA adapter they use."""
        with self._lock:
            if self._pending + len(requests) > self.capacity:
                raise QueueFull(f"the server is busy ({self._pending} sequences running or queued, room for "
                                f"{self.capacity}); retry later")
            self._pending += len(requests)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        handles = [Handle(prompt, params, events, loop, stream_interval, adapter) for prompt, params in requests]
        for h in handles:
            self._inbox.put(("add", h))
        return handles, events

    def abort(self, handles: list[Handle]):
        for h in handles:
            if not h.done:
                self._inbox.put(("abort", h))

    @property
    def pending(self) -> int:
        return self._pending

    # ---- the loop thread ----------------------------------------------------------------------------

    def warm_up(self):
        """Step batches of every size a compiled step specialises on (Engine(compile=True)), so that
        torch.compile runs before the first client instead of during its request. Call from run()'s thread."""
        runner = self.session.runner
        for b in sorted({runner.compiled_rows(m) for m in range(1, self.max_batch + 1)} - {0}):
            rids = [self.session.add([0] * 8, SamplingParams(max_new_tokens=4)) for _ in range(b)]
            while self.session.has_work():
                self.session.step()
            for rid in rids:
                self.session.abort(rid)

    def run(self):
        """Serve until stop()."""
        try:
            self._serve()
        finally:
            self.session.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                self._drain(block=not self.session.has_work())
                if self.session.has_work():
                    self._step()
            except Exception:  # a bug, not bad input (that is refused before it gets here): keep serving
                log.exception("engine step failed; failing the running requests and starting a fresh batch")
                self._fail_all("internal error in the engine step")
                self.session.close()
                self.session = self._new_session()
            self._flush()

    def _drain(self, block: bool):
        while True:
            try:
                cmd = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            if cmd is None:
                return
            action, h = cmd
            if action == "add":
                self._add(h)
            elif h.rid is not None and not h.done:
                self.session.abort(h.rid)
                self.metrics.aborted.inc()
                h.error = "aborted"
                self._finish(h, None)

    def _add(self, h: Handle):
        try:
            h.rid = self.session.add(h.prompt, h.params, h.adapter)
        except MimoError as e:
            h.error = str(e)
            self._finish(h, None)
            return
        self._handles[h.rid] = h
        self.metrics.prompt_tokens.inc(len(h.prompt))

    def _step(self):
        events = self.session.step()
        running = len(self.session.running())
        self.metrics.steps.inc()
        self.metrics.occupancy.observe(running / self.max_batch)
        self.metrics.running.set(running)
        self.metrics.waiting.set(len(self.session.waiting))
        for ev in events:
            h = self._handles.get(ev.request_id)
            if h is None:
                continue
            if not h.started:
                h.started = True
                self.metrics.ttft.observe(time.perf_counter() - h.t_submit)
            if ev.finished:
                self.metrics.finished(ev.completion)
                self._finish(h, Event(ev.request_id, h.held_text + ev.text, True, ev.completion))
                continue
            if not h.stream_interval:  # a reply that is not streamed: only its finished event goes out
                continue
            h.held_text += ev.text
            n = len(ev.completion.tokens)
            if h.sent_tokens == 0 or n - h.sent_tokens >= h.stream_interval:
                self._deliver(h, Event(ev.request_id, h.held_text, False, ev.completion))
                h.held_text, h.sent_tokens = "", n

    def _finish(self, h: Handle, ev: Event | None):
        """The sequence's last event (None: refused or aborted)."""
        h.done = True
        if h.rid is not None:
            self._handles.pop(h.rid, None)
            self.session.abort(h.rid)  # the session forgets it (a finished request keeps its finish_reason)
        with self._lock:
            self._pending -= 1
        self._deliver(h, ev)

    def _deliver(self, h: Handle, ev: Event | None):
        self._outbox.append((h, ev))

    def _flush(self):
        """Hand the events of this iteration to their event loops, one wake-up per loop (not one per token:
        each wake-up makes the two threads trade the GIL)."""
        if not self._outbox:
            return
        by_loop: dict = {}
        for h, ev in self._outbox:
            by_loop.setdefault(h.loop, []).append((h, ev))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
                pass

    def _fail_all(self, message: str):
        for h in list(self._handles.values()):
            self.session.abort(h.rid)
            h.error, h.internal_error = message, True
            self._finish(h, None)
